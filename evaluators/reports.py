"""Reports of an evaluation results store: the table of every cell, the paired comparisons of each allocator with
the uniform split (at equal budgets, and at 0.7x a budget against uniform at it), of each head split with the
uniform head split (same allocator, evictor and budget), and a PNG of quality vs budget."""

from __future__ import annotations

import math
from pathlib import Path

from squeezekit.config import LABEL_KEYS, Config

from .suite import RULER_TASKS

BASELINE = "uniform"
#: an allocator is compared with uniform at equal budgets and at this fraction of each uniform budget (0.7: 30% less
#: memory for the allocator)
SAVING = 0.7


def _task(unit_key: str) -> str:
    return unit_key.split("@")[0]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def parts(cell_key: str, cell: dict) -> tuple[str, str, float, str]:
    """(allocator, evictor, budget, variant) of a cell; the variant names any other key set (``p=0.8``)."""
    if cell_key == "full":
        return "(any)", "(any)", 1.0, ""
    config = cell["config"]
    rest = {k: v for k, v in config.items() if k not in LABEL_KEYS}
    variant = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(rest.items()))
    allocator, evictor = config.get("allocator", Config.allocator), config.get("evictor", Config.evictor)
    return allocator, evictor, float(config["budget"]), variant


def summarize(cell: dict, expected: list[str] | None = None) -> dict:
    """RULER mean (over RULER units), pass key accuracy, perplexity, multi-question accuracy (mean over those units),
    mean KV fraction of one cell.

    With ``expected`` unit keys, the RULER mean is given only when every expected RULER unit is there.
    """
    units = cell["units"]
    ruler = [u["value"] for k, u in units.items() if _task(k) in RULER_TASKS]
    if expected is not None and any(_task(k) in RULER_TASKS and k not in units for k in expected):
        ruler = []
    passkey = [u["value"] for k, u in units.items() if _task(k) == "squeezekit_passkey"]
    ppl = [u["value"] for k, u in units.items() if _task(k) == "squeezekit_ppl"]
    multi = [u["value"] for k, u in units.items() if _task(k).startswith("squeezekit_multiquestion")]
    kv = [u["kv_fraction"] for u in units.values() if u.get("kv_fraction") is not None]
    return {"ruler": _mean(ruler), "passkey": _mean(passkey), "ppl": _mean(ppl), "multi": _mean(multi), "kv": _mean(kv)}


def write_reports(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_table(data) + comparisons_markdown(data)
    if head_comparisons(data):
        text += head_comparisons_markdown(data)
    (out_dir / "results.md").write_text(text)
    try:
        plot(data, out_dir / "quality_vs_budget.png")
    except Exception as exc:  # a plot must never lose the numbers
        print(f"plot failed: {exc}")


def markdown_table(data: dict) -> str:
    cells = data["cells"]
    unit_keys = sorted({k for c in cells.values() for k in c["units"]})
    head = [*LABEL_KEYS, *unit_keys, "RULER mean", "KV kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(u):
        return "" if u is None else f"{u['value']:.3f} ± {u['stderr']:.3f}"

    def order(key):
        alloc, evict, budget, variant = parts(key, cells[key])
        return (key != "full", evict, -budget, alloc, variant)

    for key in sorted(cells, key=order):
        cell = cells[key]
        s = summarize(cell, unit_keys)
        alloc, evict, budget, variant = parts(key, cell)
        if variant:
            alloc += f" ({variant})"
        row = [
            alloc,
            evict,
            f"{budget:g}",
            *(fmt(cell["units"].get(k)) for k in unit_keys),
            "" if s["ruler"] is None else f"{s['ruler']:.3f}",
            "" if s["kv"] is None else f"{100 * s['kv']:.1f}%",
        ]
        lines.append("| " + " | ".join(row) + " |")
    meta = data.get("meta", {})
    setting = ", ".join(f"{k} {v}" for k, v in sorted(meta.items()))
    notes = [
        "",
        f"Setting: {setting}.",
        "Each cell: mean ± standard error over its samples (accuracy), or word perplexity ± its standard error "
        "(delta method over per-document NLL). KV kept: bytes of keys/values after prefill, over the full cache.",
        "",
    ]
    return "\n".join(lines + notes)


def _paired(a: dict, b: dict) -> tuple[float, float] | None:
    """Mean and standard error of the per-sample differences a - b (same samples in the same order)."""
    if len(a["scores"]) != len(b["scores"]) or not a["scores"]:
        return None
    d = [x - y for x, y in zip(a["scores"], b["scores"], strict=True)]
    return sum(d) / len(d), _sd(d) / math.sqrt(len(d))


def compare(data: dict, a_key: str, b_key: str, complete: bool = True) -> dict:
    """Paired comparison of two cells: RULER mean (a - b), pass key (a - b), perplexity ratio a / b.

    ``complete``: only when both cells hold every unit of the store; otherwise over the units they share.
    """
    cells = data["cells"]
    if a_key not in cells or b_key not in cells:
        return {}
    a, b = cells[a_key]["units"], cells[b_key]["units"]
    if complete and (set(a) != set(b) or set(a) != {k for c in cells.values() for k in c["units"]}):
        return {}  # an unfinished cell: no comparison
    out: dict = {}
    ruler = [r for k in a if k in b and _task(k) in RULER_TASKS if (r := _paired(a[k], b[k]))]
    if ruler:
        out["ruler"] = (sum(r[0] for r in ruler) / len(ruler), math.sqrt(sum(r[1] ** 2 for r in ruler)) / len(ruler))
    for k in a:
        if k in b and _task(k) == "squeezekit_passkey":
            out["passkey"] = _paired(a[k], b[k])
        if k in b and _task(k) == "squeezekit_ppl":
            d = _paired(a[k], b[k])  # per-document NLL per word: a - b
            if d:
                out["ppl_ratio"] = (a[k]["value"] / b[k]["value"], d[1])  # ratio, SE of the log ratio
    return out


def _own_params(allocator: str) -> set[str]:
    """The parameter names of an allocator (none when it is not installed here)."""
    from squeezekit.registry import registry

    try:
        return set(registry().get("allocator", allocator).params())
    except Exception:  # results written where other plugins were installed
        return set()


def comparisons(data: dict) -> list[dict]:
    """Every paired comparison of an allocator with uniform (at equal budgets and at `SAVING` x a budget), per
    evictor: an allocator cell is compared with the uniform cell of the same evictor parameters; its own parameters
    (a calibration profile) name it in the table."""
    cells = data["cells"]
    index = {}
    for key, cell in cells.items():
        if key == "full":
            continue
        alloc, evict, budget, _ = parts(key, cell)
        rest = {k: v for k, v in cell["config"].items() if k not in LABEL_KEYS}
        own = _own_params(alloc)
        mine = ",".join(f"{k}={v}" for k, v in sorted(rest.items()) if k in own)
        shared = ",".join(f"{k}={v}" for k, v in sorted(rest.items()) if k not in own)
        index[(alloc, mine, evict, shared, round(budget, 6))] = key
    allocators = sorted({(a, m) for (a, m, _, _, _) in index if a != BASELINE})
    evictors = sorted({(e, v) for (_, _, e, v, _) in index})
    rows = []
    for alloc, mine in allocators:
        for evict, shared in evictors:
            budgets = sorted({b for (a, _, e, v, b) in index if a == BASELINE and (e, v) == (evict, shared)})
            pairs = [(b, b) for b in budgets] + [(round(SAVING * b, 6), b) for b in budgets]
            for ab, ub in pairs:
                a_key = index.get((alloc, mine, evict, shared, ab))
                b_key = index.get((BASELINE, "", evict, shared, ub))
                c = compare(data, a_key, b_key) if a_key and b_key else {}
                if c:
                    name = f"{alloc} ({mine})" if mine else alloc
                    where = f"{evict} ({shared})" if shared else evict
                    rows.append({"allocator": name, "evictor": where, "budget": ab, "uniform_budget": ub, **c})
    return rows


def _difference_cells(row: dict) -> list[str]:
    """A paired comparison's RULER mean, pass key and perplexity-ratio cells, each with its error and ✓ / ✗."""
    r, pk, pr = row.get("ruler"), row.get("passkey"), row.get("ppl_ratio")
    return [
        "" if r is None else f"{r[0]:+.3f} ± {r[1]:.3f} {'✓' if r[0] >= 0 else '✗'}",
        "" if pk is None else f"{pk[0]:+.3f} ± {pk[1]:.3f} {'✓' if pk[0] >= 0 else '✗'}",
        "" if pr is None else f"{pr[0]:.3f} ± {pr[1]:.3f} {'✓' if pr[0] <= 1 else '✗'}",
    ]


def comparisons_markdown(data: dict) -> str:
    lines = [
        "",
        "### Each allocator vs uniform (paired over the same samples)",
        "",
        "Differences allocator - uniform ± standard error of the paired difference; perplexity as the ratio "
        "allocator / uniform (< 1: the allocator is better) ± the standard error of its log. ✓: at least as good.",
        "",
        "| allocator | evictor | its budget | uniform budget | RULER mean diff | pass key diff | perplexity ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in comparisons(data):
        cols = _difference_cells(row)
        lines.append(
            f"| {row['allocator']} | {row['evictor']} | {row['budget']:g} | {row['uniform_budget']:g} | "
            + " | ".join(cols)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _head_params(split: str) -> set[str]:
    """The parameter names of a head split (none when it is not installed here)."""
    from squeezekit.registry import registry

    try:
        return set(registry().get("heads", split).params())
    except Exception:  # results written where other plugins were installed
        return set()


def head_comparisons(data: dict) -> list[dict]:
    """Every paired comparison of a cell with a head split (``heads`` set, not uniform) with the cell of the same
    config under the uniform head split (``heads`` and the split's own parameters removed)."""
    cells = data["cells"]
    by_config = {
        tuple(sorted((k, str(v)) for k, v in cell["config"].items())): key for key, cell in cells.items()
    }  # fmt: skip
    rows = []
    for key, cell in cells.items():
        config = cell["config"]
        split = config.get("heads", "uniform")
        if key == "full" or split == "uniform":
            continue
        own = _head_params(split)
        base = {k: v for k, v in config.items() if k != "heads" and k not in own}
        b_key = by_config.get(tuple(sorted((k, str(v)) for k, v in base.items())))
        c = compare(data, key, b_key) if b_key else {}
        if c:
            alloc, evict, budget, _ = parts(key, cell)
            params = ",".join(f"{k}={config[k]}" for k in sorted(own) if k in config)
            rows.append({
                "heads": f"{split} ({params})" if params else split, "allocator": alloc, "evictor": evict,
                "budget": budget, **c,
            })  # fmt: skip
    rows.sort(key=lambda r: (r["heads"], r["evictor"], r["allocator"], r["budget"]))
    return rows


def head_comparisons_markdown(data: dict) -> str:
    lines = [
        "",
        "### Each head split vs the uniform head split (paired over the same samples)",
        "",
        "Same allocator, evictor and budget; differences split - uniform ± standard error of the paired difference; "
        "perplexity as the ratio split / uniform (< 1: the split is better) ± the standard error of its log. ✓: at "
        "least as good.",
        "",
        "| head split | allocator | evictor | budget | RULER mean diff | pass key diff | perplexity ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in head_comparisons(data):
        cols = _difference_cells(row)
        lines.append(
            f"| {row['heads']} | {row['allocator']} | {row['evictor']} | {row['budget']:g} | " + " | ".join(cols) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path:
    """Write `figure` of ``data`` to ``path`` (a PNG)."""
    from squeezekit.plotting import pyplot

    fig = figure(data)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _wrapped(text: str, width_inches: float, points: float) -> str:
    """``text`` in lines that fit ``width_inches`` at a font of ``points`` (a character is at most about 0.62 em)."""
    import textwrap

    return textwrap.fill(text, width=max(12, int(width_inches * 72 / (0.62 * points))))


def figure(data: dict):
    """Quality vs budget: a column per evictor, a row per measure (RULER, pass key, perplexity), a line per
    allocator. Laid out by matplotlib's constrained layout, the title wrapped to the figure's width: every label
    lies within the figure, however few the columns and long the model's name."""
    import matplotlib.ticker

    from squeezekit.plotting import pyplot

    plt = pyplot()
    cells = data["cells"]
    expected = sorted({k for c in cells.values() for k in c["units"]})
    points = {key: (parts(key, cell), summarize(cell, expected)) for key, cell in cells.items()}
    evictors = sorted({p[1] for (p, _) in points.values() if p[1] != "(any)"}) or ["full cache"]
    allocators = sorted({p[0] for (p, _) in points.values() if p[0] != "(any)" and not p[3]})
    rows = [
        ("ruler", "RULER mean (accuracy)"),
        ("passkey", "pass key accuracy"),
        ("ppl", "word perplexity (lower is better)"),
        ("multi", "multi-question accuracy"),
    ]
    rows = [r for r in rows if any(s[r[0]] is not None for (_, s) in points.values())]
    size = (4.2 * len(evictors), 3.2 * len(rows))
    fig, axes = plt.subplots(len(rows), len(evictors), figsize=size, squeeze=False, layout="constrained")
    full = points["full"][1] if "full" in points else None
    budgets = sorted({p[2] for (p, _) in points.values()})
    for j, evictor in enumerate(evictors):
        for i, (metric, label) in enumerate(rows):
            ax = axes[i][j]
            for allocator in allocators:
                pts = sorted(
                    (p[2], s[metric])
                    for (p, s) in points.values()
                    if p[:2] == (allocator, evictor) and not p[3] and s[metric] is not None
                )
                if full and full[metric] is not None:
                    pts.append((1.0, full[metric]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=allocator)
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(evictor)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(rows) - 1:
                ax.set_xlabel(_wrapped("mean KV budget (fraction of the prompt)", size[0] / len(evictors) - 0.6, 10))
            ax.legend(fontsize=8)
    model = Path(str(data.get("meta", {}).get("model", "?"))).name
    title = 12.0
    fig.suptitle(_wrapped(f"squeezekit on {model}: quality vs KV budget", size[0] - 0.2, title), fontsize=title)
    return fig

"""``squeezekit bench``'s reports: the markdown table (printed, and written with the JSON and a PNG of decode
throughput when ``--out`` is given).

A figure the device cannot give (peak memory on the CPU: there are no allocator statistics to reset) reads ``n/a``,
never ``nan``; the JSON holds it as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

NA = "n/a"
COLUMNS = (
    "method", "B", "prefill s", "decode tok/s", "end-to-end tok/s", "step ms", "floor ms", "peak GiB", "KV {unit}",
    "prefill peak KV {unit}", "policy % of prefill",
)  # fmt: skip


def stem(results: dict) -> str:
    """The reports' file name without suffix: ``bench-MODEL`` (``-Ngpu`` when sharded)."""
    return f"bench-{results['config']}" + (f"-{results['gpus']}gpu" if results.get("gpus", 1) > 1 else "")


def cell(value: float | None) -> str:
    """A measured figure as the table shows it: ``n/a`` when it is unknown (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return str(value)


def kv_unit(runs: list[dict]) -> tuple[str, int]:
    """The KV columns' unit: GiB, or MiB when no run keeps a tenth of a GiB (a tiny model's KV is not 0.00 GiB)."""
    largest = max((r.get("kv_bytes_peak_prefill") or r["kv_bytes"] for r in runs if not r.get("oom")), default=0)
    return ("GiB", 2**30) if largest >= 2**30 / 10 else ("MiB", 2**20)


def bandwidth(bps: float | None) -> str:
    """A copy bandwidth in TB/s, or GB/s below 1 TB/s (a CPU's)."""
    if bps is None or math.isnan(bps):
        return NA
    return f"{bps / 1e12:.2f} TB/s" if bps >= 1e12 else f"{bps / 1e9:.1f} GB/s"


def table(runs: list[dict]) -> list[str]:
    """The markdown table's lines: a header, then one row per run."""
    unit, size = kv_unit(runs)
    lines = ["| " + " | ".join(COLUMNS).format(unit=unit) + " |", "|" + "---|" * len(COLUMNS)]
    for r in runs:
        if r.get("oom"):
            lines.append(f"| {r['method']} | {r['B']} | OOM |" + " |" * (len(COLUMNS) - 3))
            continue
        share, peak_kv = r.get("policy_share_of_prefill"), r.get("kv_bytes_peak_prefill")
        cells = [
            r["method"], r["B"], r["prefill_s"], r["decode_tok_s"], r["e2e_tok_s"], r["step_ms"],
            cell(r.get("floor_step_ms")), cell(r.get("peak_gib")), f"{r['kv_bytes'] / size:.2f}",
            "" if peak_kv is None else f"{peak_kv / size:.2f}", "" if share is None else f"{100 * share:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def memory_table(runs: list[dict]) -> list[str]:
    """The squeezekit runs' cache as squeezekit counts it (`SqueezeCache.nbytes`: keys, values and bookkeeping) next
    to what CUDA held beyond the run's start once the prefill was done, and the KV heads' budget range."""
    rows = [r for r in runs if not r.get("oom") and r.get("cache_nbytes") is not None]
    if not rows:
        return []
    lines = [
        "| method | B | cache MiB (squeezekit) | CUDA held after prefill, MiB | held / cache | head budgets |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        held = r.get("cuda_allocated_after_prefill")
        lo, hi = r.get("head_budget_min"), r.get("head_budget_max")
        heads = "" if lo is None or lo < 0 else (f"{lo}" if lo == hi else f"{lo} to {hi}")
        cells = [
            r["method"], r["B"], f"{r['cache_nbytes'] / 2**20:.1f}", NA if held is None else f"{held / 2**20:.1f}",
            NA if held is None else f"{held / r['cache_nbytes']:.3f}", heads,
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def check_line(c: dict) -> str:
    if "not_run" in c:
        return f"- {c['method']} vs {c['reference']}: not run: {c['not_run']}"
    line = f"- {c['method']} vs {c['reference']}: {100 * c['token_agreement']:.1f}% of greedy tokens agree"
    if "logit_scale" in c:
        line += f"; prefill logits max abs diff {c['prefill_logits_max_abs_diff']} (logits up to {c['logit_scale']})"
    return line


def markdown(results: dict) -> str:
    """The report as markdown: the setting, one table row per run, why a ladder stopped early, the checks."""
    text = (
        f"# squeezekit bench: {results['config']} on {results['device']}\n\n"
        f"torch {results['torch']}, transformers {results['transformers']}, prompts {results['prompt_len']} tokens, "
        f"{results['new_tokens']} new tokens, copy bandwidth {bandwidth(results.get('copy_bandwidth_Bps'))}.\n\n"
        + "\n".join(table(results["runs"]))
        + "\n"
    )
    memory = memory_table(results["runs"])
    if memory:
        text += "\nMemory (what CUDA holds includes the first decode tokens and the allocator's rounding):\n\n"
        text += "\n".join(memory) + "\n"
    if results.get("notes"):
        text += "\n" + "\n".join(f"- {note}" for note in results["notes"]) + "\n"
    if results["checks"]:
        text += "\nCorrectness (same inputs):\n\n" + "\n".join(map(check_line, results["checks"])) + "\n"
    return text


def write_reports(results: dict, out: Path) -> None:
    """``bench-MODEL.json``, ``.md`` (the `markdown` report) and ``.png`` (decode throughput vs batch size) in
    ``out``, and the profile's text when there is one."""
    out.mkdir(parents=True, exist_ok=True)
    name = stem(results)
    if "profile" in results:
        (out / f"profile-{name[6:]}.txt").write_text(results["profile"])
    (out / f"{name}.json").write_text(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))
    (out / f"{name}.md").write_text(markdown(results))
    plot(results, out / f"{name}.png")


def plot(results: dict, path: Path) -> None:
    """Decode tokens/s against batch size, one line per method."""
    from squeezekit.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for name in dict.fromkeys(r["method"] for r in results["runs"]):
        pts = [(r["B"], r["decode_tok_s"]) for r in results["runs"] if r["method"] == name and not r.get("oom")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"{results['config']}, {results['prompt_len']}-token prompts, {results['device']}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

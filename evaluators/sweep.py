"""Offline quality evaluation: one config or a sweep of allocator x evictor x budget, through lm-eval.

A *suite* is a list of units ``TASK@LENGTH:N`` (N samples of TASK at a prompt of about LENGTH tokens), e.g.
``niah_single_1@1024:16,squeezekit_passkey@2048:8,squeezekit_ppl@1024:8``. Tasks are lm-eval's offline RULER
tasks (``niah_single_1``, ``niah_multikey_2``, ``niah_multikey_3``, ``ruler_vt``, ``ruler_cwe``, ``ruler_fwe``) and
squeezekit's own (``squeezekit_ppl``: perplexity, ``squeezekit_passkey``: pass key retrieval; YAMLs in
``squeezekit/evaluators/tasks``, data built at run time from a local public-domain text, see tasks/utils.py).

The model and the task data are built once; each cell only swaps the compression config. Results go to
``OUT/results.json`` after every unit (a rerun skips what is there: resumable), then ``results.md`` and
``quality_vs_budget.png``. Per-sample scores are kept, so any two cells can be compared pairwise.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
OWN_TASKS = ("squeezekit_ppl", "squeezekit_passkey")
TASKS_DIR = Path(__file__).parent / "tasks"
#: generation length per task: enough for the answer (RULER's own defaults generate up to 128 tokens)
MAX_GEN_TOKS = {
    "niah_single_1": 12,
    "niah_multikey_2": 12,
    "niah_multikey_3": 40,
    "ruler_vt": 30,
    "ruler_cwe": 60,
    "ruler_fwe": 20,
    "squeezekit_passkey": 8,
}
DEFAULT_SUITE = "niah_single_1@1024:8,niah_single_1@2048:4,ruler_fwe@1024:4,squeezekit_passkey@1024:8,squeezekit_ppl@1024:4"
SWEEP_ALLOCATORS = ("uniform", "squeeze")
SWEEP_EVICTORS = ("streaming", "sliding_window", "h2o")
SWEEP_BUDGETS = (0.1, 0.14, 0.2, 0.28, 0.4, 1.0)
#: the order cells run in: the full cache, then the budgets the targets compare, then the rest
PRIORITY = (1.0, 0.2, 0.4, 0.14, 0.28, 0.1)


@dataclass(frozen=True)
class Unit:
    task: str
    length: int
    n: int

    @property
    def key(self) -> str:
        return f"{self.task}@{self.length}"

    @property
    def kind(self) -> str:
        return "ppl" if self.task == "squeezekit_ppl" else "passkey" if self.task == "squeezekit_passkey" else "ruler"


def parse_suite(text: str) -> list[Unit]:
    from squeezekit.errors import ConfigError

    units = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            head, n = item.rsplit(":", 1)
            task, length = head.split("@")
            unit = Unit(task, int(length), int(n))
        except ValueError:
            raise ConfigError("--suite", item, "expected TASK@LENGTH:N, e.g. niah_single_1@1024:16", "command line") from None
        if unit.task not in RULER_TASKS + OWN_TASKS:
            raise ConfigError("--suite", item, f"unknown task; offline tasks: {', '.join(RULER_TASKS + OWN_TASKS)}", "command line")
        units.append(unit)
    return units


def cell_key(config) -> str:
    """``allocator/evictor/budget``, plus ``/k=v,...`` for any other key set (``full`` for budget 1)."""
    if config.full:
        return "full"
    key = f"{config.allocator}/{config.evictor}/{config.budget:g}"
    extra = {k: v for k, v in config.as_dict().items() if k not in ("allocator", "evictor", "budget")}
    return key + ("/" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(extra.items())) if extra else "")


def _variant(key: str) -> str:
    parts = key.split("/")
    return parts[3] if len(parts) > 3 else ""


def _cap_ruler_samples(cap: int) -> None:
    """RULER builds 500 samples per length at load time; the sweep needs the first ``cap`` only (same samples)."""
    import functools
    import importlib

    for name in ("niah_utils", "vt_utils", "cwe_utils", "fwe_utils"):
        module = importlib.import_module(f"lm_eval.tasks.ruler.{name}")
        for attr, fn in list(vars(module).items()):
            if callable(fn) and getattr(fn, "__module__", "").startswith("lm_eval.tasks.ruler") and not hasattr(fn, "_capped"):
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                if "num_samples" in params and attr not in ("get_dataset",):

                    def capped(*args, _fn=fn, **kwargs):
                        if kwargs.get("num_samples", 0) > cap:
                            kwargs["num_samples"] = cap
                        return _fn(*args, **kwargs)

                    capped._capped = True
                    functools.update_wrapper(capped, fn)
                    setattr(module, attr, capped)


class Evaluator:
    """A loaded model plus loaded task data; `run(config, unit)` evaluates one unit under one config."""

    def __init__(self, model_dir: str | None, units: list[Unit], batch_size: int = 4, text_file: str | None = None,
                 extend_chunk: int | None = None, device: str | None = None, dtype: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from squeezekit.models import default_model_dir

        self.model_dir = str(model_dir or default_model_dir())
        self.units = units
        self.text_file = text_file
        if any(u.kind == "ruler" for u in units):
            _cap_ruler_samples(max(max(u.n for u in units), 1))
        from .lm_eval_adapter import SqueezekitLM

        extra = {} if extend_chunk is None else {"extend_chunk": extend_chunk}
        self.device, self.dtype = resolve_device(device, dtype)
        self.lm = SqueezekitLM(pretrained=self.model_dir, batch_size=batch_size, budget=1.0, device=self.device,
                               dtype=self.dtype, **extra)
        self._loaded: dict[str, dict] = {}
        self._tm = None

    def _load(self, unit: Unit) -> dict:
        if unit.key in self._loaded:
            return self._loaded[unit.key]
        from lm_eval.tasks import TaskManager

        metadata = {"max_seq_lengths": [unit.length], "pretrained": self.model_dir, "tokenizer": self.model_dir,
                    "num_samples": unit.n}
        if self.text_file:
            metadata["text_file"] = self.text_file
        if self._tm is None:  # indexing lm-eval's task folder takes seconds: once, then swap the metadata
            self._tm = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
        factory = getattr(self._tm, "_factory", None)
        if factory is not None and hasattr(factory, "_meta"):
            self._tm.metadata, factory._meta = metadata, metadata
        else:
            self._tm = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
        loaded = self._tm.load([unit.task])
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            if task.get_config("output_type") == "generate_until" and unit.task in MAX_GEN_TOKS:
                task.set_config(key="generation_kwargs", value={"max_gen_toks": MAX_GEN_TOKS[unit.task]}, update=True)
        self._loaded[unit.key] = loaded
        return loaded

    def run(self, config, unit: Unit) -> dict:
        """Evaluate one unit under one config: per-sample scores and their summary."""
        from lm_eval.evaluator import evaluate

        loaded = self._load(unit)
        self.lm.squeeze_config = config
        self.lm.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
        t0 = time.time()
        out = evaluate(lm=self.lm, task_dict=loaded, limit=unit.n, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        seconds = time.time() - t0
        samples = next(iter(out["samples"].values()))
        samples = sorted(samples, key=lambda s: s["doc_id"])
        if unit.kind == "ppl":
            pairs = [s["word_perplexity"] for s in samples]
            scores = [-ll / words for ll, words in pairs]  # per-document NLL per word
            total_ll, total_words = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            value = math.exp(-total_ll / total_words)
            sd = _sd(scores)
            result = {"metric": "word_perplexity", "value": value, "stderr": value * sd / math.sqrt(len(scores))}
        else:
            metric = "acc" if unit.kind == "passkey" else str(unit.length)
            scores = [float(s[metric]) for s in samples]
            mean = sum(scores) / len(scores)
            result = {"metric": "accuracy", "value": mean, "stderr": _sd(scores) / math.sqrt(len(scores))}
        kv = self.lm.kv_bytes
        result.update(
            n=len(scores),
            scores=scores,
            seconds=round(seconds, 1),
            kv_fraction=(kv["kept"] / kv["full"]) if kv["full"] else None,
        )
        return result


def resolve_device(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """``(device, dtype)``: CUDA when there is one, else the CPU; bfloat16 on CUDA, float32 on the CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or ("bfloat16" if device.startswith("cuda") else "float32")


#: what results written before the device was recorded ran on (the CPU sweeps of docs/results)
UNRECORDED_DEVICE = {"device": "cpu", "dtype": "float32"}


def check_device(data: dict, device: str, dtype: str, path: Path) -> None:
    """Results of one store come from one device kind and dtype: another one is a `ConfigError`."""
    from squeezekit.errors import ConfigError

    if not data["cells"]:
        return
    meta = data.get("meta", {})
    have = {k: meta.get(k, UNRECORDED_DEVICE[k]) for k in ("device", "dtype")}
    want = {"device": device.split(":")[0], "dtype": dtype}
    if have != want:
        raise ConfigError(
            "--device/--dtype", f"{want['device']}/{want['dtype']}",
            f"{path} holds results from {have['device']}/{have['dtype']}; give another --out (results of different "
            f"devices or dtypes are not mixed in one store)", "command line",
        )  # fmt: skip


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def sweep_configs(allocators, evictors, budgets, extra: dict | None = None) -> list:
    """Every allocator x evictor x budget config; budget 1 (the full cache, identical for all) appears once."""
    from squeezekit.config import Config

    configs, seen = [], set()
    for budget in budgets:
        for evictor in evictors:
            for allocator in allocators:
                c = Config.from_mapping({"allocator": allocator, "evictor": evictor, "budget": budget, **(extra or {})},
                                        source="--sweep")
                if cell_key(c) not in seen:
                    seen.add(cell_key(c))
                    configs.append(c)
    # The full-cache reference first, then the budgets the comparisons need most (a cut-short sweep keeps those).
    order = {b: i for i, b in enumerate(PRIORITY)}
    configs.sort(key=lambda c: (not c.full, order.get(c.budget, len(order)), -c.budget))
    return configs


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "cells": {}}


def save_results(path: Path, data: dict) -> dict:
    """Merge ``data`` into the file (under a lock: shards of one sweep share it) and return the merged whole."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = load_results(path)
        merged["meta"].update(data.get("meta", {}))
        for key, cell in data["cells"].items():
            into = merged["cells"].setdefault(key, {k: v for k, v in cell.items() if k != "units"} | {"units": {}})
            into["units"].update(cell["units"])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return merged


def run_sweep(configs, units: list[Unit], out_dir: Path, model_dir=None, batch_size=4, text_file=None,
              extend_chunk=None, progress=True, shard: tuple[int, int] = (0, 1), device: str | None = None,
              dtype: str | None = None) -> dict:
    """Run every (config, unit) not yet in ``out_dir/results.json``; write the JSON, table and plot.

    ``shard=(i, n)`` runs only configs i, i+n, i+2n, ...: n processes (say one per core, each single-threaded)
    share one sweep and one results file. ``device``/``dtype`` (default `resolve_device`'s) are recorded in the
    results' meta; a store holding results of another device or dtype is refused (`check_device`).
    """
    from tqdm import tqdm

    path = out_dir / "results.json"
    configs = configs[shard[0] :: shard[1]]
    data = load_results(path)
    device, dtype = resolve_device(device, dtype)
    check_device(data, device, dtype, path)
    todo = [(c, u) for c in configs for u in units if u.key not in data["cells"].get(cell_key(c), {}).get("units", {})]
    evaluator = None
    bar = tqdm(total=len(configs) * len(units), initial=len(configs) * len(units) - len(todo), desc="sweep",
               disable=not progress, unit="unit", dynamic_ncols=True)
    for config, unit in todo:
        if evaluator is None:
            evaluator = Evaluator(model_dir, units, batch_size, text_file, extend_chunk, device, dtype)
            from .tasks.utils import find_text  # the same resolution the tasks use

            data["meta"].update(
                model=evaluator.model_dir,
                suite=",".join(f"{u.key}:{u.n}" for u in units),
                text=find_text(text_file)[1],
                extend_chunk=evaluator.lm.extend_chunk,
                rolling_prompt=evaluator.lm.rolling_prompt,
                batch_size=batch_size,
                device=device.split(":")[0],
                dtype=dtype,
            )
        bar.set_postfix_str(f"{cell_key(config)} {unit.key}")
        result = evaluator.run(config, unit)
        cell = data["cells"].setdefault(cell_key(config), {"config": config.as_dict(), "describe": config.describe(), "units": {}})
        cell["units"][unit.key] = result
        data = save_results(path, data)
        bar.update(1)
    bar.close()
    data = save_results(path, data)
    write_reports(data, out_dir)
    return data


# -- reports --------------------------------------------------------------------------------------------------------------
def summarize(cell: dict, expected: list[str] | None = None) -> dict:
    """RULER mean (over RULER units), pass key accuracy, perplexity, mean KV fraction of one cell.

    With ``expected`` unit keys, the RULER mean is given only when every expected RULER unit is there.
    """
    units = cell["units"]
    ruler = [u["value"] for k, u in units.items() if k.split("@")[0] in RULER_TASKS]
    if expected is not None and any(k.split("@")[0] in RULER_TASKS and k not in units for k in expected):
        ruler = []
    passkey = [u["value"] for k, u in units.items() if k.startswith("squeezekit_passkey")]
    ppl = [u["value"] for k, u in units.items() if k.startswith("squeezekit_ppl")]
    kv = [u["kv_fraction"] for u in units.values() if u.get("kv_fraction") is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"ruler": mean(ruler), "passkey": mean(passkey), "ppl": mean(ppl), "kv": mean(kv)}


def _budget_of(key: str) -> float:
    return 1.0 if key == "full" else float(key.split("/")[2])


def write_reports(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown_table(data) + comparisons_markdown(data))
    try:
        plot(data, out_dir / "quality_vs_budget.png")
    except Exception as exc:  # a plot must never lose the numbers
        print(f"plot failed: {exc}")


def markdown_table(data: dict) -> str:
    cells = data["cells"]
    unit_keys = sorted({k for c in cells.values() for k in c["units"]})
    head = ["allocator", "evictor", "budget", *unit_keys, "RULER mean", "KV kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(u):
        if u is None:
            return ""
        if u["metric"] == "word_perplexity":
            return f"{u['value']:.3f} ± {u['stderr']:.3f}"
        return f"{u['value']:.3f} ± {u['stderr']:.3f}"

    order = sorted(cells, key=lambda k: (k != "full", k.split("/")[1] if k != "full" else "", -_budget_of(k), k))
    for key in order:
        cell = cells[key]
        s = summarize(cell, unit_keys)
        alloc, evict = ("(any)", "(any)") if key == "full" else key.split("/")[:2]
        if _variant(key):
            alloc += f" ({_variant(key)})"
        row = [alloc, evict, f"{_budget_of(key):g}", *(fmt(cell["units"].get(k)) for k in unit_keys),
               "" if s["ruler"] is None else f"{s['ruler']:.3f}", "" if s["kv"] is None else f"{100 * s['kv']:.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    meta = data.get("meta", {})
    notes = [
        "",
        f"Model: {meta.get('model', '?')}; text: {meta.get('text', '?')}; suite: {meta.get('suite', '?')}; "
        f"extend_chunk {meta.get('extend_chunk', '?')}, rolling_prompt {meta.get('rolling_prompt', '?')}; "
        f"{meta.get('device', UNRECORDED_DEVICE['device'])}, {meta.get('dtype', UNRECORDED_DEVICE['dtype'])}.",
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

    ``complete``: only when both cells hold every unit of the sweep; otherwise over the units they share.
    """
    cells = data["cells"]
    if a_key not in cells or b_key not in cells:
        return {}
    a, b = cells[a_key]["units"], cells[b_key]["units"]
    if complete and (set(a) != set(b) or set(a) != {k for c in cells.values() for k in c["units"]}):
        return {}  # an unfinished cell: no comparison
    out: dict = {}
    ruler = [(_paired(a[k], b[k])) for k in a if k in b and k.split("@")[0] in RULER_TASKS]
    ruler = [r for r in ruler if r]
    if ruler:
        out["ruler"] = (sum(r[0] for r in ruler) / len(ruler), math.sqrt(sum(r[1] ** 2 for r in ruler)) / len(ruler))
    for k in a:
        if k in b and k.startswith("squeezekit_passkey"):
            out["passkey"] = _paired(a[k], b[k])
        if k in b and k.startswith("squeezekit_ppl"):
            d = _paired(a[k], b[k])  # per-document NLL per word: a - b
            if d:
                out["ppl_ratio"] = (a[k]["value"] / b[k]["value"], d[1])  # ratio, SE of the log ratio
    return out


def comparisons_markdown(data: dict) -> str:
    """squeeze vs uniform at equal budgets, and squeeze at 0.7x a budget vs uniform at it (paired)."""
    cells = data["cells"]
    evictors = sorted({k.split("/")[1] for k in cells if k != "full" and not _variant(k)})
    pairs = [(b, b) for b in (0.1, 0.14, 0.2, 0.28, 0.4)] + [(0.14, 0.2), (0.28, 0.4)]
    lines = [
        "",
        "### squeeze vs uniform (paired over the same samples)",
        "",
        "Differences squeeze - uniform ± standard error of the paired difference; perplexity as the ratio "
        "squeeze / uniform (< 1: squeeze better) ± the standard error of its log. ✓: squeeze at least as good.",
        "",
        "| evictor | squeeze budget | uniform budget | RULER mean diff | pass key diff | perplexity ratio |",
        "|---|---|---|---|---|---|",
    ]
    for evictor in evictors:
        for sb, ub in pairs:
            c = compare(data, f"squeeze/{evictor}/{sb:g}", f"uniform/{evictor}/{ub:g}")
            if not c:
                continue
            r, pk, pr = c.get("ruler"), c.get("passkey"), c.get("ppl_ratio")
            cols = [
                "" if r is None else f"{r[0]:+.3f} ± {r[1]:.3f} {'✓' if r[0] >= 0 else '✗'}",
                "" if pk is None else f"{pk[0]:+.3f} ± {pk[1]:.3f} {'✓' if pk[0] >= 0 else '✗'}",
                "" if pr is None else f"{pr[0]:.3f} ± {pr[1]:.3f} {'✓' if pr[0] <= 1 else '✗'}",
            ]
            lines.append(f"| {evictor} | {sb:g} | {ub:g} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cells = data["cells"]
    expected = sorted({k for c in cells.values() for k in c["units"]})

    def summ(cell):  # a cell's RULER mean only when all its RULER units are there
        return summarize(cell, expected)

    evictors = sorted({k.split("/")[1] for k in cells if k != "full"}) or ["full cache"]
    allocators = sorted({k.split("/")[0] for k in cells if k != "full"})
    rows = [("ruler", "RULER mean (accuracy)"), ("passkey", "pass key accuracy"), ("ppl", "word perplexity (lower is better)")]
    rows = [r for r in rows if any(summ(c)[r[0]] is not None for c in cells.values())]
    fig, axes = plt.subplots(len(rows), len(evictors), figsize=(4.2 * len(evictors), 3.2 * len(rows)), squeeze=False)
    full = summ(cells["full"]) if "full" in cells else None
    for j, evictor in enumerate(evictors):
        for i, (metric, label) in enumerate(rows):
            ax = axes[i][j]
            for allocator in allocators:
                pts = sorted(
                    (_budget_of(k), summ(c)[metric])
                    for k, c in cells.items()
                    if k != "full" and k.split("/")[:2] == [allocator, evictor] and not _variant(k)
                    and summ(c)[metric] is not None
                )
                if full and full[metric] is not None:
                    pts.append((1.0, full[metric]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=allocator)
            ax.set_xscale("log")
            ax.set_xticks([0.1, 0.14, 0.2, 0.28, 0.4, 1.0])
            ax.set_xticklabels(["0.1", ".14", "0.2", ".28", "0.4", "1"])
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(evictor)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(rows) - 1:
                ax.set_xlabel("mean KV budget (fraction of the prompt)")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())

            ax.legend(fontsize=8)
    fig.suptitle(f"squeezekit on {Path(data.get('meta', {}).get('model', '?')).name}: quality vs KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The pooling figures of docs/results/head-split-smollm2-h200/README.md from sweep stores, paired sample by sample
(stores of one model and text hold the same samples: every process builds the same ones), with the sweep reports'
own pairing (`squeezekit.evaluators.reports`: accuracy differences, perplexity as the ratio of the two cells'
perplexities with the standard error of its log).

    python docs/results/head-split-smollm2-h200/pooling/paired.py kernels K7/results.json K21/results.json 0.2,0.1,0.05
        # the table: each cell of both stores against the uniform split of the first (snapkv's kernel_size 7)
    python docs/results/head-split-smollm2-h200/pooling/paired.py split STORE/results.json 0.2,0.1,0.05 [KEY=VALUE]
        # adaptive against uniform within one store, unit by unit (the adaptive cells with that setting, e.g.
        # safeguard=0.5; without one, the cells that set nothing beyond the split)
"""

import json
import sys

from squeezekit.evaluators.reports import _paired

UNITS = ["niah_single_1@1024:16", "ruler_fwe@1024:16", "squeezekit_passkey@1024:16", "squeezekit_ppl@1024:16"]


def cells(path: str) -> dict:
    return json.load(open(path))["cells"]


def find(store: dict, budget: float, heads: str, setting: tuple[str, float] | None = None) -> dict:
    """The units of the store's cell at ``budget`` with the head split ``heads`` (and ``setting``, a key and its
    value; None: the cell with neither ``safeguard`` nor the setting's key set)."""
    key, value = setting if setting is not None else ("safeguard", None)
    for cell in store.values():
        config = cell["config"]
        if config["budget"] == budget and config.get("heads", "uniform") == heads and config.get(key) == value:
            return cell["units"]
    raise KeyError((budget, heads, setting))


def against(cell: dict, ref: dict, unit: str) -> str:
    """``cell``'s score of ``unit`` and its paired difference to ``ref`` (perplexity: the ratio)."""
    value, (mean, se) = cell[unit]["value"], _paired(cell[unit], ref[unit])
    if unit.startswith("squeezekit_ppl"):
        return f"{value:.1f} (x{value / ref[unit]['value']:.3f} ± {se:.3f})"
    return f"{value:.3f} ({mean:+.3f} ± {se:.3f})"


def kernels(k7_path: str, k21_path: str, budgets: list[float]) -> None:
    k7, k21 = cells(k7_path), cells(k21_path)
    print("| budget | split | kernel_size | niah_single_1 | ruler_fwe | pass key | word perplexity |")
    print("|---|---|---|---|---|---|---|")
    for budget in budgets:
        ref = find(k7, budget, "uniform")
        for heads, k, store in (("uniform", 7, k7), ("adaptive", 7, k7), ("uniform", 21, k21), ("adaptive", 21, k21)):
            cell = find(store, budget, heads)
            if cell is ref:
                scores = [f"{ref[u]['value']:.1f}" if u.startswith("squeezekit_ppl") else f"{ref[u]['value']:.3f}"
                          for u in UNITS]  # fmt: skip
            else:
                scores = [against(cell, ref, u) for u in UNITS]
            print("| " + " | ".join([str(budget), heads, str(k), *scores]) + " |")


def split(path: str, budgets: list[float], setting: str | None = None) -> None:
    store = cells(path)
    chosen = None
    if setting is not None:
        key, value = setting.split("=")
        chosen = (key, float(value))
    for budget in budgets:
        ref, cell = find(store, budget, "uniform"), find(store, budget, "adaptive", chosen)
        print(f"{budget}: " + "; ".join(f"{u.split('@')[0]} {against(cell, ref, u)}" for u in UNITS))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    setting = [args.pop()] if mode == "split" and "=" in args[-1] else []
    budgets = [float(b) for b in args.pop().split(",")]
    {"kernels": kernels, "split": split}[mode](*args, budgets, *setting)

"""The pooling table of docs/results/head-split-smollm2-h200/README.md from two sweep stores (snapkv's kernel_size 7
and 21, uniform and adaptive head splits), paired sample by sample against uniform at kernel_size 7 (the two stores
hold the same samples: every process builds the same ones).

    python docs/results/head-split-smollm2-h200/pooling/paired.py K7/results.json K21/results.json 0.2,0.1,0.05
"""

import json
import math
import sys


def cells(path):
    return json.load(open(path))["cells"]


def unit_scores(cell, unit):
    return cell["units"][unit]["scores"]


def diff(a, b):
    """Mean and standard error of the per-sample differences b - a."""
    n = len(a)
    d = [y - x for x, y in zip(a, b, strict=True)]
    m = sum(d) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


k7, k21 = cells(sys.argv[1]), cells(sys.argv[2])
units = ["niah_single_1@1024:16", "ruler_fwe@1024:16", "squeezekit_passkey@1024:16", "squeezekit_ppl@1024:16"]


def find(c, budget, heads, k):
    for key, cell in c.items():
        cfg = cell["config"]
        if cfg["budget"] == budget and cfg.get("heads", "uniform") == heads:
            return key, cell
    raise KeyError((budget, heads, k))


print("| budget | split | kernel_size | niah_single_1 | ruler_fwe | pass key | word perplexity |")
print("|---|---|---|---|---|---|---|")
for budget in [float(b) for b in sys.argv[3].split(",")]:
    ref = find(k7, budget, "uniform", 7)[1]
    for heads, k, store in (("uniform", 7, k7), ("adaptive", 7, k7), ("uniform", 21, k21), ("adaptive", 21, k21)):
        cell = find(store, budget, heads, k)[1]
        row = [str(budget), heads, str(k)]
        for u in units:
            r = cell["units"][u]
            if cell is ref:
                row.append(f"{r['value']:.3f}" if "ppl" not in u else f"{r['value']:.1f}")
                continue
            if "ppl" in u:  # the ratio exp(mean per-document NLL-per-word difference) +- the s.e. of its log
                m, se = diff(unit_scores(ref, u), unit_scores(cell, u))
                row.append(f"{r['value']:.1f} (x{math.exp(m):.3f} ± {se:.3f})")
            else:
                m, se = diff(unit_scores(ref, u), unit_scores(cell, u))
                row.append(f"{r['value']:.3f} ({m:+.3f} ± {se:.3f})")
        print("| " + " | ".join(row) + " |")

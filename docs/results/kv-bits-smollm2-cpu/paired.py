"""The paired table of docs/results/kv-bits-smollm2-cpu/README.md from the three sweeps' results.json (16, 8, 4 bits).

python docs/results/kv-bits-smollm2-cpu/paired.py Q16/results.json Q8/results.json Q4/results.json
"""

from __future__ import annotations

import json
import math
import sys


def cells(path: str) -> dict:
    return {k.split("/kv_bits=")[0]: v for k, v in json.load(open(path))["cells"].items()}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a and its standard error (paired by sample)."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def main(p16: str, p8: str, p4: str | None = None) -> None:
    c16, c8, c4 = cells(p16), cells(p8), cells(p4) if p4 else {}
    ppl, niah = "squeezekit_ppl@512:32", "niah_single_1@1024:32"
    print(
        "| evictor | budget | bits | KV kept (of the fp32 full cache) | word perplexity | log-ppl vs 16-bit (paired) "
        "| niah accuracy | vs 16-bit (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label in sorted(c16):
        for bits, c in ((16, c16), (8, c8), (4, c4)):
            base = c16[label]["units"]
            u = c.get(label, {}).get("units", {})
            if not all(k in u for k in (ppl, niah)):
                continue  # (a cell or unit the sweep has not run)
            if bits == 16:
                dp = dn = "-"
            else:
                m, se = paired(base[ppl]["scores"], u[ppl]["scores"])
                dp = f"{m:+.4f} +- {se:.4f} ({100 * (math.exp(m) - 1):+.2f} %)"
                m, se = paired(base[niah]["scores"], u[niah]["scores"])
                dn = f"{m:+.3f} +- {se:.3f}"
            ev, _, budget = label.partition("@")
            print(
                f"| {ev.split('+')[1]} | {budget} | {bits} | {u[ppl]['kv_fraction']:.4f} | {u[ppl]['value']:.2f} | "
                f"{dp} | {u[niah]['value']:.3f} | {dn} |"
            )
    print()
    print("Half the memory: 4 bits at 0.2 against 16 bits at 0.1 (paired):")
    print()
    for ev in sorted({k.split("@")[0] for k in c16}):
        lo, hi = c16.get(f"{ev}@0.1"), c4.get(f"{ev}@0.2")
        if lo is None or hi is None:
            continue
        m, se = paired(lo["units"][ppl]["scores"], hi["units"][ppl]["scores"])
        n, sn = paired(lo["units"][niah]["scores"], hi["units"][niah]["scores"])
        kv = (hi["units"][ppl]["kv_fraction"], lo["units"][ppl]["kv_fraction"])
        change = 100 * (math.exp(m) - 1)
        print(
            f"- {ev}: KV {kv[0]:.4f} vs {kv[1]:.4f}; log-ppl {m:+.4f} +- {se:.4f} ({change:+.2f} %), "
            f"niah {n:+.3f} +- {sn:.3f} (4-bit at 0.2 minus 16-bit at 0.1)"
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])  # (the 4-bit results may be left out)

"""The decode kernel's tile (slots per tile, warps, pipeline stages) per slot precision, timed on the GPU.

One layer of Mistral-7B shapes (8 KV heads of 4 query heads, head_dim 128) at B = 256 and 820 slots a head (budget
0.2 of 4096), its keys and values as rows in 16, 8 and 4 bits (squeezekit.layers.SlotRows), through
`squeezekit.kernels.decode.pooled_decode_attention` with each candidate tile; SDPA over the same slots in bf16 as the
reference speed. Reports microseconds per call and the bytes read per second; `TILES` in kernels/decode.py holds the
fastest, with this script's output beside it in docs/benchmarks.

    python benchmarks/decode_tiles.py --out DIR
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import torch


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / reps  # microseconds


def main(argv=None) -> int:
    from squeezekit import kernels
    from squeezekit.kernels import decode
    from squeezekit.layers import HeadPool
    from squeezekit.quantized import SlotCodec

    p = argparse.ArgumentParser(prog="python benchmarks/decode_tiles.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--slots", type=int, default=820)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--bits", default="16,8,4", help="slot precisions to time (comma-separated)")
    p.add_argument("--block-n", default="32,64,128,256", help="slots per tile to try")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument(
        "--orientations",
        default="0,1",
        help="0: query heads on the dots' M axis (the key/value tiles as their second operand); 1: the slots "
        "(``SLOTS_M``: the converted key/value tiles as the first operand, from registers)",
    )
    p.add_argument(
        "--fp16-codes",
        default="0,1",
        help="quantized slots: 1, the codes enter fp16 dots through an integer trick (``FP16_CODES``); 0, converted",
    )
    a = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    B, H, G, D, S = a.batch, 8, 4, 128, a.slots
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(B, H, S, D, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, H, S, D, device=dev, generator=g, dtype=torch.bfloat16)
    q = torch.randn(B, H * G, 1, D, device=dev, generator=g, dtype=torch.bfloat16)
    caps = np.full((B, H), S)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qf = q.view(B, H, G, D)
    res: dict = {"shape": dict(B=B, H=H, G=G, D=D, S=S), "sdpa_bf16_us": timed(lambda: sdpa(qf, k, v), a.reps)}
    res["rows"] = []
    for bits in ints(a.bits):
        codec = None if bits == 16 else SlotCodec(bits, D)
        if codec is None:
            parts = {"keys": k, "values": v}
            kn, vn = ("keys",), ("values",)
        else:
            parts = dict(zip(codec.names("k"), codec.encode(k), strict=True))
            parts.update(zip(codec.names("v"), codec.encode(v), strict=True))
            kn, vn = codec.names("k"), codec.names("v")
        pool = HeadPool.pack(parts, caps)
        valid = pool.mapped()
        keys, values = tuple(pool.parts[n] for n in kn), tuple(pool.parts[n] for n in vn)
        nbytes = sum(t.numel() * t.element_size() for t in pool.parts.values())
        # every tile's output against dequantize-then-attend in fp32 (bf16 rounding of the query and the output)
        rect = pool.rect()
        k32 = codec.decode(tuple(rect[n] for n in kn), torch.float32) if codec else k.float()
        v32 = codec.decode(tuple(rect[n] for n in vn), torch.float32) if codec else v.float()
        ref = sdpa(qf.float(), k32, v32, scale=0.1).reshape(B, 1, H * G, D)
        del rect, k32, v32
        fp16 = ints(a.fp16_codes) if bits < 16 else [0]
        grid = itertools.product(ints(a.block_n), ints(a.warps), ints(a.stages), ints(a.orientations), fp16)
        for tile in grid:
            args = (q, keys, values, pool.offsets, pool.lengths, valid, 0.1, codec, tile)
            call = functools.partial(decode.pooled_decode_attention, *args)
            with kernels.configured(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a tile that does not fit in shared memory switches the kernel off)
                out = call()
                ok = out is not None
                err = float((out.float() - ref).abs().max()) if ok else float("nan")
                us = timed(call, a.reps) if ok else float("nan")
                why = kernels.settings.failed.get("pooled", "")
            if not ok:
                res["rows"].append(dict(bits=bits, tile=list(tile), error=why[:200]))
                continue
            row = dict(bits=bits, tile=list(tile), us=round(us, 1), tb_s=round(nbytes / us / 1e6, 2), max_abs_err=err)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        done = [r for r in res["rows"] if r["bits"] == bits and "us" in r]
        for slots_m, codes16 in itertools.product(ints(a.orientations), fp16):
            best = min((r for r in done if r["tile"][3:] == [slots_m, codes16]), key=lambda r: r["us"])
            res[f"best_{bits}_slots_m{slots_m}_fp16_codes{codes16}"] = best
            print("best", json.dumps(best), "sdpa", round(res["sdpa_bf16_us"], 1), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "decode_tiles.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantized slots on the GPU (issue 23): the largest batch that fits and its decode speed, per slot precision.

Mistral-7B shapes with random bf16 weights, 4096-token prompts (the bench's model and protocol), budget 0.2. For each
method (a config label; ``/kv_bits=8`` and ``/kv_bits=4`` select the precision) one micro-batch of 16 prompts is
prefilled and its compressed cache repeated to each batch size of the ladder (as ``gpu_perf.py``'s decode stage
does: decode speed does not depend on what the rows hold), then the CUDA-graph greedy decoder runs: eager warm-up,
capture, then ``--steps`` replays timed. A batch that runs out of memory ends that method's ladder: the last one that
ran is the largest that fits (to the ladder's step). The floor of a step is the weights plus the KV bytes held over
the measured copy bandwidth. Also checked: the fused decode kernel on quantized rows against a torch
dequantize-then-attend reference in fp32, and the serving path's tokens against ``model.generate``'s.

    python benchmarks/kv_bits.py --out DIR
    python benchmarks/kv_bits.py --out DIR --device cpu --config tiny --prompt-len 256 --ladder 2,4 --steps 3 \
        --micro-batch 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from squeezekit.evaluators import bench_models as bench

DEFAULT_METHODS = (
    "uniform+streaming@0.2,uniform+streaming@0.2/kv_bits=8,uniform+streaming@0.2/kv_bits=4,"
    "uniform+snapkv@0.2,uniform+snapkv@0.2/kv_bits=8"
)


def kernel_check(device: str) -> dict:
    """The fused decode kernel on 8- and 4-bit rows against dequantize-then-attend, in fp32 (max abs difference)."""
    import numpy as np

    from squeezekit.kernels import decode
    from squeezekit.layers import HeadPool
    from squeezekit.quantized import SlotCodec

    out = {}
    g = torch.Generator().manual_seed(0)
    B, H, G, D = 4, 8, 4, 128
    for bits in (8, 4):
        codec = SlotCodec(bits, D)
        caps = np.random.default_rng(bits).integers(200, 900, size=(B, H))
        C0 = int(caps.max())
        k, v = torch.randn(B, H, C0, D, generator=g) * 3, torch.randn(B, H, C0, D, generator=g)
        parts = dict(zip(codec.names("k"), codec.encode(k.to(device)), strict=True))
        parts.update(zip(codec.names("v"), codec.encode(v.to(device)), strict=True))
        pool = HeadPool.pack(parts, caps)
        valid = pool.mapped() & (torch.rand(pool.slot_map.shape, generator=g) > 0.1).to(device)
        query = torch.randn(B, H * G, 1, D, generator=g).to(device)
        rect = pool.rect()
        kr = codec.decode(tuple(rect[n] for n in codec.names("k")), torch.float32)
        vr = codec.decode(tuple(rect[n] for n in codec.names("v")), torch.float32)
        C = valid.shape[-1]
        mask = valid[:, :, None, :].expand(B, H, G, C)
        w = torch.einsum("bhgd,bhcd->bhgc", query.view(B, H, G, D).double(), kr.double()) * 0.1
        p = torch.softmax(w.masked_fill(~mask, float("-inf")), -1)
        ref = torch.einsum("bhgc,bhcd->bhgd", p, vr.double()).reshape(B, 1, H * G, D)
        got = decode.pooled_decode_attention(
            query, tuple(pool.parts[n] for n in codec.names("k")), tuple(pool.parts[n] for n in codec.names("v")),
            pool.offsets, pool.lengths, valid, 0.1, codec,
        )  # fmt: skip
        out[f"{bits}-bit"] = None if got is None else float((got.double() - ref).abs().max())
    return out


def token_check(model, ids, method: str, tokens: int) -> float:
    """Share of the serving path's greedy tokens equal to ``model.generate``'s under the same config."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    with squeezekit.compress(model, squeezekit.Config.from_label(method)) as c:
        ref = model.generate(ids, max_new_tokens=tokens, do_sample=False)[:, ids.shape[1] :]
        cache, logits = prefill(model, c, ids, None, micro_batch=ids.shape[0])
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=ids.device.type == "cuda").run(tokens - 1)
    served = torch.cat([first[:, None], rest], dim=1)
    return float((served == ref).float().mean())


def profile_run(model, ids, method: str, B: int, device: str) -> str:
    """Top kernels of three eager (uncaptured) decode steps at batch ``B``: where a step's time goes."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    mb = ids.shape[0]
    with torch.inference_mode(), squeezekit.compress(model, squeezekit.Config.from_label(method)) as c:
        cache, logits = prefill(model, c, ids, None, micro_batch=mb)
        _repeat(cache, B // mb)
        decoder = GreedyDecoder(model, cache, logits.argmax(-1).repeat_interleave(B // mb), cuda_graph=False)
        decoder.run(2)
        bench.sync(device)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            decoder.run(3)
            bench.sync(device)
        c.last_cache = None
        del cache, decoder
    key = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)


def _repeat(cache, times: int) -> None:
    """Repeat every row of a prefilled cache ``times`` times (a batch of identical sequences)."""
    for layer in cache.layers:
        layer.batch_repeat_interleave(times)
    for name in ("seen", "prompt_len", "importance", "budgets"):
        setattr(cache, name, getattr(cache, name).repeat_interleave(times, dim=0))


def decode_run(model, ids, method: str, B: int, steps: int, device: str) -> dict:
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    mb = ids.shape[0]
    bench.peak_reset(device)
    before = bench.allocated_gib(device)
    with torch.inference_mode(), squeezekit.compress(model, squeezekit.Config.from_label(method)) as c:
        cache, logits = prefill(model, c, ids, None, micro_batch=mb)
        _repeat(cache, B // mb)
        first = logits.argmax(-1).repeat_interleave(B // mb)
        decoder = GreedyDecoder(model, cache, first, cuda_graph=device.startswith("cuda"))
        decoder.run(4)  # eager warm-up, capture, replays
        kv = cache.kv_nbytes()
        held = bench.gib_since(bench.allocated_gib(device), before)
        bench.sync(device)
        t = time.perf_counter()
        decoder.run(steps)
        bench.sync(device)
        step = (time.perf_counter() - t) / steps
        graph = decoder.graph is not None
        c.last_cache = None
        del cache, decoder
    return dict(method=method, B=B, step_ms=round(1000 * step, 2), decode_tok_s=round(B / step, 1),
                kv_bytes=kv, kv_mib=round(kv / 2**20, 1), cuda_held_gib=held, peak_gib=bench.peak_gib(device),
                cuda_graph=graph)  # fmt: skip


def use_tiles(path: str) -> dict:
    """Set kernels/decode.py's TILES to the fastest tile of each quantized precision timed in ``path`` (a
    decode_tiles.py JSON); returns what was set."""
    from squeezekit.kernels import decode

    rows = json.loads(Path(path).read_text())["rows"]
    chosen = {}
    for bits in (8, 4):
        done = [r for r in rows if r["bits"] == bits and "us" in r]
        if done:
            best = min(done, key=lambda r: r["us"])
            decode.TILES[(bits, True)] = tuple(best["tile"])
            chosen[bits] = best
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/kv_bits.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="mistral-7b")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--ladder", default="512,1024,1536,2048,2560,3072,4096", help="batch sizes, in order")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--check-tokens", type=int, default=12)
    p.add_argument("--time-budget-s", type=float, default=480)
    p.add_argument("--profile", default="", help="comma-separated methods to profile (eager steps) first")
    p.add_argument("--profile-batch", type=int, default=256)
    p.add_argument(
        "--tiles",
        metavar="FILE",
        help="a benchmarks/decode_tiles.py JSON: decode with the fastest tile of each quantized precision in it "
        "instead of kernels/decode.py's TILES (written into the output)",
    )
    a = p.parse_args(argv)
    bad = [b for b in a.ladder.split(",") if not b.isdigit() or int(b) < a.micro_batch or int(b) % a.micro_batch]
    if bad:  # each batch repeats one prefilled micro-batch
        p.error(f"--ladder {','.join(bad)}: each batch must be a multiple of --micro-batch ({a.micro_batch})")
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(a), "runs": [], "checks": {}}
    if a.tiles:
        res["tiles"] = use_tiles(a.tiles)
        print("tiles", json.dumps(res["tiles"]), flush=True)

    def write():
        (out / "kv_bits.json").write_text(json.dumps(res, indent=1, default=str))

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = bench.build_model(a.config, a.device, dtype)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    res["env"] = dict(
        torch=torch.__version__, device=name, bandwidth_tb_s=round(bench.copy_bandwidth(a.device) / 1e12, 2)
    )
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    res["checks"]["kernel_fp32_max_abs_diff"] = kernel_check(a.device)
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    small = torch.randint(1, cfg.vocab_size, (2, min(a.prompt_len, 1024)), generator=g).to(a.device)
    res["checks"]["served_vs_generate"] = {
        m: token_check(model, small, m, a.check_tokens) for m in a.methods.split(",") if "kv_bits" in m
    }
    print(json.dumps(res["checks"]), flush=True)
    write()
    ids = torch.randint(1, cfg.vocab_size, (a.micro_batch, a.prompt_len), generator=g).to(a.device)
    for method in [m for m in a.profile.split(",") if m]:
        table = profile_run(model, ids, method, a.profile_batch, a.device)
        res.setdefault("profiles", {})[method] = table
        (out / f"profile-{len(res['profiles'])}.txt").write_text(f"{method} at B={a.profile_batch}\n{table}\n")
        print(method, "\n", table, flush=True)
    for method in a.methods.split(","):
        for B in [int(b) for b in a.ladder.split(",")]:
            if time.perf_counter() - t0 > a.time_budget_s:
                res["runs"].append(dict(method=method, B=B, skipped="time budget"))
                break
            try:
                row = decode_run(model, ids, method, B, a.steps, a.device)
            except Exception as exc:
                if not bench.is_oom(exc):
                    raise
                res["runs"].append(dict(method=method, B=B, oom=True))
                bench.peak_reset(a.device)
                torch.cuda.empty_cache() if a.device.startswith("cuda") else None
                break
            bw = res["env"]["bandwidth_tb_s"] * 1e12
            row["floor_ms"] = round(1000 * (weight_bytes + row["kv_bytes"]) / bw, 2)
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            write()
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

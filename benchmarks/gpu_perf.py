"""``python benchmarks/gpu_perf.py --out DIR``: the GPU checks and measurements of issue 15's kernels.

A script of the checkout, not part of the installed package: it imports squeezekit as installed and nothing else of
this folder, so it runs from anywhere (benchmarks/README.md).

Correctness first, then the measurements; every target is printed and written as met or not met from the numbers:

1. Correctness on the GPU: the Triton masked attention + per-slot column sums against the explicit softmax in fp32
   (random bf16 and fp32 inputs: fresh prefill with padding, a sliding window, a later step over unordered
   per-head slots; the flash log-sum-exp source too); the fused steady write against the plain victim selection +
   scatters (exact); greedy tokens of the served path with the kernels on and off: exact for the steady write (bf16,
   full model) and, in fp32 on a 4-layer model of the same shapes, for the attention kernels (h2o unpadded, padded,
   chunked; chunked streaming) and for steady + decode kernels + compiled layers under the CUDA graph.
2. h2o vs streaming prefill at B=32 (micro-batches of 16), with the fused kernels (and with the flash source); one
   layer's prefill attention kernel by kernel; h2o on today's explicit path for reference.
3. Chunked (~1024) vs unchunked prefill at B=32, with the fused kernels and without.
4. The decode step vs the floor (weights + kept KV over the copy bandwidth, as ``squeezekit bench``) at B=128 and
   768, per variant (``--variants``: plain, steady write kernel, + decode attention kernel, + compiled layers).
   The cache is one real micro-batch's (16 rows) repeated to B rows: the step's cost depends on shapes, not
   contents, and this skips B x 4096 tokens of prefill. Two figures per row: the CUDA-graph replay alone, and the
   bench protocol (127 steps including the eager warm-up and the capture, derived from a timed first run and a
   timed run of replays). Also the compute floor (the step's FLOPs at the measured GEMM rate), which bounds the
   step at large batch, and one layer's decode attention (SDPA vs the Triton kernel).
5. B=1024 at budget 0.2, end to end like ``squeezekit bench`` (unchunked; chunked ~1024 if that runs out of memory),
   and its decode tok/s against transformers' and kvpress's best in ``--baseline FILE`` (a ``squeezekit bench``
   JSON; the output names the file, its setting and the rows taken; without it these targets are not judged).

Each decode and large-batch row says what its decode-step kernels did (``kernels``: ran, fell back, did not run), and
so does one layer's decode attention (``triton``): the kernels return None when they are off or fail, and the
plain path is timed in their place.

Mistral-7B shapes, random bf16 weights, 4096-token prompts (bench's model and protocol). The stages run in that order
and each is skipped once ``--time-budget-s`` would be exceeded (written as skipped). ``--quick`` runs everything at
toy sizes (also on the CPU, in seconds: tests/test_gpu_perf.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path

import torch
from squeezekit.evaluators import bench_models as bench
from squeezekit.evaluators.bench_runs import Method

#: the large batch's decode tok/s against the best of each peer in the ``--baseline`` bench JSON: (key, peer, goal)
PEERS = (("transformers", "transformers' best", 15.0), ("kvpress", "kvpress's best", 7.0))


class Runner:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.t0 = time.perf_counter()
        self.results: dict = {"args": vars(args), "stages": {}, "targets": [], "checks": []}
        self.out = Path(args.out)

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.time_budget_s - (time.perf_counter() - self.t0)

    def log(self, obj) -> None:
        print(json.dumps(obj, default=str), flush=True)

    def stage(self, name: str, fn, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            self.results["stages"][name] = {"status": f"skipped: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
            self.log({"stage": name, **self.results["stages"][name]})
            return
        t = time.perf_counter()
        try:
            fn()
            status = "done"
        except Exception as exc:  # one failed stage must not cost the others
            status = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
            traceback.print_exc()
        finally:
            bench.peak_reset(self.device)
        self.results["stages"][name] = {"status": status, "seconds": round(time.perf_counter() - t, 1)}
        self.log({"stage": name, **self.results["stages"][name]})
        self.write()

    def check(self, name: str, ok: bool, **details) -> None:
        self.results["checks"].append({"check": name, "ok": bool(ok), **details})
        self.log(self.results["checks"][-1])

    def target(self, name: str, goal: str, measured: str, met: bool | None, ratio: float | None = None) -> None:
        if ratio is not None and not ratio == ratio:  # NaN: no bandwidth measured (CPU)
            met = None
        self.results["targets"].append({"target": name, "goal": goal, "measured": measured, "met": met})
        self.log(self.results["targets"][-1])

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_perf.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_perf.md").write_text(markdown(self.results))


def _kernels(choice):
    from squeezekit import kernels

    return kernels.configured(choice)


# -- 1. correctness ---------------------------------------------------------------------------------------------------
#: the kernel checks' shapes (Mistral-7B's heads; smaller under the interpreter)
ATTN_SIZES = dict(B=2, Hq=32, H=8, D=128, q=1024, pad=300, window=256, later_q=256, C=1500, seen=2000)


def _attention_inputs(kind: str, dtype, device, g):
    """query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, causal_slots for one case."""
    z = ATTN_SIZES
    B, Hq, H, D = z["B"], z["Hq"], z["H"], z["D"]
    if kind in ("fresh-left-padding", "fresh-window"):
        q = z["q"]
        valid = torch.ones(B, q, dtype=torch.bool)
        valid[1, : z["pad"]] = False
        pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, -1)
        query = torch.randn(B, Hq, q, D, generator=g).to(device, dtype)
        key, value = (torch.randn(B, H, q, D, generator=g).to(device, dtype) for _ in range(2))
        window = z["window"] if kind == "fresh-window" else None
        return (
            query,
            key,
            value,
            valid[:, None].to(device),
            pos[:, None].to(device, torch.int32),
            pos.to(device),
            valid.to(device),
            window,
            True,
        )
    q, C, seen = z["later_q"], z["C"], z["seen"]
    query = torch.randn(B, Hq, q, D, generator=g).to(device, dtype)
    key, value = (torch.randn(B, H, C, D, generator=g).to(device, dtype) for _ in range(2))
    q_valid = torch.ones(B, q, dtype=torch.bool)
    q_pos = seen + torch.arange(q).expand(B, q)
    kv_valid = torch.zeros(B, H, C, dtype=torch.bool)
    kv_pos = torch.full((B, H, C), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            slots = torch.randperm(C, generator=g)
            kv_valid[b, h, slots[:q]], kv_pos[b, h, slots[:q]] = True, q_pos[b].to(torch.int32)
            kept = slots[q : C - 20 - h]
            kv_valid[b, h, kept] = True
            kv_pos[b, h, kept] = torch.randperm(seen, generator=g)[: len(kept)].to(torch.int32)
    return query, key, value, kv_valid.to(device), kv_pos.to(device), q_pos.to(device), q_valid.to(device), None, False


def _explicit_with(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling):
    from squeezekit.attention import _explicit, _mask

    mask_for = lambda s, e: _mask(kv_valid, kv_pos, q_pos[:, s:e], window)  # noqa: E731
    return _explicit(query, key, value, mask_for, scaling, None, q_valid.float(), True)


def check_attention_kernels(r: Runner) -> None:
    from squeezekit import kernels
    from squeezekit.kernels.attention import attention_lse, column_sums

    if not kernels.use("attention", torch.empty(0, device=r.device)):
        r.check("attention kernels vs explicit", True, skipped="kernels not available on this device")
        return
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("fresh-left-padding", "fresh-window", "later-step-unordered-slots"):
            query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, causal = _attention_inputs(
                kind, dtype, r.device, g
            )
            scaling = query.shape[-1] ** -0.5

            masks = (kv_valid, kv_pos, q_pos, q_valid, window, scaling)
            ref_out, ref_sums = _explicit_with(query.float(), key.float(), value.float(), *masks)
            plain_out, plain_sums = _explicit_with(query, key, value, *masks)  # today's path at this dtype
            out, lse = attention_lse(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal)
            sums = column_sums(query, key, lse, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal)
            real = q_valid[:, :, None, None]  # compare the real query rows (padding rows: finite)
            out_err = float(((out.float() - ref_out) * real).abs().max())
            plain_err = float(((plain_out.float() - ref_out) * real).abs().max())
            sums_err = float((sums - ref_sums).abs().max() / ref_sums.abs().max())
            plain_sums_err = float((plain_sums - ref_sums).abs().max() / ref_sums.abs().max())
            if kind == "fresh-left-padding" and dtype == torch.bfloat16:  # the flash source, on an unpadded prompt
                from squeezekit.kernels.attention import flash_lse

                dpos = torch.arange(q_pos.shape[1], device=q_pos.device).expand_as(q_pos)
                dvalid = torch.ones_like(q_valid)
                dmasks = (dvalid[:, None], dpos[:, None].to(torch.int32), dpos, dvalid, None, scaling)
                dref_out, dref_sums = _explicit_with(query.float(), key.float(), value.float(), *dmasks)
                try:
                    fout, flse = flash_lse(query, key, value, scaling)
                    fsums = column_sums(query, key, flse, *dmasks[:4], None, scaling, True)
                    ferr = float((fsums - dref_sums).abs().max() / dref_sums.abs().max())
                    oerr = float((fout.float() - dref_out).abs().max())
                    r.check("flash attention's log-sum-exp + Triton column sums vs explicit fp32 reference (bf16)",
                            ferr <= 1e-3 and oerr <= 1.6e-2, colsum_rel_err=ferr, out_max_abs_err=oerr)  # fmt: skip
                except RuntimeError as exc:
                    r.check(
                        "flash attention's log-sum-exp (SQUEEZEKIT_LSE_SOURCE=flash) available",
                        False,
                        error=str(exc)[:300],
                    )
            tol = 1e-4 if dtype == torch.float32 else max(2 * plain_err, 1.6e-2)
            ok = out_err <= tol and sums_err <= 1e-4 and bool(torch.isfinite(out.float()).all())
            r.check(
                f"attention kernels vs explicit fp32 reference ({kind}, {str(dtype)[6:]})", ok,
                out_max_abs_err=out_err, plain_path_out_err=plain_err, colsum_rel_err=sums_err,
                plain_path_colsum_rel_err=plain_sums_err, out_tolerance=tol,
            )  # fmt: skip


def check_steady_kernel(r: Runner) -> None:
    from squeezekit import kernels
    from squeezekit.kernels.steady import steady_write
    from squeezekit.policies import LayerView
    from squeezekit.selection import victim_slots

    if not kernels.use("steady", torch.empty(0, device=r.device)):
        r.check("steady write vs plain", True, skipped="kernels not available on this device")
        return
    g = torch.Generator().manual_seed(1)
    B, H, S, D = 64, 8, 819, 128
    dev = r.device
    score = torch.randint(0, 50, (B, H, S), generator=g).float().to(dev)
    positions = (
        torch.stack([torch.randperm(4096, generator=g)[:S] for _ in range(B * H)]).view(B, H, S).to(dev, torch.int32)
    )
    valid = torch.ones(B, H, S, dtype=torch.bool, device=dev)
    keys, values = (torch.randn(B, H, S, D, generator=g).to(dev, torch.bfloat16) for _ in range(2))
    attention = torch.rand(B, H, S, generator=g).to(dev)
    k, v = (torch.randn(B, H, 1, D, generator=g).to(dev, torch.bfloat16) for _ in range(2))
    new_pos = torch.full((B, 1), 5000, device=dev)
    view = LayerView(
        keys, values, valid, positions, new_pos.view(-1) + 1, torch.full((B,), S, device=dev), 0, 1, "decode"
    )
    ref = victim_slots(score, view, protect_newest=False)
    want = [t.clone() for t in (keys, values, positions, attention)]
    want[0].scatter_(2, ref[..., None].expand(B, H, 1, D), k)
    want[1].scatter_(2, ref[..., None].expand(B, H, 1, D), v)
    want[2].scatter_(2, ref, new_pos.to(torch.int32)[:, None, :].expand(B, H, 1))
    want[3].scatter_(2, ref, torch.zeros(B, H, 1, device=dev))
    flag = torch.zeros((), dtype=torch.bool, device=dev)
    victim = steady_write(score, valid, positions, (keys,), (values,), attention, 0.0, k, v, new_pos, flag)
    same = victim is not None and torch.equal(victim, ref)
    same = same and all(torch.equal(a, b) for a, b in zip((keys, values, positions, attention), want, strict=True))
    r.check("steady write kernel vs victim_slots + scatters (exact)", same and not bool(flag))
    check_quantized_steady_write(r, score, valid, positions, k, v, new_pos)


def check_quantized_steady_write(r: Runner, score, valid, positions, k, v, new_pos) -> None:
    """The steady kernel's quantized write (8 and 4 bits, rectangular buffers and a pool's rows) against
    `SlotCodec.encode` of the new token at the victim's slot: bit for bit (the GPU's division, conversions and no
    fused multiply-adds). 4-bit slots take the plain path by default (`steady.FUSED_BITS`); the kernel is checked
    here all the same."""
    from squeezekit.kernels import steady

    fused, steady.FUSED_BITS = steady.FUSED_BITS, (16, 8, 4)  # (4 bits take the plain path by default: test it)
    try:
        _quantized_steady_writes(r, score, valid, positions, k, v, new_pos)
    finally:
        steady.FUSED_BITS = fused


def _quantized_steady_writes(r: Runner, score, valid, positions, k, v, new_pos) -> None:
    import numpy as np

    from squeezekit import kernels
    from squeezekit.kernels.steady import steady_write
    from squeezekit.layers import HeadPool
    from squeezekit.quantized import SlotCodec

    B, H, S = score.shape
    D = k.shape[-1]
    g = torch.Generator().manual_seed(2)
    old = (torch.randn(B, H, S, D, generator=g) * torch.logspace(-6, 2, S)[:, None]).to(r.device, torch.bfloat16)
    new = torch.randn(2, B, H, 1, D, generator=g) * torch.logspace(-8, 3, B * H).view(1, B, H, 1, 1)
    nk, nv = (t.to(r.device, torch.bfloat16) for t in new)
    for bits in (8, 4):
        codec = SlotCodec(bits, D)
        # what the kernel must write for the new token: the codec's parts, and whether the codec gives the same on
        # the host (once a precision: both layouts compare against them)
        want = dict(zip(codec.names("k"), codec.encode(nk), strict=True))
        want.update(zip(codec.names("v"), codec.encode(nv), strict=True))
        on_cpu = dict(zip(codec.names("k"), codec.encode(nk.cpu()), strict=True))
        on_cpu.update(zip(codec.names("v"), codec.encode(nv.cpu()), strict=True))
        torch_gpu_vs_cpu = [n for n in want if not torch.equal(want[n].cpu(), on_cpu[n])]
        for pooled in (False, True):
            parts = dict(zip(codec.names("k"), codec.encode(old), strict=True))
            parts.update(zip(codec.names("v"), codec.encode(old), strict=True))
            caps = np.full((B, H), S)
            if pooled:
                caps = np.random.default_rng(bits).integers(S // 2, S + 1, size=(B, H))
                caps[0, 0] = S
            pool = HeadPool.pack(parts, caps) if pooled else None
            store = pool.parts if pool is not None else parts
            ok = pool.mapped() if pool is not None else valid
            before = {name: t.clone() for name, t in store.items()}
            flag = torch.zeros((), dtype=torch.bool, device=r.device)
            victim = steady_write(
                score, ok, positions.clone(), tuple(store[n] for n in codec.names("k")),
                tuple(store[n] for n in codec.names("v")), None, 0.0, nk, nv, new_pos, flag, codec,
                None if pool is None else pool.offsets,
            )  # fmt: skip
            same, differ = victim is not None, {}
            if not same:  # the kernel declined or failed: say why (and switch it on again for the next check)
                differ["kernel"] = kernels.settings.failed.pop("steady", "declined (no error)")
            if same:
                if torch_gpu_vs_cpu:  # SlotCodec.encode itself rounds otherwise on the GPU than on the host
                    differ["encode_gpu_vs_cpu"] = torch_gpu_vs_cpu
                for name, t in store.items():
                    expect = before[name]
                    if pool is not None:
                        expect[(pool.offsets[..., None] + victim).reshape(-1)] = want[name].reshape(-1, t.shape[-1])
                    else:
                        expect.scatter_(2, victim[..., None].expand(B, H, 1, t.shape[-1]), want[name])
                    if not torch.equal(t, expect):  # (for whoever mends it: how many, by how much, and where)
                        wrong = t != expect
                        gap = (t.float() - expect.float()).abs()[wrong]
                        at = wrong.nonzero()[:4].tolist()
                        differ[name] = dict(elements=int(wrong.sum()), of=int(t.numel()), largest=float(gap.max()),
                                            first=at, kernel=[float(t[tuple(i)]) for i in at],
                                            codec=[float(expect[tuple(i)]) for i in at])  # fmt: skip
                    same = same and not differ
            r.check(f"steady write kernel, {bits}-bit {'pool' if pooled else 'buffers'}: the codec's bytes", same,
                    **({"differ": differ} if differ else {}))  # fmt: skip


def _serve(model, ids, method: str, steps: int, micro_batch: int, compile: bool | None = False, mask=None):
    """Prefill (micro-batches) + greedy decode on the served path: (tokens (B, 1 + steps), last prompt logits)."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    m = Method.parse(method)
    graph = True
    with torch.inference_mode(), squeezekit.compress(model, m.config) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch, chunk=m.chunk)
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=graph, compile=compile).run(steps)
    return torch.cat([first[:, None], rest], dim=1), logits.float()


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean over rows of the first step whose greedy token differs (the row's length where none does)."""
    same = (a == b).long().cumprod(dim=1)
    return float(same.sum(dim=1).float().mean())


def check_served_tokens(r: Runner, model, small_model) -> None:
    """Greedy tokens of the served path with the kernels on and off. Exact where the kernels change nothing (the
    steady write only selects and copies) or in fp32 (a 4-layer model of the same shapes); in bf16 the attention
    kernels round differently from the explicit/SDPA paths, so agreement is reported."""
    import squeezekit
    from squeezekit import kernels

    a = r.args
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, model.config.vocab_size, (a.check_batch, a.check_len), generator=g).to(r.device)
    mask = torch.ones_like(ids)
    for b in range(1, a.check_batch):
        mask[b, : b * a.check_len // (2 * a.check_batch)] = 0  # left padding, a different length per row
    steps = a.check_tokens
    calls = kernels.settings.calls

    def agree(x, y):
        return float((x == y).float().mean())

    with _kernels("attention"):
        plain, _ = _serve(model, ids, "squeeze+streaming@0.2", steps, a.check_batch)
    with _kernels("attention,steady"):
        before = calls["steady"]
        fused, _ = _serve(model, ids, "squeeze+streaming@0.2", steps, a.check_batch)
        used = calls["steady"] > before
    r.check("greedy tokens with the steady kernel == without (bf16 full model, streaming@0.2, exact)",
            torch.equal(plain, fused), steady_kernel_used=used, agreement=agree(plain, fused))  # fmt: skip
    with _kernels("auto"):
        before = calls["attention"]
        h2o_fused, logits_fused = _serve(model, ids, "squeeze+h2o@0.2", steps, a.check_batch)
        used = calls["attention"] > before
        with torch.inference_mode(), squeezekit.compress(model, evictor="h2o", budget=0.2):
            slow = model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)[
                :, ids.shape[1] :
            ]
    r.check("h2o fast path (micro-batches + graph) == model.generate with the same kernels (bf16 full model)",
            agree(h2o_fused, slow) == 1.0, attention_kernel_used=used, agreement=agree(h2o_fused, slow))  # fmt: skip
    with _kernels("off"):
        h2o_plain, logits_plain = _serve(model, ids, "squeeze+h2o@0.2", steps, a.check_batch)
    r.check("h2o, fused prefill vs explicit (bf16 full model; informational)", True,
            logits_max_abs_diff=float((logits_fused - logits_plain).abs().max()),
            logit_scale=float(logits_plain.abs().max()), token_agreement=agree(h2o_fused, h2o_plain))  # fmt: skip
    if r.cuda:
        with _kernels("attention,steady,decode") as settings:
            before = dict(settings.calls)
            fast, _ = _serve(model, ids, "squeeze+streaming@0.2", steps, a.check_batch)
            used = kernels_used(settings, "decode", before)["decode"]
        r.check("decode kernel vs SDPA (bf16 full model; informational)", True, decode_kernel=used,
                agreement=agree(fast, plain))  # fmt: skip
        # the default since 2026-12-07 (decode kernel + compiled layers) against the previous default
        with _kernels("attention,steady,evict,importance,window,pooled"):
            before, _ = _serve(model, ids, "squeeze+streaming@0.2", steps, a.check_batch, compile=None)
        with _kernels("auto"):
            default, _ = _serve(model, ids, "squeeze+streaming@0.2", steps, a.check_batch, compile=None)
        r.check("default kernels (decode + compile) vs the previous default (bf16 full model; informational)", True,
                agreement=agree(default, before), first_difference=_first_difference(default, before))  # fmt: skip
    if small_model is None:
        return
    # fp32, 4 layers of the same shapes: the kernels against the plain paths, exactly (tokens) and closely (logits)
    for method, m in (("squeeze+h2o@0.2", None), ("squeeze+h2o@0.2", mask), ("squeeze+h2o@0.2~128", mask),
                      ("squeeze+streaming@0.2~128", mask)):  # fmt: skip
        with _kernels("off"):
            ref, ref_logits = _serve(small_model, ids, method, steps, a.check_batch, mask=m)
        with _kernels("auto"):
            before = calls["attention"]
            got, got_logits = _serve(small_model, ids, method, steps, a.check_batch, mask=m)
            used = calls["attention"] > before
        diff = float((got_logits - ref_logits).abs().max() / ref_logits.abs().max())
        what = f"{method}{', left-padded' if m is not None else ''}"
        r.check(f"fused attention kernels vs plain path (fp32, 4 layers, {what}): same tokens, logits within 1e-4",
                torch.equal(got, ref) and diff <= 1e-4 and (used or not r.cuda), kernel_used=used, logits_rel_diff=diff,
                agreement=agree(got, ref))  # fmt: skip
    with _kernels("off"):
        eager, _ = _serve(small_model, ids, "squeeze+streaming@0.2", 2 * steps, a.check_batch, compile=False)
    with _kernels("attention,steady,decode"):
        compile = r.cuda or a.quick_compile
        comp, _ = _serve(small_model, ids, "squeeze+streaming@0.2", 2 * steps, a.check_batch, compile=compile)
    r.check("steady + decode kernels + compiled layers == plain eager step (fp32, 4 layers, CUDA graph): same tokens",
            torch.equal(eager, comp), agreement=agree(eager, comp))  # fmt: skip


# -- 2./3. prefill ----------------------------------------------------------------------------------------------------
def _prefill_time(r: Runner, model, B: int, method: str, kernels_choice: str, chunk: int | None = None) -> dict:
    import squeezekit
    from squeezekit.batching import prefill

    m = Method.parse(method)
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(1, model.config.vocab_size, (B, r.args.prompt_len), generator=g).to(r.device)
    bench.peak_reset(r.device)
    with _kernels(kernels_choice), torch.inference_mode():
        with squeezekit.compress(model, m.config) as c:
            c.sync_timings = r.cuda
            bench.sync(r.device)
            t = time.perf_counter()
            cache, logits = prefill(model, c, ids, None, micro_batch=r.args.micro_batch, chunk=chunk or m.chunk)
            bench.sync(r.device)
            seconds = time.perf_counter() - t
            s = c.summary()
    peak = torch.cuda.max_memory_allocated() / 2**30 if r.cuda else float("nan")
    del cache, logits, ids
    row = dict(method=method, B=B, kernels=kernels_choice, chunk=chunk or m.chunk, prefill_s=round(seconds, 3),
               policy_s={k: round(v, 4) for k, v in s["timings"].items()}, peak_gib=round(peak, 2),
               kv_gib_peak_prefill=round(s["kv_bytes_peak_prefill"] / 2**30, 2))  # fmt: skip
    r.results.setdefault("prefill", []).append(row)
    r.log(row)
    return row


def prefill_attention_bench(r: Runner, model, B: int) -> dict:
    """One layer's prefill attention at the micro-batch's shapes: what streaming runs (SDPA, causal) against h2o's
    pieces (Triton forward, or torch's flash with its log-sum-exp, plus the column sums) and today's explicit path."""
    import torch.nn.functional as F

    from squeezekit import kernels
    from squeezekit.kernels import attention as ka

    cfg, T, dev = model.config, r.args.prompt_len, r.device
    Hq, H = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    if not kernels.use("attention", torch.empty(0, device=dev)):
        return {}
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    k, v = (
        torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16),
        torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16),
    )
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    pos = torch.arange(T, device=dev).expand(B, T)
    m = (valid[:, None], pos[:, None].to(torch.int32), pos, valid, None, D**-0.5)
    _, lse = ka.attention_lse(q, k, v, *m, True)
    fns = {
        "sdpa_causal (streaming)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "triton_forward_lse": lambda: ka.attention_lse(q, k, v, *m, True),
        "flash_forward_lse": lambda: ka.flash_lse(q, k, v, D**-0.5),
        "triton_colsum": lambda: ka.column_sums(q, k, lse, *m, True),
        "explicit (today's h2o)": lambda: _explicit_with(q, k, v, *m),
    }
    flops = 4 * B * Hq * T * T / 2 * D
    row = {"B": B, "T": T}
    for name, fn in fns.items():
        try:
            fn()
            bench.sync(dev)
            n = 2 if name.startswith("explicit") else 10
            t = time.perf_counter()
            for _ in range(n):
                fn()
            bench.sync(dev)
            ms = 1000 * (time.perf_counter() - t) / n
            row[name] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:
            row[name] = {"error": str(exc)[:200]}
    return row


def stage_h2o_prefill(r: Runner, model) -> None:
    from squeezekit.kernels import attention as ka

    B, warm = r.args.prefill_batch, min(2, r.args.prefill_batch)
    for method in ("squeeze+streaming@0.2", "squeeze+h2o@0.2"):
        _prefill_time(r, model, warm, method, "auto")  # warm-up: kernel compilation and autotuning
    r.results["prefill_attention"] = bench_row = prefill_attention_bench(r, model, r.args.micro_batch)
    r.log({"prefill_attention": bench_row})
    stream = _prefill_time(r, model, B, "squeeze+streaming@0.2", "auto")
    h2o = _prefill_time(r, model, B, "squeeze+h2o@0.2", "auto")
    ratio = h2o["prefill_s"] / stream["prefill_s"]
    r.results["h2o_ratio"] = ratio
    r.target(
        f"h2o prefill vs streaming at B={B}",
        "<= 1.5x",
        f"{h2o['prefill_s']:.2f} vs {stream['prefill_s']:.2f} s: {ratio:.2f}x",
        ratio <= 1.5,
        ratio if r.cuda else float("nan"),
    )  # (CPU: no fused kernels, toy sizes)
    if r.cuda:  # the other source of the dense case's log-sum-exp (SQUEEZEKIT_LSE_SOURCE=flash)
        old, ka.LSE_SOURCE = ka.LSE_SOURCE, "flash"
        try:
            flash = _prefill_time(r, model, B, "squeeze+h2o@0.2", "auto")
            flash["lse_source"] = "flash" if ka.LSE_SOURCE == "flash" else "flash refused: triton"
        finally:
            ka.LSE_SOURCE = old
        f_ratio = flash["prefill_s"] / stream["prefill_s"]
        r.target(
            f"h2o prefill vs streaming at B={B}, SQUEEZEKIT_LSE_SOURCE=flash",
            "<= 1.5x",
            f"{flash['prefill_s']:.2f} vs {stream['prefill_s']:.2f} s: {f_ratio:.2f}x ({flash['lse_source']})",
            f_ratio <= 1.5,
        )
    if r.left() > 60:  # for reference: today's explicit path, one micro-batch
        mb = r.args.micro_batch
        plain = _prefill_time(r, model, mb, "squeeze+h2o@0.2", "off")
        fused16 = _prefill_time(r, model, mb, "squeeze+h2o@0.2", "auto")
        r.results["h2o_plain_vs_fused_one_micro_batch"] = round(plain["prefill_s"] / fused16["prefill_s"], 2)


def stage_chunked(r: Runner, model) -> None:
    B, chunk = r.args.prefill_batch, r.args.chunk
    _prefill_time(r, model, min(2, B), "squeeze+streaming@0.2", "auto", chunk)  # warm-up
    for choice in ("auto", "off"):
        plain = _prefill_time(r, model, B, "squeeze+streaming@0.2", choice)
        chunked = _prefill_time(r, model, B, "squeeze+streaming@0.2", choice, chunk)
        ratio = chunked["prefill_s"] / plain["prefill_s"]
        r.results[f"chunked_ratio_kernels_{choice}"] = ratio
        if choice == "auto":
            r.target(f"chunked (~{chunk}) vs unchunked prefill at B={B}", "<= 1.1x",
                     f"{chunked['prefill_s']:.2f} vs {plain['prefill_s']:.2f} s: {ratio:.2f}x "
                     f"(peak KV {chunked['kv_gib_peak_prefill']} vs {plain['kv_gib_peak_prefill']} GiB)", ratio <= 1.1,
                     ratio if r.cuda else float("nan"))  # fmt: skip
        if r.left() < 90:
            break


# -- 4. decode --------------------------------------------------------------------------------------------------------
def replicate(cache, times: int) -> None:
    """Repeat every row of a prefilled cache ``times`` times, in place (a batch of identical sequences)."""
    for layer in cache.layers:
        layer.batch_repeat_interleave(times)
    for name in ("seen", "prompt_len", "importance", "budgets"):
        t = getattr(cache, name, None)
        if t is not None:
            setattr(cache, name, t.repeat_interleave(times, dim=0))


def gemm_tflops(device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    bench.sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    bench.sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


def _decode_once(r: Runner, model, cache, first, steps: int, compile: bool, graph: bool = True) -> dict:
    from squeezekit.decoding import GreedyDecoder

    bench.sync(r.device)
    t = time.perf_counter()
    decoder = GreedyDecoder(model, cache, first, cuda_graph=graph, compile=compile)
    decoder.run(steps)  # bench's protocol: eager warm-up steps, capture, replays
    bench.sync(r.device)
    first_run = time.perf_counter() - t
    t = time.perf_counter()
    decoder.run(steps)  # replays only
    bench.sync(r.device)
    replay = (time.perf_counter() - t) / steps
    # bench times 127 steps in one run: the warm-up and capture (what the first run took beyond its replays) spread
    # over 127 steps
    overhead = max(first_run - (steps - 2) * replay, 0.0)
    bench_ms = 1000 * (overhead + 125 * replay) / 127
    return dict(bench_step_ms=round(bench_ms, 2), replay_step_ms=round(1000 * replay, 2),
                warmup_capture_s=round(overhead, 3), graph=decoder.graph is not None)  # fmt: skip


VARIANTS = {
    "plain": ("attention", False),
    "steady": ("attention,steady", False),
    "steady+decode": ("attention,steady,decode", False),
    "steady+compile": ("attention,steady", True),
    "steady+decode+compile": ("attention,steady,decode", True),
}


def _why_off(tensor: torch.Tensor) -> str:
    """Why a chosen kernel does not serve ``tensor`` (squeezekit.kernels.use)."""
    from squeezekit import kernels

    if tensor.device.type != "cuda":
        return f"{tensor.device.type} tensors take the plain path"
    return "Triton does not import" if not kernels.triton_available() else "TRITON_INTERPRET is set"


#: the kernels of a decode step: a variant's ``attention`` kernel serves only its prefill (streaming's is SDPA's)
STEP_KERNELS = ("steady", "decode")


def kernels_used(settings, choice: str, before: dict[str, int]) -> dict[str, str]:
    """What each decode-step kernel of ``choice`` did since ``before`` (a copy of ``settings.calls``): "ran",
    "fell back: ERROR" (it failed and the plain path ran instead) or "did not run" (not on this device)."""
    used = {}
    for name in (k for k in choice.split(",") if k in STEP_KERNELS):
        if name in settings.failed:
            used[name] = f"fell back: {settings.failed[name][:300]}"
        else:
            used[name] = "ran" if settings.calls[name] > before[name] else "did not run"
    return used


def variant_label(row: dict) -> str:
    """A decode row's variant, and which of its kernels fell back or did not run (the row then timed the plain path
    in their place)."""
    kernels = row.get("kernels", {})
    fell = [k for k, v in kernels.items() if v.startswith("fell back")]
    idle = [k for k, v in kernels.items() if v == "did not run"]
    notes = [f"{', '.join(names)} {what}" for names, what in ((fell, "fell back"), (idle, "did not run")) if names]
    return f"{row['variant']} ({'; '.join(notes)})" if notes else row["variant"]


def attention_bench(r: Runner, B: int, H: int, G: int, S: int, D: int) -> dict:
    """One layer's decode attention over a full buffer: SDPA over the folded query (plain) vs the Triton kernel."""
    import torch.nn.functional as F

    from squeezekit import kernels
    from squeezekit.attention import _fold, _unfold
    from squeezekit.kernels.decode import decode_attention

    dev = r.device
    dtype = torch.bfloat16 if r.cuda else torch.float32
    q = torch.randn(B, H * G, 1, D, device=dev, dtype=dtype)
    k, v = torch.randn(B, H, S, D, device=dev, dtype=dtype), torch.randn(B, H, S, D, device=dev, dtype=dtype)
    nbytes = 2 * k.numel() * k.element_size()
    row = {"B": B, "S": S, "kv_mb_per_layer": round(nbytes / 1e6, 1)}

    def plain():
        return _unfold(F.scaled_dot_product_attention(_fold(q, H), k, v, scale=D**-0.5), H * G, 1)

    def fused():
        return decode_attention(q, k, v, D**-0.5)

    with kernels.configured("decode") as settings:
        if not kernels.use("decode", q):
            row["triton"] = f"off: {_why_off(q)}"
            return row
        ref, got = plain(), fused()
        if got is None:  # the kernel failed on its first use: its callers run SDPA instead
            row["triton"] = f"fell back to SDPA: {settings.failed.get('decode', 'no reason given')[:300]}"
            return row
        row["triton"] = "ran"
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        for name, fn in (("sdpa", plain), ("triton", fused)):
            for _ in range(3):
                fn()
            bench.sync(dev)
            t = time.perf_counter()
            for _ in range(20):
                fn()
            bench.sync(dev)
            us = 1e6 * (time.perf_counter() - t) / 20
            row[f"{name}_us"] = round(us, 1)
            row[f"{name}_TBps"] = round(nbytes / us / 1e6, 2)
    return row


def stage_decode(r: Runner, model, weight_bytes: int, bandwidth: float, tflops: float) -> None:
    import squeezekit
    from squeezekit.batching import prefill

    a = r.args
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    mb = a.micro_batch
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, cfg.vocab_size, (mb, a.prompt_len), generator=g).to(r.device)
    variants = [v for v in a.variants.split(",") if v]
    broken: set[str] = set()
    for B in [int(b) for b in a.decode_batches.split(",")]:
        if r.left() < a.decode_need_s:
            r.results.setdefault("decode", []).append({"B": B, "skipped": "time budget"})
            continue
        S = max(1, round(0.2 * a.prompt_len))
        attn = attention_bench(
            r, B, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, S, head_dim
        )
        r.results.setdefault("decode_attention", []).append(attn)
        r.log(attn)
        for variant in variants:
            choice, compile = VARIANTS[variant]
            if compile and ((not r.cuda and not a.quick_compile) or variant in broken):
                continue
            bench.peak_reset(r.device)

            def measure(steps, choice=choice, compile=compile, B=B):
                with _kernels(choice) as settings, torch.inference_mode():
                    before = dict(settings.calls)
                    with squeezekit.compress(model, evictor="streaming", budget=0.2) as c:
                        cache, logits = prefill(model, c, ids, None, micro_batch=mb)
                        replicate(cache, B // mb)
                        first = logits.argmax(-1).repeat_interleave(B // mb)
                        kv = cache.kv_nbytes()
                        row = _decode_once(r, model, cache, first, steps, compile)
                        c.last_cache = None
                        del cache
                    row["kernels"] = kernels_used(settings, choice, before)
                return row, kv

            try:
                if compile:  # compile (or recompile for a new batch size) outside the timed runs
                    measure(3)
                    bench.peak_reset(r.device)
                row, kv = measure(a.decode_steps)
            except Exception as exc:
                if bench.is_oom(exc) or not compile:
                    raise
                broken.add(variant)  # a compile failure costs this variant, not the stage
                traceback.print_exc()
                r.results.setdefault("decode", []).append({"B": B, "variant_failed": variant, "error": str(exc)[:500]})
                continue
            floor = 1000 * (weight_bytes + kv) / bandwidth if bandwidth == bandwidth else float("nan")
            S = kv / (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize * B)
            flops = 2 * params * B + 4 * B * cfg.num_attention_heads * S * head_dim * cfg.num_hidden_layers
            compute_ms = 1000 * flops / (tflops * 1e12) if tflops == tflops else float("nan")
            row.update(B=B, variant=variant, kv_gib=round(kv / 2**30, 2), floor_ms=round(floor, 2),
                       compute_floor_ms=round(compute_ms, 2), replay_over_floor=round(row["replay_step_ms"] / floor, 2),
                       bench_over_floor=round(row["bench_step_ms"] / floor, 2),
                       decode_tok_s_replay=round(1000 * B / row["replay_step_ms"], 1))  # fmt: skip
            r.results.setdefault("decode", []).append(row)
            r.log(row)
            r.write()
    rows = [x for x in r.results.get("decode", []) if "replay_step_ms" in x and x["B"] >= a.target_min_batch]
    for B in sorted({x["B"] for x in rows}):
        best = min((x for x in rows if x["B"] == B), key=lambda x: x["replay_step_ms"])
        others = [x for x in rows if x["B"] == B and x["variant"] in ("plain", "steady") and x is not best]
        was = "".join(f"; {variant_label(x)} {x['replay_step_ms']} ms ({x['replay_over_floor']}x)" for x in others)
        r.target(
            f"decode step vs floor at B={B}",
            "<= 1.6x",
            f"{best['replay_step_ms']} ms replayed ({best['replay_over_floor']}x; bench protocol "
            f"{best['bench_over_floor']}x) vs floor {best['floor_ms']} ms, "
            f"compute floor {best['compute_floor_ms']} ms, with {variant_label(best)}{was}",
            best["replay_over_floor"] <= 1.6,
            best["replay_over_floor"],
        )


# -- 5. B=1024 --------------------------------------------------------------------------------------------------------
def stage_big_batch(r: Runner, model, weight_bytes: int, bandwidth: float) -> None:
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    a = r.args
    B = a.big_batch
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, model.config.vocab_size, (B, a.prompt_len), generator=g).to(r.device)
    row = None
    # the decode variant: the fastest the decode stage measured (compiled layers only if they worked there)
    timed = [x for x in r.results.get("decode", []) if "replay_step_ms" in x]
    if timed:
        largest = max(x["B"] for x in timed)
        variant = min((x for x in timed if x["B"] == largest), key=lambda x: x["replay_step_ms"])["variant"]
    else:
        variant = "steady"
    choice, compile = VARIANTS[variant]
    for chunk in (None, a.chunk):
        bench.peak_reset(r.device)
        try:
            with _kernels(choice) as settings, torch.inference_mode():
                before = dict(settings.calls)
                with squeezekit.compress(model, evictor="streaming", budget=0.2) as c:
                    bench.sync(r.device)
                    t0 = time.perf_counter()
                    cache, logits = prefill(model, c, ids, None, micro_batch=a.micro_batch, chunk=chunk)
                    first = logits.argmax(-1)
                    bench.sync(r.device)
                    t1 = time.perf_counter()
                    decoder = GreedyDecoder(model, cache, first, cuda_graph=True, compile=compile)
                    decoder.run(a.big_new_tokens - 1)
                    bench.sync(r.device)
                    t2 = time.perf_counter()
                    decoder.run(16)
                    bench.sync(r.device)
                    replay = 1000 * (time.perf_counter() - t2) / 16
                    kv = cache.kv_nbytes()
                    peak = torch.cuda.max_memory_allocated() / 2**30 if r.cuda else float("nan")
                    del cache, decoder
                used = kernels_used(settings, choice, before)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not bench.is_oom(exc):
                raise
            r.results.setdefault("big_batch", []).append({"B": B, "chunk": chunk, "oom": True})
            r.log(r.results["big_batch"][-1])
            continue
        floor = 1000 * (weight_bytes + kv) / bandwidth if bandwidth == bandwidth else float("nan")
        N = a.big_new_tokens
        row = dict(B=B, chunk=chunk, variant=variant, prefill_s=round(t1 - t0, 2),
                   bench_step_ms=round(1000 * (t2 - t1) / (N - 1), 2), replay_step_ms=round(replay, 2),
                   floor_ms=round(floor, 2), peak_gib=round(peak, 2), kv_gib=round(kv / 2**30, 2),
                   decode_tok_s=round(B * (N - 1) / (t2 - t1), 1), decode_tok_s_replay=round(1000 * B / replay, 1),
                   e2e_tok_s=round(B * N / (t2 - t0), 1), kernels=used)  # fmt: skip
        r.results.setdefault("big_batch", []).append(row)
        r.log(row)
        break
    if row is None:
        r.target(f"B={B} at budget 0.2 fits", "runs", "out of memory, chunked too", False)
        return
    how = "unchunked" if row["chunk"] is None else f"chunked prefill ~{row['chunk']}"
    r.target(
        f"B={B} at budget 0.2 fits", "runs", f"{how}: peak {row['peak_gib']} GiB, prefill {row['prefill_s']} s", True
    )
    r.target(
        f"decode step vs floor at B={B}",
        "<= 1.6x",
        f"{row['replay_step_ms']} ms replayed vs floor {row['floor_ms']} ms: "
        f"{row['replay_step_ms'] / row['floor_ms']:.2f}x (bench protocol {row['bench_step_ms']} ms; "
        f"{variant_label(row)})",
        row["replay_step_ms"] / row["floor_ms"] <= 1.6,
        row["replay_step_ms"] / row["floor_ms"],
    )
    tok = row["decode_tok_s_replay"]
    base = r.results["baseline"]
    for key, peer, goal in PEERS:
        ref = base.get(key)
        if ref is None:
            why = f"no {key} run in {base['file']}" if base else "no --baseline given"
            r.target(f"decode tok/s at B={B} vs {peer}", f">= {goal:g}x", f"{tok:.0f} tok/s replayed; not compared: "
                     f"{why}", None)  # fmt: skip
            continue
        ratio = tok / ref["decode_tok_s"]
        unlike = []  # the baseline's setting where it is not this run's
        for what, field, mine in (("config", "config", a.config), ("prompt length", "prompt_len", a.prompt_len)):
            if base.get(field) not in (None, mine):
                unlike.append(f"{what} {base[field]} there, {mine} here")
        r.target(
            f"decode tok/s at B={B} vs {peer}",
            f">= {goal:g}x",
            f"{tok:.0f} tok/s replayed ({row['decode_tok_s']:.0f} bench protocol, {N} tokens) vs "
            f"{ref['decode_tok_s']:.0f} tok/s ({ref['method']} at B={ref['B']}, from {base['source']}): {ratio:.1f}x "
            f"(indicative: not the same run{''.join(f'; {u}' for u in unlike)})",
            ratio >= goal,
            None if r.cuda else float("nan"),
        )


def read_baseline(path: str | None) -> dict:
    """transformers' (``hf``) and kvpress's best decode tok/s in a ``squeezekit bench`` JSON (``bench --out DIR``;
    kvpress's rows with ``--peer-kvpress``), and where they come from; {} without a file."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--baseline {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise SystemExit(f"--baseline {path}: not a squeezekit bench JSON (no list of runs)")
    setting = ", ".join(f"{k} {data[k]}" for k in ("device", "config", "prompt_len", "new_tokens") if k in data)
    out: dict = {"file": str(path), "source": f"{path} ({setting})" if setting else str(path),
                 "config": data.get("config"), "prompt_len": data.get("prompt_len")}  # fmt: skip
    for key, pick in (("transformers", lambda m: m == "hf"), ("kvpress", lambda m: m.startswith("kvpress"))):
        rows = [x for x in data["runs"] if isinstance(x, dict) and pick(str(x.get("method", ""))) and
                isinstance(x.get("decode_tok_s"), (int, float))]  # fmt: skip
        if rows:
            best = max(rows, key=lambda x: x["decode_tok_s"])
            out[key] = {"method": best["method"], "B": best.get("B"), "decode_tok_s": best["decode_tok_s"]}
    return out


# -- report -----------------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = [f"# gpu_perf: {res.get('device', '?')}", "",
             f"torch {res.get('torch')}, transformers {res.get('transformers')}, triton {res.get('triton')}, "
             f"config {res['args']['config']}, prompts {res['args']['prompt_len']} tokens, copy bandwidth "
             f"{res.get('copy_bandwidth_Bps', float('nan')) / 1e12:.2f} TB/s, "
             f"bf16 GEMM {res.get('gemm_tflops', float('nan')):.0f} TFLOP/s.", "",
             f"Baseline of the peers' figures: {res.get('baseline', {}).get('source', 'none (no --baseline)')}.", "",
             "## Targets", "", "| target | goal | measured | met? |", "|---|---|---|---|"]  # fmt: skip
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    lines += ["", "## Checks", ""]
    for c in res["checks"]:
        extra = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items() if k not in ("check", "ok")
        )
        lines.append(f"- {'ok' if c['ok'] else 'FAILED'}: {c['check']} ({extra})")
    if res.get("prefill"):
        lines += ["", "## Prefill", "",
                  "| method | B | kernels | chunk | prefill s | peak GiB | prefill peak KV GiB | policy s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in res["prefill"]:
            lines.append(
                f"| {p['method']} | {p['B']} | {p['kernels']} | {p['chunk'] or ''} | {p['prefill_s']} | "
                f"{p['peak_gib']} | {p['kv_gib_peak_prefill']} | {p['policy_s']} |"
            )
    if res.get("decode"):
        lines += ["", "## Decode step (streaming@0.2, cache of one micro-batch repeated to B rows)", "",
                  "| B | variant | replay ms | bench-protocol ms | floor ms | compute floor ms | replay / floor "
                  "| tok/s (replay) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for d in res["decode"]:
            if "replay_step_ms" not in d:
                lines.append(
                    f"| {d['B']} | {d.get('variant_failed', '')} {d.get('skipped', '')} {d.get('error', '')[:200]} "
                    "| | | | | | |"
                )
                continue
            lines.append(
                f"| {d['B']} | {variant_label(d)} | {d['replay_step_ms']} | {d['bench_step_ms']} | {d['floor_ms']} | "
                f"{d['compute_floor_ms']} | {d['replay_over_floor']} | {d['decode_tok_s_replay']} |"
            )
    if res.get("prefill_attention"):
        lines += ["", "## Prefill attention alone (one layer, one micro-batch)", "", "```",
                  json.dumps(res["prefill_attention"]), "```"]  # fmt: skip
    if res.get("decode_attention"):
        lines += ["", "## Decode attention alone (one layer, full buffer)", "", "```",
                  *[json.dumps(x) for x in res["decode_attention"]], "```"]  # fmt: skip
    if res.get("big_batch"):
        lines += ["", "## Large batch, end to end", "", "```", *[json.dumps(b) for b in res["big_batch"]], "```"]
    lines += ["", "## Stages", "", *[f"- {k}: {v}" for k, v in res["stages"].items()], ""]
    return "\n".join(lines)


STAGES = ("correctness", "h2o_prefill", "chunked_prefill", "decode", "big_batch")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_perf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU, seconds): the script's own test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="mistral-7b")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--prefill-batch", type=int, default=32, help="B of the h2o and chunked prefill comparisons")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--decode-batches", default="128,768")
    p.add_argument("--variants", default="plain,steady,steady+decode+compile", help=f"of {', '.join(VARIANTS)}")
    p.add_argument(
        "--decode-steps", type=int, default=32, help="steps per timed run (bench's 127-step figure is derived)"
    )
    p.add_argument("--decode-need-s", type=float, default=25.0, help="skip a decode batch with less time left")
    p.add_argument("--target-min-batch", type=int, default=128)
    p.add_argument("--big-batch", type=int, default=1024)
    p.add_argument("--big-new-tokens", type=int, default=32)
    p.add_argument("--big-batch-need-s", type=float, default=150.0)
    p.add_argument(
        "--baseline",
        metavar="FILE",
        help="a squeezekit bench JSON (bench --out DIR, with --peer-kvpress for kvpress): the large batch's decode "
        "tok/s is compared with the best hf and kvpress rows there (default: not compared)",
    )
    p.add_argument("--check-batch", type=int, default=4)
    p.add_argument("--check-len", type=int, default=512)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=430.0,
        help="stages that would not fit are skipped (rerun them with --stages)",
    )
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--quick-compile", action="store_true", help="(quick mode) also run the compiled variant on the CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.prompt_len, args.micro_batch, args.prefill_batch, args.chunk = "tiny", 64, 2, 4, 16
        args.decode_batches, args.decode_steps, args.target_min_batch = "4,8", 4, 4
        args.variants = "plain,steady,steady+decode,steady+decode+compile"
        args.big_batch, args.big_new_tokens, args.check_batch, args.check_len, args.check_tokens = 8, 4, 2, 96, 4
        args.big_batch_need_s, args.decode_need_s = 0.0, 0.0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    r = Runner(args)
    r.results["baseline"] = read_baseline(args.baseline)  # before any work: a bad file is a one-line error
    device = args.device
    dtype = torch.bfloat16 if r.cuda else torch.float32
    import transformers

    r.results.update(device=torch.cuda.get_device_name() if r.cuda else "cpu", torch=torch.__version__,
                     transformers=transformers.__version__)  # fmt: skip
    with contextlib.suppress(Exception):
        import triton

        r.results["triton"] = triton.__version__
    model = bench.build_model(args.config, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = bench.copy_bandwidth(device)
    tflops = gemm_tflops(device)
    r.results.update(weight_bytes=weight_bytes, copy_bandwidth_Bps=bandwidth, gemm_tflops=tflops)
    r.log(
        {
            "model": args.config,
            "weight_gib": round(weight_bytes / 2**30, 2),
            "copy_TBps": bandwidth / 1e12,
            "gemm_tflops": tflops,
        }
    )

    def correctness():
        check_attention_kernels(r)
        check_steady_kernel(r)
        # the same shapes with 4 layers, in fp32: exact token comparisons
        exact = r.cuda and args.config in bench.CONFIGS
        small = bench.build_model(args.config, device, torch.float32, layers=4) if exact else None
        if args.quick and not r.cuda:
            small = model  # the tiny model is fp32 already: runs the code path (the kernels are GPU-only)
        check_served_tokens(r, model, small)
        del small

    chosen = set(args.stages.split(","))
    stages = [
        ("correctness", correctness, 0),
        ("h2o_prefill", lambda: stage_h2o_prefill(r, model), 40 if r.cuda else 0),
        ("chunked_prefill", lambda: stage_chunked(r, model), 40 if r.cuda else 0),
        ("decode", lambda: stage_decode(r, model, weight_bytes, bandwidth, tflops), args.decode_need_s),
        ("big_batch", lambda: stage_big_batch(r, model, weight_bytes, bandwidth), args.big_batch_need_s),
    ]
    for name, fn, need in stages:
        if name in chosen:
            r.stage(name, fn, need_s=need)
    failed = [c["check"] for c in r.results["checks"] if not c["ok"]]
    broken = [k for k, v in r.results["stages"].items() if v["status"].startswith("failed")]
    r.results["summary"] = {
        "checks_failed": failed,
        "stages_failed": broken,
        "targets_met": [t["target"] for t in r.results["targets"] if t["met"]],
        "targets_not_met": [t["target"] for t in r.results["targets"] if t["met"] is False],
        "seconds": round(time.perf_counter() - r.t0, 1),
    }
    r.write()
    print(markdown(r.results))
    print(f"wrote {r.out}/gpu_perf.json and gpu_perf.md in {r.results['summary']['seconds']} s")
    return 1 if failed or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""transformers' own fast paths as ``squeezekit bench`` baselines, timed with the protocol of `bench_models.run_hf`:
``hf-static`` (``generate`` with a ``StaticCache``, whose decode transformers compiles on CUDA) and ``hf-cb``
(continuous batching: ``generate_batch``, a paged cache and CUDA graphs, the engine behind ``transformers serve
--continuous-batching``).

Set up as transformers documents them, so that the baselines are fair:

- ``hf-static``: one ``StaticCache`` of B x (prompt + new tokens) slots, a first ``generate`` of three tokens that
  compiles and captures the decode step (timed apart, as ``warmup_s``), ``cache.reset()``, then the timed
  ``generate``. On CUDA transformers compiles the decode forward itself (its ``CompileConfig``: inductor,
  ``reduce-overhead``, static shapes); every batch size is its own compilation, so dynamo's caches are reset before
  each one (a ladder of sizes would otherwise pass dynamo's recompile limit and fall back to eager steps). On the
  CPU nothing is compiled: a plain static cache.
- ``hf-cb``: B requests with at most B in flight (``max_requests_per_batch``), a page pool sized to the workload
  (``num_blocks`` = B x the pages of one sequence; by default transformers fills 90 % of free memory with pages)
  and no safety margin (by default the scheduler admits no new prompt once 15 % of the pages are left, which in a
  pool sized to the workload holds the last requests back until the first ones finish),
  ``max_batch_tokens`` = one prompt plus one decode token per request (a forward prefills one prompt while the
  others decode), ``eos_token_id = -1`` (every request runs to its length). Without flash-attn transformers runs
  ``paged|sdpa``: every forward attends with a dense mask over every key in flight, so a decode step costs
  O(B^2 x length) and the ladder finds the size past which it stops paying. (transformers' defaults on one H200,
  256 x 4096-token prompts: not finished after 540 s, a mask of 8192 x the whole page pool.)

Continuous batching interleaves one request's prefill with the others' decode, so its figures are read from the
per-token timestamps (``record_timestamps``), on the clock of ``time.perf_counter``: ``prefill_s`` = the last
request's first token - the first request's admission; decode tok/s = B x (N - 1) / the time during which at least
one request was decoding (the union of [first token, last token] over requests); step ms = a request's mean
time between tokens; end to end = B x N / (last token - first admission). The manager's start (page pool, CUDA
graph capture) is ``setup_s``, outside every rate.
"""

from __future__ import annotations

import math
import time

import torch

from .bench_models import (
    BaselineMissing,
    allocated_gib,
    gib_since,
    kv_bytes_per_token,
    peak_gib,
    peak_reset,
    sync,
    transformers_version,
)

STATIC = "hf-static"
BATCHING = "hf-cb"
SERVING = {STATIC: "transformers' StaticCache (compiled decode on CUDA)", BATCHING: "transformers' continuous batching"}
#: tokens of the three-token generate that compiles and captures ``hf-static``'s decode before the timed one
WARMUP_TOKENS = 3


def serve(name: str, model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """The serving baseline ``name`` (`STATIC` or `BATCHING`) on ``ids``. A baseline that breaks here for another
    reason than memory is a `BaselineMissing` saying why (reported as not run, not the end of the other methods'
    runs); running out of memory is raised as it is, for the batch ladder to stop at."""
    from .bench_models import is_oom

    run = run_static if name == STATIC else run_batching
    try:
        return run(model, ids, new_tokens, device)
    except BaselineMissing:
        raise
    except Exception as exc:
        if is_oom(exc):
            raise
        line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BaselineMissing(f"failed: {type(exc).__name__}: {line}") from None


@torch.inference_mode()
def run_static(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """One greedy ``generate`` of ``new_tokens`` tokens with a ``StaticCache``, after a warm-up on the same cache."""
    from transformers import StaticCache

    from squeezekit.transformers_api import cache_argument

    from .bench_models import timed_generate

    B, L = ids.shape
    compiled = device.startswith("cuda")
    if compiled:
        torch._dynamo.reset()  # this batch size compiles afresh (see the module docstring)
    peak_reset(device)
    before = allocated_gib(device)
    cache = StaticCache(config=model.config, max_cache_len=L + new_tokens)
    given = {cache_argument(model): cache}  # ``cache`` from transformers 5.24 on, ``past_key_values`` before
    try:
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=WARMUP_TOKENS, min_new_tokens=WARMUP_TOKENS, do_sample=False, **given)
        sync(device)
        warmup = time.perf_counter() - t
        cache.reset()
        r = timed_generate(model, ids, new_tokens, device, before, **given)
    finally:
        if compiled:
            torch._dynamo.reset()  # the compiled step's CUDA graphs hold memory the next method needs
        del cache, given
    kv = B * (L + new_tokens) * kv_bytes_per_token(model)  # the static cache holds every slot from the start
    return {**r, "kv_bytes": kv, "kv_bytes_peak_prefill": kv, "warmup_s": round(warmup, 3)}


def batching_config(B: int, prompt_len: int, new_tokens: int, block_size: int = 256):
    """The ``ContinuousBatchingConfig`` of ``hf-cb`` at B requests (see the module docstring); a `BaselineMissing`
    on a transformers without it (before 5.x's continuous batching took its own config, it read these from the
    ``GenerationConfig``)."""
    import transformers.generation as generation

    ContinuousBatchingConfig = getattr(generation, "ContinuousBatchingConfig", None)
    if ContinuousBatchingConfig is None:
        raise BaselineMissing(f"transformers {transformers_version()} has no ContinuousBatchingConfig")

    pages = B * math.ceil((prompt_len + new_tokens) / block_size)
    return ContinuousBatchingConfig(
        block_size=block_size, num_blocks=pages, max_batch_tokens=prompt_len + B, max_requests_per_batch=B,
        safety_margin=0.0,
    )  # fmt: skip


@torch.inference_mode(False)
def run_batching(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """``generate_batch`` of the B prompts of ``ids``, greedy, ``new_tokens`` tokens each, timed from its per-token
    timestamps (see the module docstring). Outside inference mode, also when called inside it: the manager's
    generation thread updates in place the tensors this thread creates, which inference mode would forbid."""
    from transformers import GenerationConfig

    B, L = ids.shape
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1:
        raise BaselineMissing(f"continuous batching runs on one device, the model is on {len(devices)}")
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    config = batching_config(B, L, new_tokens)
    peak_reset(device)
    before = allocated_gib(device)
    sync(device)
    t = time.perf_counter()
    results = model.generate_batch([row.tolist() for row in ids.cpu()], generation_config=gen,
                                   continuous_batching_config=config, record_timestamps=True,
                                   progress_bar=False)  # fmt: skip
    sync(device)
    done = list(results.values())
    failed = [r.error for r in done if r.error is not None]
    if len(done) != B or failed:
        raise RuntimeError(f"generate_batch returned {len(done)} of {B} requests ({len(failed)} failed: "
                           f"{(failed or ['none'])[0]})")  # fmt: skip
    stamps = [r.timestamps for r in done]
    if any(s is None or len(s) != new_tokens for s in stamps):
        raise RuntimeError(f"generate_batch did not record {new_tokens} timestamps per request")
    start = min(r.created_time for r in done)
    end = max(s[-1] for s in stamps)
    decoding = busy_time([(s[0], s[-1]) for s in stamps])
    step = sum(s[-1] - s[0] for s in stamps) / (B * (new_tokens - 1))
    tokens = torch.tensor([r.generated_tokens for r in done], device=ids.device)
    peak = peak_gib(device)
    kv = config.num_blocks * config.block_size * kv_bytes_per_token(model)  # the page pool, held from the start
    return dict(
        prefill_s=round(max(s[0] for s in stamps) - start, 3), total_s=round(end - start, 3),
        decode_tok_s=round(B * (new_tokens - 1) / decoding, 1), e2e_tok_s=round(B * new_tokens / (end - start), 1),
        step_ms=round(1000 * step, 2), peak_gib=peak, prefill_mem_gib=gib_since(peak, before), kv_bytes=kv,
        kv_bytes_peak_prefill=kv, setup_s=round(start - t, 3), tokens=tokens,
    )  # fmt: skip


def busy_time(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the intervals ``spans`` (the time during which at least one request decoded)."""
    total, reach = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total

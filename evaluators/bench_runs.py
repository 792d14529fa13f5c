"""squeezekit's side of ``squeezekit bench``: the methods it compares and how one squeezekit run is timed.

A method is ``hf`` (transformers' full cache, timed by `bench_models.run_hf`), ``hf@BACKEND[BITS]`` (transformers'
own ``QuantizedCache``, a full cache quantized by ``fp8``, ``quanto2``/``quanto4`` or ``hqq1``..``hqq8``: the
field's quantized baseline; a backend that does not import is reported as not run, with why), ``hf-static`` and
``hf-cb`` (transformers' static cache with its compiled decode, and its continuous batching: `bench_serving`) or a
config label (``squeeze+streaming@0.2``, any ``/KEY=VALUE`` after it, see `squeezekit.Config.from_label`),
optionally followed by its own chunked prefill (``~1024``) and its own batch sizes (``:8/16/32``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from squeezekit.config import Config
from squeezekit.errors import ConfigError

from .bench_models import allocated_gib, gib_since, peak_gib, peak_reset, sync
from .bench_serving import SERVING

HF = "hf"
#: transformers' QuantizedCache backends and the bits each takes (None: its own, fp8's per-tensor scale)
QUANTIZED = {"fp8": (None,), "quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}


@dataclass(frozen=True)
class Method:
    name: str  #: as given, without its batch sizes, e.g. "squeeze+streaming@0.2~1024"
    config: Config | None  #: None for transformers' full cache
    batches: tuple[int, ...] | None = None  #: this method's own batch sizes, else --batches
    chunk: int | None = None  #: this method's own chunked prefill, else --prefill-chunk
    #: ``hf@BACKEND[BITS]``: transformers' QuantizedCache (backend, bits), else None
    quantized: tuple[str, int | None] | None = None
    #: ``hf-static`` or ``hf-cb``: one of transformers' serving paths (bench_serving.SERVING), else None
    serving: str | None = None

    @classmethod
    def parse(cls, text: str) -> Method:
        spec, _, sizes = text.strip().partition(":")
        batches = _sizes(text, sizes) if sizes else None
        if spec == HF:
            return cls(HF, None, batches)
        if spec in SERVING:
            return cls(spec, None, batches, serving=spec)
        if spec.startswith(HF + "@"):
            return cls(spec, None, batches, quantized=_backend(text, spec[len(HF) + 1 :]))
        label, _, chunk = spec.partition("~")
        config = Config.from_label(label, source="--methods")
        return cls(spec, config, batches, _sizes(text, chunk)[0] if chunk else None)

    @property
    def is_hf(self) -> bool:
        return self.config is None


def _sizes(text: str, part: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in part.split("/"))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            "--methods",
            text,
            "expected hf, hf-static, hf-cb or LABEL[~CHUNK][:B1/B2...], e.g. squeeze+h2o@0.2~1024:8/16 "
            "(chunk and batch sizes whole numbers >= 1)",
            "command line",
        )
    return sizes


def _backend(text: str, name: str) -> tuple[str, int | None]:
    backend = next((b for b in QUANTIZED if name.startswith(b)), "")
    rest = name[len(backend) :]
    bits = int(rest) if rest.isdigit() else None if not rest else -1
    if not backend or bits not in QUANTIZED[backend]:
        choices = ", ".join(f"hf@{b}{'' if n is None else n}" for b, ns in QUANTIZED.items() for n in ns)
        raise ConfigError("--methods", text, f"expected a QuantizedCache backend: {choices}", "command line")
    return backend, bits


def parse_methods(text: str) -> list[Method]:
    methods = [Method.parse(item) for item in text.split(",") if item.strip()]
    if not methods:
        raise ConfigError(
            "--methods", text, "expected at least one method, e.g. hf,squeeze+streaming@0.2", "command line"
        )
    return methods


#: the models whose compiled decoder layers (squeezekit.compiled, on by default on CUDA) were compiled already
_COMPILED: set[int] = set()


def warm_compiled_layers(model, ids, device: str, config: Config) -> float | None:
    """Compile the decoder layers once per model and process, on two short rows, before a timed run: the
    compilation (tens of seconds for a 7B model) then stays out of the decode figures. It serves every later batch
    size of two or more (compiled with a symbolic batch). Returns its seconds, or None when there is nothing to do."""
    import squeezekit
    from squeezekit import compiled
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    if id(model) in _COMPILED or not compiled.wanted(None, ids):
        return None
    _COMPILED.add(id(model))
    sync(device)
    t0 = time.perf_counter()
    with squeezekit.compress(model, config) as comp:
        cache, logits = prefill(model, comp, ids[:2, :64], None, micro_batch=2)
        GreedyDecoder(model, cache, logits.argmax(-1)).run(4)
        del cache, logits
    sync(device)
    return round(time.perf_counter() - t0, 1)


@torch.inference_mode()
def run_squeezekit(
    model,
    ids,
    new_tokens: int,
    device: str,
    config: Config,
    micro_batch: int,
    cuda_graph: bool,
    chunk: int | None = None,
) -> dict:
    """One squeezekit run: micro-batched (optionally chunked) prefill, then the greedy decoder."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    compile_s = warm_compiled_layers(model, ids, device, config)
    peak_reset(device)
    before = allocated_gib(device)
    with squeezekit.compress(model, config) as comp:
        comp.sync_timings = device.startswith("cuda")
        sync(device)
        t0 = time.perf_counter()
        cache, logits = prefill(model, comp, ids, None, micro_batch=micro_batch, chunk=chunk)
        first = logits.argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        peak_prefill = peak_gib(device)
        del logits
        held = cache_allocated(device, before) if device.startswith("cuda") else None
        decoder = GreedyDecoder(model, cache, first, cuda_graph=cuda_graph)
        rest = decoder.run(new_tokens - 1)
        sync(device)
        t2 = time.perf_counter()
        s = comp.summary()
    B, _ = ids.shape
    overhead = sum(s["timings"].values())
    return dict(
        prefill_s=round(t1 - t0, 3), total_s=round(t2 - t0, 3), decode_tok_s=round(B * (new_tokens - 1) / (t2 - t1), 1),
        e2e_tok_s=round(B * new_tokens / (t2 - t0), 1), step_ms=round(1000 * (t2 - t1) / (new_tokens - 1), 2),
        peak_gib=peak_gib(device), peak_prefill_gib=peak_prefill, prefill_mem_gib=gib_since(peak_prefill, before),
        kv_bytes=s["kv_bytes_kept"], kv_bytes_full=s["kv_bytes_full"], kv_bytes_peak_prefill=s["kv_bytes_peak_prefill"],
        prefill_chunk=chunk, cuda_graph=decoder.graph is not None,
        policy_s={k: round(v, 4) for k, v in s["timings"].items()},
        policy_share_of_prefill=round(overhead / max(t1 - t0, 1e-9), 4),
        mean_budget=round(s["mean_budget"], 1), tokens=torch.cat([first[:, None], rest], dim=1),
        cache_nbytes=cache.nbytes(), cuda_allocated_after_prefill=held,
        head_budget_min=s["min_head_budget"], head_budget_max=s["max_head_budget"],
        compile_s=compile_s,  # (the layers' compilation before this run, outside its timings; None: none)
    )  # fmt: skip


def cache_allocated(device: str, before_gib: float | None) -> int:
    """Bytes CUDA holds now beyond what it held before the run (after prefill: the compressed cache, the step's
    first tokens and the allocator's rounding), to check the cache's own accounting (`SqueezeCache.nbytes`)."""
    gc.collect()
    sync(device)
    assert before_gib is not None
    return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) - before_gib * 2**30)


@torch.inference_mode()
def correctness_checks(model, ids, new_tokens: int, device: str, methods: list[Method], cuda_graph: bool) -> list[dict]:
    """On the same inputs: the full budget against transformers (prefill logits, greedy tokens), transformers' own
    serving paths (``hf-static``, ``hf-cb``) against its ``generate``, and each compressed fast path (micro-batches
    + decoder / CUDA graph) against squeezekit through ``model.generate``. The fast path prefills one row per
    micro-batch; a batch-level allocator (``squeeze`` with ``per="batch"``) allocates a served batch from its first
    micro-batch (squeezekit.batching.prefill), so for it the whole check batch is one micro-batch, as ``generate``
    sees it. A chunked prefill measures importance on its first chunk, so it has no
    unchunked reference (its exactness at budget 1 is tested on CPU: tests/test_fast_path.py)."""
    import squeezekit

    from .bench_models import BaselineMissing, run_hf
    from .bench_serving import serve

    checks = []
    ref = run_hf(model, ids, new_tokens, device)["tokens"]
    full = Config.from_label("squeeze+streaming@1")
    got = run_squeezekit(model, ids, new_tokens, device, full, ids.shape[0], cuda_graph)
    hf_logits = model(ids).logits[:, -1].float()
    with squeezekit.compress(model, full):
        sk_logits = model(ids, use_cache=True).logits[:, -1].float()
    checks.append({
        "method": full.label, "reference": "transformers full cache",
        "token_agreement": round(float((got["tokens"] == ref).float().mean()), 4),
        "prefill_logits_max_abs_diff": round(float((sk_logits - hf_logits).abs().max()), 5),
        "logit_scale": round(float(hf_logits.abs().max()), 3),
    })  # fmt: skip
    for method in [m for m in methods if m.serving is not None]:
        check = {"method": method.name, "reference": "transformers' generate with its full cache"}
        try:
            served = serve(method.serving, model, ids, new_tokens, device)["tokens"]
            check["token_agreement"] = round(float((served == ref).float().mean()), 4)
        except BaselineMissing as exc:
            check["not_run"] = str(exc)
        checks.append(check)
    for method in [m for m in methods if not m.is_hf and not m.chunk]:
        batch_level = bool(getattr(method.config.build_allocator(), "batch_level", False))
        micro_batch = ids.shape[0] if batch_level else 1
        fast = run_squeezekit(model, ids, new_tokens, device, method.config, micro_batch, cuda_graph)["tokens"]
        with squeezekit.compress(model, method.config):
            slow = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        checks.append({
            "method": method.name, "reference": "squeezekit through model.generate (no micro-batches, no CUDA graph)",
            "micro_batch": micro_batch,
            "token_agreement": round(float((fast == slow[:, ids.shape[1] :]).float().mean()), 4),
        })  # fmt: skip
    return checks


@torch.inference_mode()
def profile_decode(model, ids, device: str, config: Config, micro_batch: int, steps: int = 4) -> str:
    """Top CUDA kernels (CPU operators on the CPU) of a few eager (uncaptured) decode steps: where a step's time
    goes."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    with squeezekit.compress(model, config) as comp:
        cache, logits = prefill(model, comp, ids, None, micro_batch=micro_batch)
        decoder = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False)
        decoder.run(2)
        sync(device)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            decoder.run(steps)
            sync(device)
    return prof.key_averages().table(sort_by=f"{'cuda' if len(acts) > 1 else 'cpu'}_time_total", row_limit=30)

"""The steps squeezekit replays as CUDA graphs (`squeezekit.replay`).

Capturing a step needs two things the CPU can check: the step is a fixed point of the host's bookkeeping (buffer
sizes, held counts, steady flags: `SqueezeCache.host_state`), and it asks the device nothing (no ``.item()``,
``bool(tensor)``, ``nonzero`` or tensor built from host data, each a host sync or a copy on CUDA). Both are checked
here for the lm-eval adapter's extend chunks (`squeezekit.decoding.ChunkExtender`) with every bundled score-based
evictor and the usual allocators. The replay itself is checked on the GPU: ``benchmarks/lm_eval_timing.py --check``
compares the scores with the previous adapter's.
"""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
from tiny_models import applicable, batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import squeezekit
from squeezekit.decoding import ChunkExtender
from squeezekit.transformers_api import output_cache

pytestmark = pytest.mark.usefixtures("one_thread")

_SYNCS = {
    torch.ops.aten._local_scalar_dense.default: "a host sync (.item(), int(), bool())",
    torch.ops.aten.is_nonzero.default: "a host sync (bool(tensor))",
    torch.ops.aten.nonzero.default: "a host sync (nonzero)",
    torch.ops.aten.equal.default: "a host sync (torch.equal)",
    torch.ops.aten.lift_fresh.default: "a tensor built from host data (a host-to-device copy on CUDA)",
}


def _deferred_on_cuda() -> bool:
    """Inside the runner's NaN check of a score whose NaN check CUDA defers (the CPU checks at once)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "check" and frame.f_code.co_filename.endswith("runner.py"):
            return bool(frame.f_locals.get("defer_nan"))
        frame = frame.f_back
    return False


class HostSyncs(TorchDispatchMode):
    """Records the operations of a step that would make it wait for (or copy from) the host on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS and not _deferred_on_cuda():
            where = next(
                (f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
                 if "/squeezekit/" in f.filename or "/plugins/" in f.filename), "?"
            )  # fmt: skip
            self.found.append(f"{_SYNCS[func]} at {where}")
        return func(*args, **(kwargs or {}))


EVICTORS = [
    "streaming", "sliding_window", "h2o", "snapkv", "tova", "knorm", "keydiff", "random", "criticalkv",
    "expected_attention", "lagkv",
]  # fmt: skip
CONFIGS = [
    *(dict(allocator="squeeze", evictor=e) for e in EVICTORS),
    dict(allocator="uniform", evictor="h2o"),
    dict(allocator="lost_attention", evictor="streaming"),
    dict(allocator="pyramid", evictor="snapkv"),
    dict(allocator="squeeze", evictor="h2o", kv_bits=8),
    dict(allocator="squeeze", evictor="snapkv", heads="adaptive"),
]


def _extend_steps(config: dict, steps: int = 4, chunk: int = 8):
    """Prefill a left-padded batch, then extend it by ``steps`` chunks: each step's host state before and after,
    and its host syncs."""
    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=5)
    params = {k: v for k, v in config.items() if k not in ("allocator", "evictor")}
    out = []
    with torch.inference_mode(), squeezekit.compress(model, budget=0.3, **applicable(**config), **params):
        cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
        extend = ChunkExtender(model, cache, chunk)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            new = torch.randint(2, 128, (3, chunk), generator=g)
            pos = cache.seen.view(-1, 1) + torch.arange(chunk)
            before = cache.host_state()
            probe = HostSyncs()
            with probe:
                extend(new, pos)
            out.append((before, cache.host_state(), probe.found))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_a_steady_extend_step_is_a_fixed_point_with_no_host_sync(config):
    steps = _extend_steps(config)
    # the first chunk grows each buffer by a chunk's room; from then on every step leaves the host state as it was
    for before, after, found in steps[1:]:
        assert before == after
        assert not found, f"{config}: {sorted(set(found))}"


def test_the_extender_equals_plain_forwards():
    """`ChunkExtender` (eager on the CPU) gives the logits and the cache of plain forwards without a mask."""
    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=5)
    chunks = torch.randint(2, 128, (5, 3, 8), generator=torch.Generator().manual_seed(2))
    got, ref = [], []
    for use in (True, False):
        logits = got if use else ref
        with torch.inference_mode(), squeezekit.compress(model, budget=0.3, evictor="h2o") as comp:
            cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
            extend = ChunkExtender(model, cache, 8)
            for new in chunks:
                pos = cache.seen.view(-1, 1) + torch.arange(8)
                if use:
                    logits.append(extend(new, pos).clone())
                else:
                    out = model(input_ids=new, position_ids=pos, use_cache=True, past_key_values=cache)
                    logits.append(out.logits)
            logits.append(comp.last_cache.layers[1].keys.clone())
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

"""`squeezekit.compress` leaves the model exactly as it found it, and compressed models do not interfere.

Exactly: the same modules, the same attention implementation on every (sub-)config, no leftover hooks, the same
parameters and outputs, and no hook or attention implementation left over, after a successful block, an
exception and a KeyboardInterrupt raised during ``generate`` (from a forward hook, at prefill or mid-decode, or
from a StoppingCriteria). Two models compressed at once, with different configs, each give exactly their own
single-model result, also when their generation steps are interleaved.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_restored, batch, snapshot, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

import squeezekit
from squeezekit import attention
from squeezekit.architectures import resolve
from squeezekit.transformers_api import cache_argument, output_cache

GEN = dict(do_sample=False, pad_token_id=0)
CONFIG = dict(allocator="squeeze", evictor="h2o", budget=0.4, window=3)


pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(Exception):
    pass


class InterruptAfter(StoppingCriteria):
    """Raises KeyboardInterrupt (as Ctrl-C would) after ``steps`` generated tokens."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls >= self.steps:
            raise KeyboardInterrupt
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def raising_hook(module, exc: type[BaseException], on_call: int):
    """A forward hook on ``module`` raising ``exc`` on its ``on_call``-th call (1 = during prefill)."""
    calls = [0]

    def hook(mod, args, output):
        calls[0] += 1
        if calls[0] == on_call:
            raise exc()

    return module.register_forward_hook(hook)


def layers_of(model):
    return resolve(model).layers


WAYS = {
    "success": (None, None),
    "exception after generate": (Boom, None),
    "exception in a forward hook at prefill": (Boom, ("hook", 1)),
    "KeyboardInterrupt in a forward hook at prefill": (KeyboardInterrupt, ("hook", 1)),
    "KeyboardInterrupt in a forward hook mid-decode": (KeyboardInterrupt, ("hook", 4)),
    "KeyboardInterrupt from a StoppingCriteria": (KeyboardInterrupt, ("stopping", 3)),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt_neox", "mistral_window"])
@pytest.mark.parametrize("way", list(WAYS))
def test_model_is_restored_exactly(arch, way):
    exc, where = WAYS[way]
    model = tiny_model(arch)
    ids, mask = batch(2, 30, pad=4)
    before = snapshot(model, ids, mask)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
    handle, kwargs = None, {}
    if where and where[0] == "hook":
        handle = raising_hook(layers_of(model)[1], exc, where[1])
    elif where:
        kwargs["stopping_criteria"] = StoppingCriteriaList([InterruptAfter(where[1])])
    compressor = None
    try:
        with pytest.raises(exc) if exc else _nothing():
            with squeezekit.compress(model, **CONFIG) as compressor:
                assert model.config._attn_implementation == attention.NAME and compressor.active
                model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN, **kwargs)
                if exc is Boom:
                    raise Boom
    finally:
        if handle is not None:
            handle.remove()  # the user's own hook
    assert_restored(model, before, ids, mask)
    assert compressor._handles == [] and not compressor.active and compressor._forward is None
    # plain generation is untouched, and a new block works as if nothing had happened
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN), reference)
    fresh = tiny_model(arch)
    with squeezekit.compress(fresh, **CONFIG):
        expected = fresh.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
    with squeezekit.compress(model, **CONFIG):
        again = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
    assert torch.equal(again, expected)
    assert_restored(model, before, ids, mask)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_eager_model_keeps_eager():
    model = tiny_model("qwen3", attn="eager")
    ids, mask = batch(1, 20)
    before = snapshot(model, ids, mask)
    with squeezekit.compress(model, budget=0.5, window=2) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **GEN)
    assert c.backend == "eager"
    assert_restored(model, before, ids, mask)
    assert model.config._attn_implementation == "eager"


# ---- two models at once ------------------------------------------------------------------------------------------

A = ("llama", dict(allocator="squeeze", evictor="streaming", budget=0.3, sinks=2, window=4))
B = ("gemma3", dict(allocator="pyramid", evictor="h2o", budget=0.5, window=3))
C = ("qwen2", dict(allocator="uniform", evictor="snapkv", budget=16, window=4))


def _inputs(seed):
    return batch(2, 36, pad=5, seed=seed)


def solo(arch, config, seed, new=8):
    model = tiny_model(arch)
    ids, mask = _inputs(seed)
    with squeezekit.compress(model, **config) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GEN)
    return out, c.summary()["budgets"]


def test_two_models_nested_do_not_interfere():
    (arch_a, cfg_a), (arch_b, cfg_b) = A, B
    ref_a, budgets_a = solo(arch_a, cfg_a, 1)
    ref_b, budgets_b = solo(arch_b, cfg_b, 2)
    a, b = tiny_model(arch_a), tiny_model(arch_b)
    (ids_a, mask_a), (ids_b, mask_b) = _inputs(1), _inputs(2)
    snap_a, snap_b = snapshot(a, ids_a, mask_a), snapshot(b, ids_b, mask_b)
    with squeezekit.compress(a, **cfg_a) as ca:
        with squeezekit.compress(b, **cfg_b) as cb:
            out_a = a.generate(ids_a, attention_mask=mask_a, max_new_tokens=8, **GEN)
            out_b = b.generate(ids_b, attention_mask=mask_b, max_new_tokens=8, **GEN)
            again_a = a.generate(ids_a, attention_mask=mask_a, max_new_tokens=8, **GEN)
            assert torch.equal(cb.summary()["budgets"], budgets_b)
        assert_restored(b, snap_b, ids_b, mask_b)  # b is back while a is still compressed...
        after_b = a.generate(ids_a, attention_mask=mask_a, max_new_tokens=8, **GEN)  # ... and a unaffected
        assert torch.equal(ca.summary()["budgets"], budgets_a)
    assert torch.equal(out_a, ref_a) and torch.equal(again_a, ref_a) and torch.equal(after_b, ref_a)
    assert torch.equal(out_b, ref_b)
    assert_restored(a, snap_a, ids_a, mask_a)


def _greedy(model, ids, mask):
    """A step-by-step greedy decode, as generate does it (finished rows continue on the pad token), one forward per
    call to next()."""
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens = []
    finished = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    while True:
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).masked_fill(finished, GEN["pad_token_id"])
        finished |= torch.isin(nxt, eos)
        tokens.append(nxt)
        yield torch.cat(tokens, dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_argument(model): output_cache(out)},
        )


def test_three_models_with_interleaved_steps_each_match_their_own_run():
    refs = [solo(arch, cfg, seed)[0] for seed, (arch, cfg) in enumerate((A, B, C))]
    models = [tiny_model(arch) for arch, _ in (A, B, C)]
    inputs = [_inputs(seed) for seed in range(3)]
    snaps = [snapshot(m, *x) for m, x in zip(models, inputs, strict=True)]
    with (
        squeezekit.compress(models[0], **A[1]),
        squeezekit.compress(models[1], **B[1]),
        squeezekit.compress(models[2], **C[1]),
    ):
        loops = [_greedy(m, *x) for m, x in zip(models, inputs, strict=True)]
        got = [None, None, None]
        for _ in range(8):  # one step of each model in turn
            for i, loop in enumerate(loops):
                got[i] = next(loop)
    for i in range(3):
        ids = inputs[i][0]
        assert torch.equal(torch.cat([ids, got[i]], dim=1), refs[i]), i
        assert_restored(models[i], snaps[i], *inputs[i])


def test_an_error_in_one_block_leaves_the_other_compressed():
    (arch_a, cfg_a), (arch_b, cfg_b) = A, B
    ref_a, _ = solo(arch_a, cfg_a, 1)
    a, b = tiny_model(arch_a), tiny_model(arch_b)
    (ids_a, mask_a), (ids_b, mask_b) = _inputs(1), _inputs(2)
    snap_b = snapshot(b, ids_b, mask_b)
    with squeezekit.compress(a, **cfg_a):
        with pytest.raises(KeyboardInterrupt):
            with squeezekit.compress(b, **cfg_b):
                b.generate(
                    ids_b,
                    attention_mask=mask_b,
                    max_new_tokens=8,
                    stopping_criteria=StoppingCriteriaList([InterruptAfter(2)]),
                    **GEN,
                )
        assert_restored(b, snap_b, ids_b, mask_b)
        assert a.config._attn_implementation == attention.NAME
        out_a = a.generate(ids_a, attention_mask=mask_a, max_new_tokens=8, **GEN)
    assert torch.equal(out_a, ref_a)

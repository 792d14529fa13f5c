"""Property-based fuzzing: random configs x tiny random models of every supported architecture x random batches.

Every case ends in a result or a *documented* error (a squeezekit error class whose message matches a row of
docs/errors.md), never an unexplained traceback; and on every result the invariants hold:

* the total budget is conserved exactly: for each sequence whose prompt is longer than its mean budget, the
  per-layer budgets of the compressible layers sum to round(mean budget x layers);
* the most recent token and (streaming) the attention sinks are always kept;
* no layer ever holds more tokens than its budget, after prefill and after every decode step;
* budget 1 is exact: the same greedy tokens as plain transformers;
* the model is restored after every case.

Deterministic (``derandomize=True``) and small enough for CI (a few hundred tiny generations in all).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled
from test_errors import documented
from tiny_models import ARCHS, attn_implementations, hook_counts, tiny_model

import squeezekit
from squeezekit.cache import SqueezeCache
from squeezekit.transformers_api import cache_in

ALLOCATORS = bundled("allocator", plain=True)
EVICTORS = bundled("evictor")
GEN = dict(do_sample=False, pad_token_id=0)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(arch: str, attn: str):
    if (arch, attn) not in _MODELS:
        _MODELS[arch, attn] = tiny_model(arch, attn)
    return _MODELS[arch, attn]


def left_padded(batch: int, length: int, pads: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, pad in enumerate(pads):
        mask[i, :pad] = 0
        ids[i, :pad] = 0
    return ids, mask


budgets = st.one_of(
    st.floats(0.05, 1.0),
    st.just(1.0),
    st.integers(2, 64),
    st.sampled_from([0.0, -0.25, 1.5, float("nan"), 0.004]),  # bad and degenerate values: documented errors
)


@st.composite
def cases(draw):
    config = {
        "allocator": draw(st.sampled_from(ALLOCATORS)),
        "evictor": draw(st.sampled_from(EVICTORS)),
        "budget": draw(budgets),
    }
    for key, strategy in (
        ("p", st.floats(0.05, 1.0)),
        ("sinks", st.integers(0, 4)),
        ("window", st.integers(1, 6)),
        ("heavy_ratio", st.floats(0.0, 1.0)),
    ):
        value = draw(st.none() | strategy)
        if value is not None:
            config[key] = value
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 64))
    # mostly real tokens; now and then a row that is almost or entirely padding (documented errors)
    pads = [draw(st.integers(0, length // 2) | st.integers(0, length)) for _ in range(batch)]
    return {
        "arch": draw(st.sampled_from(ARCHS)),
        "attn": draw(st.sampled_from(["sdpa", "sdpa", "eager"])),
        "config": config,
        "batch": batch,
        "length": length,
        "pads": pads,
        "new": draw(st.integers(1, 6)),
        "seed": draw(st.integers(0, 2**16)),
    }


def run(case):
    """Generate under compression; return (tokens, compressor, per-step layer counts) or the documented error."""
    model = model_for(case["arch"], case["attn"])
    ids, mask = left_padded(case["batch"], case["length"], case["pads"], case["seed"])
    steps: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []

    def spy(module, args, kwargs, output):  # after squeezekit's own hook: the cache as the step left it
        cache = cache_in(kwargs)
        if isinstance(cache, SqueezeCache) and cache.budgets is not None:
            steps.append(
                [
                    (layer.counts().clone(), None if layer.budget is None else layer.budget.clone())
                    for layer in cache.layers
                ]
            )

    hooks, attn = hook_counts(model), attn_implementations(model)
    try:
        with squeezekit.compress(model, **case["config"]) as compressor:
            handle = compressor.resolved.decoder.register_forward_hook(spy, with_kwargs=True)
            try:
                out = model.generate(
                    ids, attention_mask=mask, max_new_tokens=case["new"], min_new_tokens=case["new"], **GEN
                )
            finally:
                handle.remove()
    except squeezekit.SqueezekitError as error:
        assert documented(error), f"undocumented error: {type(error).__name__}: {error}"
        return error, ids, mask, None, None
    finally:  # restored, whatever happened
        assert hook_counts(model) == hooks and attn_implementations(model) == attn
    return out, ids, mask, compressor, steps


def check_invariants(case, out, ids, mask, compressor, steps):
    config = compressor.config
    summary = compressor.summary()
    cache = compressor.last_cache
    comp = compressor.compressible
    L = len(comp)
    prompt = mask.sum(-1)
    assert torch.equal(summary["prompt_len"], prompt)
    budgets = summary["budgets"]
    assert out.shape == (ids.shape[0], ids.shape[1] + case["new"])

    if config.full:
        assert bool((budgets == -1).all())  # unbounded: nothing evicted
    else:
        floor = compressor.runner.floor
        for b in range(ids.shape[0]):
            n = int(prompt[b])
            mean = n * config.budget if not config.absolute else float(config.budget)
            row = budgets[b, comp]
            whole = bool(summary["kept_whole"][b])
            assert whole == (mean >= n or round(mean * L) < floor * L), (n, mean, floor)
            if not whole:  # the prompt is longer than the budget: the allocator split exactly the total
                assert int(row.sum()) == round(mean * L), (row.tolist(), mean, L)
                assert int(row.min()) >= floor and int(row.max()) <= n
            elif mean >= n:  # kept whole until it reaches the (absolute) budget
                assert bool((row == round(mean)).all())
            else:  # too short for the evictor's floor: kept whole, never more than the prompt or the floor
                assert bool((row == max(n, floor)).all())

    # the cache never exceeds its budget: after prefill and after every decode step
    assert len(steps) == case["new"]  # (generate runs one forward per new token; the last one's cache included)
    for counts in steps:
        for layer_counts, budget in counts:
            if budget is not None:
                assert bool((layer_counts <= budget.view(-1, 1)).all())

    seen = cache.seen
    for i, layer in enumerate(cache.layers):
        if layer.keys is None:
            continue
        valid, pos = layer.valid, layer.positions.masked_fill(~layer.valid, -1)
        # the most recent token is always kept, in every KV head of every sequence
        assert bool((pos.amax(-1) == seen.view(-1, 1) - 1).all()), i
        if layer.budget is not None:
            assert bool((valid.sum(-1) <= layer.budget.view(-1, 1)).all())
        # streaming keeps its attention sinks (layers with the model's own sliding window drop what it drops)
        if config.evictor == "streaming" and not config.full and layer.window is None:
            sinks = compressor.evictor.sinks
            for s in range(sinks):
                has = (pos == s).any(-1)  # (B, H)
                assert bool(has[seen > s].all()), (i, s)


def _case(arch, config, length, new, batch=1, pads=(0,)):
    return {
        "arch": arch,
        "attn": "sdpa",
        "config": config,
        "batch": batch,
        "length": length,
        "pads": list(pads),
        "new": new,
        "seed": 0,
    }


@FUZZ
@given(case=cases())
# found by this test: a 1-token prompt on a sliding-window model overflowed an int32 position mask (RuntimeError)
@example(case=_case("mistral_window", {"budget": 1.0}, length=1, new=1))
# found by this test: at budget = sinks + 1 (window 1), making room for a decode token dropped a sink
@example(case=_case("llama", {"evictor": "streaming", "budget": 5, "window": 1}, length=2, new=5))
def test_any_config_on_any_model_ends_in_a_result_or_a_documented_error(case):
    got, ids, mask, compressor, steps = run(case)
    if isinstance(got, squeezekit.SqueezekitError):
        event(f"error: {type(got).__name__}")
        return
    event("result: full cache" if compressor.config.full else "result: compressed")
    check_invariants(case, got, ids, mask, compressor, steps)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    arch=st.sampled_from(ARCHS),
    attn=st.sampled_from(["sdpa", "eager"]),
    evictor=st.sampled_from(EVICTORS),
    batch=st.integers(1, 3),
    length=st.integers(2, 40),
    pad=st.integers(0, 12),
    new=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_budget_one_is_exact(arch, attn, evictor, batch, length, pad, new, seed):
    model = model_for(arch, attn)
    pads = [min(i * pad, length - 2) for i in range(batch)]
    ids, mask = left_padded(batch, length, pads, seed)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **GEN)
    case = {
        "arch": arch,
        "attn": attn,
        "config": {"evictor": evictor, "budget": 1.0},
        "batch": batch,
        "length": length,
        "pads": pads,
        "new": new,
        "seed": seed,
    }
    out, ids, mask, compressor, steps = run(case)
    assert not isinstance(out, BaseException), out
    assert torch.equal(out, reference)
    check_invariants(case, out, ids, mask, compressor, steps)


#: values of every kind for every key, valid or not
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(ALLOCATORS + EVICTORS + ["h20", "sqeeze", "", "max", "batch"]),
    st.lists(st.integers(), max_size=2),
)
_KEYS = [
    "allocator",
    "evictor",
    "budget",
    "p",
    "sinks",
    "window",
    "heavy_ratio",
    "fallback_allocator",
    "fallback_evictor",
    "kernel_size",
    "pooling",
    "beta",
    "per",
    "n_init",
    "budgte",
    "windw",
    "x",
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(values=st.dictionaries(st.sampled_from(_KEYS), _ANY, max_size=5), as_text=st.booleans())
def test_any_config_mapping_is_a_config_or_a_documented_error(values, as_text):
    try:
        if as_text:  # the k=v form: lm-eval model_args, CLI flags
            text = ",".join(f"{k}={v}" for k, v in values.items() if "," not in str(v) and "=" not in str(v))
            config = squeezekit.Config.from_string(text)
        else:
            config = squeezekit.Config.from_kwargs(**values)
    except squeezekit.SqueezekitError as error:
        assert documented(error), f"undocumented error: {type(error).__name__}: {error}"
        assert "\n" not in str(error)
        return
    assert squeezekit.Config.from_mapping(config.as_dict()) == config
    assert 0 < config.budget and math.isfinite(config.budget)
    config.describe()

"""The compressed cache on tiny random models of every supported architecture (fast, CPU, fp32)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from plugin_factory import bundled
from tiny_models import ARCHS, UNBUILT, applicable, batch, model_type, tiny_model

import squeezekit
from squeezekit.architectures import ARCHITECTURES
from squeezekit.cache import SqueezeCache
from squeezekit.transformers_api import cache_in, output_cache

GEN = dict(do_sample=False, pad_token_id=0)
ROOT = Path(__file__).resolve().parents[1]


def test_every_supported_architecture_has_a_tiny_model_and_is_in_the_readme():
    """The table of squeezekit/architectures.py is the one list of supported architectures: the tiny models these
    tests run on are of its model types, and cover every one but those `tiny_models.UNBUILT` names, with a reason;
    the README's "Supported models" names exactly its model types."""
    built = {model_type(name) for name in ARCHS}
    assert built <= set(ARCHITECTURES), built - set(ARCHITECTURES)
    assert set(ARCHITECTURES) - built == set(UNBUILT), "a supported architecture without a tiny model (or a reason)"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Supported models\n", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`([a-z0-9_]+)`", section)) == set(ARCHITECTURES)


def _full_cache_bytes(model, ids, mask):
    out = model(ids, attention_mask=mask, use_cache=True)
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in output_cache(out).layers)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_is_exact(arch, attn):
    """budget=1: logits within 1e-5 of plain transformers at every real position, identical greedy tokens."""
    model = tiny_model(arch, attn)
    ids, mask = batch(3, 40, pad=6)
    ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN)
    with squeezekit.compress(model, budget=1.0):
        logits = model(ids, attention_mask=mask, use_cache=True).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN)
    real = mask.bool()
    assert (logits - ref_logits)[real].abs().max().item() <= 1e-5
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_budget_beyond_prompt_plus_generation_is_exact(arch):
    """An absolute budget >= prompt + new tokens never evicts: same tokens as plain transformers."""
    model = tiny_model(arch)
    ids, mask = batch(2, 30, pad=4)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    with squeezekit.compress(model, budget=40, evictor="h2o", window=2) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    assert torch.equal(out, ref)
    s = c.summary()
    # nothing evicted at prefill (Gemma3's sliding layers keep only their own window, as in transformers)
    assert bool((s["budgets"][:, c.compressible] >= s["prompt_len"].view(-1, 1)).all())


def test_right_padding_forward_is_exact():
    model = tiny_model("llama")
    ids, _ = batch(3, 24)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    mask[2, -9:] = 0
    ref = model(ids, attention_mask=mask).logits
    with squeezekit.compress(model, budget=1.0):
        out = model(ids, attention_mask=mask, use_cache=True).logits
        no_cache = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-5
    assert (no_cache - ref)[real].abs().max().item() <= 1e-5


@pytest.mark.parametrize("evictor", bundled("evictor"))
@pytest.mark.parametrize("allocator", bundled("allocator", plain=True))
def test_memory_after_prefill_and_constant_during_decode(allocator, evictor):
    """At budget b the cache holds at most b x full + 3% bytes, and does not grow over 200 decode steps."""
    model = tiny_model("llama", hidden_size=128, head_dim=64)  # a real head size: bookkeeping is ~2% of K+V
    ids, mask = batch(2, 100)
    full = _full_cache_bytes(model, ids, mask)
    budget = 0.3
    with squeezekit.compress(model, budget=budget, **applicable(allocator, evictor, sinks=2, window=4)) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=200, min_new_tokens=200, **GEN)
        cache = c.last_cache
        s = c.summary()
    assert s["kv_bytes_full"] == full
    assert cache.nbytes() <= budget * full * 1.03  # all tensors: keys, values and slot bookkeeping
    assert s["kv_bytes_now"] == s["kv_bytes_kept"]
    budgets = s["budgets"]
    assert torch.equal(budgets.sum(-1), torch.full((2,), round(budget * 100 * 4)))
    for i, layer in enumerate(cache.layers):
        assert bool((layer.counts() <= budgets[:, i].view(-1, 1)).all())
        # the most recent token is always kept
        assert bool((layer.positions.amax(-1) == cache.seen.view(-1, 1) - 1).all())
        if evictor == "streaming":
            for sink in range(2):
                assert bool((layer.positions == sink).any(-1).all())


@pytest.mark.parametrize("evictor", bundled("evictor"))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_eager_and_sdpa_agree_under_compression(arch, evictor):
    ids, mask = batch(2, 48, pad=5)
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_model(arch, attn)
        with squeezekit.compress(model, budget=0.4, **applicable("squeeze", evictor, sinks=2, window=3)):
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=16, **GEN))
    assert torch.equal(outs[0], outs[1])


def test_compression_changes_the_cache_and_stays_within_budget_every_step():
    model = tiny_model("qwen2")
    ids, mask = batch(3, 60, pad=7)
    seen_counts = []

    def spy(module, args, kwargs, output):
        cache = cache_in(kwargs)
        if isinstance(cache, SqueezeCache) and cache.budgets is not None:
            seen_counts.append([int(layer.counts().max()) for layer in cache.layers])

    with squeezekit.compress(model, evictor="h2o", budget=0.25, window=3) as c:
        handle = model.model.register_forward_hook(spy, with_kwargs=True)
        try:
            model.generate(ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, **GEN)
        finally:
            handle.remove()
        budgets = c.summary()["budgets"]
    assert len(seen_counts) >= 29
    for counts in seen_counts:
        assert all(n <= int(budgets[:, i].max()) for i, n in enumerate(counts))


def test_a_prompt_too_short_for_the_budget_is_kept_whole():
    """Budget 0.1 of a 40-token prompt would keep 4 tokens per layer, below streaming's floor of 12: the prompt
    needs no compression and is kept whole (prefill logits and greedy tokens as with the full cache, while the
    prompt still fits), beside a longer prompt of the same batch that is compressed as usual; a layer of the short
    row never holds more than the prompt while decoding."""
    model = tiny_model("llama")
    ids, mask = batch(2, 160, pad=120)  # prompts of 160 and 40 tokens
    ref = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=8, **GEN)
    with squeezekit.compress(model, evictor="streaming", budget=0.1, sinks=4, window=8) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN)
    s = c.summary()
    assert s["kept_whole"].tolist() == [False, True]
    assert s["budgets"][1].tolist() == [40] * 4 and int(s["budgets"][0].sum()) == round(160 * 0.1 * 4)
    assert torch.equal(out[1:, -8:], ref[:, -8:])
    for layer in c.last_cache.layers:
        assert int(layer.counts()[1].max()) <= 40


def test_a_one_token_prompt_is_kept_whole():
    model = tiny_model("llama")
    ids, mask = batch(2, 6, pad=5)  # the second row holds 1 token
    ref = model.generate(ids[1:, -1:], max_new_tokens=5, **GEN)
    with squeezekit.compress(model, budget=0.2) as c:
        out = model.generate(ids[1:, -1:], max_new_tokens=5, **GEN)
    assert torch.equal(out, ref)
    assert c.summary()["kept_whole"].tolist() == [True]
    with squeezekit.compress(model, budget=0.2) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **GEN)
    assert c.summary()["kept_whole"].tolist() == [True, True]


def test_prompt_shorter_than_budget_is_not_evicted():
    model = tiny_model("mistral")
    ids, mask = batch(2, 20)
    ref = model(ids, attention_mask=mask).logits
    with squeezekit.compress(model, budget=64) as c:
        out = model(ids, attention_mask=mask, use_cache=True).logits
    assert (out - ref).abs().max().item() <= 1e-5
    assert c.summary()["kv_bytes_kept"] == c.summary()["kv_bytes_full"]


def test_unsupported_architecture_fails_before_generation():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(squeezekit.UnsupportedModelError, match="'gpt2'.*not supported"):
        with squeezekit.compress(model):
            pass


def test_model_is_restored_after_success_and_exception():
    model = tiny_model("llama")
    ids, mask = batch(1, 20)
    before = model(ids, attention_mask=mask).logits
    impl = model.config._attn_implementation

    def hooks(m):
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    n_hooks = hooks(model)
    with squeezekit.compress(model, budget=0.5, window=2):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **GEN)
    with pytest.raises(RuntimeError, match="boom"):
        with squeezekit.compress(model, budget=0.5, window=2):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, **GEN)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert hooks(model) == n_hooks
    assert torch.equal(model(ids, attention_mask=mask).logits, before)

"""Head splits (``heads=``): the contract's invariants, the bundled adaptive split (Ada-KV), and what the engine does
with unequal head budgets (each head kept within its own budget at every step, the memory following their sum)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_factory import bundled
from squeezekit.plugins.adaptive_heads import AdaptiveHeads
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit.budget import check_head_budgets
from squeezekit.layers import BudgetedLayer, HeadPool
from squeezekit.transformers_api import cache_in

GREEDY = dict(do_sample=False, pad_token_id=0)


# ---- the adaptive split alone ----------------------------------------------------------------------------------------
@st.composite
def requests(draw):
    B, H, S = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 24))
    cap = torch.tensor([[draw(st.integers(1, S)) for _ in range(H)] for _ in range(B)])
    budget = torch.tensor([draw(st.integers(1, int(cap[b].min()))) for b in range(B)])
    floor = draw(st.integers(1, 12))
    scores = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=B * H * S, max_size=B * H * S)), dtype=torch.float64)
    scores = scores.view(B, H, S)
    scores = scores.masked_fill(torch.arange(S) >= cap[..., None], float("-inf"))  # a head holds its first cap slots
    ties = draw(st.booleans())
    if ties:  # every head ranks its tokens alike (a positional evictor): the split must stay equal
        scores = torch.where(torch.isinf(scores), scores, torch.arange(S, dtype=torch.float64).neg())
    request = squeezekit.HeadSplitRequest(scores=scores, budget=budget, cap=cap, floor=floor)
    return request, draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])), ties


@settings(max_examples=300, deadline=None)
@given(requests())
def test_the_adaptive_split_honours_the_contract(case):
    """Rows sum to budget x H, every head keeps at least its safeguard share (and the floor) and at most what it
    holds; a safeguard of 1 is the equal split; heads that rank their tokens alike split equally."""
    request, safeguard, ties = case
    out = AdaptiveHeads(safeguard=safeguard).split(request)
    assert out.dtype == torch.long and out.device.type == "cpu"
    assert check_head_budgets(out, request.budget, request.floor, request.cap) is None
    guard = torch.maximum(request.budget.clamp(max=request.floor), (safeguard * request.budget).floor().long())
    assert bool((out >= guard.view(-1, 1)).all())
    equal = request.budget.view(-1, 1).expand_as(out)
    if safeguard == 1.0 or (ties and bool((request.cap == request.cap[:, :1]).all())):
        assert torch.equal(out, equal)


def test_the_layer_budget_goes_to_the_head_with_the_best_tokens():
    """One head attends to a few tokens (the others' scores are flat): the others' best tokens outrank its tail, so
    it keeps its safeguard share and the flat heads share the rest."""
    B, H, S = 1, 4, 100
    scores = torch.full((B, H, S), 0.5, dtype=torch.float64)
    scores[:, 0] = 0.0
    scores[:, 0, :3] = 10.0  # head 0: three heavy hitters, then nothing
    request = squeezekit.HeadSplitRequest(scores=scores, budget=torch.tensor([20]), cap=torch.full((B, H), S), floor=2)
    out = AdaptiveHeads(safeguard=0.2).split(request)
    assert out[0, 0] == 4  # its safeguard share, 0.2 x 20 (its three heavy hitters are in it)
    assert out[0, 1:].tolist() == [26, 25, 25]  # the other 76, in turn


# ---- in the engine ---------------------------------------------------------------------------------------------------
def _generate(model, ids, mask, new=8, spy=None, **config):
    with squeezekit.compress(model, **config) as c:
        handle = model.model.register_forward_hook(spy, with_kwargs=True) if spy else None
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, output_scores=True,
                                 return_dict_in_generate=True, **GREEDY)  # fmt: skip
        finally:
            if handle is not None:
                handle.remove()
        return out, c.summary(), c


def test_the_uniform_split_is_the_default_and_skips_the_call():
    model = tiny_model("llama")
    ids, mask = batch(3, 64, pad=7)
    base, summary, c = _generate(model, ids, mask, evictor="snapkv", budget=0.25)
    assert c.config.heads == "uniform" and not c.runner.splits_heads
    same, _, _ = _generate(model, ids, mask, evictor="snapkv", heads="uniform", budget=0.25)
    assert torch.equal(base.sequences, same.sequences)
    assert all(torch.equal(a, b) for a, b in zip(base.scores, same.scores, strict=True))
    # a safeguard of 1 runs the split and keeps equal head budgets: the same tokens, bit for bit
    guarded, s2, c2 = _generate(model, ids, mask, evictor="snapkv", heads="adaptive", safeguard=1.0, budget=0.25)
    assert c2.runner.splits_heads
    assert torch.equal(base.sequences, guarded.sequences)
    assert torch.equal(summary["head_budgets"], s2["head_budgets"])


@pytest.mark.parametrize("evictor", bundled("evictor"))
def test_budget_one_with_adaptive_is_plain_transformers(evictor):
    model = tiny_model("llama")
    ids, mask = batch(2, 48, pad=5)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, output_scores=True,
                           return_dict_in_generate=True, **GREEDY)  # fmt: skip
    out, _, _ = _generate(model, ids, mask, new=6, evictor=evictor, heads="adaptive", budget=1)
    assert torch.equal(plain.sequences, out.sequences)
    for a, b in zip(plain.scores, out.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("evictor", ["snapkv", "h2o"])
@pytest.mark.parametrize("allocator", ["uniform", "squeeze", "pyramid"])
def test_every_head_stays_within_its_own_budget_and_the_bytes_follow_their_sum(allocator, evictor):
    """At every step (prefill and each decode step), each KV head of each budgeted layer holds at most its own
    budget, and the layer's K/V bytes are exactly its heads' budgets' sum: no head is padded to the largest."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)  # (4 KV heads: room for a split)
    ids, mask = batch(2, 96, pad=9)
    steps, unequal = [], []

    def spy(module, args, kwargs, output):
        cache = cache_in(kwargs)
        if cache is None or getattr(cache, "budgets", None) is None:
            return
        for layer in cache.layers:
            if not isinstance(layer, BudgetedLayer) or layer.head_budget_host is None:
                continue
            hb = torch.from_numpy(layer.head_budget_host)
            assert bool((layer.counts().cpu() <= hb).all()), layer.layer_idx
            if bool((hb != hb[:, :1]).any()):
                unequal.append(layer.layer_idx)
                per_token = 2 * layer.head_dim * layer.dtype.itemsize
                assert layer.kv_nbytes() == int(hb.sum()) * per_token
        steps.append(True)

    out, summary, _ = _generate(model, ids, mask, spy=spy, allocator=allocator, evictor=evictor, heads="adaptive",
                                budget=0.2)  # fmt: skip
    assert len(steps) == 8  # prefill + 7 decode steps
    # snapkv's window attention tells this model's heads apart; h2o's prefill attention sums rank every head's tokens
    # alike here (by position: early tokens are seen by more queries), and the split then stays equal
    assert bool(unequal) == (evictor == "snapkv")
    heads = summary["head_budgets"]
    L = summary["budgets"].shape[1]
    assert torch.equal(heads.sum(-1), summary["budgets"][:, :L] * heads.shape[-1])  # each layer: budget x heads


def test_adaptive_holds_the_memory_of_uniform_at_the_same_budget():
    """KV bytes held with the adaptive split are within 2 % of the uniform split's at the same budget (the target),
    in the buffers themselves (kv_bytes_now), after prefill and decoding."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    ids, mask = batch(4, 128)
    _, uniform, _ = _generate(model, ids, mask, new=12, allocator="squeeze", evictor="snapkv", budget=0.1)
    _, adaptive, _ = _generate(model, ids, mask, new=12, allocator="squeeze", evictor="snapkv", heads="adaptive",
                               budget=0.1)  # fmt: skip
    assert adaptive["min_head_budget"] < adaptive["max_head_budget"]
    for key in ("kv_bytes_kept", "kv_bytes_now", "kv_bytes_held"):
        assert abs(adaptive[key] - uniform[key]) <= 0.02 * uniform[key], (key, adaptive[key], uniform[key])
    assert adaptive["kv_bytes_now"] <= 0.11 * adaptive["kv_bytes_full"] * 1.2  # (budget 0.1 of 128 + 12 new tokens)


def test_a_third_party_head_split_runs_by_name(plugin_site):
    """The plugin guide's example head split, installed as a package, is used by name; what it returns is checked."""
    import re

    from plugin_factory import DOC

    block = re.search(r"```python\n(# example: head split\n.*?)```", DOC.read_text(), flags=re.S).group(1)
    plugin_site.add("sk_first_head", block, package="sk-first-head", entry_points={"first_head": "sk_first_head"})
    plugin_site.reload()
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    ids, mask = batch(2, 80)
    config = dict(allocator="uniform", evictor="snapkv", heads="first_head", share=0.5, budget=0.25)
    out, summary, c = _generate(model, ids, mask, **config)
    assert c.runner.heads.name == "first_head"
    heads = summary["head_budgets"]  # (B, L, H): head 0 takes half of each layer's budget, the others a third each
    budget = summary["budgets"][:, : heads.shape[1]]
    assert torch.equal(heads.sum(-1), budget * 4)
    assert bool(((heads[..., 0] - 2 * budget).abs() <= 1).all())
    assert bool(((heads[..., 1:] - 2 * budget[..., None] / 3).abs() <= 1).all())
    assert c.config.label == "uniform+snapkv@0.25/heads=first_head/share=0.5"


def test_decode_reads_the_pool_in_the_fused_kernel_with_snapkv(monkeypatch):
    """With snapkv (whose window queries are a prefill-only statistic) every decode step of a pooled layer runs the
    fused pooled kernel (under Triton's interpreter here), with generate's tokens and logits of the gathered path."""
    pytest.importorskip("triton")
    from squeezekit import kernels
    from squeezekit.kernels import decode

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    ids, mask = batch(2, 96, pad=9)
    config = dict(allocator="uniform", evictor="snapkv", heads="adaptive", budget=0.2)
    ref, summary, _ = _generate(model, ids, mask, new=4, **config)
    assert summary["min_head_budget"] < summary["max_head_budget"]
    launches, gathers = [], []
    real = decode.pooled_decode_attention
    monkeypatch.setattr(decode, "pooled_decode_attention", lambda *a: launches.append(1) or real(*a))
    real_gather = HeadPool.gather
    monkeypatch.setattr(HeadPool, "gather", lambda pool, rows: gathers.append(len(launches)) or real_gather(pool, rows))
    with kernels.configured("pooled", interpret=True):
        out, _, _ = _generate(model, ids, mask, new=4, **config)
        assert kernels.settings.failed == {}
    assert launches  # the decode steps of the pooled layers read the pool in place
    # and nothing else copies the pool into rectangular buffers once decoding started (a gather of every layer's
    # keys and values at every step was 5x uniform's decode time on the H200)
    assert not [g for g in gathers if g > 0]
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---- rows of unequal budgets (a per-prompt allocator) ----------------------------------------------------------------
def _pooled_layers(cache) -> list[BudgetedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, BudgetedLayer) and layer.pool is not None]


def _slot_bytes(layer: BudgetedLayer) -> int:
    return 2 * layer.head_dim * layer.dtype.itemsize


@pytest.mark.parametrize("micro_batch", [3, 1], ids=["one-batch", "assembled"])
def test_rows_of_unequal_budgets_hold_their_sum_with_the_rectangular_buffers_tokens(micro_batch, monkeypatch):
    """Prompts of different lengths (and lost_attention, which gives each prompt its own layer budgets): a layer
    whose rows' budgets differ enough holds their sum (a pool of per-row segments), not the longest row's for every
    row, through the serving path (micro-batched or not) and through model.generate, with the tokens and logits of
    rectangular buffers, and with the GPU's kernels (under Triton's interpreter)."""
    from squeezekit import layers as layers_module
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    ids, mask = batch(3, 96, pad=30)  # prompts of 96, 66 and 36 tokens
    config = dict(allocator="lost_attention", evictor="streaming", budget=0.2)

    def serve():
        with torch.inference_mode(), squeezekit.compress(model, **config) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch)
            held = [(layer.kv_nbytes(), layer) for layer in cache.layers if isinstance(layer, BudgetedLayer)]
            pooled = _pooled_layers(cache)
            for layer in pooled:  # exactly the rows' budgets (every head of a row at its budget after prefill)
                assert layer.kv_nbytes() == int(layer.pool.caps.sum()) * _slot_bytes(layer)
                assert bool((layer.pool.caps == layer.head_budget_host).all())
            reported = cache.kv_bytes_prefill
            assert reported == cache.kv_nbytes()  # what is reported is what the buffers hold
            tokens = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(6)
            for layer in pooled:  # decoding stayed in the pool, each head within its budget
                assert layer.pool is not None
                assert bool((layer.counts().cpu() <= torch.from_numpy(layer.head_budget_host)).all())
            return tokens, reported, len(pooled), sum(n for n, _ in held)

    tokens, reported, n_pooled, _ = serve()
    ref, generate_summary, _ = _generate(model, ids, mask, new=7, **config)
    monkeypatch.setattr(layers_module, "ROW_POOL_SHARE", 0.0)  # rectangular buffers, as before the pool
    rect_tokens, rect_reported, rect_pooled, _ = serve()
    rect, rect_summary, _ = _generate(model, ids, mask, new=7, **config)
    assert n_pooled > 0 and rect_pooled == 0
    assert reported < 0.9 * rect_reported
    assert generate_summary["kv_bytes_kept"] < 0.9 * rect_summary["kv_bytes_kept"]
    assert torch.equal(tokens, rect_tokens)
    assert torch.equal(ref.sequences, rect.sequences)
    if micro_batch == 1 and importlib.util.find_spec("triton") is not None:  # the GPU's kernels on the pool
        from squeezekit import kernels

        monkeypatch.setattr(layers_module, "ROW_POOL_SHARE", 0.9)
        before = dict(kernels.settings.calls)
        with kernels.configured("steady,pooled", interpret=True):
            fused_tokens, _, _, _ = serve()
            assert kernels.settings.failed == {}
        assert all(kernels.settings.calls[k] > before[k] for k in ("pooled", "steady"))
        assert torch.equal(fused_tokens, tokens)
    assert torch.equal(ref.sequences[:, ids.shape[1] + 1 :], tokens)  # the serving path is model.generate
    for a, b in zip(ref.scores, rect.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rows_whose_budgets_differ_little_stay_rectangular():
    """Prompts a few tokens apart get budgets a token or two apart: a pool would save little, the rows stay in
    rectangular buffers (the steady decode path of equal rows)."""
    model = tiny_model("llama")
    ids, mask = batch(3, 96, pad=1)
    with torch.inference_mode(), squeezekit.compress(model, evictor="streaming", budget=0.25) as c:
        from squeezekit.batching import prefill

        cache, _ = prefill(model, c, ids, mask, micro_batch=3)
        hb = [layer.head_budget_host for layer in cache.layers if isinstance(layer, BudgetedLayer)]
        assert any(bool((h != h.flat[0]).any()) for h in hb)  # the rows' budgets do differ
        assert not _pooled_layers(cache)

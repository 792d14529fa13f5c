"""The bundled TOVA and ChunkKV evictors (plugins/tova.py, plugins/chunkkv.py) against literal references: TOVA's
score is the newest query's attention averaged over its KV head's query heads (at prefill the last prompt token's,
while decoding the previous step's), ChunkKV's is the per-chunk sum of SnapKV's vote and keeps whole chunks."""

from __future__ import annotations

import textwrap

import pytest
import torch
from squeezekit.plugins.chunkkv import ChunkKV
from squeezekit.plugins.tova import TOVA, NewestAttention
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import LayerView
from squeezekit.statistics import Observation

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_over(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [torch.tensor(x - top).exp().item() for x in logits]
    return [x / sum(e) for x in e]


# ---- TOVA --------------------------------------------------------------------------------------------------------


def test_tova_statistic_is_the_newest_real_querys_attention_over_the_held_slots():
    """Row 0: its newest real query is not the call's last (right padding); row 1: no real query, so it keeps the
    value from before; free slots get nothing. Checked against a per-head, per-slot loop."""
    g = torch.Generator().manual_seed(0)
    B, H, G, q, S, D = 2, 2, 3, 4, 6, 5
    query = torch.randn(B, H * G, q, D, generator=g)
    keys = torch.randn(B, H, S, D, generator=g)
    keys_valid = torch.rand(B, H, S, generator=g) > 0.3
    keys_valid[:, :, 0] = True
    query_valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    before = torch.rand(B, H, S, generator=g)
    stats = {"tova_attention": before.clone()}
    call = Observation(
        query=query, query_positions=torch.where(query_valid, torch.arange(q), -1), query_valid=query_valid,
        keys=keys, values=keys, keys_valid=keys_valid, new_slots=torch.zeros(B, H, q, dtype=torch.long),
        prefill=False, scaling=0.3,
    )  # fmt: skip
    NewestAttention([TOVA()]).observe(stats, call)
    got = stats["tova_attention"]
    for h in range(H):
        held = [s for s in range(S) if keys_valid[0, h, s]]
        want = [0.0] * S
        for gq in range(G):
            logits = [float(query[0, h * G + gq, 1] @ keys[0, h, s]) * 0.3 for s in held]
            for s, p in zip(held, _softmax_over(logits), strict=True):
                want[s] += p / G
        assert torch.allclose(got[0, h], torch.tensor(want), atol=1e-6)
    assert torch.equal(got[1], before[1])
    view = LayerView(
        keys, keys, keys_valid, torch.arange(S, dtype=torch.int32).expand(B, H, S), torch.tensor([S, S]),
        torch.tensor([3, 3]), 0, 1, "decode", tova_attention=got,
    )  # fmt: skip
    assert torch.equal(TOVA().score(view), got)


def _kept_positions(layer, b: int, h: int) -> set[int]:
    return set(layer.positions[b, h][layer.valid[b, h]].tolist())


def test_tova_prefill_keeps_the_top_of_the_last_prompt_querys_attention():
    """Each layer keeps, per KV head, the newest token and the ``budget - 1`` others the last prompt query attends to
    most (averaged over the head's query heads), the reference taken from the uncompressed eager model's attention
    probabilities."""
    model = tiny_model("llama", attn="eager")
    ids, mask = batch(2, 40, pad=6)
    pads = (mask == 0).sum(-1).tolist()
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions  # L x (B, Hq, T, T)
        with squeezekit.compress(model, allocator="squeeze", evictor="tova", budget=0.3) as c:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = c.last_cache
    H = model.config.num_key_value_heads
    checked = 0
    for layer, p in zip(cache.layers, probs, strict=True):
        B, Hq, T, _ = p.shape
        ref = p[:, :, -1, :].reshape(B, H, Hq // H, T).mean(2)  # (B, H, T): columns are padded positions
        for b in range(B):
            budget = int(layer.budget[b])
            for h in range(H):
                score = ref[b, h, pads[b] :].clone()
                score[-1] = float("inf")  # the engine always keeps the newest token
                cut = float(score.sort(descending=True).values[budget - 1])
                kept = _kept_positions(layer, b, h)
                assert len(kept) == budget
                # every token clearly above the cut is kept, every one clearly below dropped (near-ties either way)
                assert set((score > cut + 1e-6).nonzero().flatten().tolist()) <= kept
                assert not set((score < cut - 1e-6).nonzero().flatten().tolist()) & kept
                checked += 1
    assert checked == len(cache.layers) * 2 * H


SPY = textwrap.dedent(
    """
    from dataclasses import dataclass

    import squeezekit
    from squeezekit.plugins.tova import TOVA, NewestAttention

    CALLS = []


    @dataclass
    class SpyTOVA(TOVA):
        name = "spy_tova"
        needs = (NewestAttention, squeezekit.Stat.ATTENTION)

        def score(self, view):
            if view.phase == "decode" and view.layer_idx == 0:
                CALLS.append((view.positions.clone(), view.valid.clone(), view.tova_attention.clone(),
                              view.attention.clone()))
            return super().score(view)


    @squeezekit.hookimpl
    def register_evictors(register):
        register(SpyTOVA)
    """
)


def test_tova_decode_ranks_by_the_previous_steps_query(plugin_site):
    """While decoding, the score a layer evicts by is the attention of the previous step's query: the engine's
    accumulated attention (``Stat.ATTENTION``, summed over the query heads) grows between two evictions by exactly
    G times the TOVA score of every token held at both."""
    plugin_site.add("sk_spy_tova", SPY)
    plugin_site.reload()
    import sk_spy_tova

    model = tiny_model("llama")
    ids, mask = batch(1, 32)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad(), squeezekit.compress(model, allocator="uniform", evictor="spy_tova", budget=0.25):
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = sk_spy_tova.CALLS
    assert len(calls) >= 4
    for (pos0, valid0, _, att0), (pos1, valid1, tova1, att1) in zip(calls, calls[1:], strict=False):
        for h in range(pos0.shape[1]):
            was = {int(p): float(a) for p, a, v in zip(pos0[0, h], att0[0, h], valid0[0, h], strict=True) if v}
            for p, a, t, v in zip(pos1[0, h], att1[0, h], tova1[0, h], valid1[0, h], strict=True):
                if v and int(p) in was:
                    assert abs((float(a) - was[int(p)]) - G * float(t)) < 1e-5
        assert torch.allclose(tova1[valid1].sum() / pos1.shape[1], torch.tensor(1.0), atol=1e-5)  # a distribution


# ---- ChunkKV -----------------------------------------------------------------------------------------------------


def test_chunkkv_score_is_the_per_chunk_sum_of_the_window_vote():
    """Every token scores its chunk's summed SnapKV vote (the window queries' attention, summed over the window and
    the query heads), the window itself +inf, in slots that are not in token order and with a free slot."""
    g = torch.Generator().manual_seed(1)
    B, H, G, W, S, D, T = 1, 2, 2, 3, 14, 4, 13
    keys = torch.randn(B, H, S, D, generator=g)
    positions = torch.full((B, H, S), -1, dtype=torch.int32)
    for h in range(H):
        positions[0, h, torch.randperm(S, generator=g)[:T]] = torch.arange(T, dtype=torch.int32)
    valid = positions >= 0
    wq = torch.randn(B, H, G, W, D, generator=g)
    wpos = torch.arange(T - W, T).view(1, W)
    view = LayerView(
        keys, keys, valid, positions, torch.tensor([T]), torch.tensor([6]), 0, 1, "prefill", scaling=0.5,
        window_queries=wq, window_positions=wpos,
    )  # fmt: skip
    got = ChunkKV(chunk_size=4, window=W).score(view)
    for h in range(H):
        slot_of = {int(positions[0, h, s]): s for s in range(S) if valid[0, h, s]}
        vote = [0.0] * T
        for gq in range(G):
            for w in range(W):
                qp = T - W + w
                logits = [float(wq[0, h, gq, w] @ keys[0, h, slot_of[p]]) * 0.5 for p in range(qp + 1)]
                for p, pr in enumerate(_softmax_over(logits)):
                    vote[p] += pr
        for p in range(T):
            if p >= T - W:
                assert got[0, h, slot_of[p]] == float("inf")
            else:
                chunk = sum(vote[r] for r in range(T - W) if r // 4 == p // 4)
                assert abs(float(got[0, h, slot_of[p]]) - chunk) < 1e-5


def test_chunkkv_keeps_whole_chunks():
    """After prefill, per KV head, outside the protected window every chunk is kept whole or not at all, except at
    most one (the one the budget cuts)."""
    model = tiny_model("llama")
    ids, mask = batch(2, 64, pad=5)
    size, window = 6, 4
    with (
        torch.no_grad(),
        squeezekit.compress(
            model, allocator="squeeze", evictor="chunkkv", budget=0.4, chunk_size=size, window=window
        ) as c,
    ):
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = c.last_cache
    seen = mask.sum(-1).tolist()
    for layer in cache.layers:
        for b in range(2):
            start = seen[b] - window
            for h in range(layer.valid.shape[1]):
                kept = {p for p in _kept_positions(layer, b, h) if p < start}
                cut = [ch for ch in {p // size for p in kept} if any(
                    r not in kept for r in range(ch * size, min((ch + 1) * size, start)))]  # fmt: skip
                assert len(cut) <= 1, (layer.layer_idx, b, h, sorted(kept))
                assert set(range(start, seen[b])) <= _kept_positions(layer, b, h)


# ---- both --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("evictor", ["tova", "chunkkv"])
def test_every_layer_stays_within_its_budget_through_generate(evictor):
    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=5)
    with torch.no_grad(), squeezekit.compress(model, evictor=evictor, budget=0.25) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = c.last_cache
    assert out.shape[1] == 48 + 8
    for layer in cache.layers:
        held = layer.valid.sum(-1)  # (B, H)
        assert bool((held <= layer.budget.view(-1, 1)).all()), (layer.layer_idx, held, layer.budget)
        assert bool((held < mask.sum(-1).view(-1, 1) + 8).all())  # something was evicted

"""The key-only evictors knorm, keydiff and random, against references computed here from their definitions.

On hand-built views (shuffled slots, invalid slots holding NaN keys) the scores of the unprotected slots equal the
paper's score computed with plain loops, and the ``window`` newest tokens score +inf. Through the engine, on the tiny
llama model, each layer holds at most its budget and exactly the window plus the top of the reference score,
computed from the uncompressed model's keys.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import LayerView


def evictor(name: str, **params):
    return squeezekit.registry().get("evictor", name).cls(**params)


def hand_view(seed: int = 0, B: int = 2, H: int = 2, S: int = 12, D: int = 4) -> LayerView:
    """Row b holds tokens 0..n_b-1 in shuffled slots; the other slots are invalid, their keys NaN."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.full((B, H, S), -1, dtype=torch.int32)
    held = [S, S - 4]
    for b in range(B):
        for h in range(H):
            positions[b, h, torch.randperm(S, generator=g)[: held[b]]] = torch.arange(held[b], dtype=torch.int32)
    valid = positions >= 0
    keys = (torch.randn(B, H, S, D, generator=g) * torch.rand(B, H, S, 1, generator=g) * 3).masked_fill(
        ~valid[..., None], float("nan")
    )
    seen = torch.tensor(held)
    return LayerView(keys, torch.randn(B, H, S, D, generator=g), valid, positions, seen, seen // 2, 3, 6)


def reference(name: str, view: LayerView) -> torch.Tensor:
    """The paper's score of every valid slot (nan elsewhere), one slot at a time."""
    B, H, S, _ = view.keys.shape
    out = torch.full((B, H, S), float("nan"))
    for b in range(B):
        for h in range(H):
            slots = [s for s in range(S) if view.valid[b, h, s]]
            units = [view.keys[b, h, s] / view.keys[b, h, s].norm() for s in slots]
            anchor = sum(units) / len(units)
            for s in slots:
                k = view.keys[b, h, s]
                if name == "knorm":
                    out[b, h, s] = -torch.sqrt((k * k).sum())
                else:
                    out[b, h, s] = -(k @ anchor) / (k.norm() * anchor.norm())
    return out


def protected(view: LayerView, window: int) -> torch.Tensor:
    return view.valid & (view.positions >= (view.seen - window).view(-1, 1, 1))


@pytest.mark.parametrize("name", ["knorm", "keydiff"])
@pytest.mark.parametrize("window", [0, 3])
def test_key_scores_are_the_papers_outside_the_window(name, window):
    view = hand_view()
    score = evictor(name, window=window).score(view)
    recent = protected(view, window)
    assert int(recent.sum()) == 2 * 2 * window
    assert bool(torch.isinf(score[recent]).all()) and bool((score[recent] > 0).all())
    rest = view.valid & ~recent
    torch.testing.assert_close(score[rest], reference(name, view)[rest])


def test_keydiffs_anchor_is_the_mean_over_valid_slots_only():
    """Changing what invalid slots hold (NaN above, here large finite keys) changes no valid slot's score."""
    view = hand_view(seed=1)
    other = hand_view(seed=1)
    other.keys = other.keys.nan_to_num(nan=100.0)
    a, b = evictor("keydiff", window=0).score(view), evictor("keydiff", window=0).score(other)
    torch.testing.assert_close(a[view.valid], b[view.valid])


def test_random_scores_follow_the_token_not_the_slot_or_the_row():
    """A token's priority depends on its position, head, layer and the seed: shuffling the slots shuffles the
    scores with them, the same token in another row scores the same, and another seed or layer orders differently."""
    view = hand_view(seed=2)
    ev = evictor("random", window=0)
    score = ev.score(view)
    assert score.dtype == torch.float32 and bool(torch.isfinite(score).all())
    by_token = {}
    for b, h, s in zip(*torch.nonzero(view.valid, as_tuple=True), strict=True):
        key = (int(h), int(view.positions[b, h, s]))
        by_token.setdefault(key, set()).add(float(score[b, h, s]))
    assert all(len(v) == 1 for v in by_token.values())  # row 1's tokens score as in row 0
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = LayerView(view.keys[..., perm, :], view.values, view.valid[..., perm], view.positions[..., perm],
                         view.seen, view.budget, view.layer_idx, view.n_layers)  # fmt: skip
    torch.testing.assert_close(ev.score(shuffled), score[..., perm])
    for other in (evictor("random", window=0, seed=1).score(view), ev.score(LayerView(
        view.keys, view.values, view.valid, view.positions, view.seen, view.budget, 4, 6))):  # fmt: skip
        assert not torch.equal(other.argsort(-1), score.argsort(-1))
    recent = protected(view, 5)
    assert bool(torch.isinf(evictor("random", window=5).score(view)[recent]).all())


def test_random_keeps_each_token_about_equally_often():
    """Over many seeds, each of 40 tokens is among the 10 best scores about a quarter of the time (binomial,
    400 draws: 100 +- 8.7; the bound is 5 sigma)."""
    S = 40
    positions = torch.arange(S, dtype=torch.int32).view(1, 1, S)
    view = LayerView(torch.zeros(1, 1, S, 2), torch.zeros(1, 1, S, 2), positions >= 0, positions,
                     torch.tensor([S]), torch.tensor([10]))  # fmt: skip
    counts = torch.zeros(S)
    for seed in range(400):
        counts[evictor("random", window=0, seed=seed).score(view)[0, 0].topk(10).indices] += 1
    assert float((counts - 100).abs().max()) < 45, counts


# ---- through the engine ----------------------------------------------------------------------------------------


def full_keys(model, ids) -> list[torch.Tensor]:
    """Every layer's cached keys (B, H, T, D), RoPE applied, without compression."""
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    return [layer.keys for layer in cache.layers]


def compressed(model, ids, **config):
    with squeezekit.compress(model, allocator="uniform", budget=0.25, **config) as c, torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        return cache, c.summary()["budgets"]


def kept(layer, b: int, h: int) -> set[int]:
    return set(layer.positions[b, h][layer.valid[b, h]].tolist())


@pytest.mark.parametrize("name", ["knorm", "keydiff"])
def test_the_engine_keeps_the_window_and_the_top_of_the_reference_score(name):
    model = tiny_model("llama")
    ids, _ = batch(2, 64)
    T, window = 64, 4
    keys = full_keys(model, ids)
    cache, budgets = compressed(model, ids, evictor=name, window=window)
    for idx, layer in enumerate(cache.layers):
        B, H, S = layer.valid.shape
        positions = torch.arange(T, dtype=torch.int32).expand(B, H, T)
        ref = reference(name, LayerView(keys[idx], keys[idx], positions >= 0, positions, torch.full((B,), T),
                                        budgets[:, idx]))  # fmt: skip
        for b in range(B):
            budget = int(budgets[b, idx])
            assert 0 < budget < T and int(layer.valid[b].sum(-1).max()) <= budget
            for h in range(H):
                top = ref[b, h, : T - window].topk(budget - window).indices.tolist()
                assert kept(layer, b, h) == {*top, *range(T - window, T)}, (idx, b, h)


def test_the_engine_keeps_the_same_random_tokens_for_a_seed_and_others_for_another():
    model = tiny_model("llama")
    ids, _ = batch(2, 64)
    runs = [compressed(model, ids, evictor="random", window=4, seed=seed) for seed in (0, 0, 1)]
    sets = [[[kept(layer, b, h) for b in range(2) for h in range(layer.valid.shape[1])] for layer in cache.layers]
            for cache, _ in runs]  # fmt: skip
    budgets = runs[0][1]
    for idx, layer in enumerate(runs[0][0].layers):
        assert int(layer.valid.sum(-1).max()) <= int(budgets[:, idx].max()) < 64
        assert all(set(range(60, 64)) <= s for s in sets[0][idx])  # the window
    assert sets[0] == sets[1]
    assert all(a != b for a, b in zip(sets[0], sets[2], strict=True))  # every layer keeps other tokens

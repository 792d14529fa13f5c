"""Prompts of different lengths in one batch get different budgets, so some rows keep free slots (shorter budgets,
left padding). Once every row is at its budget the decode step still has fixed shapes: it is taken as steady (no host
sync, CUDA-graph safe), and it writes, evicts and masks exactly as the general path does (bitwise: same tokens, same
logits, same slots)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import applicable, tiny_model

import squeezekit
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder
from squeezekit.layers import BudgetedLayer


def _mixed_batch(n=6, length=90, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i, pad in enumerate([0, 3, 3, 7, 12, 20][:n]):  # prompt lengths 90, 87, 87, 83, 78, 70
        mask[i, :pad] = 0
        ids[i, :pad] = 0
    return ids, mask


def _decode(model, config, ids, mask, micro_batch, steps=10):
    """Tokens, the logits of every decode step, and the final slots of every layer."""
    logits_seen = []
    hook = model.register_forward_hook(
        lambda m, a, k, out: logits_seen.append(out.logits[:, -1].clone()), with_kwargs=True
    )
    try:
        with squeezekit.compress(model, **config) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch)
            states = [(layer.steady, layer.holes) for layer in cache.layers if layer.budget is not None]
            tokens = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(steps)
            slots = [(layer.valid.clone(), layer.positions.clone()) for layer in cache.layers]
    finally:
        hook.remove()
    return tokens, logits_seen[-steps:], slots, states


@pytest.mark.parametrize("evictor", ["streaming", "h2o", "snapkv"])
@pytest.mark.parametrize("micro_batch", [6, 2])
def test_free_slots_decode_as_the_general_path(evictor, micro_batch, monkeypatch):
    model = tiny_model("mistral", num_hidden_layers=6)
    ids, mask = _mixed_batch()
    config = dict(budget=0.25, **applicable(evictor=evictor, sinks=2, window=4))
    fast = _decode(model, config, ids, mask, micro_batch)
    assert all(steady for steady, _ in fast[3]) and any(holes for _, holes in fast[3])  # steady, with free slots

    general = BudgetedLayer.update_steady
    monkeypatch.setattr(BudgetedLayer, "update_steady", lambda self: general(self) or setattr(self, "steady", False))
    ref = _decode(model, config, ids, mask, micro_batch)
    assert not any(steady for steady, _ in ref[3])  # the general path throughout
    assert torch.equal(fast[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], ref[1], strict=True))  # bitwise, every step
    for (va, pa), (vb, pb) in zip(fast[2], ref[2], strict=True):
        assert torch.equal(va, vb) and torch.equal(pa, pb)  # the same tokens in the same slots


def test_graph_decoder_accepts_free_slots():
    """GreedyDecoder's CUDA-graph condition holds for a mixed-length batch (on CUDA it would capture)."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = _mixed_batch(4)
    with squeezekit.compress(model, evictor="streaming", budget=0.3, sinks=2, window=4) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=2)
        assert all(layer.steady for layer in cache.layers) and any(layer.holes for layer in cache.layers)
        assert len({tuple(row.tolist()) for row in c.summary()["budgets"]}) > 1  # rows of different budgets

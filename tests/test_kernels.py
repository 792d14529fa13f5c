"""squeezekit's Triton kernels on the CPU, through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU): the masked attention + per-slot column sums against the explicit softmax path, and the
dispatch in squeezekit.attention (CPU keeps the plain path unless told otherwise)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import kernels
from squeezekit.attention import _explicit, _mask
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder

pytestmark = pytest.mark.skipif(
    not (kernels.triton_available() and kernels.interpreting()), reason="needs Triton and TRITON_INTERPRET=1"
)


def _reference(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling):
    mask_for = lambda s, e: _mask(kv_valid, kv_pos, q_pos[:, s:e], window)  # noqa: E731
    return _explicit(query, key, value, mask_for, scaling, None, q_valid.float(), True)


def _fresh(B, Hq, H, q, D, pad_rows=(), right=False, seed=0):
    """A fresh prefill layer: slot i holds token i; some rows padded on the left (or right)."""
    g = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(B, h, q, D, generator=g) for h in (Hq, H, H))
    valid = torch.ones(B, q, dtype=torch.bool)
    for b, n in pad_rows:
        if right:
            valid[b, q - n :] = False
        else:
            valid[b, :n] = False
    pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, -1)
    return query, key, value, valid[:, None, :], pos[:, None, :].to(torch.int32), pos, valid


def _later_step(B, Hq, H, q, C, D, seed=0):
    """A non-fresh layer (a chunk of a chunked prefill, or any later step): C unordered slots, per-head validity
    (after eviction), the q new tokens written into free slots, one padded new token in row 1."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, Hq, q, D, generator=g)
    key, value = torch.randn(B, H, C, D, generator=g), torch.randn(B, H, C, D, generator=g)
    seen = torch.tensor([37, 41])[:B]
    q_valid = torch.ones(B, q, dtype=torch.bool)
    q_valid[1, 0] = False
    q_pos = (seen.view(-1, 1) + q_valid.long().cumsum(-1) - 1).masked_fill(~q_valid, -1)
    kv_valid = torch.zeros(B, H, C, dtype=torch.bool)
    kv_pos = torch.full((B, H, C), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            slots = torch.randperm(C, generator=g)
            new, old = slots[:q], slots[q:]
            kv_valid[b, h, new], kv_pos[b, h, new] = q_valid[b], q_pos[b].to(torch.int32)
            kept = old[: len(old) - 3 - h]  # a few free slots, a different number per head
            kv_valid[b, h, kept] = True
            kv_pos[b, h, kept] = torch.randperm(int(seen[b]), generator=g)[: len(kept)].to(torch.int32)
    return query, key, value, kv_valid, kv_pos, q_pos, q_valid


CASES = {
    "gqa": dict(B=2, Hq=4, H=2, q=37, D=16),
    "left-padding": dict(B=3, Hq=4, H=2, q=40, D=16, pad_rows=((1, 7), (2, 19))),
    "right-padding": dict(B=2, Hq=4, H=2, q=33, D=16, pad_rows=((1, 10),), right=True),
    "mha-head-dim-24": dict(B=2, Hq=2, H=2, q=35, D=24, pad_rows=((0, 3),)),
    "group-of-4": dict(B=1, Hq=8, H=2, q=50, D=32),
}


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("case", list(CASES))
def test_fresh_prefill_matches_the_explicit_path(case, window):
    from squeezekit.kernels.attention import attention_lse, column_sums

    query, key, value, kv_valid, kv_pos, q_pos, q_valid = _fresh(**CASES[case])
    scaling = query.shape[-1] ** -0.5
    ref_out, ref_sums = _reference(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling)
    for causal_slots in (True, False):  # the diagonal skip changes nothing
        out, lse = attention_lse(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal_slots)
        sums = column_sums(query, key, lse, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal_slots)
        assert out.shape == ref_out.shape and sums.shape == ref_sums.shape
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)  # padding rows too (finite, as explicit)
        assert float((sums - ref_sums).abs().max() / ref_sums.abs().max()) < 1e-5
        # every real query hands out probability 1 per query head
        G = query.shape[1] // key.shape[1]
        assert torch.allclose(sums.sum((1, 2)), q_valid.sum(-1).float() * G * key.shape[1], rtol=1e-5)


@pytest.mark.parametrize("window", [None, 15])
def test_later_step_with_unordered_per_head_slots_matches_the_explicit_path(window):
    from squeezekit.kernels.attention import attention_lse, column_sums

    query, key, value, kv_valid, kv_pos, q_pos, q_valid = _later_step(B=2, Hq=4, H=2, q=12, C=45, D=16)
    scaling = 0.25
    ref_out, ref_sums = _reference(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling)
    out, lse = attention_lse(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling, False)
    sums = column_sums(query, key, lse, kv_valid, kv_pos, q_pos, q_valid, window, scaling, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert float((sums - ref_sums).abs().max() / ref_sums.abs().max()) < 1e-5
    assert bool((sums[~kv_valid] == 0).all())  # free slots receive nothing


def _spy():
    return dict(kernels.settings.calls)


def _h2o_run(model, ids, mask, steps=6, chunk=None):
    with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=ids.shape[0], chunk=chunk)
        attention = [layer.stats["attention"].clone() for layer in cache.layers]
        tokens = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(steps)
        return logits, attention, tokens, c.summary()["budgets"]


def test_dispatch_cpu_keeps_the_explicit_path_and_the_interpreted_kernels_agree():
    model = tiny_model("mistral_window")  # a sliding window of 24 tokens: the windowed mask and column sums
    ids, mask = batch(3, 40, pad=5)
    before = _spy()
    ref = _h2o_run(model, ids, mask)
    assert _spy() == before  # CPU: the plain path, kernels untouched
    with kernels.configured(interpret=True):
        got = _h2o_run(model, ids, mask)
    assert _spy()["attention"] == before["attention"] + 4  # the prefill's 4 layers (decode steps: one query, plain)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # last-token logits
    for a, b in zip(got[1], ref[1], strict=True):  # the accumulated attention after prefill, per slot
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    assert torch.equal(got[3], ref[3]) and torch.equal(got[2], ref[2])  # same budgets, same greedy tokens


def test_flash_lse_source_for_the_dense_causal_case(monkeypatch):
    """``SQUEEZEKIT_LSE_SOURCE=flash``: torch's flash attention gives the output and log-sum-exp of an unpadded fresh
    prefill (the column sums still come from the Triton kernel); padded prompts keep the Triton forward."""
    from squeezekit.kernels import attention as ka

    model = tiny_model("llama")
    ids, _ = batch(2, 40)
    ref = _h2o_run(model, ids, None, steps=3)
    flash, original = [], ka.flash_lse
    monkeypatch.setattr(ka, "LSE_SOURCE", "flash")
    monkeypatch.setattr(ka, "flash_lse", lambda *a: flash.append(1) or original(*a))
    with kernels.configured(interpret=True):
        got = _h2o_run(model, ids, None, steps=3)
    assert len(flash) == 4  # the 4 layers' prefill
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], ref[1], strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    assert torch.equal(got[2], ref[2])


def test_kernels_off_and_failure_fall_back_to_the_plain_path(monkeypatch):
    model = tiny_model("llama")
    ids, mask = batch(2, 40, pad=4)
    ref = _h2o_run(model, ids, mask, steps=3)
    before = _spy()
    with kernels.configured("steady", interpret=True):  # attention kernel not chosen
        got = _h2o_run(model, ids, mask, steps=3)
    after = _spy()
    assert {k: n for k, n in after.items() if k != "steady"} == {k: n for k, n in before.items() if k != "steady"}
    assert after["steady"] > before["steady"] and torch.equal(got[2], ref[2])  # (padded rows: free slots)
    from squeezekit.kernels import attention as ka

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(ka, "attention_lse", broken)
    monkeypatch.setattr(kernels, "falls_back", lambda where: True)  # as on the GPU
    with kernels.configured(interpret=True):
        with pytest.warns(RuntimeWarning, match="fused 'attention' kernel failed"):
            got = _h2o_run(model, ids, mask, steps=3)
        assert "attention" in kernels.settings.failed and not kernels.use("attention", ids)
    assert torch.equal(got[2], ref[2]) and "attention" not in kernels.settings.failed


def test_chunked_prefill_through_the_masked_kernel_matches():
    """Chunks after the first are masked steps over unordered slots: the kernel serves them (no colsum)."""
    model = tiny_model("llama")
    ids, mask = batch(2, 60, pad=6)
    with squeezekit.compress(model, evictor="streaming", budget=0.3, sinks=2, window=4) as c:
        cache, ref_logits = prefill(model, c, ids, mask, micro_batch=2, chunk=20)
        ref = GreedyDecoder(model, cache, ref_logits.argmax(-1), cuda_graph=False).run(4)
    before = _spy()["attention"]
    with kernels.configured(interpret=True):
        with squeezekit.compress(model, evictor="streaming", budget=0.3, sinks=2, window=4) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=2, chunk=20)
            got = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(4)
    assert _spy()["attention"] == before + 3 * 4  # 3 chunks x 4 layers (the first chunk is padded: masked too)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, ref)


def test_steady_write_matches_victim_slots_and_the_scatters():
    """Victim choice (ties to the older token, NaN lowest, +inf kept) and the in-place write, against the plain path."""
    from squeezekit.kernels.steady import steady_write
    from squeezekit.policies import LayerView
    from squeezekit.selection import victim_slots

    g = torch.Generator().manual_seed(3)
    B, H, S, D = 3, 2, 37, 16
    score = torch.randint(0, 4, (B, H, S), generator=g).float()  # many exact ties
    score[0, 0, 5] = float("nan")
    score[1, 1, :] = float("inf")
    score[2, 0, 30:] = float("-inf")
    positions = torch.stack([torch.randperm(100, generator=g)[:S] for _ in range(B * H)]).view(B, H, S).to(torch.int32)
    valid = torch.ones(B, H, S, dtype=torch.bool)
    keys, values = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    attention = torch.rand(B, H, S, generator=g)
    k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    new_pos = torch.tensor([[100], [101], [102]])
    view = LayerView(keys, values, valid, positions, new_pos.view(-1) + 1, torch.full((B,), S), 0, 1, "decode")
    ref = victim_slots(score, view, protect_newest=False)
    want = [t.clone() for t in (keys, values, positions, attention)]
    want[0].scatter_(2, ref[..., None].expand(B, H, 1, D), k)
    want[1].scatter_(2, ref[..., None].expand(B, H, 1, D), v)
    want[2].scatter_(2, ref, new_pos.to(torch.int32)[:, None, :].expand(B, H, 1))
    want[3].scatter_(2, ref, torch.zeros(B, H, 1))
    flag = torch.zeros((), dtype=torch.bool)
    with kernels.configured(interpret=True):
        victim = steady_write(score, valid, positions, (keys,), (values,), attention, 0.0, k, v, new_pos, flag)
    assert torch.equal(victim, ref)
    for got, exp in zip((keys, values, positions, attention), want, strict=True):
        assert torch.equal(got, exp)
    assert bool(flag)  # the NaN score is recorded, not raised
    score[0, 0, 5] = 0.0
    flag.zero_()
    with kernels.configured(interpret=True):
        steady_write(score, valid, positions, (keys,), (values,), None, 0.0, k, v, new_pos, flag)
    assert not bool(flag)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), S=st.integers(2, 40), free=st.floats(0.0, 0.6))
def test_steady_write_with_free_slots_writes_where_the_plain_path_does(seed, S, free):
    """Rows with free slots anywhere (an eviction that did not compact): the victim's slot is freed and the new
    token takes the first free slot, `valid` updated, as BudgetedLayer's plain steady path does."""
    from squeezekit.kernels.steady import steady_write
    from squeezekit.policies import LayerView
    from squeezekit.selection import victim_slots

    g = torch.Generator().manual_seed(seed)
    B, H, D = 3, 2, 16
    valid = torch.rand(B, H, S, generator=g) >= free
    valid[..., 0] = True  # every row holds a token
    valid[0, 0] = True  # and one row has no free slot
    score = torch.randint(0, 5, (B, H, S), generator=g).float()
    positions = torch.stack([torch.randperm(100, generator=g)[:S] for _ in range(B * H)]).view(B, H, S).to(torch.int32)
    keys, values = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    new_pos = torch.tensor([[100], [101], [102]])
    view = LayerView(keys, values, valid, positions, new_pos.view(-1) + 1, valid.sum(-1)[:, 0], 0, 1, "decode")
    victim = victim_slots(score, view, protect_newest=False)
    want_valid = valid.clone().scatter_(2, victim, False)
    slot = (~want_valid).to(torch.int8).argmax(-1, keepdim=True)
    want_valid.scatter_(2, slot, True)
    want = [t.clone() for t in (keys, values, positions)]
    want[0].scatter_(2, slot[..., None].expand(B, H, 1, D), k)
    want[1].scatter_(2, slot[..., None].expand(B, H, 1, D), v)
    want[2].scatter_(2, slot, new_pos.to(torch.int32)[:, None, :].expand(B, H, 1))
    flag = torch.zeros((), dtype=torch.bool)
    with kernels.configured(interpret=True):
        got = steady_write(score, valid, positions, (keys,), (values,), None, 0.0, k, v, new_pos, flag, holes=True)
    assert torch.equal(got, slot) and torch.equal(valid, want_valid)
    assert all(torch.equal(a, b) for a, b in zip((keys, values, positions), want, strict=True))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    C=st.integers(1, 70), B=st.integers(1, 3), H=st.integers(1, 3), strided=st.booleans(), seed=st.integers(0, 2**16)
)
def test_the_eviction_kernel_keeps_what_the_layers_ranked_together_keep(C, B, H, strided, seed):
    """`kernels.evict.kept` (one kernel a layer) keeps exactly `kept_together`'s slots: tied, infinite and NaN
    scores (recorded in the flag, not raised), invalid slots that still carry a stale position, any count per head
    (one per row, or one per head), and slot tensors that are views of wider buffers."""
    from squeezekit.kernels import evict
    from squeezekit.selection import Ranking, kept_together

    g = torch.Generator().manual_seed(seed)
    S = C + 5 if strided else C  # the layer's buffers may be wider than the ranked slots
    positions = torch.stack([torch.randperm(3 * S, generator=g)[:S] for _ in range(B * H)]).view(B, H, S).int()
    valid = torch.rand(B, H, S, generator=g) < 0.7
    positions = torch.where(valid | (torch.rand(B, H, S, generator=g) < 0.5), positions, -1)  # stale or -1
    pick = torch.randint(0, 6, (B, H, C), generator=g).float()  # ties, +-inf, NaN
    score = torch.where(pick == 0, float("inf"), torch.where(pick == 1, float("-inf"), pick))
    score = torch.where(pick == 5, float("nan"), score)
    held = valid[..., :C].sum(-1)
    keep = (torch.rand(B, H, generator=g) * (held + 1)).long().clamp_max(held)
    if seed % 2:  # one count per row, broadcast over the heads
        keep = held.min(-1, keepdim=True).values.clamp_max(keep[:, :1]).expand(B, H)
    ranking = Ranking(score, positions[..., :C], valid[..., :C], keep, int((held - keep).max()))
    want_flag = torch.zeros((), dtype=torch.bool)
    (want,) = kept_together([ranking], want_flag)
    flag = torch.zeros((), dtype=torch.bool)
    with kernels.configured("evict", interpret=True):
        got = evict.kept(ranking, flag)
    assert got is not None and torch.equal(got, want)
    assert bool(flag) == bool(want_flag) == bool(torch.isnan(score).any())


@pytest.mark.parametrize(
    "dtype,E,strided", [(torch.float32, 24, False), (torch.float16, 1030, True), (torch.bfloat16, 64, True)]
)
def test_the_importance_kernel_gives_the_plain_cosines(dtype, E, strided):
    """`kernels.importance.cosines`: each token's cos(x, x + out) as the plain path's three norms give it, with
    the residual sum rounded to the activations' dtype, for rows wider than one block and strided views (fp32
    sums in another order: a few ulps)."""
    from squeezekit.kernels import importance
    from squeezekit.statistics import IMPORTANCE, Importance

    g = torch.Generator().manual_seed(E)
    wide = E + 3 if strided else E
    hidden = (torch.randn(2, 5, wide, generator=g) * 3).to(dtype)[..., :E]
    attended = torch.randn(2, 5, wide, generator=g).to(dtype)[..., :E]
    attended[1, 2] = -hidden[1, 2]  # h = 0: the clamp's case
    valid = torch.rand(2, 5, generator=g) < 0.7
    valid[:, 0] = True
    plain: dict = {}
    with kernels.configured("off"):
        Importance([]).observe_residual(plain, hidden, attended, valid)
        assert importance.cosines(hidden, attended) is None
    fused: dict = {}
    before = _spy()["importance"]
    with kernels.configured("importance", interpret=True):
        Importance([]).observe_residual(fused, hidden, attended, valid)
        cos = importance.cosines(hidden, attended)
    assert _spy()["importance"] == before + 2
    x, h, o = hidden.double(), (hidden + attended).double(), attended.double()  # h rounded as the model adds it
    nx, nh = x.norm(dim=-1), h.norm(dim=-1)
    want = (nx.square() + nh.square() - o.norm(dim=-1).square()) / (2 * nx * nh).clamp_min(1e-12)
    assert cos is not None and float(cos[1, 2]) == 0.0
    torch.testing.assert_close(cos.double(), want, rtol=0, atol=1e-5)
    if dtype == torch.float32:  # (in fp32 the identity is the cosine itself)
        torch.testing.assert_close(cos.double(), (x * h).sum(-1) / (nx * nh).clamp_min(1e-12), rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[IMPORTANCE], plain[IMPORTANCE], rtol=0, atol=1e-6)


def test_squeeze_budgets_with_the_importance_kernel_are_the_plain_ones():
    """Through a prefill: the importance the kernel measures plans the same budgets as the plain path's."""
    model = tiny_model("llama")
    ids, mask = batch(3, 40, pad=6)

    def run():
        with torch.inference_mode(), squeezekit.compress(model, allocator="squeeze", budget=0.3) as c:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            s = c.summary()
        return s["importance"], s["budgets"]

    with kernels.configured("off"):
        ref_importance, ref_budgets = run()
    with kernels.configured("importance", interpret=True):
        importance, budgets = run()
    torch.testing.assert_close(importance, ref_importance, rtol=0, atol=1e-6)
    assert torch.equal(torch.as_tensor(budgets), torch.as_tensor(ref_budgets))


def _window_view(B, H, G, W, S, D, dtype, seed, strided=False):
    """A prefill view with window queries: row 1 padded on the left, its first window query padded too."""
    from squeezekit import LayerView

    g = torch.Generator().manual_seed(seed)
    wide = S + 7 if strided else S  # slot tensors that are views of wider buffers
    keys = (torch.randn(B, H, wide, D, generator=g) * 2).to(dtype)[:, :, :S]
    values = torch.randn(B, H, wide, D, generator=g).to(dtype)[:, :, :S]
    n = torch.tensor([S] + [S - 5] * (B - 1))
    positions = (torch.arange(S).view(1, 1, S) - (S - n).view(-1, 1, 1)).expand(B, H, S).int()
    valid = positions >= 0
    qpos = n.view(-1, 1) - W + torch.arange(W).view(1, -1)
    qpos[1:, 0] = -1
    return LayerView(
        keys=keys, values=values, valid=valid, positions=positions.masked_fill(~valid, -1), seen=n, budget=n,
        window_queries=(torch.randn(B, H, G, W, D, generator=g) * 2).to(dtype), window_positions=qpos,
        scaling=D**-0.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype,G,W,S,D,strided",
    [(torch.float32, 2, 4, 70, 16, False), (torch.bfloat16, 3, 8, 150, 64, True), (torch.float16, 4, 8, 64, 32, True)],
)
def test_the_window_kernel_gives_the_plain_window_outputs(dtype, G, W, S, D, strided):
    """`LayerView.window_output` through the kernel: the plain path's outputs over all slots and over subsets (one
    that keeps a single slot, one that keeps none of a head's), for GQA groups that do not fill a block, slots over
    several blocks and spans (merged), a padded window query (0) and strided views; fp32 sums in another order."""
    B, H = 2, 2
    view = _window_view(B, H, G, W, S, D, dtype, seed=S)
    g = torch.Generator().manual_seed(1)
    kept = torch.rand(3, B, H, S, generator=g) < torch.tensor([0.5, 0.1, 0.9]).view(3, 1, 1, 1)
    kept[1] = False
    kept[1, 0, 0, S - 3] = True  # one slot for head 0 of row 0, none for the others
    with kernels.configured("off"):
        want_full, want = view.window_output(), view.window_output(kept)
    before = _spy()["window"]
    with kernels.configured("window", interpret=True):
        full, got = view.window_output(), view.window_output(kept)
    assert _spy()["window"] == before + 2
    assert got.shape == (3, B, H, G, W, D) and full.shape == (B, H, G, W, D)
    torch.testing.assert_close(full, want_full, rtol=0, atol=2e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert float(got[:, 1, :, :, 0].abs().max()) == 0.0  # the padded window query
    assert float(got[1, 1].abs().max()) == 0.0 and float(got[1, 0, 1].abs().max()) == 0.0  # nothing kept


def test_many_layers_window_outputs_in_one_merge_are_each_layers_own(monkeypatch):
    """`LayerView.window_outputs` over layers of different slot counts, an odd number of masks (the last program
    reads one mask twice) and merges in chunks (a tiny `PARTIAL_BYTES`): each layer's plain `window_output`, with
    one counted kernel call per chunk, not per layer."""
    from squeezekit import LayerView
    from squeezekit.kernels import window as fused

    views = [_window_view(2, 2, 3, 4, S, 32, torch.float16, seed=S) for S in (40, 70, 40, 55)]
    g = torch.Generator().manual_seed(3)
    kept = [torch.rand(3, 2, 2, v.valid.shape[-1], generator=g) < 0.4 for v in views]
    with kernels.configured("off"):
        want = torch.stack([v.window_output(k) for v, k in zip(views, kept, strict=True)])
    for limit, launches in ((fused.PARTIAL_BYTES, 1), (1, len(views))):
        monkeypatch.setattr(fused, "PARTIAL_BYTES", limit)
        before = _spy()["window"]
        with kernels.configured("window", interpret=True):
            got = LayerView.window_outputs(views, kept)
        assert _spy()["window"] == before + launches
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_lost_attention_budgets_with_the_window_kernel_are_the_plain_ones():
    """Through a prefill: lost_attention's budgets (both rules) are the same with the window kernel."""
    model = tiny_model("llama")
    ids, mask = batch(3, 40, pad=6)

    def run(rule):
        with (
            torch.inference_mode(),
            squeezekit.compress(
                model, allocator="lost_attention", evictor="snapkv", budget=0.3, window=4, rule=rule
            ) as c,
        ):
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            return torch.as_tensor(c.summary()["budgets"])

    for rule in ("sqrt", "greedy"):
        with kernels.configured("off"):
            want = run(rule)
        before = _spy()["window"]
        with kernels.configured("window", interpret=True):
            got = run(rule)
        assert _spy()["window"] > before
        assert torch.equal(got, want)


EXTEND_CONFIGS = [dict(evictor="h2o"), dict(evictor="snapkv", heads="adaptive"), dict(evictor="tova", kv_bits=8)]


@pytest.mark.parametrize("config", EXTEND_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_extend_chunks_through_the_eviction_kernel_give_the_same_logits_and_cache(config):
    """Extend chunks after a prefill (lm-eval's scoring path: every head ends a chunk over its budget) evicted by
    the kernel: the same logits and the same kept slots as the plain path, with one count per row or per head."""
    from squeezekit.decoding import ChunkExtender
    from squeezekit.transformers_api import output_cache

    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=5)
    chunks = torch.randint(2, 128, (4, 3, 8), generator=torch.Generator().manual_seed(2))

    def run():
        logits = []
        with torch.inference_mode(), squeezekit.compress(model, allocator="squeeze", budget=0.3, **config):
            cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
            extend = ChunkExtender(model, cache, 8, cuda_graph=False)
            for new in chunks:
                logits.append(extend(new, cache.seen.view(-1, 1) + torch.arange(8)).clone())
            held = [(layer.positions.clone(), layer.valid.clone()) for layer in cache.layers]
        return logits, held

    with kernels.configured("off"):
        ref_logits, ref_held = run()
    before = _spy()["evict"]
    with kernels.configured("evict", interpret=True):
        got_logits, got_held = run()
    assert _spy()["evict"] == before + 4 * 4  # 4 chunks x 4 layers
    for a, b in zip(got_logits, ref_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (pos, valid), (pos_ref, valid_ref) in zip(got_held, ref_held, strict=True):
        assert torch.equal(valid, valid_ref) and torch.equal(pos[valid], pos_ref[valid_ref])


def test_steady_decode_through_the_kernel_gives_the_same_tokens_and_cache():
    model = tiny_model("mistral")
    ids, _ = batch(2, 40)

    def run():  # h2o: its accumulated attention is reset in the written slot too
        with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4) as c:
            cache, logits = prefill(model, c, ids, None, micro_batch=1)
            assert all(layer.steady for layer in cache.layers)
            tokens = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(6)
            return tokens, [(layer.keys, layer.positions, layer.stats.get("attention")) for layer in cache.layers]

    ref = run()
    before = _spy()["steady"]
    with kernels.configured("steady", interpret=True):
        got = run()
    assert _spy()["steady"] == before + 4 * 6  # 4 layers x 6 steady steps
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1], ref[1], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(a[2], b[2]))


@pytest.mark.parametrize("B,H,G,S,D", [(1, 2, 4, 100, 16), (3, 2, 2, 37, 24), (4, 4, 1, 70, 16), (1, 1, 8, 130, 32)])
def test_decode_attention_matches_sdpa_over_the_folded_query(B, H, G, S, D):
    """Split shares merged by log-sum-exp (small B x H) and one share per row (large), GQA groups 1..8."""
    import torch.nn.functional as F

    from squeezekit.attention import _fold, _unfold
    from squeezekit.kernels import decode

    g = torch.Generator().manual_seed(B * 100 + S)
    query = torch.randn(B, H * G, 1, D, generator=g)
    key, value = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    ref = _unfold(F.scaled_dot_product_attention(_fold(query, H), key, value, scale=0.3), H * G, 1)
    assert decode.decode_attention(query, key, value, 0.3) is None  # off unless chosen
    with kernels.configured("decode", interpret=True):
        out = decode.decode_attention(query, key, value, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert decode.splits(B, H, S, 8, 16) == (1 if B * H >= 16 else max(1, min(-(-32 // (B * H)), S // 32)))


@pytest.mark.parametrize("slots_m", [False, True], ids=["heads-on-M", "slots-on-M"])
@pytest.mark.parametrize("B,H,G,D", [(1, 2, 4, 16), (3, 2, 2, 24), (2, 4, 1, 16)])
def test_pooled_decode_attention_matches_the_gathered_masked_reference(B, H, G, D, slots_m):
    """The pooled kernel reads only the valid slots of each head's segment (of its own length) and equals masked
    attention over the gathered rectangular buffers."""
    import numpy as np

    from squeezekit.attention import _fold, _unfold
    from squeezekit.kernels import decode
    from squeezekit.layers import HeadPool

    g = torch.Generator().manual_seed(B * 10 + H)
    caps = np.random.default_rng(B + H).integers(5, 60, size=(B, H))
    C0 = int(caps.max())
    keys, values = torch.randn(B, H, C0, D, generator=g), torch.randn(B, H, C0, D, generator=g)
    pool = HeadPool.pack({"keys": keys, "values": values}, caps)
    valid = pool.mapped() & (torch.rand(pool.slot_map.shape, generator=g) > 0.2)  # some free slots in each segment
    valid[..., 0] = True
    query = torch.randn(B, H * G, 1, D, generator=g)
    k_rect, v_rect = pool.gather("keys"), pool.gather("values")
    rows = (pool.parts["keys"],), (pool.parts["values"],)
    mask = valid[:, :, None, :].expand(B, H, G, C0).reshape(B, H, G, C0)
    ref = _unfold(F_sdpa(_fold(query, H), k_rect, v_rect, mask), H * G, 1)
    assert decode.pooled_decode_attention(query, *rows, pool.offsets, pool.lengths, valid, 0.25) is None
    with kernels.configured("pooled", interpret=True):
        out = decode.pooled_decode_attention(query, *rows, pool.offsets, pool.lengths, valid, 0.25, None,
                                             (64, 4, 2, slots_m))  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def F_sdpa(query, key, value, mask):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25)


def test_steady_decode_with_the_decode_kernel_gives_the_same_tokens():
    model = tiny_model("llama")
    ids, _ = batch(2, 40)

    def run():
        with squeezekit.compress(model, evictor="streaming", budget=0.3, window=4) as c:
            cache, logits = prefill(model, c, ids, None, micro_batch=2)
            return GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(4)

    ref = run()
    before = _spy()["decode"]
    with kernels.configured("decode", interpret=True):
        got = run()
    assert _spy()["decode"] == before + 4 * 4
    assert torch.equal(got, ref)


def test_kernels_compile_for_hopper():
    """Every configuration the GPU path launches compiles for sm_90 with Triton's bundled ptxas, no GPU needed (bf16
    autotune tiles, the fp32 launch, the steady write and the decode kernels) and fits in shared memory: the
    lowering errors the interpreter cannot see. In a process of its own: the interpreter is on in this one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("kernels_aot.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "compiled" in done.stdout


@pytest.mark.parametrize("case", ["left-padding", "later-step"])
def test_half_precision_kernels_against_an_fp32_reference(case):
    """The GPU runs these kernels in bf16/fp16 (probabilities cast to the value dtype before P.V, as flash does).
    The interpreter's dot is wrong for bf16, right for fp16: fp16 checks that path here (bf16:
    benchmarks/gpu_perf.py)."""
    from squeezekit.kernels import decode
    from squeezekit.kernels.attention import attention_lse, column_sums

    if case == "left-padding":
        inputs = _fresh(B=2, Hq=4, H=2, q=40, D=32, pad_rows=((1, 9),))
        causal = True
    else:
        inputs = _later_step(B=2, Hq=4, H=2, q=12, C=45, D=32)
        causal = False
    query, key, value, kv_valid, kv_pos, q_pos, q_valid = inputs
    masks = (kv_valid, kv_pos, q_pos, q_valid, None, 0.2)
    half = [t.half() for t in (query, key, value)]
    ref_out, ref_sums = _reference(*[t.float() for t in half], *masks)
    out, lse = attention_lse(*half, *masks, causal)
    sums = column_sums(half[0], half[1], lse, *masks, causal)
    assert out.dtype == torch.float16
    real = q_valid[:, :, None, None]
    assert float(((out.float() - ref_out) * real).abs().max()) < 4e-3
    assert float((sums - ref_sums).abs().max() / ref_sums.abs().max()) < 1e-5  # fp32 scores from fp16 inputs
    q1 = half[0][:, :, -1:].contiguous()
    k1, v1 = half[1].contiguous(), half[2].contiguous()
    with kernels.configured("decode", interpret=True):
        dec = decode.decode_attention(q1, k1, v1, 0.2)
    import torch.nn.functional as F

    from squeezekit.attention import _fold, _unfold

    dref = _unfold(F.scaled_dot_product_attention(_fold(q1.float(), 2), k1.float(), v1.float(), scale=0.2), 4, 1)
    assert dec.dtype == torch.float16 and float((dec.float() - dref).abs().max()) < 4e-3

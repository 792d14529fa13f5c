"""The output-aware, RoPE-aware and attention-free evictors (criticalkv, expected_attention, lagkv) and the
attention-driven allocators (dynamickv, cake, simlayerkv), against references computed here from their papers'
definitions with plain loops, then through prefill and decode on the tiny models.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import AllocationRequest, LayerView


def plugin(kind: str, name: str, **params):
    return squeezekit.registry().get(kind, name).cls(**params)


def window_view(seed=0, B=2, H=2, G=2, S=16, W=4, D=8, held=(16, 12)) -> LayerView:
    """Row b holds tokens 0..held[b]-1 in slot order (a prefill), its last W tokens' queries as the window."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.full((B, H, S), -1, dtype=torch.int32)
    for b in range(B):
        positions[b, :, : held[b]] = torch.arange(held[b], dtype=torch.int32)
    valid = positions >= 0
    keys = torch.randn(B, H, S, D, generator=g).masked_fill(~valid[..., None], float("nan"))
    values = (torch.randn(B, H, S, D, generator=g) * torch.rand(B, H, S, 1, generator=g) * 2).masked_fill(
        ~valid[..., None], float("nan")
    )
    seen = torch.tensor(held)
    wpos = seen.view(B, 1) - W + torch.arange(W).view(1, W)
    return LayerView(
        keys, values, valid, positions, seen, seen // 2, layer_idx=0, n_layers=2, scaling=D**-0.5,
        window_queries=torch.randn(B, H, G, W, D, generator=g), window_positions=wpos,
    )  # fmt: skip


def attention_ref(view: LayerView, b: int, h: int, g: int, w: int) -> dict[int, float]:
    """One window query's softmax over the valid slots it may see (slot -> probability), with loops."""
    q = view.window_queries[b, h, g, w]
    qpos = int(view.window_positions[b, w])
    slots = [s for s in range(view.keys.shape[2]) if view.valid[b, h, s] and int(view.positions[b, h, s]) <= qpos]
    logits = [float(q @ view.keys[b, h, s]) * view.scaling for s in slots]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return {s: v / sum(e) for s, v in zip(slots, e, strict=True)}


def protected(view: LayerView, window: int) -> torch.Tensor:
    return view.valid & (view.positions >= (view.seen - window).view(-1, 1, 1))


# ---- criticalkv ----------------------------------------------------------------------------------------------------


def mean_attention(view: LayerView, b: int, h: int, g: int, s: int) -> float:
    """The window's mean attention to slot ``s`` (0 for a slot no query sees)."""
    W = view.window_queries.shape[3]
    return sum(attention_ref(view, b, h, g, w).get(s, 0.0) for w in range(W)) / W


def near(s: int, S: int, k: int = 7) -> range:
    """The slots max-pooled with ``s`` (SnapKV's kernel of ``k`` neighbours; slots are in token order here)."""
    return range(max(0, s - k // 2), min(S, s + k // 2 + 1))


def critical_ref(view: LayerView, weight: torch.Tensor) -> torch.Tensor:
    """sum_g a_g(s) * ||W_g v_s||_2, ``a_g`` the window's mean attention max-pooled over 7 neighbours, ``W_g``
    head g's slice of ``weight``."""
    B, H, G, W, D = view.window_queries.shape
    out = torch.full((B, H, view.keys.shape[2]), float("nan"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for s in range(view.keys.shape[2]):
                if not view.valid[b, h, s]:
                    continue
                total = 0.0
                for g in range(G):
                    a = max(mean_attention(view, b, h, g, t) for t in near(s, view.keys.shape[2]))  # max-pooled
                    head = h * G + g
                    total += a * float((weight[:, head * D : (head + 1) * D] @ view.values[b, h, s]).norm())
                out[b, h, s] = total
    return out


def test_criticalkv_scores_attention_times_the_projected_value_norm():
    view = window_view()
    weight = torch.randn(24, 2 * 2 * 8, generator=torch.Generator().manual_seed(5))  # (hidden, Hq * D)
    ev = plugin("evictor", "criticalkv", window=4, first_stage=0.0)
    per_head = weight.view(24, 4, 8).transpose(0, 1)
    ev.grams = {0: per_head.transpose(1, 2) @ per_head}
    score = ev.score(view)
    rest = view.valid & ~protected(view, 4)
    assert bool(torch.isinf(score[protected(view, 4)]).all())
    torch.testing.assert_close(score[rest].double(), critical_ref(view, weight)[rest], rtol=1e-5, atol=1e-6)


def test_criticalkv_first_stage_keeps_the_most_attended_share_above_the_rest():
    view = window_view(seed=2)
    ev = plugin("evictor", "criticalkv", window=4, first_stage=0.5)
    ev.grams = {0: torch.eye(8).expand(4, 8, 8) * 0.01}  # a tiny projection: stage two alone would differ
    score = ev.score(view)
    votes = torch.tensor([[[sum(max(mean_attention(view, b, h, g, t) for t in near(s, 16)) for g in range(2))
                            for s in range(16)] for h in range(2)] for b in range(2)])  # fmt: skip
    for b in range(2):
        first = int(0.5 * (int(view.budget[b]) - 4))
        for h in range(2):
            rest = [s for s in range(16) if view.valid[b, h, s] and not protected(view, 4)[b, h, s]]
            by_attention = sorted(rest, key=lambda s: -float(votes[b, h, s]))[:first]
            others = [s for s in rest if s not in by_attention]
            assert min(float(score[b, h, s]) for s in by_attention) > max(float(score[b, h, s]) for s in others)


def test_criticalkv_prepare_reads_each_layers_output_projection():
    model = tiny_model("llama")
    ev = plugin("evictor", "criticalkv")
    ev.prepare(model)
    attn = model.model.layers[1].self_attn
    D = attn.head_dim
    w = attn.o_proj.weight.detach()
    assert sorted(ev.grams) == list(range(len(model.model.layers)))
    for g in range(model.config.num_attention_heads):
        torch.testing.assert_close(ev.grams[1][g], w[:, g * D : (g + 1) * D].T @ w[:, g * D : (g + 1) * D])


# ---- expected_attention --------------------------------------------------------------------------------------------


def rope_matrix(angle: torch.Tensor) -> torch.Tensor:
    """The D x D matrix of RoPE's rotate-half layout for per-frequency angles (F,): pairs (i, i + F)."""
    F = angle.shape[0]
    m = torch.zeros(2 * F, 2 * F, dtype=torch.float64)
    for i in range(F):
        c, s = math.cos(float(angle[i])), math.sin(float(angle[i]))
        m[i, i], m[i, i + F], m[i + F, i], m[i + F, i + F] = c, -s, s, c
    return m


def expected_ref(view: LayerView, inv_freq: torch.Tensor, horizon: int) -> torch.Tensor:
    B, H, G, W, D = view.window_queries.shape
    freq = inv_freq.double()
    r_bar = sum(rope_matrix(j * freq) for j in range(horizon)) / horizon
    out = torch.full((B, H, view.keys.shape[2]), float("nan"), dtype=torch.float64)
    for b in range(B):
        T = int(view.seen[b])
        for h in range(H):
            slots = [s for s in range(view.keys.shape[2]) if view.valid[b, h, s]]
            probs = torch.zeros(len(slots), dtype=torch.float64)
            for g in range(G):
                carry = [rope_matrix((T - int(view.window_positions[b, w])) * freq) for w in range(W)]
                xs = [carry[w] @ view.window_queries[b, h, g, w].double() for w in range(W)]
                logits = []
                for s in slots:
                    z = torch.stack([view.scaling * (view.keys[b, h, s].double() @ r_bar @ x) for x in xs])
                    logits.append(float(z.mean() + z.var(unbiased=True) / 2))
                probs += torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            for i, s in enumerate(slots):
                out[b, h, s] = probs[i] / G * view.values[b, h, s].double().norm()
    return out


def test_expected_attention_is_the_gaussian_expectation_under_rope():
    view = window_view(seed=3)
    ev = plugin("evictor", "expected_attention", window=4, horizon=6)
    ev.inv_freq = 1.0 / (10.0 ** (torch.arange(0, 8, 2).float() / 8))
    score = ev.score(view)
    rest = view.valid & ~protected(view, 4)
    assert bool(torch.isinf(score[protected(view, 4)]).all())
    torch.testing.assert_close(score[rest].double(), expected_ref(view, ev.inv_freq, 6)[rest], rtol=1e-4, atol=1e-7)


def test_expected_attention_reads_rope_and_refuses_a_model_without_it():
    ev = plugin("evictor", "expected_attention")
    model = tiny_model("llama")
    ev.prepare(model)
    torch.testing.assert_close(ev.inv_freq, model.model.rotary_emb.inv_freq.float())
    opt = tiny_model("opt")
    with pytest.raises(squeezekit.ConfigError, match="expected_attention.*rotary position embeddings"):
        with squeezekit.compress(opt, evictor="expected_attention", budget=0.5):
            pass


# ---- lagkv ---------------------------------------------------------------------------------------------------------


def shuffled(view: LayerView, seed: int = 0) -> LayerView:
    """The same tokens in shuffled slots (LagKV reads positions, never slot order)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(view.keys.shape[2], generator=g)
    return LayerView(view.keys[:, :, perm], view.values[:, :, perm], view.valid[:, :, perm],
                     view.positions[:, :, perm], view.seen, view.budget)  # fmt: skip


def lag_ref(view: LayerView, sinks: int, lag: int) -> torch.Tensor:
    B, H, S, _ = view.keys.shape
    out = torch.full((B, H, S), float("nan"), dtype=torch.float64)
    for b in range(B):
        complete = (int(view.seen[b]) - sinks) // lag
        for h in range(H):
            by_chunk: dict[int, list[int]] = {}
            for s in range(S):
                if view.valid[b, h, s] and int(view.positions[b, h, s]) >= sinks:
                    by_chunk.setdefault((int(view.positions[b, h, s]) - sinks) // lag, []).append(s)
            for c, slots in by_chunk.items():
                if c + 1 >= complete:
                    continue
                total = torch.zeros(len(slots), dtype=torch.float64)
                for x in (view.keys, view.values):
                    ref = torch.stack([x[b, h, s].double() for s in by_chunk[c + 1]])
                    lo, hi = ref.min(0).values, ref.max(0).values
                    spread = torch.stack([((x[b, h, s].double() - lo) / (hi - lo)).std() for s in slots])
                    total += torch.softmax(spread, 0)
                for i, s in enumerate(slots):
                    out[b, h, s] = total[i]
    return out


@pytest.mark.parametrize("sinks,lag", [(2, 3), (0, 4)])
def test_lagkv_scores_each_chunk_against_the_next(sinks, lag):
    view = shuffled(window_view(seed=4, S=20, held=(20, 15)))
    score = plugin("evictor", "lagkv", sinks=sinks, lag=lag).score(view)
    ref = lag_ref(view, sinks, lag)
    scored = ~ref.isnan()
    assert int(scored.sum()) > 0
    torch.testing.assert_close(score[scored].double(), ref[scored], rtol=1e-4, atol=1e-6)
    pos = view.positions
    sink = view.valid & (pos < sinks)
    tail = view.valid & ~scored & ~sink  # the chunks with no complete successor
    assert bool(torch.isinf(score[sink]).all()) and int(tail.sum()) > 0
    assert bool((score[tail] == 4.0).all()) and float(score[scored].max()) <= 2.0  # sinks > tail > every share


# ---- the allocators ------------------------------------------------------------------------------------------------


def request(views, total, floor=2):
    B = views[0].keys.shape[0]
    cap = views[0].seen.clone()
    return AllocationRequest(torch.zeros(B, len(views)), torch.tensor(total), floor, cap, layers=views)


def test_dynamickv_budgets_are_each_layers_share_of_the_global_top_votes():
    views = [window_view(seed=10 + i, held=(16, 16)) for i in range(3)]
    for i, v in enumerate(views):  # layers that concentrate their attention (sharp queries) and spread it
        v.window_queries = v.window_queries * (4.0, 1.0, 0.1)[i]
    al = plugin("allocator", "dynamickv", window=4, r_max=3.0)
    budgets = al.allocate(request(views, [18, 18]))
    offer = math.ceil(3.0 * 18 / 3)
    for b in range(2):
        pool = []
        for layer, v in enumerate(views):
            W = v.window_queries.shape[3]
            vote = [[max(sum(mean_attention(v, b, h, g, t) * W for g in range(2)) / 2 for t in near(s, 16))
                     for s in range(16) if not protected(v, 4)[b, h, s]] for h in range(2)]  # fmt: skip
            votes = torch.tensor(vote).mean(0)  # the mean over the KV heads
            pool += [(float(x), layer) for x in sorted(votes.tolist(), reverse=True)[:offer]]
        winners = sorted(pool, key=lambda t: -t[0])[:18]
        counts = [sum(1 for _, layer in winners if layer == i) for i in range(3)]
        assert abs(budgets[b] - torch.tensor(counts)).max() <= 2, (budgets[b], counts)  # (floor 2 moves a little)
        assert int(budgets[b].sum()) == 18


def cake_ref(view: LayerView, tau1: float, tau2: float, b: int) -> float:
    B, H, G, W, D = view.window_queries.shape
    ents, shifts = [], []
    for h in range(H):
        for g in range(G):
            rows = [attention_ref(view, b, h, g, w) for w in range(W)]
            slots = sorted({s for r in rows for s in r})
            mat = torch.tensor([[r.get(s, 0.0) for s in slots] for r in rows], dtype=torch.float64)
            a = mat.mean(0)
            ents.append(float(-(a * a.log()).sum()))
            shifts.append(float(mat.var(0, unbiased=True).sum()))
    return (sum(ents) / len(ents)) ** (1 / tau1) * (sum(shifts) / len(shifts)) ** (1 / tau2)


def test_cake_budgets_follow_entropy_and_variance_of_each_layer():
    views = [window_view(seed=20 + i, held=(16, 16)) for i in range(3)]
    for i, v in enumerate(views):
        v.window_queries = v.window_queries * (3.0, 1.0, 0.3)[i]
    al = plugin("allocator", "cake", window=4, tau1=0.5, tau2=2.0)
    for b in range(2):
        for v in views:
            assert al.preference(v)[b] == pytest.approx(cake_ref(v, 0.5, 2.0, b), rel=1e-6)
    budgets = al.allocate(request(views, [24, 24]))
    for b in range(2):
        prefs = torch.tensor([cake_ref(v, 0.5, 2.0, b) for v in views])
        assert (budgets[b].double() - 24 * prefs / prefs.sum()).abs().max() <= 1.0
        assert int(budgets[b].sum()) == 24


def test_simlayerkv_gives_lazy_layers_sinks_plus_recent_and_the_rest_to_the_others():
    views = [window_view(seed=30 + i, S=40, held=(40, 40)) for i in range(4)]
    # layers 1 and 3 lazy: every window query is u, the first 2 and the last 6 keys 5u, the others 0
    for i in (1, 3):
        v = views[i]
        u = torch.ones(8)
        v.window_queries = u.expand_as(v.window_queries).clone()
        local = (v.positions < 2) | (v.positions >= 34)
        v.keys = torch.where(local[..., None], 5 * u, torch.zeros(8))
    al = plugin("allocator", "simlayerkv", window=4, threshold=0.9, sinks=2, recent=6)
    assert [bool(al.lazy(v)[0]) for v in views] == [False, True, False, True]
    budgets = al.allocate(request(views, [80, 80]))
    assert budgets[:, 1].tolist() == [8, 8] and budgets[:, 3].tolist() == [8, 8]
    assert budgets[:, 0].tolist() == [32, 32] and budgets[:, 2].tolist() == [32, 32]


# ---- through the engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [{"evictor": "criticalkv"}, {"evictor": "expected_attention"}, {"evictor": "lagkv", "lag": 4},
     {"allocator": "dynamickv", "evictor": "snapkv"}, {"allocator": "cake", "evictor": "h2o"},
     {"allocator": "simlayerkv", "evictor": "streaming"}, {"evictor": "criticalkv", "heads": "adaptive"},
     {"evictor": "lagkv", "lag": 4, "kv_bits": 8}],
)  # fmt: skip
def test_every_layer_stays_within_its_budget_through_generate(config):
    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=5)
    with torch.no_grad(), squeezekit.compress(model, budget=0.25, **config) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = c.last_cache
    assert out.shape[1] == 48 + 8
    for layer in cache.layers:
        held = layer.valid.sum(-1)  # (B, H)
        limit = layer.head_budget if getattr(layer, "head_budget", None) is not None else layer.budget.view(-1, 1)
        assert bool((held <= limit).all()), (layer.layer_idx, held, limit)
        assert bool((held < mask.sum(-1).view(-1, 1) + 8).all())  # something was evicted


@pytest.mark.parametrize("name", ["criticalkv", "expected_attention", "lagkv", "dynamickv", "cake", "simlayerkv"])
def test_full_budget_is_plain_transformers(name):
    model = tiny_model("llama")
    ids, mask = batch(2, 32, pad=4)
    kind = "allocator" if name in ("dynamickv", "cake", "simlayerkv") else "evictor"
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with squeezekit.compress(model, budget=1, **{kind: name}):
            ours = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # (padded positions attend to nothing real: their logits are arbitrary either way)
    torch.testing.assert_close(ours[real], plain[real], atol=1e-5, rtol=0)


def test_doc_evictor_with_prepare_example(plugin_site):
    """The evictor-with-prepare snippet of docs/plugins.md works when registered from a plugin: prepare reads the
    model once, and the engine keeps its top scores within budget."""
    import re

    from plugin_factory import DOC

    block = re.search(r"```python\n(# example: evictor with prepare\n.*?)```", DOC.read_text(), flags=re.S).group(1)
    plugin_site.add("sk_doc_prepare", block, package="sk-doc-prepare")
    reg = plugin_site.reload()
    assert reg.failures == []
    model = tiny_model("llama")
    ids, mask = batch(2, 40, pad=4)
    with torch.no_grad(), squeezekit.compress(model, evictor="projected_value", budget=0.25) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        cache, evictor = c.last_cache, c.runner.evictor
    assert sorted(evictor.out) == list(range(len(model.model.layers)))
    for layer in cache.layers:
        assert bool((layer.valid.sum(-1) <= layer.budget.view(-1, 1)).all())


def test_lagkv_keeps_its_sinks_when_the_unreferenced_tail_outgrows_the_budget():
    """Found by the SmolLM2 sweep: at budget 0.1 the chunks with no reference (up to 2 x lag - 1 tokens) filled the
    budget, ties went to the recent tokens and the sinks were dropped (perplexity worse than random)."""
    model = tiny_model("llama")
    ids, mask = batch(2, 48)
    with (
        torch.no_grad(),
        squeezekit.compress(model, allocator="uniform", evictor="lagkv", sinks=2, lag=8, budget=10) as c,
    ):
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = c.last_cache
    for layer in cache.layers:
        held = layer.positions.masked_fill(~layer.valid, -1)
        assert bool(((held == 0).any(-1) & (held == 1).any(-1)).all())  # every head keeps both sinks
        assert bool((layer.valid.sum(-1) <= layer.budget.view(-1, 1)).all()) and int(layer.budget.max()) == 10


@pytest.mark.parametrize("name", ["dynamickv", "cake"])
def test_batch_level_allocation_gives_every_row_the_batch_mean_share(name):
    """``per="batch"``: every sequence of equal length gets the same budgets (equal buffers: the CUDA-graph decode),
    the batch's mean share of each layer; ``per="sequence"`` (the default) allocates each row alone."""
    model = tiny_model("llama")
    ids, _ = batch(3, 48)
    budgets = {}
    for per in ("sequence", "batch"):
        with torch.no_grad(), squeezekit.compress(model, allocator=name, evictor="snapkv", budget=0.25, per=per) as c:
            model(input_ids=ids, use_cache=True)
            budgets[per] = c.summary()["budgets"]
    assert bool((budgets["batch"] == budgets["batch"][0]).all())
    shares = (budgets["sequence"].double() / budgets["sequence"].sum(-1, keepdim=True)).mean(0)
    assert (budgets["batch"][0].double() - shares * budgets["batch"][0].sum()).abs().max() <= 1.0


def test_lagkvs_group_total_is_the_sum_over_each_slots_group():
    from squeezekit.plugins.lagkv import group_total

    g = torch.Generator().manual_seed(0)
    e = torch.rand(2, 3, 17, generator=g)
    group = torch.randint(0, 5, (2, 3, 17), generator=g)
    expected = torch.stack([torch.stack([torch.stack([e[b, h][group[b, h] == group[b, h, s]].sum() for s in range(17)])
                                         for h in range(3)]) for b in range(2)])  # fmt: skip
    torch.testing.assert_close(group_total(e, group), expected)

"""The ``lost_attention`` allocator (per prompt, from the last prompt queries), tested by its behaviour.

Requests are built by hand as the engine builds them at the end of prefill: one `LayerView` per layer (slot i holds
token i, padding slots invalid), the queries of the last prompt tokens, and the evictor that will keep the budgets.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled

import squeezekit
from squeezekit import AllocationRequest, LayerView, Stat, kernels
from squeezekit.budget import check_budgets

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVICTORS = bundled("evictor")


def plugin(kind: str, name: str, **params):
    return squeezekit.registry().get(kind, name).cls(**params)


def views(lengths: list[int], L: int, seed: int, H: int = 2, G: int = 2, D: int = 8, W: int = 8) -> list[LayerView]:
    """``L`` layers of a batch of prompts of the given lengths, random keys and window queries."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    n = torch.tensor(lengths)
    positions = torch.arange(S).view(1, 1, S).expand(B, H, S).clone().int()
    valid = positions < n.view(-1, 1, 1)
    positions = positions.masked_fill(~valid, -1)
    W = min(W, min(lengths))
    out = []
    for layer in range(L):
        out.append(
            LayerView(
                keys=torch.randn(B, H, S, D, generator=g) * 2,
                values=torch.randn(B, H, S, D, generator=g),
                valid=valid,
                positions=positions,
                seen=n.clone(),
                budget=n.clone(),
                layer_idx=layer,
                n_layers=L,
                phase="prefill",
                attention=torch.rand(B, H, S, generator=g).masked_fill(~valid, 0.0),
                window_queries=torch.randn(B, H, G, W, D, generator=g) * 2,
                window_positions=n.view(-1, 1) - W + torch.arange(W).view(1, -1),
                scaling=D**-0.5,
                tova_attention=torch.rand(B, H, S, generator=g).masked_fill(~valid, 0.0),  # (tova's statistic)
            )
        )
    return out


def request(layers, evictor, total, floor) -> AllocationRequest:
    B, L = layers[0].keys.shape[0], len(layers)
    return AllocationRequest(
        importance=torch.zeros(B, L),
        total=torch.as_tensor(total),
        floor=floor,
        cap=layers[0].seen.clone(),
        layers=layers,
        evictor=evictor,
    )


@st.composite
def cases(draw):
    L = draw(st.integers(1, 12))
    evictor = plugin("evictor", draw(st.sampled_from(EVICTORS)))
    floor = max(1, evictor.floor())
    lengths = draw(st.lists(st.integers(floor, 200), min_size=1, max_size=3))
    totals = [draw(st.integers(floor * L, n * L)) for n in lengths]
    return request(views(lengths, L, draw(st.integers(0, 2**16))), evictor, totals, floor)


@pytest.mark.parametrize("rule", ["sqrt", "greedy"])
@SETTINGS
@given(req=cases())
def test_contract_exact_total_floor_cap_and_determinism(rule, req):
    budgets = plugin("allocator", "lost_attention", rule=rule).allocate(req)
    assert budgets.dtype == torch.long
    assert check_budgets(budgets, req.total, req.floor, req.cap, tuple(req.importance.shape)) is None
    assert torch.equal(plugin("allocator", "lost_attention", rule=rule).allocate(req), budgets)


@SETTINGS
@given(L=st.integers(2, 10), n=st.integers(40, 200), rows=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_budgets_follow_each_prompt_alone(L, n, rows, seed):
    """Per prompt: each row's budgets are those it gets alone, whatever the other rows of its batch (before, the
    batch's mean cost: a served batch then depended on how it was split into micro-batches)."""
    evictor = plugin("evictor", "streaming")
    req = request(views([n] * rows, L, seed), evictor, [n * L // 3] * rows, evictor.floor())
    budgets = plugin("allocator", "lost_attention").allocate(req)
    for b in range(rows):
        one = dataclasses.replace(
            req, importance=req.importance[b : b + 1], total=req.total[b : b + 1], cap=req.cap[b : b + 1],
            layers=[view.rows(torch.tensor([b])) for view in req.layers],
        )  # fmt: skip
        assert torch.equal(plugin("allocator", "lost_attention").allocate(one)[0], budgets[b])


def _attend(query, keys, values, over, scaling):
    """One query's softmax attention over the slots ``over`` alone (a list), in float64: 0 over none."""
    if not over:
        return torch.zeros(keys.shape[-1], dtype=torch.float64)
    logits = torch.stack([query @ keys[s] * scaling for s in over])
    return torch.softmax(logits, 0) @ values[over]


@pytest.mark.parametrize("evictor", ["h2o", "streaming"])
def test_the_cost_is_the_literal_change_of_the_window_output(evictor):
    """`LostAttention.lost` against a literal float64 computation on a tiny batch: rank each head's slots as the
    engine keeps them at prefill (the newest token first, then by the evictor's score, ties to the more recent
    token), keep the first ``b``; each real window query attends over the kept slots it sees alone; the cost is the
    L2 distance to its output over every slot it sees, averaged over the KV heads, the query heads and the real
    window queries (one row padded, so its first window query is padding)."""
    import math

    view = views([30, 24], 1, seed=5, H=2, G=2, D=4, W=4)[0]
    ev = plugin("evictor", evictor)
    knots = torch.tensor([[5, 12, 30], [1, 9, 24]])
    budget = torch.tensor([6, 6])
    cost = squeezekit.registry().get("allocator", "lost_attention").cls.lost(view, ev, budget, knots)
    score = ev.score(dataclasses.replace(view, budget=budget)).double()
    B, H, G, W, _ = view.window_queries.shape
    q, k, v = view.window_queries.double(), view.keys.double(), view.values.double()
    for b in range(B):
        for j, b_keep in enumerate(knots[b].tolist()):
            total, count = 0.0, 0
            for h in range(H):
                slots = [s for s in range(view.valid.shape[-1]) if view.valid[b, h, s]]
                newest = max(int(view.positions[b, h, s]) for s in slots)
                order = sorted(
                    slots,
                    key=lambda s: (int(view.positions[b, h, s]) != newest, -float(score[b, h, s]),
                                   -int(view.positions[b, h, s])),
                )  # fmt: skip
                keep = set(order[:b_keep])
                for g in range(G):
                    for w in range(W):
                        qp = int(view.window_positions[b, w])
                        if qp < 0:
                            continue
                        seen = [s for s in slots if int(view.positions[b, h, s]) <= qp]
                        query, kv = q[b, h, g, w], (k[b, h], v[b, h])
                        moved = _attend(query, *kv, [s for s in seen if s in keep], view.scaling)
                        total += float((moved - _attend(query, *kv, seen, view.scaling)).norm())
                        count += 1
            want = total / count
            assert math.isclose(float(cost[b, j]), want, rel_tol=1e-5, abs_tol=1e-6), (b, j, float(cost[b, j]), want)
    assert float(cost[0, 2]) < 1e-6  # keeping every slot moves nothing


def test_every_layer_costed_at_once_costs_what_it_costs_alone():
    """`LostAttention.costs` (all layers: one stacked ranking, one merge of the window outputs) gives each layer
    the cost `lost` gives it alone, for both rules' knots."""
    cls = squeezekit.registry().get("allocator", "lost_attention").cls
    layers = views([30, 24], 4, seed=9, H=2, G=2, D=4, W=4)
    ev = plugin("evictor", "h2o")
    budget = torch.tensor([6, 6])
    for knots in (budget.view(-1, 1), torch.tensor([[5, 12, 30], [1, 9, 24]])):
        together = cls.costs(layers, ev, budget, knots)
        assert together.shape == (2, 4, knots.shape[1])
        for i, view in enumerate(layers):
            torch.testing.assert_close(together[:, i], cls.lost(view, ev, budget, knots), rtol=1e-6, atol=1e-7)


def test_a_subset_with_a_tiny_share_of_the_attention_still_gets_its_own_softmax():
    """The plain `window_output` renormalizes the kept probabilities; where the kept slots hold almost none of a
    query's attention (a slot it attends to 120 nats more strongly is dropped: the kept probabilities underflow in
    fp32), the output must still be the softmax over the kept slots alone (float64, literally)."""
    view = views([20], 1, seed=2, H=1, G=1, D=4, W=2)[0]
    view.keys[0, 0, 3] = view.window_queries[0, 0, 0, 0] * (120 / float(view.window_queries[0, 0, 0, 0].square().sum()
                                                                  * view.scaling))  # fmt: skip
    kept = view.valid.clone()
    kept[0, 0, 3] = False  # the strong slot dropped
    kept[0, 0, 10:] = False
    with kernels.configured("off"):
        got = view.window_output(kept)
    q, k, v = view.window_queries.double(), view.keys.double(), view.values.double()
    for w in range(2):
        qp = int(view.window_positions[0, w])
        over = [s for s in range(20) if bool(kept[0, 0, s]) and int(view.positions[0, 0, s]) <= qp]
        want = _attend(q[0, 0, 0, w], k[0, 0], v[0, 0], over, view.scaling)
        torch.testing.assert_close(got[0, 0, 0, w].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["sqrt", "greedy"])
def test_identical_layers_split_like_uniform(rule):
    layers = views([120], 1, seed=3) * 6
    budgets = plugin("allocator", "lost_attention", rule=rule).allocate(
        request(layers, plugin("evictor", "streaming"), [6 * 40], 12)
    )[0]
    assert int(budgets.max() - budgets.min()) <= 1


@pytest.mark.parametrize("rule", ["sqrt", "greedy"])
@pytest.mark.parametrize("evictor", ["streaming", "sliding_window"])  # (snapkv would keep token 40: no loss)
def test_a_layer_looking_far_back_keeps_more_than_one_looking_at_recent_tokens(evictor, rule):
    """Layer 0's last queries look only at token 40 (in the middle, dropped first by recency); layer 1's at their own
    recent tokens, which every evictor keeps. Layer 1 loses (next to) nothing at the floor, so layer 0 gets the rest
    (the loss is measured at a grid of budgets: to a token or two)."""
    n, W = 120, 8
    layers = views([n], 2, seed=0, W=W)
    far, near = [dataclasses.replace(v) for v in layers]
    q = torch.zeros_like(far.window_queries)
    q[..., 0] = 30.0
    keys = torch.zeros_like(far.keys)
    keys[:, :, 40, 0] = 1.0  # only token 40 matches the queries
    far.keys, far.window_queries = keys, q
    recent = torch.zeros_like(near.keys)
    recent[:, :, n - W :, 0] = 1.0  # the window's own tokens
    near.keys, near.window_queries = recent, q.clone()
    ev = plugin("evictor", evictor)
    budgets = plugin("allocator", "lost_attention", rule=rule).allocate(
        request([far, near], ev, [2 * 40], max(1, ev.floor()))
    )[0]
    floor = max(1, ev.floor())
    assert budgets[1] <= floor + 2 and budgets[0] == 80 - budgets[1]


# ---- in the engine, on a tiny model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_model

    return tiny_model("llama")


@pytest.mark.parametrize("evictor", EVICTORS)
def test_runs_in_the_engine_with_every_evictor(tiny, evictor):
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (3, 96))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # a left-padded shorter prompt
    with squeezekit.compress(tiny, allocator="lost_attention", evictor=evictor, budget=0.3) as c:
        out = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        s = c.summary()
    assert out.shape == (3, 100)
    n = s["prompt_len"]
    assert n.tolist() == [96, 76, 96]
    for b in range(3):
        assert int(s["budgets"][b].sum()) == round(0.3 * int(n[b]) * 4)
    with squeezekit.compress(tiny, allocator="lost_attention", evictor=evictor, budget=0.3) as c:
        tiny.generate(input_ids=ids[2:], attention_mask=mask[2:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(s["budgets"][2], c.summary()["budgets"][0])  # per prompt: alone as in the batch


def test_the_engine_collects_queries_only_for_those_who_need_them(tiny):
    seen = {}

    @dataclasses.dataclass
    class Spy(squeezekit.LayerBudgetAllocator):
        name = "spy"
        needs = Stat.WINDOW_QUERIES
        window: int = 5

        def allocate(self, request):
            seen["window"] = {tuple(v.window_queries.shape) for v in request.layers}
            seen["evictor"] = request.evictor.name
            return plugin("allocator", "uniform").allocate(request)

    ids = torch.randint(3, 128, (2, 40))
    for evictor, window in (("streaming", 5), ("snapkv", 8)):  # snapkv collects its own window: the allocator shares it
        with squeezekit.compress(tiny, allocator="uniform", evictor=evictor, budget=0.5) as c:
            c.runner.use("allocator", Spy())
            tiny(input_ids=ids, use_cache=True)
        assert seen.pop("window") == {(2, 2, 2, window, 16)} and seen.pop("evictor") == evictor
    with squeezekit.compress(tiny, allocator="uniform", evictor="streaming", budget=0.5) as c:
        tiny(input_ids=ids, use_cache=True)
        assert all("window_queries" not in layer.stats for layer in c.last_cache.layers)


def test_allocator_statistics_are_checked_at_registration(plugin_site):
    plugin_site.add(
        "sk_bad_alloc",
        """
from dataclasses import dataclass
import squeezekit

@dataclass
class NoWindow(squeezekit.LayerBudgetAllocator):
    name = "nowindow"
    needs = squeezekit.Stat.WINDOW_QUERIES
    def allocate(self, request):
        return None

@dataclass
class Attention(squeezekit.LayerBudgetAllocator):
    name = "wantsattention"
    needs = squeezekit.Stat.ATTENTION
    def allocate(self, request):
        return None

@squeezekit.hookimpl
def register_allocators(register):
    register(NoWindow)
    register(Attention)
""",
        package="sk-bad-alloc",
    )
    reg = plugin_site.reload()
    problems = " | ".join(str(f) for f in reg.failures)
    assert "NoWindow needs Stat.WINDOW_QUERIES, so it must have a 'window' field" in problems
    assert "Attention.needs must be Stat.NONE or statistics of one step (Stat.WINDOW_QUERIES) for an" in problems


# ---- on the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gives_layer_0_the_least_and_the_retrieving_layers_more():
    """On SmolLM2 (1024 tokens of English), whatever the evictor: layer 0 attends broadly over small values and gets
    the smallest budget (squeeze gives it the whole prompt); layers 20, 23 and 24, the costliest to evict in the
    calibration profiles (plugins/profiles/smollm2), get more than the mean."""
    from test_smollm2 import english_text

    model, tok = squeezekit.load_default_model()
    ids = tok([english_text(6000)], return_tensors="pt")["input_ids"][:, :1024]
    for evictor in EVICTORS:
        with squeezekit.compress(model, allocator="lost_attention", evictor=evictor, budget=0.1) as c:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            budgets = c.summary()["budgets"][0]
        assert int(budgets.sum()) == round(0.1 * 1024 * 30), evictor
        assert int(budgets.argmin()) == 0 and all(budgets[i] > budgets.double().mean() for i in (20, 23, 24)), (
            evictor,
            budgets,
        )

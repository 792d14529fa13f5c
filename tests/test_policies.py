"""Token evictors (streaming, sliding_window, h2o, snapkv) and `squeezekit.selection`, tested by their behaviour.

Each test builds a `squeezekit.LayerView` by hand: random keys and values, some invalid (free or padding) slots,
token positions scattered over the slots, and calls ``evictor.select(view, keep)`` as the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled

import squeezekit
from squeezekit import LayerView, Stat, TokenEvictor
from squeezekit.selection import check_selection, top_slots

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVICTORS = bundled("evictor")


def evictor(name: str, **params) -> TokenEvictor:
    return squeezekit.registry().get("evictor", name).cls(**params)


@dataclass
class Case:
    view: LayerView
    keep: torch.Tensor  # (B,)


def build_view(
    seed: int,
    B: int,
    H: int,
    S: int,
    D: int = 4,
    *,
    phase: str = "prefill",
    layout: str = "shuffled",
    window: int = 8,
    G: int = 2,
) -> LayerView:
    """A random layer cache.

    ``layout``: "shuffled" (prefill: every token 0..n-1 present, in random slots, invalid slots in between),
    "ordered" (prefill as the engine lays it out: slot i holds token i, invalid slots at the tail) or "sparse"
    (after some evictions: each head holds its own subset of the tokens, in random slots).
    ``phase="decode"``: the engine is making room for one new token, so ``seen`` counts it but no slot holds it.
    """
    g = torch.Generator().manual_seed(seed)
    positions = torch.full((B, H, S), -1, dtype=torch.int32)  # the engine's dtype (see LayerView)
    seen = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(1, S + 1, (1,), generator=g))  # tokens this sequence holds (per head)
        span = n if layout != "sparse" else n + int(torch.randint(0, 3 * S, (1,), generator=g))
        for h in range(H):
            if layout == "sparse":
                older = torch.randperm(span - 1, generator=g)[: n - 1]
                held = torch.cat([older, torch.tensor([span - 1])])  # every head holds the newest token
            else:
                held = torch.arange(n)
            slots = torch.arange(n) if layout == "ordered" else torch.randperm(S, generator=g)[:n]
            positions[b, h, slots] = held.int()
        seen[b] = span + (1 if phase == "decode" else 0)
    valid = positions >= 0
    keys = torch.randn(B, H, S, D, generator=g)
    values = torch.randn(B, H, S, D, generator=g)
    # accumulated attention: distinct per row (a random permutation), so "the top slots" is unambiguous
    attention = torch.stack([torch.randperm(S, generator=g).float() + 1 for _ in range(B * H)]).view(B, H, S)
    attention = attention.masked_fill(~valid, 0.0) / S
    W = min(window, int(seen.min()))
    window_queries = torch.randn(B, H, G, W, D, generator=g)
    window_positions = (seen.view(B, 1) - W + torch.arange(W).view(1, W)) - (1 if phase == "decode" else 0)
    return LayerView(
        keys=keys,
        values=values,
        valid=valid,
        positions=positions,
        seen=seen,
        budget=torch.zeros(B, dtype=torch.long),  # set by the caller, with keep
        layer_idx=3,
        n_layers=30,
        phase=phase,
        attention=attention,
        window_queries=window_queries if phase == "prefill" else None,
        window_positions=window_positions if phase == "prefill" else None,
        scaling=D**-0.5,
        stats=other_slot_statistics(attention),
    )


def other_slot_statistics(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-slot field of the other statistics defined (a bundled plugin's own: tova's), filled like ``like``
    (the engine collects them for the evictors that need them; a hand-built view has them all)."""
    from squeezekit.statistics import Statistic

    squeezekit.registry()  # (loads the plugins, which define their statistics)
    return {f: like.clone() for s in Statistic._named.values() if s.per_slot for f in s.fields if f != "attention"}


def held(view: LayerView) -> torch.Tensor:
    """(B,) the fewest tokens any head of each sequence holds (keep may not exceed it)."""
    return view.valid.sum(-1).min(-1).values


def with_keep(view: LayerView, keep: torch.Tensor) -> Case:
    view.budget = keep + (1 if view.phase == "decode" else 0)  # decode: keep budget - 1 so the new token fits
    return Case(view, keep)


@st.composite
def cases(
    draw,
    layouts=("shuffled", "ordered", "sparse"),
    phases=("prefill", "decode"),
    max_slots: int = 24,
    min_keep: int = 1,
):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    S = draw(st.integers(1, max_slots))
    view = build_view(
        draw(st.integers(0, 2**32 - 1)),
        B,
        H,
        S,
        D=draw(st.integers(1, 6)),
        phase=draw(st.sampled_from(phases)),
        layout=draw(st.sampled_from(layouts)),
        window=draw(st.integers(1, 8)),
    )
    hi = held(view).tolist()
    keep = torch.tensor([draw(st.integers(min(min_keep, h), h)) for h in hi], dtype=torch.long)
    return with_keep(view, keep)


def kept_positions(view: LayerView, idx: torch.Tensor, b: int, h: int) -> set[int]:
    row = idx[b, h]
    return set(view.positions[b, h, row[row >= 0]].tolist())


def valid_positions(view: LayerView, b: int, h: int) -> list[int]:
    return sorted(view.positions[b, h][view.valid[b, h]].tolist())


def last(items: list, k: int) -> list:
    return items[len(items) - k :]


def assert_honours_contract(idx: torch.Tensor, case: Case) -> None:
    view, keep = case.view, case.keep
    B, H, S = view.valid.shape
    assert check_selection(idx, view, keep) is None
    assert idx.dtype == torch.long and tuple(idx.shape) == (B, H, int(keep.max()))
    for b in range(B):
        for h in range(H):
            row = idx[b, h]
            used = row[row >= 0]
            assert used.numel() == int(keep[b])  # exactly keep[b] slots...
            assert bool((row[int(keep[b]) :] == -1).all())  # ... padded at the tail with -1
            assert len(set(used.tolist())) == used.numel()  # no duplicates
            assert bool(view.valid[b, h, used].all())  # only valid slots
            if int(keep[b]) > 0:
                assert max(valid_positions(view, b, h)) in kept_positions(view, idx, b, h)  # the newest token


def params_for(name: str, window: int = 4) -> dict:
    """Small parameters for evictor ``name``: its window (when it has one), and streaming's sinks, h2o's ratio."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(squeezekit.registry().get("evictor", name).cls)}
    params = {"streaming": {"sinks": 2, "window": window}, "h2o": {"window": window, "heavy_ratio": 0.5}}.get(
        name, {"window": window}
    )
    return {k: v for k, v in params.items() if k in fields}


# ---- every evictor ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTORS)
@SETTINGS
@given(case=cases(min_keep=0), window=st.integers(1, 8))
def test_evictor_honours_the_selection_contract(name, case, window):
    ev = evictor(name, **params_for(name, window))
    snapshot = (case.view.keys.clone(), case.view.positions.clone(), case.view.valid.clone())
    idx = ev.select(case.view, case.keep)
    assert_honours_contract(idx, case)
    assert torch.equal(ev.select(case.view, case.keep), idx)  # deterministic
    assert torch.equal(evictor(name, **params_for(name, window)).select(case.view, case.keep), idx)
    assert torch.equal(case.view.keys, snapshot[0])  # the view is not modified
    assert torch.equal(case.view.positions, snapshot[1]) and torch.equal(case.view.valid, snapshot[2])


@pytest.mark.parametrize("name", EVICTORS)
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_keeping_everything_keeps_every_valid_slot(name, case):
    view = case.view
    keep = held(view)
    if bool((view.valid.sum(-1) != keep.view(-1, 1)).any()):
        return  # heads of a sequence hold different numbers of tokens: "everything" differs per head
    idx = evictor(name).select(view, keep)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            assert kept_positions(view, idx, b, h) == set(valid_positions(view, b, h))


@pytest.mark.parametrize(
    ("name", "floor"),
    [
        ("streaming", 4 + 8),
        ("sliding_window", 8),
        ("h2o", 8),
        ("snapkv", 8),
        ("knorm", 8),
        ("keydiff", 8),
        ("random", 8),
    ],
)
def test_default_floors(name, floor):
    assert evictor(name).floor() == floor


def test_needs():
    assert evictor("h2o").needs is Stat.ATTENTION
    assert evictor("snapkv").needs is Stat.WINDOW_QUERIES
    assert evictor("streaming").needs is Stat.NONE and evictor("sliding_window").needs is Stat.NONE


# ---- one behaviour each ----------------------------------------------------------------------------------------


def expected(
    view: LayerView, keep: torch.Tensor, protected: torch.Tensor, key: torch.Tensor, b: int, h: int
) -> set[int]:
    """Positions kept by "protected slots (and the newest token), then the highest ``key``"."""
    valid = view.valid[b, h]
    pos = view.positions[b, h]
    must = valid & (protected[b, h] | (pos == pos[valid].max()))
    rest = valid & ~must
    k = int(keep[b]) - int(must.sum())
    assert k >= 0
    ranked = pos[rest][torch.argsort(key[b, h][rest], descending=True)]
    return set(pos[must].tolist()) | set(ranked[:k].tolist())


@SETTINGS
@given(case=cases(), sinks=st.integers(0, 4), window=st.integers(1, 8))
def test_streaming_keeps_sinks_and_the_most_recent(case, sinks, window):
    view = case.view
    is_sink = view.positions < sinks
    sink_count = (view.valid & is_sink).sum(-1).max(-1).values  # per sequence, most sinks any head holds
    keep = torch.minimum(torch.maximum(case.keep, sink_count + 1), held(view))
    idx = evictor("streaming", sinks=sinks, window=window).select(view, keep)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            got = kept_positions(view, idx, b, h)
            sinks_held = {p for p in valid_positions(view, b, h) if p < sinks}
            if len(sinks_held) + 1 > int(keep[b]):
                continue  # a budget below the floor (the engine never asks): not specified
            assert sinks_held <= got
            assert got == expected(view, keep, is_sink, view.positions.float(), b, h)


@SETTINGS
@given(case=cases(), window=st.integers(1, 8))
def test_sliding_window_keeps_exactly_the_most_recent(case, window):
    view, keep = case.view, case.keep
    idx = evictor("sliding_window", window=window).select(view, keep)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            assert kept_positions(view, idx, b, h) == set(last(valid_positions(view, b, h), int(keep[b])))


@SETTINGS
@given(case=cases(), window=st.integers(1, 8), heavy_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]))
def test_h2o_keeps_the_recent_window_then_the_heavy_hitters(case, window, heavy_ratio):
    view, keep = case.view, case.keep
    # The recent window: the budget's non-heavy share, at least ``window`` tokens (counting the one being added).
    recent = torch.clamp(view.budget - torch.round(heavy_ratio * view.budget).long(), min=window)
    protected = view.positions >= (view.seen - recent).view(-1, 1, 1)
    idx = evictor("h2o", window=window, heavy_ratio=heavy_ratio).select(view, keep)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            got = kept_positions(view, idx, b, h)
            recent_held = {p for p in valid_positions(view, b, h) if p >= int(view.seen[b] - recent[b])}
            if len(recent_held) > int(keep[b]):
                continue  # window larger than the budget (the engine never asks): not specified
            assert recent_held <= got
            assert got == expected(view, keep, protected, view.attention, b, h)


def test_h2o_heavy_hitter_survives_far_from_the_window():
    """The oldest token, if it draws the most attention, outlives every newer non-recent token."""
    S = 32
    view = build_view(0, 1, 1, S, layout="ordered")
    while int(view.valid.sum()) < S:  # a fully held prompt
        view = build_view(int(view.seen[0]) + 1000, 1, 1, S, layout="ordered")
    view.attention = torch.full((1, 1, S), 0.01)
    view.attention[0, 0, 0] = 5.0
    case = with_keep(view, torch.tensor([5]))
    idx = evictor("h2o", window=4, heavy_ratio=0.2).select(case.view, case.keep)  # 1 heavy + 4 recent
    assert kept_positions(view, idx, 0, 0) == {0, 28, 29, 30, 31}


def test_h2o_gives_each_head_its_own_recent_window_under_a_head_split():
    """With per-head budgets (``heads=adaptive``), a head keeps its own budget's non-heavy share as its recent
    window: 4 -> 2 recent tokens, 12 -> 6, not half the layer's mean budget for both."""
    S = 32
    view = build_view(0, 1, 2, S, layout="ordered")
    while int(view.valid.sum()) < 2 * S:  # a fully held prompt
        view = build_view(int(view.seen[0]) + 1000, 1, 2, S, layout="ordered")
    view.budget = torch.tensor([8])
    view.head_budget = torch.tensor([[4, 12]])
    score = evictor("h2o", window=1, heavy_ratio=0.5).score(view)
    newest = int(view.seen[0]) - 1
    for h, recent in ((0, 2), (1, 6)):
        assert set(view.positions[0, h][score[0, h].isinf()].tolist()) == set(range(newest - recent + 1, newest + 1))
    view.head_budget = None  # no split: half the layer's budget for every head
    score = evictor("h2o", window=1, heavy_ratio=0.5).score(view)
    assert score.isinf().sum(-1).tolist() == [[4, 4]]


@SETTINGS
@given(case=cases(phases=("prefill",)), window=st.integers(1, 8))
def test_snapkv_keeps_its_observation_window(case, window):
    view, keep = case.view, case.keep
    W = min(window, view.window_queries.shape[3])
    view.window_queries = view.window_queries[..., -W:, :]
    view.window_positions = view.window_positions[:, -W:]
    keep = torch.maximum(keep, torch.full_like(keep, window)).minimum(held(view))
    case = with_keep(view, keep)
    idx = evictor("snapkv", window=window).select(view, keep)
    assert_honours_contract(idx, case)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            last = {p for p in valid_positions(view, b, h) if p >= int(view.seen[b]) - window}
            if len(last) <= int(keep[b]):
                assert last <= kept_positions(view, idx, b, h)


def snapkv_hot_view(S: int = 40, hot: int = 10, window: int = 4, seed: int = 0) -> LayerView:
    """One sequence, slots in token order; the window's queries all point at the key of token ``hot``."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    q = torch.randn(D, generator=g)
    keys = 0.05 * torch.randn(1, 1, S, D, generator=g)
    keys[0, 0, hot] = 4 * q / q.norm()
    positions = torch.arange(S, dtype=torch.int32).view(1, 1, S)
    return LayerView(
        keys=keys,
        values=torch.randn(1, 1, S, D, generator=g),
        valid=torch.ones(1, 1, S, dtype=torch.bool),
        positions=positions,
        seen=torch.tensor([S]),
        budget=torch.tensor([window + 1]),
        layer_idx=0,
        n_layers=2,
        phase="prefill",
        window_queries=q.expand(1, 1, 3, window, D).clone(),  # (B, H, G, W, D)
        window_positions=torch.arange(S - window, S).view(1, window),
        scaling=D**-0.5,
    )


@pytest.mark.parametrize("hot", [0, 10, 30])
def test_snapkv_keeps_the_token_its_window_attends_to(hot):
    view = snapkv_hot_view(hot=hot)
    idx = evictor("snapkv", window=4, kernel_size=1).select(view, torch.tensor([5]))
    assert kept_positions(view, idx, 0, 0) == {hot, 36, 37, 38, 39}


def test_snapkv_pooling_keeps_the_hot_tokens_neighbourhood():
    view = snapkv_hot_view(hot=10)
    idx = evictor("snapkv", window=4, kernel_size=5, pooling="max").select(view, torch.tensor([4 + 5]))
    assert kept_positions(view, idx, 0, 0) == {8, 9, 10, 11, 12, 36, 37, 38, 39}


def test_snapkv_decode_drops_the_oldest():
    view = build_view(3, 1, 2, 16, phase="decode", layout="sparse")
    assert bool((held(view) >= 3).all())
    case = with_keep(view, held(view) - 1)
    idx = evictor("snapkv").select(view, case.keep)
    for h in range(2):
        assert kept_positions(view, idx, 0, h) == set(valid_positions(view, 0, h)[1:])


# ---- squeezekit.selection --------------------------------------------------------------------------------------


@dataclass
class Constant(TokenEvictor):
    """Scores every slot the same."""

    name = "constant"

    def score(self, view):
        return torch.zeros(view.valid.shape)


@SETTINGS
@given(case=cases())
def test_ties_are_broken_in_favour_of_recent_tokens(case):
    view, keep = case.view, case.keep
    idx = Constant().select(view, keep)
    assert_honours_contract(idx, case)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            assert kept_positions(view, idx, b, h) == set(last(valid_positions(view, b, h), int(keep[b])))


@dataclass
class OldestFirst(TokenEvictor):
    """Keeps the oldest tokens (the engine still keeps the newest)."""

    name = "oldest_first"

    def score(self, view):
        return -view.positions.float()


@SETTINGS
@given(case=cases())
def test_the_newest_token_is_kept_whatever_the_score(case):
    view, keep = case.view, case.keep
    idx = OldestFirst().select(view, keep)
    assert_honours_contract(idx, case)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            pos = valid_positions(view, b, h)
            assert kept_positions(view, idx, b, h) == set(pos[: int(keep[b]) - 1]) | {pos[-1]}


def small_case() -> Case:
    """2 sequences, 1 head, 6 slots; slots 4 and 5 of sequence 1 are invalid."""
    positions = torch.tensor([[[3, 0, 5, 1, 2, 4]], [[1, 0, 3, 2, -1, -1]]], dtype=torch.int32)
    view = build_view(0, 2, 1, 6)
    view.positions, view.valid = positions, positions >= 0
    return with_keep(view, torch.tensor([3, 2]))


def test_check_selection_accepts_a_valid_selection():
    case = small_case()
    assert check_selection(torch.tensor([[[2, 5, 0]], [[2, 0, -1]]]), case.view, case.keep) is None
    assert check_selection(torch.tensor([[[2, 5, 0]], [[2, 0, -1]]], dtype=torch.int32), case.view, case.keep) is None
    assert check_selection(top_slots(torch.zeros(2, 1, 6), case.view, case.keep), case.view, case.keep) is None


@pytest.mark.parametrize(
    ("idx", "message"),
    [
        ([[[2, 5, 0]], [[2, 0, -1]]], "must return a long tensor, got list"),
        (torch.tensor([[[2.0, 5.0, 0.0]], [[2.0, 0.0, -1.0]]]), "must return a long tensor, got torch.float32"),
        (torch.tensor([[[2, 5, 0, -1]], [[2, 0, -1, -1]]]), "returned shape (2, 1, 4), expected (2, 1, 3)"),
        (torch.tensor([[2, 5, 0], [2, 0, -1]]), "returned shape (2, 3), expected (2, 1, 3)"),
        (torch.tensor([[[2, 5, 6]], [[2, 0, -1]]]), "outside [0, 6)"),
        (torch.tensor([[[2, 5, 0]], [[2, -2, -1]]]), "outside [0, 6)"),
        (torch.tensor([[[2, 5, -3]], [[2, 0, -1]]]), "outside [0, 6)"),
        (torch.tensor([[[2, 5, 0]], [[2, 0, 3]]]), "kept 3 slots in row [1, 0], expected 2"),  # too many
        (torch.tensor([[[2, 5, -1]], [[2, 0, -1]]]), "kept 2 slots in row [0, 0], expected 3"),  # too few
        (torch.tensor([[[2, 5, 0]], [[2, 4, -1]]]), "kept an invalid (free or padding) slot"),
        (torch.tensor([[[2, 5, 2]], [[2, 0, -1]]]), "duplicate indices"),
        (torch.tensor([[[2, 5, 0]], [[1, 1, -1]]]), "duplicate indices"),
    ],
)
def test_check_selection_names_each_violation(idx, message):
    case = small_case()
    problem = check_selection(idx, case.view, case.keep)
    assert problem is not None and message in problem, problem
    assert "\n" not in problem


def test_selection_with_nothing_to_keep():
    """Decode with a budget of 1 keeps 0 old tokens (the new one takes the slot)."""
    case = small_case()
    keep = torch.tensor([0, 0])
    for name in EVICTORS:
        idx = evictor(name).select(case.view, keep)  # (each at its defaults)
        assert tuple(idx.shape) == (2, 1, 0) and check_selection(idx, case.view, keep) is None
    idx = evictor("streaming", sinks=4).select(case.view, torch.tensor([2, 0]))
    assert idx[1].tolist() == [[-1, -1]]
    # fewer slots than sinks + the newest token: the newest, then the most recent sink
    assert kept_positions(case.view, idx, 0, 0) == {5, 3}


class Tied(TokenEvictor):
    """Scores from a few values (infinities included): nearly every slot ties with others."""

    name = "tied"

    def __init__(self, seed: int):
        self.seed = seed

    def score(self, view):
        g = torch.Generator().manual_seed(self.seed)
        choices = torch.tensor([float("-inf"), -1.0, 0.0, 2.5, float("inf")])
        return choices[torch.randint(0, 5, view.valid.shape, generator=g)]


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2**16))
def test_ties_go_to_the_more_recent_token_even_between_infinite_scores(case, seed):
    view, keep = case.view, case.keep
    ev = Tied(seed)
    score = ev.score(view)
    idx = ev.select(view, keep)
    assert_honours_contract(idx, case)
    for b in range(keep.numel()):
        for h in range(view.valid.shape[1]):
            valid = view.valid[b, h]
            pos, sc = view.positions[b, h][valid].tolist(), score[b, h][valid].tolist()
            newest = max(pos)
            ranked = sorted(zip(pos, sc, strict=True), key=lambda ps: (ps[0] == newest, ps[1], ps[0]), reverse=True)
            assert kept_positions(view, idx, b, h) == {p for p, _ in ranked[: int(keep[b])]}


@SETTINGS
@given(
    layers=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    protect=st.booleans(),
    stack=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_layers_ranked_in_one_stack_get_the_ranks_each_gets_alone(layers, B, H, protect, stack, seed):
    """`slot_ranks` (lost_attention ranks every layer's slots at once, stacked by shape, `STACKED_SLOTS` at a time)
    gives each layer the place of every slot in its own `slot_order`: with tied and infinite scores, invalid slots
    and layers of different slot counts."""
    from unittest import mock

    from squeezekit import selection

    g = torch.Generator().manual_seed(seed)
    scores, views = [], []
    for C in layers:
        positions = torch.stack([torch.randperm(3 * C, generator=g)[:C] for _ in range(B * H)]).view(B, H, C).int()
        valid = torch.rand(B, H, C, generator=g) < 0.7
        positions = positions.masked_fill(~valid, -1)
        pick = torch.randint(0, 5, (B, H, C), generator=g).float()
        scores.append(torch.where(pick == 0, float("inf"), torch.where(pick == 1, float("-inf"), pick)))
        views.append(LayerView(keys=torch.zeros(B, H, C, 1), values=torch.zeros(B, H, C, 1), valid=valid,
                               positions=positions, seen=torch.zeros(B, dtype=torch.long),
                               budget=torch.ones(B, dtype=torch.long)))  # fmt: skip
    with mock.patch.object(selection, "STACKED_SLOTS", stack):
        ranks = selection.slot_ranks(scores, views, protect)
    for score, view, rank in zip(scores, views, ranks, strict=True):
        order = selection.slot_order(score, view, protect)
        assert torch.equal(rank.gather(-1, order), torch.arange(order.shape[-1]).expand_as(order))


@SETTINGS
@given(
    layers=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_layers_ranked_together_keep_what_each_would_keep_alone(layers, B, H, seed):
    """`kept_together` (an extend chunk's eviction for all layers at once, each padded to the widest) keeps exactly
    the slots `top_slots` keeps for each layer alone: with tied and infinite scores, invalid slots that still carry
    the position of the token they held, and any count per head."""
    from squeezekit.selection import Ranking, kept_together

    g = torch.Generator().manual_seed(seed)
    rankings, alone = [], []
    for C in layers:
        positions = torch.stack([torch.randperm(3 * C, generator=g)[:C] for _ in range(B * H)]).view(B, H, C).int()
        valid = torch.rand(B, H, C, generator=g) < 0.7
        positions = torch.where(valid | (torch.rand(B, H, C, generator=g) < 0.5), positions, -1)  # stale or -1
        pick = torch.randint(0, 5, (B, H, C), generator=g).float()  # ties, and +-inf
        score = torch.where(pick == 0, float("inf"), torch.where(pick == 1, float("-inf"), pick))
        keep = (torch.rand(B, H, generator=g) * (valid.sum(-1) + 1)).long().clamp_max(valid.sum(-1))
        view = LayerView(keys=torch.zeros(B, H, C, 1), values=torch.zeros(B, H, C, 1), valid=valid,
                         positions=positions, seen=torch.zeros(B, dtype=torch.long), budget=keep[:, 0])  # fmt: skip
        rankings.append(Ranking(score, positions, valid, keep, int((valid.sum(-1) - keep).max())))
        idx = top_slots(score, view, keep)
        mask = torch.zeros(B, H, C + 1, dtype=torch.bool).scatter_(2, torch.where(idx >= 0, idx, C), True)
        alone.append(mask[..., :C])
    for got, want in zip(kept_together(rankings), alone, strict=True):
        assert torch.equal(got, want)


@SETTINGS
@given(C=st.integers(1, 40), q=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_new_tokens_take_the_first_free_slots_in_slot_order(C, q, density, seed):
    """`first_free`: where a step writes its ``q`` tokens (then the taken slots, in order, should a row be short)."""
    from squeezekit.layers import first_free

    q = min(q, C)
    free = torch.rand(2, 3, C, generator=torch.Generator().manual_seed(seed)) < density
    got = first_free(free, q)
    for row, slots in zip(free.view(-1, C).tolist(), got.view(-1, q).tolist(), strict=True):
        want = [i for i in range(C) if row[i]] + [i for i in range(C) if not row[i]]
        assert slots == want[:q]

"""Layer-budget allocators (uniform, squeeze, pyramid) and `squeezekit.budget`, tested by their behaviour.

Every allocator must honour the contract of `squeezekit.LayerBudgetAllocator`: (B, L) long budgets, each row summing
exactly to ``total``, each entry in ``[floor, cap]``, the same output for the same input.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled

import squeezekit
from squeezekit import AllocationRequest
from squeezekit.budget import check_budgets, distribute

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALLOCATORS = bundled("allocator", plain=True)


def allocator(name: str, **params):
    return squeezekit.registry().get("allocator", name).cls(**params)


def request(importance, total, floor, cap) -> AllocationRequest:
    imp = torch.as_tensor(importance, dtype=torch.float32)
    if imp.dim() == 1:
        imp = imp.view(1, -1)
    B = imp.shape[0]
    return AllocationRequest(
        importance=imp,
        total=torch.as_tensor(total, dtype=torch.long).view(B),
        floor=int(floor),
        cap=torch.as_tensor(cap, dtype=torch.long).view(B),
    )


def assert_contract(budgets, req: AllocationRequest) -> None:
    B, L = req.importance.shape
    assert isinstance(budgets, torch.Tensor)
    assert budgets.dtype == torch.long
    assert tuple(budgets.shape) == (B, L)
    assert torch.equal(budgets.sum(-1), req.total), (budgets.sum(-1), req.total)
    assert int(budgets.min()) >= req.floor
    assert bool((budgets <= req.cap.view(-1, 1)).all())
    assert check_budgets(budgets, req.total, req.floor, req.cap, (B, L)) is None


# ---- strategies ------------------------------------------------------------------------------------------------

importance_value = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False, width=32),
    st.sampled_from([0.6, 0.84, 0.87, 0.97, 0.99]),  # repeated values: degenerate clusterings
)


@st.composite
def row_limits(draw, n_layers: int):
    """(total, cap) for one sequence, feasible for the given floor drawn by the caller."""
    floor = draw(st.integers(1, 40))
    cap = draw(st.integers(floor, 4096))
    total = draw(st.integers(floor * n_layers, cap * n_layers))
    return floor, cap, total


@st.composite
def requests(draw, max_batch: int = 3, min_layers: int = 1, max_layers: int = 32) -> AllocationRequest:
    B = draw(st.integers(1, max_batch))
    L = draw(st.integers(min_layers, max_layers))
    floor = draw(st.integers(1, 40))
    caps, totals = [], []
    for _ in range(B):
        cap = draw(st.integers(floor, 4096))
        caps.append(cap)
        totals.append(draw(st.integers(floor * L, cap * L)))
    importance = [draw(st.lists(importance_value, min_size=L, max_size=L)) for _ in range(B)]
    return request(importance, totals, floor, caps)


# ---- every allocator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALLOCATORS)
@SETTINGS
@given(req=requests())
def test_allocator_contract_and_determinism(name, req):
    budgets = allocator(name).allocate(req)
    assert_contract(budgets, req)
    assert torch.equal(allocator(name).allocate(req), budgets)  # same input, same output (fresh instance too)


@pytest.mark.parametrize(("name", "params"), [("uniform", {}), ("pyramid", {}), ("squeeze", {"per": "sequence"})])
@settings(max_examples=25, deadline=None)
@given(req=requests(min_layers=3))
def test_allocator_rows_are_independent(name, params, req):
    """Batching sequences together does not change any sequence's budgets."""
    both = allocator(name, **params).allocate(req)
    for b in range(req.importance.shape[0]):
        one = request(req.importance[b], req.total[b : b + 1], req.floor, req.cap[b : b + 1])
        assert torch.equal(allocator(name, **params).allocate(one)[0], both[b])


@pytest.mark.parametrize("name", ALLOCATORS)
def test_allocator_does_not_modify_request(name):
    req = request([[0.6, 0.84, 0.87, 0.97, 0.98, 0.99]], [60], 2, [40])
    before = (req.importance.clone(), req.total.clone(), req.cap.clone())
    allocator(name).allocate(req)
    assert (
        torch.equal(req.importance, before[0]) and torch.equal(req.total, before[1]) and torch.equal(req.cap, before[2])
    )


@pytest.mark.parametrize("name", ALLOCATORS)
def test_allocator_tight_limits(name):
    """total == floor x L and total == cap x L leave exactly one answer."""
    imp = [[0.6, 0.84, 0.87, 0.97, 0.98, 0.99]]
    assert allocator(name).allocate(request(imp, [6 * 5], 5, [100])).tolist() == [[5] * 6]
    assert allocator(name).allocate(request(imp, [6 * 9], 1, [9])).tolist() == [[9] * 6]


# ---- uniform ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(req=requests())
def test_uniform_is_as_even_as_integers_allow(req):
    budgets = allocator("uniform").allocate(req)
    assert bool(((budgets.max(-1).values - budgets.min(-1).values) <= 1).all())
    L = req.importance.shape[1]
    for b in range(budgets.shape[0]):
        if int(req.total[b]) % L == 0:
            assert budgets[b].tolist() == [int(req.total[b]) // L] * L


@SETTINGS
@given(req=requests(), perm_seed=st.integers(0, 2**16))
def test_uniform_ignores_importance(req, perm_seed):
    shuffled = request(
        torch.rand(req.importance.shape, generator=torch.Generator().manual_seed(perm_seed)),
        req.total,
        req.floor,
        req.cap,
    )
    assert torch.equal(allocator("uniform").allocate(req), allocator("uniform").allocate(shuffled))


# ---- squeeze ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    L=st.integers(1, 32),
    values=st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=2),
    choice_seed=st.integers(0, 2**16),
    limits=st.data(),
)
def test_squeeze_with_fewer_than_three_distinct_importances_is_uniform(L, values, choice_seed, limits):
    g = torch.Generator().manual_seed(choice_seed)
    idx = torch.randint(0, len(values), (L,), generator=g)
    importance = [values[i] for i in idx.tolist()]
    floor, cap, total = limits.draw(row_limits(L))
    req = request(importance, [total], floor, [cap])
    assert torch.equal(allocator("squeeze").allocate(req), allocator("uniform").allocate(req))


@settings(max_examples=25, deadline=None)
@given(req=requests(min_layers=3))
def test_squeeze_per_batch_clusters_the_batch_mean(req):
    """``per="batch"`` (the default): every sequence is split as the batch's mean importance would be."""
    mean = req.importance.double().mean(0, keepdim=True).expand_as(req.importance).float()
    ref = [
        allocator("squeeze", per="sequence").allocate(
            request(mean[b], req.total[b : b + 1], req.floor, req.cap[b : b + 1])
        )[0]
        for b in range(mean.shape[0])
    ]
    assert torch.equal(allocator("squeeze").allocate(req), torch.stack(ref))


@pytest.mark.parametrize("per", ["sequence", "batch"])
@SETTINGS
@given(req=requests(min_layers=3), p=st.floats(0.05, 0.95))
def test_squeeze_never_favours_a_more_similar_layer(per, req, p):
    """A layer whose attention changed the hidden state less (higher importance value) never gets more tokens
    than a layer that changed it more, beyond one token of rounding (equal targets are split by layer order)."""
    budgets = allocator("squeeze", p=p, per=per).allocate(req)
    assert_contract(budgets, req)
    imp = (
        req.importance if per == "sequence" else req.importance.double().mean(0, keepdim=True).expand_as(req.importance)
    )
    more_similar = imp.unsqueeze(-1) > imp.unsqueeze(-2)  # [b, i, j]: layer i is less important than layer j
    gap = budgets.unsqueeze(-1) - budgets.unsqueeze(-2)  # budget_i - budget_j
    assert not bool((more_similar & (gap > 1)).any())


@st.composite
def clustered(draw):
    """Importances in three well-separated groups, so which layers form the least important group is unambiguous."""
    L = draw(st.integers(3, 32))
    labels = draw(st.lists(st.integers(0, 2), min_size=L, max_size=L).filter(lambda x: len(set(x)) == 3))
    centers = [draw(st.floats(0.05, 0.3)), draw(st.floats(0.45, 0.7)), draw(st.floats(0.85, 0.98))]
    jitter = draw(st.lists(st.floats(-0.01, 0.01), min_size=L, max_size=L))
    importance = [centers[c] + j for c, j in zip(labels, jitter, strict=True)]
    squeezed = torch.tensor([c == 2 for c in labels])
    return importance, squeezed


@SETTINGS
@given(data=clustered(), p=st.floats(0.05, 0.95), limits=st.data())
def test_squeeze_gives_the_least_important_group_no_more(data, p, limits):
    importance, squeezed = data
    L = len(importance)
    floor, cap, total = limits.draw(row_limits(L))
    budgets = allocator("squeeze", p=p).allocate(request(importance, [total], floor, [cap]))[0]
    assert int(budgets.sum()) == total
    assert int(budgets[squeezed].max()) <= int(budgets[~squeezed].min())


@SETTINGS
@given(data=clustered(), p=st.floats(0.05, 0.95), mean=st.integers(16, 2000))
def test_squeeze_gives_the_least_important_group_p_times_the_mean(data, p, mean):
    """Nothing capped or floored: the squeezed layers get p x the mean budget, the others share the rest evenly."""
    importance, squeezed = data
    L = len(importance)
    total = mean * L
    n_sq = int(squeezed.sum())
    low = p * mean
    high = (total - n_sq * low) / (L - n_sq)
    floor, cap = 1, math.ceil(high) + 5
    assume(low >= floor)
    budgets = allocator("squeeze", p=p).allocate(request(importance, [total], floor, [cap]))[0].double()
    assert int(budgets.sum()) == total
    assert bool(((budgets[squeezed] - low).abs() < 1).all()), (budgets, low)
    assert bool(((budgets[~squeezed] - high).abs() < 1).all()), (budgets, high)


def smollm2_importance() -> list[float]:
    """SmolLM2-135M's measured layer importances (shared/research/environment.md): 3 important layers, 27 not."""
    g = torch.Generator().manual_seed(0)
    imp = (0.965 + 0.025 * torch.rand(30, generator=g, dtype=torch.float64)).tolist()
    imp[0], imp[1], imp[24] = 0.60, 0.84, 0.87
    return imp


@pytest.mark.parametrize("p", [0.4, 0.3, 0.1])
def test_squeeze_smollm2_cap_conserves_the_total(p):
    """At budget 0.2 of a 1024-token prompt, the 3 important layers' share exceeds the prompt: they are capped at
    1024 and what the cap frees flows back to the 27 squeezed layers, so no token is lost or invented."""
    total, cap = round(0.2 * 1024 * 30), 1024
    budgets = allocator("squeeze", p=p).allocate(request(smollm2_importance(), [total], 12, [cap]))[0]
    assert int(budgets.sum()) == total == 6144
    important = torch.zeros(30, dtype=torch.bool)
    important[[0, 1, 24]] = True
    assert budgets[important].tolist() == [1024, 1024, 1024]
    rest = budgets[~important]
    assert int(rest.sum()) == total - 3 * 1024
    assert int(rest.max()) - int(rest.min()) <= 1  # the freed tokens are spread evenly
    assert int(rest.max()) < 1024


def test_squeeze_smollm2_uncapped():
    """At budget 0.1 nothing is capped: 27 layers get p x mean, the 3 important ones the rest (6.4 x mean)."""
    total, cap = round(0.1 * 4096 * 30), 4096
    budgets = allocator("squeeze", p=0.4).allocate(request(smollm2_importance(), [total], 12, [cap]))[0]
    mean = total / 30
    assert int(budgets.sum()) == total
    important = [0, 1, 24]
    for layer in range(30):
        target = (total - 27 * 0.4 * mean) / 3 if layer in important else 0.4 * mean
        assert abs(int(budgets[layer]) - target) < 1


@pytest.mark.parametrize("bad", [{"p": 0.0}, {"p": 1.5}, {"n_init": 0}, {"per": "layer"}])
def test_squeeze_rejects_bad_parameters(bad):
    with pytest.raises(squeezekit.ConfigError, match=next(iter(bad))):
        allocator("squeeze", **bad)


# ---- pyramid ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(req=requests(), beta=st.floats(1.0, 50.0))
def test_pyramid_budgets_never_grow_with_depth(req, beta):
    budgets = allocator("pyramid", beta=beta).allocate(req)
    assert_contract(budgets, req)
    assert bool((budgets[:, 1:] <= budgets[:, :-1]).all()), budgets


@SETTINGS
@given(L=st.integers(2, 32), mean=st.integers(10, 2000), beta=st.floats(1.0, 50.0))
def test_pyramid_is_linear_from_two_means_minus_low_to_low(L, mean, beta):
    """Nothing clipped: the last layer gets mean / beta, the first 2 x mean - mean / beta, linear in between."""
    total = mean * L
    low, high = mean / beta, 2 * mean - mean / beta
    floor, cap = 1, math.ceil(high) + 1
    assume(low >= floor)
    budgets = allocator("pyramid", beta=beta).allocate(request([0.5] * L, [total], floor, [cap]))[0].double()
    target = high + (low - high) * torch.linspace(0, 1, L, dtype=torch.float64)
    assert int(budgets.sum()) == total
    assert bool(((budgets - target).abs() < 1).all()), (budgets, target)


def test_pyramid_rejects_beta_below_one():
    with pytest.raises(squeezekit.ConfigError, match="beta"):
        allocator("pyramid", beta=0.5)


# ---- squeezekit.budget.distribute ------------------------------------------------------------------------------

grid = st.integers(0, 8 * 4096).map(lambda v: v / 8)  # targets on a 1/8 grid: no float ties between distinct ones


@st.composite
def distribute_args(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 24))
    floor = draw(st.integers(0, 40))
    targets, totals, caps = [], [], []
    for _ in range(B):
        cap = draw(st.integers(max(floor, 1), 4096))
        caps.append(cap)
        totals.append(draw(st.integers(floor * L, cap * L)))
        targets.append(draw(st.lists(grid, min_size=L, max_size=L)))
    return (
        torch.tensor(targets, dtype=torch.float64),
        torch.tensor(totals, dtype=torch.long),
        floor,
        torch.tensor(caps, dtype=torch.long),
    )


@SETTINGS
@given(args=distribute_args())
def test_distribute_conserves_total_and_respects_limits(args):
    targets, total, floor, cap = args
    out = distribute(targets, total, floor, cap)
    assert out.dtype == torch.long and out.shape == targets.shape
    assert torch.equal(out.sum(-1), total)
    assert int(out.min()) >= floor
    assert bool((out <= cap.view(-1, 1)).all())
    assert check_budgets(out, total, floor, cap, tuple(targets.shape)) is None
    assert torch.equal(distribute(targets, total, floor, cap), out)


@SETTINGS
@given(args=distribute_args())
def test_distribute_preserves_order(args):
    """A layer with a higher target never gets fewer tokens."""
    targets, total, floor, cap = args
    out = distribute(targets, total, floor, cap)
    higher = targets.unsqueeze(-1) > targets.unsqueeze(-2)  # [b, i, j]: target_i > target_j
    assert not bool((higher & (out.unsqueeze(-1) < out.unsqueeze(-2))).any()), (targets, out)


@SETTINGS
@given(args=distribute_args())
def test_distribute_spreads_clipped_tokens_evenly(args):
    """Layers not held at floor or cap all move by the same shift from their target (up to rounding)."""
    targets, total, floor, cap = args
    out = distribute(targets, total, floor, cap)
    for b in range(out.shape[0]):
        free = (out[b] > floor) & (out[b] < cap[b])
        if int(free.sum()) >= 2:
            moved = out[b][free].double() - targets[b][free]
            assert float(moved.max() - moved.min()) < 2, (targets[b], out[b])


@SETTINGS
@given(L=st.integers(1, 24), data=st.data())
def test_distribute_stays_within_one_token_of_feasible_targets(L, data):
    """Targets already in [floor, cap] and summing to the total: every budget is within one token of its target."""
    floor = data.draw(st.integers(0, 20))
    cap = data.draw(st.integers(max(floor, 1) + 1, 2000))
    eighths = data.draw(st.lists(st.integers(8 * floor, 8 * cap), min_size=L, max_size=L))
    r = sum(eighths) % 8  # make the targets sum to a whole number of tokens
    if r:
        down = [i for i, e in enumerate(eighths) if e - r >= 8 * floor]
        up = [i for i, e in enumerate(eighths) if e + 8 - r <= 8 * cap]
        assume(down or up)
        if down:
            eighths[down[0]] -= r
        else:
            eighths[up[0]] += 8 - r
    targets = torch.tensor([eighths], dtype=torch.float64) / 8
    total = torch.tensor([sum(eighths) // 8])
    out = distribute(targets, total, floor, torch.tensor([cap]))
    assert bool(((out.double() - targets).abs() < 1).all()), (targets, out)
    if all(e % 8 == 0 for e in eighths):  # integral feasible targets come back unchanged
        assert out.tolist() == [[e // 8 for e in eighths]]


def test_distribute_cap_flows_to_the_free_layers():
    out = distribute(torch.tensor([[500.0, 10.0, 10.0, 10.0]]), torch.tensor([530]), 1, torch.tensor([200]))
    assert out.tolist() == [[200, 110, 110, 110]]


def test_distribute_floor_takes_from_the_free_layers():
    out = distribute(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([100]), 10, torch.tensor([100]))
    assert out.tolist() == [[10, 10, 40, 40]]


@pytest.mark.parametrize(("total", "floor", "cap"), [(9, 5, 100), (401, 1, 100)])
def test_distribute_refuses_infeasible_totals(total, floor, cap):
    with pytest.raises(ValueError, match=f"cannot place {total} tokens"):
        distribute(torch.ones(1, 4), torch.tensor([total]), floor, torch.tensor([cap]))


# ---- squeezekit.budget.check_budgets ---------------------------------------------------------------------------

TOTAL, FLOOR, CAP, SHAPE = torch.tensor([12, 9]), 2, torch.tensor([6, 4]), (2, 3)


def test_check_budgets_accepts_valid():
    assert check_budgets(torch.tensor([[6, 4, 2], [3, 4, 2]]), TOTAL, FLOOR, CAP, SHAPE) is None
    assert check_budgets(torch.tensor([[6, 4, 2], [3, 4, 2]], dtype=torch.int32), TOTAL, FLOOR, CAP, SHAPE) is None


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ([[6, 4, 2], [3, 4, 2]], "must return an integer tensor, got list"),
        (torch.tensor([[6.0, 4.0, 2.0], [3.0, 4.0, 2.0]]), "must return an integer tensor, got torch.float32"),
        (torch.ones(2, 3, dtype=torch.bool), "must return an integer tensor, got torch.bool"),
        (torch.tensor([[6, 4, 2, 0], [3, 4, 2, 0]]), "returned shape (2, 4), expected (2, 3)"),
        (torch.tensor([6, 4, 2]), "returned shape (3,), expected (2, 3)"),
        (torch.tensor([[6, 4, 2], [3, 4, 3]]), "sum to 10 tokens for sequence 1, expected exactly 9"),
        (torch.tensor([[6, 4, 1], [3, 4, 2]]), "sum to 11 tokens for sequence 0, expected exactly 12"),
        (torch.tensor([[6, 5, 1], [3, 4, 2]]), "gave a layer 1 tokens, below the evictor's floor 2"),
        (torch.tensor([[7, 3, 2], [3, 4, 2]]), "gave a layer 7 tokens, more than the 6 it holds"),
        (torch.tensor([[6, 4, 2], [5, 2, 2]]), "gave a layer 5 tokens, more than the 4 it holds"),
    ],
)
def test_check_budgets_names_each_violation(budgets, message):
    problem = check_budgets(budgets, TOTAL, FLOOR, CAP, SHAPE)
    assert problem is not None and message in problem, problem
    assert "\n" not in problem

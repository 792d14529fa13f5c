"""Exact integer budgets: conserve the total, respect floors and caps, stay close to the targets.

numpy and torch are imported by the functions that use them, so that a plugin module importing `distribute` stays
cheap to import (``squeezekit plugins`` lists plugins without loading either).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def _project_row(target: np.ndarray, total: int, lo: int, hi: int | np.ndarray) -> np.ndarray:
    """Integers in [lo, hi] summing to ``total``, nearest to ``target`` + a common shift (water-filling). ``hi`` may
    be one bound for every entry or one per entry."""
    import numpy as np

    n = target.size
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), target.shape)
    if not (n * lo <= total <= int(hi.sum()) and bool((hi >= lo).all())):
        shown = f"{int(hi[0])}" if bool((hi == hi[0]).all()) else f"{int(hi.min())}..{int(hi.max())}"
        raise ValueError(f"cannot place {total} tokens in {n} layers of [{lo}, {shown}]")
    # Find the shift s so that sum(clip(target + s, lo, hi)) == total. The sum is monotone in s: bisection.
    a, b = lo - float(target.max()) - 1.0, float(hi.max()) - float(target.min()) + 1.0
    for _ in range(100):
        mid = (a + b) / 2
        if np.clip(target + mid, lo, hi).sum() < total:
            a = mid
        else:
            b = mid
    real = np.clip(target + b, lo, hi)
    out = np.floor(real).astype(np.int64)
    # Largest remainders get the missing units (never above hi); surplus units leave the smallest remainders.
    short = total - int(out.sum())
    frac = real - out
    if short > 0:
        order = np.lexsort((np.arange(n), -frac))
        room = out < hi
        for i in order[room[order]][:short]:
            out[i] += 1
    elif short < 0:
        order = np.lexsort((np.arange(n), frac))
        spare = out > lo
        for i in order[spare[order]][:-short]:
            out[i] -= 1
    return out


def distribute(
    targets: torch.Tensor, total: torch.Tensor, floor: int | torch.Tensor, cap: torch.Tensor
) -> torch.Tensor:
    """Round real-valued per-layer ``targets`` (B, L) to exact integer budgets.

    Each row sums to ``total[b]``, each entry lies in ``[floor, cap[b]]``. What a cap or floor clips is spread
    evenly over the layers still free, so the total is conserved exactly (no leaked, no invented tokens).
    ``floor`` may also be (B,), one per row, and ``cap`` (B, L), one per entry (a head split's request: its
    ``budget.clamp(max=floor)`` and ``cap``, with ``total = budget * H``).
    """
    import numpy as np
    import torch

    t = targets.detach().to(torch.float64).cpu().numpy()
    tot = total.detach().cpu().numpy().astype(np.int64)
    caps = cap.detach().cpu().numpy().astype(np.int64)
    floors = np.broadcast_to(torch.as_tensor(floor).cpu().numpy().astype(np.int64), tot.shape)
    rows = [_project_row(t[b], int(tot[b]), int(floors[b]), caps[b]) for b in range(t.shape[0])]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def _integer_tensor_problem(method: str, budgets: object, shape: tuple) -> str | None:
    """What is wrong with the budgets a plugin's ``method`` returned before their values are read: not an integer
    tensor, another shape, or on the meta device."""
    import torch

    if not isinstance(budgets, torch.Tensor) or budgets.is_floating_point() or budgets.dtype == torch.bool:
        return f"{method}() must return an integer tensor, got {getattr(budgets, 'dtype', type(budgets).__name__)}"
    if tuple(budgets.shape) != tuple(shape):
        return f"{method}() returned shape {tuple(budgets.shape)}, expected {tuple(shape)}"
    if budgets.device.type == "meta":
        return f"{method}() returned a tensor on the meta device (it holds no values)"
    return None


def check_budgets(budgets: object, total: torch.Tensor, floor: int, cap: torch.Tensor, shape: tuple) -> str | None:
    """Return what is wrong with an allocator's budgets, or None when they honour the contract.

    ``total`` and ``cap`` are squeezekit's own copies (on the CPU), never the ones the allocator was handed.
    """
    import torch

    problem = _integer_tensor_problem("allocate", budgets, shape)
    if problem:
        return problem
    assert isinstance(budgets, torch.Tensor)
    b = budgets.long().cpu()
    sums = b.sum(-1)
    if not torch.equal(sums, total):
        i = int((sums != total).nonzero()[0])
        return f"allocate() budgets sum to {int(sums[i])} tokens for sequence {i}, expected exactly {int(total[i])}"
    if bool((b < floor).any()):
        return f"allocate() gave a layer {int(b.min())} tokens, below the evictor's floor {floor}"
    over = b > cap.view(-1, 1)
    if bool(over.any()):
        i = int(over.nonzero()[0, 0])
        return f"allocate() gave a layer {int(b[i].max())} tokens, more than the {int(cap[i])} it holds"
    return None


def check_head_budgets(budgets: object, budget: torch.Tensor, floor: int, cap: torch.Tensor) -> str | None:
    """Return what is wrong with a head split's (B, H) budgets, or None when they honour the contract: each row sums
    to ``budget[b] * H``, each head keeps at least ``min(floor, budget[b])`` and at most ``cap[b, h]`` (the tokens
    it holds). ``budget`` (B,) and ``cap`` (B, H) are squeezekit's own copies, on the CPU."""
    import torch

    problem = _integer_tensor_problem("split", budgets, tuple(cap.shape))
    if problem:
        return problem
    assert isinstance(budgets, torch.Tensor)
    b = budgets.long().cpu()
    H = cap.shape[1]
    want = budget.long() * H
    sums = b.sum(-1)
    if not torch.equal(sums, want):
        i = int((sums != want).nonzero()[0])
        return f"split() budgets sum to {int(sums[i])} tokens for sequence {i}, expected exactly {int(want[i])}"
    lo = budget.long().clamp(max=floor).view(-1, 1)
    under = b < lo
    if bool(under.any()):
        i, h = (int(x) for x in under.nonzero()[0])
        return f"split() gave head {h} of sequence {i} {int(b[i, h])} tokens, below the floor {int(lo[i])}"
    over = b > cap
    if bool(over.any()):
        i, h = (int(x) for x in over.nonzero()[0])
        return f"split() gave head {h} of sequence {i} {int(b[i, h])} tokens, more than the {int(cap[i, h])} it holds"
    return None


def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (x increasing), left to right."""
    hull: list[int] = []
    for i in range(x.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):  # b on or above the chord a-i
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _even_fill(room: np.ndarray, units: int) -> np.ndarray:
    """``units`` tokens over slots of the given room, as evenly as possible (lowest index first on ties)."""
    import numpy as np

    out = np.zeros_like(room)
    while units > 0:
        open_ = np.flatnonzero(out < room)
        share = units // open_.size
        if share == 0:
            out[open_[:units]] += 1
            break
        add = np.minimum(room[open_] - out[open_], share)
        out[open_] += add
        units -= int(add.sum())
    return out


def waterfill_row(costs: np.ndarray, knots: np.ndarray, total: int, floor: int, cap: int) -> np.ndarray:
    """Integer budgets of one sequence's layers minimising the summed cost: greedy on the marginal gain.

    ``costs`` (L, K): each layer's cost (e.g. loss increase) at budgets ``knots`` (K,) tokens, increasing. A layer
    costs nothing at ``cap`` (it keeps the whole prompt); between knots the cost is linear, below the first knot it
    continues the first segment's slope. Each curve is made non-increasing and replaced by its lower convex hull,
    then every layer starts at ``floor`` and the ``total - L x floor`` remaining tokens go, one segment at a time,
    to the layer where a token saves the most cost. Segments saving exactly as much share their tokens evenly, so
    equal curves give a uniform split. The result sums to ``total`` with every entry in ``[floor, cap]``.
    """
    import numpy as np

    L = costs.shape[0]
    if not L * floor <= total <= L * cap:
        raise ValueError(f"cannot place {total} tokens in {L} layers of [{floor}, {cap}]")
    knots = np.asarray(knots, dtype=np.float64)
    use = np.flatnonzero((knots < cap) & np.concatenate([[True], np.diff(knots) > 0]))  # distinct, below the cap
    kx = np.concatenate([knots[use], [cap]])
    x = np.unique(np.concatenate([[floor, cap], kx[(kx > floor) & (kx < cap)]]))
    segments = []  # (slope, layer, tokens)
    for layer in range(L):
        ky = np.concatenate([np.asarray(costs[layer], dtype=np.float64)[use], [0.0]])
        y = np.interp(x, kx, ky)
        if kx.size > 1 and floor < kx[0]:  # below the first knot: the first segment's slope continues
            y[0] = ky[0] + (ky[1] - ky[0]) / (kx[1] - kx[0]) * (floor - kx[0])
        y = np.maximum.accumulate(y[::-1])[::-1]  # never cheaper with fewer tokens
        hull = _lower_hull(x, y)
        for a, b in zip(hull[:-1], hull[1:], strict=True):
            segments.append(((y[b] - y[a]) / (x[b] - x[a]), layer, int(x[b] - x[a])))
    out = np.full(L, floor, dtype=np.int64)
    left = total - L * floor
    segments.sort(key=lambda s: (s[0], s[1]))
    i = 0
    while left > 0 and i < len(segments):
        j = i + 1
        while j < len(segments) and segments[j][0] - segments[i][0] <= 1e-9 * abs(segments[i][0]) + 1e-15:
            j += 1
        # segments saving as much per token, by layer (a layer's curve may split into collinear segments)
        room_of: dict[int, int] = {}
        slope_of: dict[int, float] = {}
        for slope, layer, tokens in segments[i:j]:
            room_of[layer] = room_of.get(layer, 0) + tokens
            slope_of[layer] = min(slope, slope_of.get(layer, slope))
        # an uneven share's spare tokens go to the layers saving the most, then the lowest index: a layer whose
        # curve is steeper by a rounding error never keeps fewer than the flatter one
        layers = sorted(room_of, key=lambda layer: (slope_of[layer], layer))
        room = np.array([room_of[layer] for layer in layers], dtype=np.int64)
        give = room if room.sum() <= left else _even_fill(room, left)
        out[layers] += give
        left -= int(give.sum())
        i = j
    return out


def waterfill(
    costs: torch.Tensor, knots: torch.Tensor, total: torch.Tensor, floor: int, cap: torch.Tensor
) -> torch.Tensor:
    """`waterfill_row` for each sequence: ``costs`` (B, L, K) at ``knots`` (B, K) tokens -> (B, L) long budgets."""
    import numpy as np
    import torch

    c = costs.detach().to(torch.float64).cpu().numpy()
    k = knots.detach().cpu().numpy().astype(np.int64)
    tot = total.detach().cpu().numpy().astype(np.int64)
    caps = cap.detach().cpu().numpy().astype(np.int64)
    rows = [waterfill_row(c[b], k[b], int(tot[b]), int(floor), int(caps[b])) for b in range(c.shape[0])]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def sqrt_split(cost: torch.Tensor, total: torch.Tensor, floor: int, cap: torch.Tensor) -> torch.Tensor:
    """(B, L) budgets proportional to the square root of each layer's ``cost`` (B, L) at the mean budget.

    If a layer's loss falls as ``a / b`` with its budget ``b``, the summed loss is smallest, for a fixed total, at
    budgets proportional to ``sqrt(a)`` (the marginal gains ``a / b**2`` are then all equal): a smooth water-filling
    that, unlike `waterfill` on measured curves, never starves a layer whose cost is small but not nil. A layer with
    no cost gets the floor; a row without any cost is split evenly. Exact totals, floor and caps (`distribute`).
    """

    return proportional_split(cost.detach().double().cpu().clamp_min(0).sqrt(), total, floor, cap)


def proportional_split(
    weight: torch.Tensor, total: torch.Tensor, floor: int, cap: torch.Tensor, batch: bool = False
) -> torch.Tensor:
    """(B, L) budgets proportional to each layer's ``weight`` (B, L), >= 0; a row without any weight is split
    evenly. ``batch``: every row takes the batch's mean share of each layer (equal prompts, equal budgets: what an
    allocator with ``per="batch"`` wants). Exact totals, floor and caps (`distribute`)."""
    import torch

    w = weight.detach().double().cpu()
    s = w.sum(-1, keepdim=True)
    share = torch.where(s > 0, w / s.clamp_min(1e-300), torch.full_like(w, 1.0 / w.shape[-1]))
    if batch:
        share = share.mean(0, keepdim=True).expand_as(share)
    return distribute(share * total.double().view(-1, 1), total, floor, cap)

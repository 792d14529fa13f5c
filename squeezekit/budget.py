"""Exact integer budgets: conserve the total, respect floors and caps, stay close to the targets.

numpy and torch are imported by the functions that use them, so that a plugin module importing `distribute` stays
cheap to import (``squeezekit plugins`` lists plugins without loading either).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def _project_row(target: np.ndarray, total: int, lo: int, hi: int) -> np.ndarray:
    """Integers in [lo, hi] summing to ``total``, nearest to ``target`` + a common shift (water-filling)."""
    import numpy as np

    n = target.size
    if not n * lo <= total <= n * hi:
        raise ValueError(f"cannot place {total} tokens in {n} layers of [{lo}, {hi}]")
    # Find the shift s so that sum(clip(target + s, lo, hi)) == total. The sum is monotone in s: bisection.
    a, b = lo - float(target.max()) - 1.0, hi - float(target.min()) + 1.0
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


def distribute(targets: torch.Tensor, total: torch.Tensor, floor: int, cap: torch.Tensor) -> torch.Tensor:
    """Round real-valued per-layer ``targets`` (B, L) to exact integer budgets.

    Each row sums to ``total[b]``, each entry lies in ``[floor, cap[b]]``. What a cap or floor clips is spread
    evenly over the layers still free, so the total is conserved exactly (no leaked, no invented tokens).
    """
    import numpy as np
    import torch

    t = targets.detach().to(torch.float64).cpu().numpy()
    tot = total.detach().cpu().numpy().astype(np.int64)
    caps = cap.detach().cpu().numpy().astype(np.int64)
    rows = [_project_row(t[b], int(tot[b]), int(floor), int(caps[b])) for b in range(t.shape[0])]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def check_budgets(budgets: object, total: torch.Tensor, floor: int, cap: torch.Tensor, shape: tuple) -> str | None:
    """Return what is wrong with an allocator's budgets, or None when they honour the contract.

    ``total`` and ``cap`` are squeezekit's own copies (on the CPU), never the ones the allocator was handed.
    """
    import torch

    if not isinstance(budgets, torch.Tensor) or budgets.is_floating_point() or budgets.dtype == torch.bool:
        return f"allocate() must return an integer tensor, got {getattr(budgets, 'dtype', type(budgets).__name__)}"
    if tuple(budgets.shape) != tuple(shape):
        return f"allocate() returned shape {tuple(budgets.shape)}, expected {tuple(shape)}"
    if budgets.device.type == "meta":
        return "allocate() returned a tensor on the meta device (it holds no values)"
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

"""From a prompt's length and its layers' importance to per-layer token budgets: `plan_budgets`, a pure function of
its arguments (the allocator is called through the `PolicyRunner`; nothing else is read or written, but for the
`BatchAllocation` a micro-batched prefill shares on purpose).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import floor_hint
from .errors import BudgetError

if TYPE_CHECKING:
    from .policies import LayerView
    from .runner import PolicyRunner


@dataclass
class BatchAllocation:
    """The allocation a batch prefilled in micro-batches shares (`squeezekit.batching.prefill`), for allocators
    whose budgets follow the batch as a whole (``LayerBudgetAllocator.batch_level``): the first micro-batch is
    allocated as usual; later rows with a prompt length it has seen reuse its budgets, other lengths are allocated
    with every row set to its mean importance. Equal prompts then get equal budgets (equal-size layer buffers)."""

    #: (all layers,) the first micro-batch's mean importance (None until it is allocated)
    importance: torch.Tensor | None = None
    #: prompt length -> (compressible layers,) budgets
    budgets: dict[int, torch.Tensor] = field(default_factory=dict)


def plan_budgets(
    prompt_len: torch.Tensor,
    importance: torch.Tensor,
    layers: list[int],
    n_layers: int,
    budget: float,
    runner: PolicyRunner,
    shared: BatchAllocation | None = None,
    views: Callable[[torch.Tensor], Sequence[LayerView]] | None = None,
) -> torch.Tensor:
    """(B, n_layers) long budgets on the CPU; -1 for the layers no budget applies to (not in ``layers``).

    ``prompt_len`` (B,) real tokens per prompt, ``importance`` (B, n_layers) from the prefill, ``budget`` the
    config's (a fraction of each prompt, or tokens per layer; never 1, the full cache). A prompt no longer than its
    mean budget keeps every token at prefill; the others ask the allocator for exactly ``round(mean x L)`` tokens
    over their ``L`` compressible layers, each in [floor, prompt length]. ``views(rows)``: those rows' prefill views
    of the ``L`` layers, for an allocator that needs them (``LayerBudgetAllocator.needs``).
    """
    n = prompt_len.cpu().long()
    B, L = n.shape[0], len(layers)
    mean = n.double() * budget if budget <= 1 else torch.full((B,), float(budget), dtype=torch.float64)
    total = torch.round(mean * L).long()
    kept_whole = mean >= n.double()  # prompt not longer than the budget: nothing to evict at prefill
    check_budget(budget, mean, total, kept_whole, n, L, runner)
    out = torch.full((B, n_layers), -1, dtype=torch.long)
    budgets = torch.empty(B, L, dtype=torch.long)
    if bool(kept_whole.any()):
        budgets[kept_whole] = torch.round(mean[kept_whole]).long().clamp_min(n[kept_whole]).view(-1, 1).expand(-1, L)
    rows = (~kept_whole).nonzero().view(-1)
    if rows.numel():
        shared = shared if runner.batch_level else None
        if shared is not None and shared.importance is not None and all(int(k) in shared.budgets for k in n[rows]):
            budgets[rows] = torch.stack([shared.budgets[int(k)] for k in n[rows]])
        else:
            scores = importance[rows][:, layers].float()
            if shared is not None and shared.importance is not None:
                scores = shared.importance[layers].float().expand_as(scores).clone()
            layer_views = views(rows) if views is not None else None
            budgets[rows] = runner.allocate(scores, total[rows], n[rows], runner.floor, layer_views)
            if shared is not None:
                if shared.importance is None:
                    shared.importance = importance.float().mean(0)
                shared.budgets.update((int(k), row) for k, row in zip(n[rows], budgets[rows], strict=True))
    out[:, layers] = budgets
    return out


def check_budget(
    budget: float,
    mean: torch.Tensor,
    total: torch.Tensor,
    kept_whole: torch.Tensor,
    n: torch.Tensor,
    L: int,
    runner: PolicyRunner,
) -> None:
    """Every layer keeps at least the floor (>= 1 token). A fractional budget too small for some prompt of the batch
    is a `BudgetError` whose suggestion works for every sequence of the batch (it is computed for the shortest)."""
    floor = runner.floor
    short = ~kept_whole & (total < floor * L)
    if not bool(short.any()):
        return
    b = int(n.masked_fill(~short, torch.iinfo(n.dtype).max).argmin())  # the shortest prompt fails first
    prompt = int(n[b])
    setter = runner.floor_setter
    if floor == 1:
        what = "which rounds to 0 tokens for some layers"
    else:
        what = f"below the floor of evictor {setter.name!r} ({floor} tokens per layer)"
    if floor <= prompt:
        remedy = f"raise the budget to at least {math.ceil(floor / prompt * 1000) / 1000:g}"
    else:
        remedy = f"use an absolute budget of at least {max(floor, 2)} tokens (shorter prompts are kept whole)"
    if floor > 1:
        remedy += floor_hint(setter)
    raise BudgetError(
        f"budget {budget:g} keeps {float(mean[b]):.1f} tokens per layer of a {prompt}-token prompt (sequence {b} "
        f"of the batch), {what}; {remedy}"
    )

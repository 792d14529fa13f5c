"""From a prompt's length and its layers' importance to per-layer token budgets: `plan_budgets`, a pure function of
its arguments (the allocator is called through the `PolicyRunner`; nothing else is read or written, but for the
`BatchAllocation` a micro-batched prefill shares on purpose).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

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
    config's (a fraction of each prompt, or tokens per layer; never 1, the full cache). The others ask the allocator
    for exactly ``round(mean x L)`` tokens over their ``L`` compressible layers, each in [floor, prompt length]. Two
    kinds of prompt are kept whole instead (`kept_whole`): one no longer than its mean budget (an absolute budget
    above the prompt: its layers may grow to the budget), and a *short* one, whose budget would keep fewer tokens per
    layer than the evictor's floor (a 37-token question at budget 0.2 keeps 7.4, below streaming's 12): it needs no
    compression, and its layers hold at most ``max(prompt, floor)`` tokens. ``views(rows)``: those rows' prefill
    views of the ``L`` layers, for an allocator that needs them (``LayerBudgetAllocator.needs``).
    """
    n = prompt_len.cpu().long()
    B, L = n.shape[0], len(layers)
    mean = n.double() * budget if budget <= 1 else torch.full((B,), float(budget), dtype=torch.float64)
    total = torch.round(mean * L).long()
    whole = kept_whole(n, budget, runner.floor, L)
    out = torch.full((B, n_layers), -1, dtype=torch.long)
    budgets = torch.empty(B, L, dtype=torch.long)
    if bool(whole.any()):
        keep = torch.maximum(torch.round(mean[whole]).long(), n[whole]).clamp_min(runner.floor)
        budgets[whole] = keep.view(-1, 1).expand(-1, L)
    rows = (~whole).nonzero().view(-1)
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


def kept_whole(prompt_len: torch.Tensor, budget: float, floor: int, layers: int) -> torch.Tensor:
    """(B,) bool: the prompts `plan_budgets` keeps whole at this budget (see there): no longer than an absolute
    budget, or short, where the budget keeps fewer tokens per layer than the evictor's ``floor``."""
    n = prompt_len.cpu().long()
    if budget > 1:
        return n.double() <= budget
    total = torch.round(n.double() * budget * layers).long()
    return (total < floor * layers) | (n.double() * budget >= n.double())


def short_prompt_note(prompt_len: int, budget: float, floor: int, evictor: str) -> str:
    """Why a prompt was kept whole, in words (for summaries): empty when the budget did not ask for less."""
    if budget > 1 or budget * prompt_len >= floor:
        return ""
    return (
        f"kept whole: budget {budget:g} would keep {budget * prompt_len:.1f} tokens per layer of this "
        f"{prompt_len}-token prompt, below the floor of evictor {evictor!r} ({floor})"
    )

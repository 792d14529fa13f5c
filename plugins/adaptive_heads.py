"""Adaptive head split (Ada-KV, Feng et al. 2024, arXiv 2407.11550): a layer's budget goes to its heads' best tokens.

The heads of a layer hold ``budget x H`` tokens together. Each head first keeps its ``safeguard`` share of an equal
split (at least the evictor's floor); the rest of the layer's budget goes to the highest-ranked tokens across all its
heads, so a head whose attention is spread over many tokens keeps more of them than one that attends to a few. The
engine then holds exactly what the heads keep, and keeps each head within its own budget while decoding.
"""

from dataclasses import dataclass

import squeezekit


@dataclass
class AdaptiveHeads(squeezekit.HeadBudgetSplitter):
    """Ada-KV: the layer's budget goes to the best-scored tokens across its heads, each keeping a safeguard share."""

    name = "adaptive"
    #: the share of an equal split each head keeps whatever its scores (Ada-KV's alpha; 1 = the uniform split)
    safeguard: float = 0.2

    def __post_init__(self):
        squeezekit.check("safeguard", self.safeguard, 0 <= self.safeguard <= 1, "must be in [0, 1]")

    def split(self, request):
        import torch

        scores, budget, cap = request.scores, request.budget.to(request.scores.device), request.cap
        B, H, S = scores.shape
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True).values  # (B, H, S): each head's best first
        rank = torch.arange(S, device=scores.device)
        holds = rank < cap.to(scores.device)[..., None]  # the tokens each head holds
        guard = torch.maximum(budget.clamp(max=request.floor), (self.safeguard * budget).floor().long())
        ranked = ranked.clamp(min=-1e300).masked_fill(~holds, float("-inf"))  # (a held token is never out-ranked
        ranked = ranked.masked_fill(rank < guard.view(-1, 1, 1), float("inf"))  # by one a head does not hold)
        # Rank-major order, then a stable sort: equal scores go to the heads in turn, not all to the first head.
        flat = ranked.transpose(1, 2).reshape(B, S * H)
        order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
        taken = torch.arange(S * H, device=scores.device).view(1, -1) < (budget * H).view(-1, 1)
        head = (order % H).masked_fill(~taken, H)  # (an index past the heads: not taken)
        counts = torch.zeros(B, H + 1, dtype=torch.long, device=scores.device).scatter_add_(1, head, taken.long())
        return counts[:, :H].cpu()


@squeezekit.hookimpl
def register_head_splits(register):
    register(AdaptiveHeads)

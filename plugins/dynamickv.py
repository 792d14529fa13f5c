"""DynamicKV allocator (Zhou et al., 2024, "DynamicKV: Task-Aware Adaptive KV Cache Compression for Long Context
LLMs", arXiv 2412.14838): each layer's budget is its share of the batch's most attended tokens.

At the end of prefill, the last ``window`` prompt queries attend to each layer's tokens (SnapKV's vote: summed over
the window, averaged over the layer's heads, max-pooled over 7 neighbours; the window itself, which
every window-based evictor keeps, is left out). Each layer offers its ``r_max`` x mean-budget best votes; the
``total`` best of all layers' offers (per sequence) are counted per layer, and a layer's budget is its count. Attention
sums to one per query in every layer, so the votes are comparable across layers: a layer that concentrates its
attention on few tokens wins few places, one that spreads it wins many. (The paper re-balances every few layers
while the prompt is processed; squeezekit allocates once, after the whole prompt, with every layer in view.)
"""

from dataclasses import dataclass
from typing import Literal

import squeezekit
from squeezekit.budget import proportional_split

#: neighbouring tokens max-pooled together (SnapKV's default kernel)
POOL = 7


@dataclass
class DynamicKV(squeezekit.LayerBudgetAllocator):
    """DynamicKV: each layer's budget is how many of the most attended tokens of all layers are its own."""

    name = "dynamickv"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: the last prompt tokens whose queries vote (the evictor's own window when it collects them)
    window: int = 8
    #: no layer offers more than r_max x the mean budget
    r_max: float = 2.0
    #: allocate each sequence on its own ("sequence", the paper's) or share the batch's mean shares ("batch": equal
    #: prompts get equal budgets, so the decode takes the CUDA-graph path of equal buffers)
    per: Literal["batch", "sequence"] = "sequence"

    @property
    def batch_level(self) -> bool:  # micro-batches of one batch share its allocation (see LayerBudgetAllocator)
        return self.per == "batch"

    def __post_init__(self):
        squeezekit.check("per", self.per, self.per in ("batch", "sequence"), "must be 'batch' or 'sequence'")
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("r_max", self.r_max, self.r_max >= 1, "must be >= 1")

    def allocate(self, request):
        import math

        import torch
        import torch.nn.functional as F

        B, L = request.importance.shape
        # per sequence: each layer offers r_max x its mean budget (a row's budgets depend on that row alone)
        per_row = [max(1, math.ceil(self.r_max * int(t) / L)) for t in request.total]
        offer = max(per_row)
        offers = []
        for view in request.layers:
            votes = view.window_attention().sum(dim=3).mean(dim=2)  # (B, H, S)
            S = votes.shape[-1]
            votes = F.max_pool1d(votes.reshape(-1, 1, S), POOL, stride=1, padding=POOL // 2).view(votes.shape)
            votes = votes.masked_fill(~view.valid | view.recent(self.window), float("-inf")).mean(dim=1)  # (B, S)
            best = votes.topk(min(offer, S), dim=-1).values.cpu()
            offers.append(F.pad(best, (0, offer - best.shape[-1]), value=float("-inf")))
        pool = torch.stack(offers, dim=1)  # (B, L, offer)
        beyond = torch.arange(offer).view(1, 1, -1) >= torch.tensor(per_row).view(-1, 1, 1)
        pool = pool.masked_fill(beyond, float("-inf"))
        counts = torch.zeros(B, L, dtype=torch.float64)
        for b in range(B):
            n = min(int(request.total[b]), L * per_row[b])
            winners = pool[b].reshape(-1).topk(n).indices // pool.shape[2]
            counts[b] = torch.bincount(winners, minlength=L).double()
        return proportional_split(counts, request.total, request.floor, request.cap, batch=self.per == "batch")


@squeezekit.hookimpl
def register_allocators(register):
    register(DynamicKV)

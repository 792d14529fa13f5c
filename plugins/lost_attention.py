"""Lost-attention allocator: budgets from how much eviction would move each layer's attention output, per prompt.

At the end of prefill, the queries of the last ``window`` prompt tokens (those snapkv scores with) attend to each
layer's keys. The evictor ranks the layer's tokens as it will at the uniform budget; a layer keeping only its ``b``
best ranked tokens attends over those alone, and its output moves (L2 distance, averaged over the queries and
heads). Per prompt: a sequence's budgets depend on its own prompt alone, so they are the same whatever batch (or
micro-batch of a served batch) it runs in:

``rule="sqrt"`` (default): that change at the uniform budget is each layer's cost, and budgets are proportional to
its square root (`squeezekit.budget.sqrt_split`). ``rule="greedy"``: the change at a grid of budgets is each
layer's cost curve, every layer starts at the evictor's floor and each further token goes to the layer where it
reduces the change the most (`squeezekit.budget.waterfill`). (The attention *mass* the evictor drops predicts the
loss worse on SmolLM2: layers 0-1 attend broadly but carry small values.)
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal

import squeezekit
from squeezekit.budget import sqrt_split, waterfill

#: layers costed together (each prefill view may copy its layer's keys and values: a bounded number at once)
LAYERS_AT_ONCE = 8


@dataclass
class LostAttention(squeezekit.LayerBudgetAllocator):
    """Budgets from how much eviction moves each layer's attention output, seen by the last prompt queries."""

    name = "lost_attention"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: the last prompt tokens whose queries measure the loss (the evictor's own window when it collects them)
    window: int = 8
    #: "sqrt" (budgets ~ square root of each layer's change at the uniform budget) or "greedy" (token by token)
    rule: Literal["sqrt", "greedy"] = "sqrt"
    #: "greedy": budgets (fractions of the prompt, geometric from 1/points) at which the change is measured
    points: int = 16

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("rule", self.rule, self.rule in ("sqrt", "greedy"), "must be 'sqrt' or 'greedy'")
        squeezekit.check("points", self.points, self.points >= 2, "must be an integer >= 2")

    def allocate(self, request):
        import torch  # (here: listing plugins imports no torch)

        B, L = request.importance.shape
        uniform = torch.div(request.total, L, rounding_mode="floor").clamp_min(request.floor)
        if self.rule == "sqrt":
            knots = uniform.view(-1, 1)
        else:
            levels = torch.logspace(-torch.log10(torch.tensor(float(self.points))), 0, self.points, dtype=torch.float64)
            knots = torch.round(levels.view(1, -1) * request.cap.double().view(-1, 1)).long().clamp(1, None)  # (B, K)
        costs = self.costs(request.layers, request.evictor, uniform, knots)  # (B, L, K) on the CPU
        if self.rule == "sqrt":
            return sqrt_split(costs[..., 0], request.total, request.floor, request.cap)
        return waterfill(costs, knots, request.total, request.floor, request.cap)

    @staticmethod
    def costs(views, evictor, budget, knots):
        """(B, L, K) on the CPU: how far each layer's window queries' attention output moves when it keeps only
        ``knots`` (B, K) tokens (the L2 distance, averaged over the heads and the real window queries). Layers
        ``LAYERS_AT_ONCE`` at a time (a prefill view may hold a copy of its layer's keys and values): their slots
        ranked in one stack, their outputs in one kernel launch a layer and one merge (on CUDA)."""
        import torch

        parts = [
            LostAttention._costs(views[i : i + LAYERS_AT_ONCE], evictor, budget, knots)
            for i in range(0, len(views), LAYERS_AT_ONCE)
        ]
        return torch.cat(parts, dim=1)

    @staticmethod
    def _costs(views, evictor, budget, knots):
        import torch

        from squeezekit.selection import slot_ranks  # (it imports torch)

        views = list(views)
        B, K = knots.shape
        budgets, limits = {}, {}  # (the uniform budget, and the knots as (K, B, 1, 1), copied once per device)
        for device in {v.valid.device for v in views}:
            budgets[device], limits[device] = budget.to(device), knots.to(device).t().reshape(K, B, 1, 1)
        # each slot's place in the order the engine keeps the evictor's best in at prefill (the newest token first)
        uniform = [dataclasses.replace(v, budget=budgets[v.valid.device], head_budget=None) for v in views]
        scores = [evictor.score(view) for view in uniform]  # (every head at the uniform budget)
        kept = [
            torch.cat([view.valid[None], rank[None] < limits[rank.device]])  # all slots, then the kept ones
            for view, rank in zip(views, slot_ranks(scores, views), strict=True)
        ]
        outputs = squeezekit.LayerView.window_outputs(views, kept)  # (L, 1 + K, B, H, G, W, D)
        moved = (outputs[:, 1:] - outputs[:, :1]).norm(dim=-1)  # (L, K, B, H, G, W)
        real = (views[0].window_positions.to(moved.device) >= 0).to(moved.dtype)  # (B, W): the same for every layer
        H, G = moved.shape[3], moved.shape[4]
        per = (moved * real.view(1, 1, B, 1, 1, -1)).sum(dim=(3, 4, 5)) / (real.sum(1) * H * G).clamp_min(1)
        return per.permute(2, 0, 1).cpu()  # (one copy: no sync per layer)

    @staticmethod
    def lost(view, evictor, budget, knots):
        """(B, K): `costs` of one layer."""
        return LostAttention.costs([view], evictor, budget, knots)[:, 0]


@squeezekit.hookimpl
def register_allocators(register):
    register(LostAttention)

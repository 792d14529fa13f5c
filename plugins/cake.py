"""CAKE allocator (Qin et al., ICLR 2025, "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
arXiv 2503.12491): budgets from how spread out and how shifting each layer's attention is.

From the attention ``A`` (W x S) of the last ``window`` prompt queries over a layer's tokens (per head):

- spatial dispersion: the entropy of the window's mean attention, ``H = -sum_s a_s log a_s`` with ``a = mean_w A``;
- temporal shift: how much a token's attention moves from query to query, ``V = sum_s var_w A[w, s]``;

each averaged over the layer's heads. The layer's preference is ``P = H^(1/tau1) * V^(1/tau2)`` and its budget is its
share of the total, ``total * P / sum P`` (uniform when every ``P`` is 0, e.g. a one-query window). A layer
attending broadly (high entropy) or whose attention shifts (high variance) needs more cache. (CAKE's cascading, which
keeps memory bounded while the prompt is processed layer by layer, is what squeezekit's prefill does anyway; its
eviction indicator is not part of this allocator.)
"""

from dataclasses import dataclass
from typing import Literal

import squeezekit
from squeezekit.budget import proportional_split


@dataclass
class Cake(squeezekit.LayerBudgetAllocator):
    """CAKE: budgets proportional to entropy^(1/tau1) x variance^(1/tau2) of each layer's window attention."""

    name = "cake"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: the last prompt tokens whose attention is measured (the evictor's own window when it collects them)
    window: int = 8
    #: temperature of the spatial dispersion (entropy): smaller sharpens its effect
    tau1: float = 1.0
    #: temperature of the temporal shift (variance): smaller sharpens its effect
    tau2: float = 1.0
    #: allocate each sequence on its own ("sequence", the paper's) or share the batch's mean shares ("batch": equal
    #: prompts get equal budgets, so the decode takes the CUDA-graph path of equal buffers)
    per: Literal["batch", "sequence"] = "sequence"

    @property
    def batch_level(self) -> bool:  # micro-batches of one batch share its allocation (see LayerBudgetAllocator)
        return self.per == "batch"

    def __post_init__(self):
        squeezekit.check("per", self.per, self.per in ("batch", "sequence"), "must be 'batch' or 'sequence'")
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("tau1", self.tau1, self.tau1 > 0, "must be > 0")
        squeezekit.check("tau2", self.tau2, self.tau2 > 0, "must be > 0")

    def allocate(self, request):
        import torch

        prefs = torch.stack([self.preference(view) for view in request.layers], dim=1)  # (B, L)
        return proportional_split(prefs, request.total, request.floor, request.cap, batch=self.per == "batch")

    def preference(self, view):
        """(B,) float64: this layer's ``H^(1/tau1) * V^(1/tau2)``."""
        p = view.window_attention().double()  # (B, H, G, W, S)
        B, W = view.window_positions.shape
        real = (view.window_positions >= 0).double().view(B, 1, 1, W, 1).to(p.device)
        n = real.sum(3, keepdim=True).clamp_min(1)
        mean = (p * real).sum(3, keepdim=True) / n
        var = (((p - mean) ** 2) * real).sum(3, keepdim=True) / (n - 1).clamp_min(1)
        a = mean.squeeze(3)
        entropy = -(a * a.clamp_min(1e-300).log()).sum(-1).mean(dim=(1, 2))  # (B,)
        shift = var.squeeze(3).sum(-1).mean(dim=(1, 2))
        return (entropy.clamp_min(0) ** (1 / self.tau1) * shift.clamp_min(0) ** (1 / self.tau2)).cpu()


@squeezekit.hookimpl
def register_allocators(register):
    register(Cake)

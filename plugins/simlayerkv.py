"""SimLayerKV allocator (Zhang et al., 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
arXiv 2410.13846): lazy layers, found at prefill, get a streaming-sized budget; the others share the rest.

A layer is lazy for a sequence when the last ``window`` prompt queries put more than ``threshold`` of their
attention (averaged over the window and the layer's heads) on the first ``sinks`` tokens and the ``recent`` most
recent ones: it attends like StreamingLLM, so it needs no more than those. Each lazy layer gets ``sinks + recent``
tokens (never more than the mean budget, never less than the evictor's floor); the non-lazy layers share what is
left equally. With no lazy layer, or only lazy ones, the split is uniform. (The paper keeps exactly the sinks and
the recent window in lazy layers; here the chosen evictor keeps that layer's budget as it would any other.)
"""

from dataclasses import dataclass

import squeezekit
from squeezekit.budget import distribute


@dataclass
class SimLayerKV(squeezekit.LayerBudgetAllocator):
    """SimLayerKV: layers whose last queries attend to sinks and recent tokens only get a streaming-sized budget."""

    name = "simlayerkv"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: the last prompt tokens whose attention decides (the evictor's own window when it collects them)
    window: int = 8
    #: a layer is lazy above this share of attention on the sinks and recent tokens
    threshold: float = 0.9
    #: the first tokens counted as sinks
    sinks: int = 4
    #: the most recent tokens counted as recent
    recent: int = 32

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("threshold", self.threshold, 0 < self.threshold < 1, "must be in (0, 1)")
        squeezekit.check("sinks", self.sinks, self.sinks >= 0, "must be an integer >= 0")
        squeezekit.check("recent", self.recent, self.recent >= 1, "must be an integer >= 1")

    def lazy(self, view):
        """(B,) bool: whether this layer is lazy for each sequence."""
        p = view.window_attention()  # (B, H, G, W, S)
        local = (view.positions < self.sinks) | view.recent(self.recent)  # (B, H, S)
        share = (p * local[:, :, None, None, :]).sum(-1)  # (B, H, G, W)
        B, W = view.window_positions.shape
        real = (view.window_positions >= 0).float().view(B, 1, 1, W).to(share.device)
        return ((share * real).sum(dim=(1, 2, 3)) / (real.sum(dim=(1, 2, 3)) * share.shape[1] * share.shape[2])
                > self.threshold).cpu()  # fmt: skip

    def allocate(self, request):
        import torch

        B, L = request.importance.shape
        lazy = torch.stack([self.lazy(view) for view in request.layers], dim=1)  # (B, L)
        mean = request.total.double().view(-1, 1) / L
        small = torch.full_like(mean, float(self.sinks + self.recent)).clamp(min=request.floor).minimum(mean)
        n_lazy = lazy.sum(-1, keepdim=True).double()
        rest = (request.total.double().view(-1, 1) - n_lazy * small) / (L - n_lazy).clamp_min(1)
        targets = torch.where(lazy, small, rest)
        targets = torch.where((n_lazy == 0) | (n_lazy == L), mean.expand(B, L), targets)
        return distribute(targets, request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(SimLayerKV)

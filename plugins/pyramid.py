"""Pyramid allocator (PyramidKV, Cai et al., 2024, arXiv 2406.02069): budgets fall linearly with depth; the total is
conserved.

This is PyramidKV's schedule: with ``mean`` the mean budget, the last layer's is ``mean / beta``, the first layer's
``2 x mean - mean / beta``, the layers between on the straight line (an arithmetic sequence), ``beta = 20`` as in the
paper. What PyramidKV keeps inside each layer (SnapKV's selection) is the evictor's choice here: ``evictor=snapkv``.
"""

from dataclasses import dataclass

import squeezekit
from squeezekit.budget import distribute


@dataclass
class Pyramid(squeezekit.LayerBudgetAllocator):
    """Budgets decrease linearly from the first layer to the last."""

    name = "pyramid"
    #: steepness: the last layer's target is mean / beta, the first layer's 2 x mean minus that
    beta: float = 20.0

    def __post_init__(self):
        squeezekit.check("beta", self.beta, self.beta >= 1, "must be >= 1")

    def allocate(self, request):
        import torch

        n_layers = request.importance.shape[1]
        mean = request.total.double().view(-1, 1) / n_layers
        low, high = mean / self.beta, 2 * mean - mean / self.beta
        ramp = torch.linspace(0, 1, n_layers, dtype=torch.float64).view(1, -1)
        return distribute(high + (low - high) * ramp, request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(Pyramid)

"""Uniform allocator: every layer keeps the same number of tokens (the baseline SqueezeAttention improves on)."""

from dataclasses import dataclass

import squeezekit
from squeezekit.budget import distribute


@dataclass
class Uniform(squeezekit.LayerBudgetAllocator):
    """Same budget for every layer."""

    name = "uniform"

    def allocate(self, request):
        n_layers = request.importance.shape[1]
        targets = (request.total.double() / n_layers).view(-1, 1).expand(-1, n_layers)
        return distribute(targets, request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(Uniform)

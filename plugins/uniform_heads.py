"""Uniform head split: every KV head of a layer keeps the layer's budget (the default, ``heads=uniform``)."""

from dataclasses import dataclass

import squeezekit


@dataclass
class UniformHeads(squeezekit.HeadBudgetSplitter):
    """Every KV head keeps its layer's budget."""

    name = "uniform"
    equal = True  # the engine skips the call: each head keeps the layer's budget

    def split(self, request):
        return request.budget.view(-1, 1).expand_as(request.cap).clone()


@squeezekit.hookimpl
def register_head_splits(register):
    register(UniformHeads)

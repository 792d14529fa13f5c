"""Tensor parallelism (transformers' ``tp_plan``): each rank's cache holds its own KV heads; the policies agree.

A model loaded with ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N, tp_plan="auto"))`` under
``torchrun`` splits every attention layer by heads: rank ``r`` computes query heads and KV heads ``r x H/N`` to
``(r + 1) x H/N - 1``, and its cache sees only those. What squeezekit needs of the ranks:

- the same layer budgets on every rank. Layer importance comes from the residual stream, which the output
  projection's all-reduce makes identical on every rank, so allocators that read importance alone agree as they are.
  An allocator that reads the layers' views (``needs``: window queries, attention) would see only the rank's heads:
  `gather_heads` all-gathers each view along the head dimension, once per prefill, so it sees every head, in head
  order, exactly as one process would (`squeezekit.cache.PrefillViews`);
- evictors score per KV head as always, so each rank evicts its own heads only; head splits split each rank's heads
  (a rank's heads hold ``budget x H/N`` tokens together);
- nothing else crosses ranks: no step of decode communicates beyond what the model itself does.

The group is the tensor-parallel dimension of the model's device mesh (``model._device_mesh["tp"]``, what
transformers 5.x sets when it loads a model with a TP plan); any other model has none and nothing here runs.
"""

from __future__ import annotations

from typing import Any

import torch


def head_group(model: Any) -> Any:
    """The process group across which ``model``'s attention heads are split, or None (no tensor parallelism)."""
    if int(getattr(model, "_tp_size", 1) or 1) <= 1 or not torch.distributed.is_initialized():
        return None
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    try:
        return mesh["tp"].get_group()
    except (KeyError, RuntimeError, IndexError):
        return mesh.get_group()


def gather_heads(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``t`` (dim 1: this rank's heads) concatenated along dim 1 over the ranks of ``group``, in rank order."""
    world = torch.distributed.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def gathered_view(view: Any, group: Any) -> Any:
    """A `LayerView` with every head of the layer: its slot tensors and its statistics with a head dimension (dim 1
    of size H, 3 dimensions or more: per-slot statistics, window queries) all-gathered; the rest as it is."""
    import dataclasses

    from .policies import LIVE_FIELDS, LayerView

    H = view.valid.shape[1]

    def heads(name: str, value: Any) -> Any:  # (head_budget: (B, H), the only per-sequence field with heads)
        if name in LIVE_FIELDS or (name == "head_budget" and value is not None):
            return gather_heads(value, group)
        return value

    def stat(value: Any) -> Any:
        has_heads = isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[1] == H
        return gather_heads(value, group) if has_heads else value

    return LayerView(
        **{f.name: heads(f.name, getattr(view, f.name)) for f in dataclasses.fields(view) if f.name != "stats"},
        stats={name: stat(value) for name, value in view.stats.items()},
    )

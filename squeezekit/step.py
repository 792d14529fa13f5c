"""One forward of a compressed model is one *step*: what it adds to every layer, known on the host before the
first layer runs, and the attention plan each layer gets once it has written its tokens (`squeezekit.attention`).

`SqueezeCache.begin_step` builds the `Step` (called by the compressor's hook on the decoder stack); each layer's
write records its `squeezekit.attention.LayerPlan` here; `SqueezeCache.end_step` closes the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .attention import LayerPlan


@dataclass
class Step:
    """What the current forward adds to every layer."""

    new_valid: torch.Tensor  #: (B, q) bool: real (non-padding) new tokens
    new_pos: torch.Tensor  #: (B, q) long: their positions in their sequences, -1 for padding
    prefill: bool  #: first step of this cache
    #: host-side: no padding among the new tokens (lets hot paths skip masks and syncs)
    all_valid: bool = False
    #: host-side: the real new tokens of each row (every layer's count of held tokens follows it)
    real: list[int] = field(default_factory=list)
    counted: bool = False  #: end_step has added the new tokens to `seen`
    #: masks shared by layers whose slots are laid out alike in this step, keyed by (window, device)
    shared_masks: dict[Any, torch.Tensor] = field(default_factory=dict)
    #: `SqueezeCache.seen_after_step`, computed once per step (every layer's evictor view asks for it)
    seen_after: torch.Tensor | None = None
    #: each layer's attention plan for this step, by layer index (made when the layer has written its tokens)
    plans: dict[int, LayerPlan] = field(default_factory=dict)

    @property
    def q(self) -> int:
        return int(self.new_valid.shape[1])


def open_step(seen: torch.Tensor, new_valid: torch.Tensor, prefill: bool, all_valid: bool | None = None) -> Step:
    """The `Step` of ``new_valid`` (B, q) tokens after ``seen`` (B,) per sequence: their positions, and what the
    host knows of them (one host sync when ``all_valid`` is not given: the caller passed an attention mask)."""
    B, q = new_valid.shape
    new_valid = new_valid.bool()
    real = [q] * B
    if not all_valid:  # unknown (or padding): the one host sync of such a step
        real = [int(n) for n in new_valid.sum(-1).tolist()]
        all_valid = all(n == q for n in real)
    if all_valid:
        pos = seen.view(-1, 1) + torch.arange(q, device=new_valid.device)
    else:
        pos = seen.view(-1, 1) + new_valid.long().cumsum(-1) - 1
        pos = pos.masked_fill(~new_valid, -1)
    return Step(new_valid=new_valid, new_pos=pos, prefill=prefill, all_valid=all_valid, real=real)

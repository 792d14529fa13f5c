"""Turning evictor scores into kept slots, and checking what a plugin's `select` returned."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .policies import LayerView


def rank_key(score: torch.Tensor, view: LayerView, protect_newest: bool = True) -> torch.Tensor:
    """A float64 key that orders slots by score, then recency; invalid slots last; the newest token first.

    ``protect_newest=False`` when making room for a new token: that one will be the newest, the held ones compete.
    """
    return _key(score, view.positions, view.valid, protect_newest)


def _key(
    score: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, protect_newest: bool, invalid: float = -math.inf
) -> torch.Tensor:
    score = torch.nan_to_num(score.to(torch.float64), nan=float("-inf"))
    pos = positions.to(torch.float64)
    # Recency breaks ties: scale positions into (0, 1) so they never reorder distinct finite scores by much.
    # Distinct scores that differ by less than this are exceedingly rare and then recency decides, by design.
    tie = pos / (pos.amax(dim=-1, keepdim=True).clamp_min(1.0) + 1.0) * 1e-9
    key = score + tie
    if protect_newest:
        newest = positions == positions.amax(dim=-1, keepdim=True)
        key = key.masked_fill(newest & valid, float("inf"))
    return key.masked_fill(~valid, invalid)


def top_slots(
    score: torch.Tensor, view: LayerView, keep: torch.Tensor, protect_newest: bool = True, most: int | None = None
) -> torch.Tensor:
    """Indices (B, H, K) of the ``keep[b]`` best slots of each row (``keep`` (B,)), or ``keep[b, h]`` of each head
    (``keep`` (B, H)), padded with -1, ``K = keep.max()`` (``most``, when the caller knows it: no host sync)."""
    k = int(keep.max()) if most is None else most
    order = slot_order(score, view, protect_newest)[..., :k]
    rank = torch.arange(k, device=order.device)
    per = keep.to(order.device)
    pad = rank.view(1, 1, k) >= (per.view(-1, 1, 1) if per.dim() == 1 else per[..., None])
    return order.masked_fill(pad, -1)


def slot_order(score: torch.Tensor, view: LayerView, protect_newest: bool = True) -> torch.Tensor:
    """(B, H, S) long: each head's slots, best first, as the engine keeps them: by `rank_key` (the newest token
    first when protected, invalid slots last); exact ties (infinite scores, which the tiny recency term cannot
    split) to the more recent token too: sorted by recency first, then stably by key."""
    return _order(rank_key(score, view, protect_newest), view.positions)


def _order(key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    recent_first = torch.sort(positions, dim=-1, descending=True, stable=True).indices
    order = torch.sort(key.gather(-1, recent_first), dim=-1, descending=True, stable=True).indices
    return recent_first.gather(-1, order)


#: the most slots `slot_ranks` ranks in one stack (float64 keys and int64 orders: ~40 bytes a slot at the peak)
STACKED_SLOTS = 1 << 25


def slot_ranks(
    scores: Sequence[torch.Tensor], views: Sequence[LayerView], protect_newest: bool = True
) -> list[torch.Tensor]:
    """Each layer's (B, H, S) long place of every slot in `slot_order` (0: kept first), for many layers at once:
    the layers of one device and shape are stacked and ranked together (a fixed number of kernels for them all,
    `STACKED_SLOTS` at a time). Every step is per row, so a layer's ranks are those it gets alone."""
    ranks: list[torch.Tensor] = [None] * len(scores)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for i, score in enumerate(scores):
        groups.setdefault((score.device, *score.shape), []).append(i)
    for (_, *shape), index in groups.items():
        step = max(1, STACKED_SLOTS // max(1, math.prod(shape)))
        for c0 in range(0, len(index), step):
            chunk = index[c0 : c0 + step]
            positions = torch.stack([views[i].positions for i in chunk])
            valid = torch.stack([views[i].valid for i in chunk])
            key = _key(torch.stack([scores[i] for i in chunk]), positions, valid, protect_newest)
            order = _order(key, positions)
            place = torch.arange(order.shape[-1], device=order.device).expand_as(order)
            for i, rank in zip(chunk, torch.empty_like(order).scatter_(-1, order, place).unbind(0), strict=True):
                ranks[i] = rank
    return ranks


@dataclass
class Ranking:
    """One layer's request to keep the ``keep[b, h]`` best of its valid slots by ``score`` (`kept_together`), with
    the slot tensors of its view. ``drop``: the most slots a head gives up (``valid.sum(-1) - keep``), known on the
    host."""

    score: torch.Tensor  #: (B, H, C) the evictor's scores
    positions: torch.Tensor  #: (B, H, C) int32
    valid: torch.Tensor  #: (B, H, C) bool
    keep: torch.Tensor  #: (B, H) long, on the device
    drop: int


def kept_together(rankings: Sequence[Ranking], nan_flag: torch.Tensor | None = None) -> list[torch.Tensor]:
    """What `top_slots` (the newest token protected) keeps of each layer, as a (B, H, C) bool mask, for many layers
    at once and by what they give up: an extend chunk of ``q`` tokens leaves each head ``q`` over its budget, so the
    ``d = valid - keep`` lowest-ranked valid slots of each head leave (key ascending, exact ties the older first:
    `top_slots`' order read from its end), found with two top-``d`` selections instead of two sorts of every slot.

    The layers are stacked into one (L, B, H, max C) problem, each padded with invalid slots; every step is per row,
    so each layer's kept set is the one `top_slots` gives it alone, at a fixed number of kernels for all layers.
    ``nan_flag``: set where a score is NaN (checked later, without a host sync)."""
    C = max(r.score.shape[-1] for r in rankings)
    L, (B, H) = len(rankings), rankings[0].keep.shape
    device = rankings[0].score.device
    score = torch.zeros((L, B, H, C), dtype=torch.float64, device=device)
    positions = torch.full((L, B, H, C), -1, dtype=torch.int32, device=device)
    valid = torch.zeros((L, B, H, C), dtype=torch.bool, device=device)
    keep = torch.empty((L, B, H), dtype=torch.long, device=device)
    for i, r in enumerate(rankings):
        c = r.score.shape[-1]
        score[i, ..., :c] = r.score
        positions[i, ..., :c] = r.positions
        valid[i, ..., :c] = r.valid
        keep[i] = r.keep
    if nan_flag is not None:
        nan_flag.logical_or_(torch.isnan(score).any())
    m = max(1, *(r.drop for r in rankings))
    key = _key(score, positions, valid, protect_newest=True, invalid=math.inf)  # (never dropped)
    d = valid.sum(-1) - keep  # (L, B, H): slots each head gives up
    lowest = torch.topk(key, m, dim=-1, largest=False).values  # ascending
    edge = lowest.gather(-1, (d - 1).clamp_min(0)[..., None])  # the d-th lowest key (d = 0: below every key)
    edge = edge.masked_fill(d[..., None] == 0, float("-inf"))
    dropped = valid & (key < edge)
    need = d - dropped.sum(-1)  # of the slots whose key is the edge's, the oldest
    tied = torch.where(valid & (key == edge), positions, torch.iinfo(torch.int32).max)
    oldest = torch.topk(tied, m, dim=-1, largest=False).indices
    take = torch.arange(m, device=device) < need[..., None]
    gone = torch.zeros((L, B, H, C + 1), dtype=torch.bool, device=device)
    gone.scatter_(3, torch.where(take, oldest, C), True)
    kept = valid & ~(dropped | gone[..., :C])
    return [kept[i, ..., : r.score.shape[-1]] for i, r in enumerate(rankings)]


def victim_slots(score: torch.Tensor, view: LayerView, protect_newest: bool = True) -> torch.Tensor:
    """(B, H, 1): each row's lowest-scored valid slot, never the newest token (unless ``protect_newest=False``:
    making room for a new token, which will be the newest); exact ties go to the older token.

    The decode hot path: float32 and int32 only, no host sync.
    """
    key = torch.nan_to_num(score.float(), nan=float("-inf"))
    if protect_newest:
        newest = view.positions == view.positions.amax(dim=-1, keepdim=True)
        key = key.masked_fill(newest | ~view.valid, float("inf"))
    else:
        key = key.masked_fill(~view.valid, float("inf"))
    lowest = key == key.amin(dim=-1, keepdim=True)
    oldest = view.positions.masked_fill(~lowest, torch.iinfo(view.positions.dtype).max)
    return oldest.argmin(dim=-1, keepdim=True)


def check_selection(idx: object, view: LayerView, keep: torch.Tensor) -> str | None:
    """Return what is wrong with an evictor's selection, or None when it honours the contract."""
    B, H, S = view.valid.shape
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        return f"select() must return a long tensor, got {getattr(idx, 'dtype', type(idx).__name__)}"
    k = int(keep.max())
    if tuple(idx.shape) != (B, H, k):
        return f"select() returned shape {tuple(idx.shape)}, expected {(B, H, k)}"
    idx = idx.long()
    if bool((idx >= S).any()) or bool((idx < -1).any()):  # before counting: -2 is out of range, not "one fewer"
        return f"select() returned indices outside [0, {S})"
    used = idx >= 0
    counts = used.sum(-1)
    want = keep.to(idx.device)
    want = want.view(B, 1).expand(B, H) if want.dim() == 1 else want
    if not torch.equal(counts, want):
        bad = (counts != want).nonzero()[0].tolist()
        return f"select() kept {int(counts[bad[0], bad[1]])} slots in row {bad}, expected {int(want[bad[0], bad[1]])}"
    safe = idx.clamp_min(0)
    if not bool(torch.gather(view.valid, -1, safe)[used].all()):
        return "select() kept an invalid (free or padding) slot"
    srt = torch.sort(safe.masked_fill(~used, -1), dim=-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        return "select() returned duplicate indices"
    return None

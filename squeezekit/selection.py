"""Turning evictor scores into kept slots, and checking what a plugin's `select` returned."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .policies import LayerView


def rank_key(score: torch.Tensor, view: LayerView, protect_newest: bool = True) -> torch.Tensor:
    """A float64 key that orders slots by score, then recency; invalid slots last; the newest token first.

    ``protect_newest=False`` when making room for a new token: that one will be the newest, the held ones compete.
    """
    score = torch.nan_to_num(score.to(torch.float64), nan=float("-inf"))
    pos = view.positions.to(torch.float64)
    # Recency breaks ties: scale positions into (0, 1) so they never reorder distinct finite scores by much.
    # Distinct scores that differ by less than this are exceedingly rare and then recency decides, by design.
    tie = pos / (pos.amax(dim=-1, keepdim=True).clamp_min(1.0) + 1.0) * 1e-9
    key = score + tie
    if protect_newest:
        newest = view.positions == view.positions.amax(dim=-1, keepdim=True)
        key = key.masked_fill(newest & view.valid, float("inf"))
    return key.masked_fill(~view.valid, float("-inf"))


def top_slots(
    score: torch.Tensor, view: LayerView, keep: torch.Tensor, protect_newest: bool = True, most: int | None = None
) -> torch.Tensor:
    """Indices (B, H, K) of the ``keep[b]`` best slots of each row (``keep`` (B,)), or ``keep[b, h]`` of each head
    (``keep`` (B, H)), padded with -1, ``K = keep.max()`` (``most``, when the caller knows it: no host sync)."""
    key = rank_key(score, view, protect_newest)
    k = int(keep.max()) if most is None else most
    # Exact ties (infinite scores, which the tiny recency term cannot split) go to the more recent token too:
    # sort by recency first, then stably by key.
    recent_first = torch.sort(view.positions, dim=-1, descending=True, stable=True).indices
    order = torch.sort(key.gather(-1, recent_first), dim=-1, descending=True, stable=True).indices
    order = recent_first.gather(-1, order)[..., :k]
    rank = torch.arange(k, device=key.device)
    per = keep.to(key.device)
    pad = rank.view(1, 1, k) >= (per.view(-1, 1, 1) if per.dim() == 1 else per[..., None])
    return order.masked_fill(pad, -1)


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

"""An extend chunk's eviction of one layer in one Triton kernel: the slots each head gives up, found in registers.

After an extend chunk of ``q`` tokens every head of a budgeted layer is up to ``q`` slots over its budget; which of
them leave is `squeezekit.selection.kept_together`'s choice: the ``d = valid - keep`` lowest-ranked valid slots of
each (sequence, KV head) row, by `squeezekit.selection._key` (the score, NaN as -inf and +-inf as the largest finite
floats, as ``torch.nan_to_num`` maps them, plus a recency term of 1e-9
scaled positions, in float64; the newest token never leaves), exact ties to the older token. The plain path stacks
the layers into one problem (four copies a layer) and runs ~20 passes over it with two top-``d`` selections; this
kernel reads each row once, builds the same float64 key (without fused multiply-adds, so every key is the plain
path's to the bit) and takes the ``d`` lowest one at a time (``d`` is at most the chunk's length), then writes the
kept mask. One launch a layer, no stacking; a row stays in registers, so rows of more than `MAX_SLOTS` slots take
the plain path. It also records, without a host sync, whether any score is NaN.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from . import launch, use

if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface

    from ..selection import Ranking
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)

#: the most slots a row may hold for the kernel, which keeps a row in registers (longer rows take the plain path)
MAX_SLOTS = 16384


def _drop_lowest(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Score, Pos, Valid, Keep, Kept, NanFlag,
    ssb, ssh, ssc,
    spb, sph, spc,
    svb, svh, svc,
    skb, skh,
    H, C, most,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # 64-bit offsets: large batches of long buffers
    h = pid % H
    offs = tl.arange(0, BLOCK)
    ok = offs < C
    score = tl.load(Score + b * ssb + h * ssh + offs * ssc, mask=ok, other=0.0).to(tl.float64)
    pos = tl.load(Pos + b * spb + h * sph + offs * spc, mask=ok, other=-1)
    valid = (tl.load(Valid + b * svb + h * svh + offs * svc, mask=ok, other=0) != 0) & ok
    nan = score != score
    if tl.max(nan.to(tl.int32), 0) > 0:
        tl.store(NanFlag, 1)
    newest = tl.max(pos, 0)
    scale = tl.maximum(newest.to(tl.float64), 1.0) + 1.0
    tie = pos.to(tl.float64) / scale * tl.full([], 1e-9, tl.float64)  # (a bare literal would be fp32's 1e-9)
    # torch.nan_to_num(score, nan=-inf), as the plain path ranks: NaN lowest, then +-inf as the largest finite floats
    big = tl.full([], 1.7976931348623157e308, tl.float64)  # torch.finfo(torch.float64).max
    finite = tl.where(score == float("inf"), big, tl.where(score == float("-inf"), -big, score))
    key = tl.where(nan, float("-inf"), finite) + tie
    key = tl.where(valid & (pos == newest), float("inf"), key)
    d = tl.sum(valid.to(tl.int32), 0) - tl.load(Keep + b * skb + h * skh).to(tl.int32)
    left = valid  # the slots that may still be picked
    for i in range(0, most):
        low = tl.min(tl.where(left, key, float("inf")), 0)
        cand = left & (key == low)
        oldest = tl.min(tl.where(cand, pos, 2147483647), 0)
        slot = tl.min(tl.where(cand & (pos == oldest), offs, 2147483647), 0)
        left = left & ((offs != slot) | (i >= d))
    tl.store(Kept + pid.to(tl.int64) * C + offs, left.to(tl.int8), mask=ok)  # what was not picked stays


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_drop_lowest)


def kept(ranking: Ranking, nan_flag: torch.Tensor) -> torch.Tensor | None:
    """The (B, H, C) bool mask of the slots ``ranking``'s layer keeps (exactly `kept_together`'s), or None when the
    kernel is off for this device (or failed before: the caller then runs the plain path). ``nan_flag``: a bool
    scalar tensor set to True when a score is NaN."""
    score = ranking.score
    B, H, C = score.shape
    if C > MAX_SLOTS or not use("evict", score):
        return None
    out = torch.empty((B, H, C), dtype=torch.bool, device=score.device)
    positions, valid = ranking.positions[..., :C], ranking.valid[..., :C]
    valid8 = valid.view(torch.int8) if valid.dtype == torch.bool else valid
    flag8 = nan_flag.view(torch.uint8) if nan_flag.dtype == torch.bool else nan_flag
    keep = ranking.keep.expand(B, H)
    block = max(16, 1 << (C - 1).bit_length())  # (the next power of two)

    def run() -> torch.Tensor:
        _kernel()[(B * H,)](
            score, positions, valid8, keep, out.view(torch.int8), flag8,
            *score.stride(), *positions.stride(), *valid8.stride(), *keep.stride(),
            H, C, max(1, ranking.drop), BLOCK=block, num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False,
        )  # fmt: skip
        return out

    return launch("evict", score, run)

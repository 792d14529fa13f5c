"""The steady decode step's slot write in one Triton kernel: victim selection + writing the new token.

At steady state (squeezekit.layers.BudgetedLayer.steady) each decode step replaces, in every (sequence, KV head) row,
the slot the evictor ranks lowest by the new token. The plain path takes ~15 small kernels per layer for it (NaN
check of the scores, the ranking key, min, ties, argmin, four scatters); this kernel does it in one, with the
same choice as `squeezekit.selection.victim_slots` (``protect_newest=False``): the lowest score (NaN counts as
-inf, an invalid slot as +inf), ties to the older token, then to the lower slot. It also records, without a host
sync, whether any score is NaN (what `SqueezeCache.check_nan_later` records).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from . import interpreting, launch, use

if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)


def _steady_write(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Score, Valid, Pos, Keys, Values, Stat, Fill, KNew, VNew, NewPos, Victim, NanFlag,
    ssb, ssh, sss,
    svb, svh, svs,
    spb, sph, sps,
    skb, skh, sks, skd,
    sxb, sxh, sxs, sxd,
    sab, sah, sas,
    snb, snh, snd,
    smb, smh, smd,
    H, S, D,
    HAS_STAT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # 64-bit offsets: large batches of long buffers
    h = pid % H
    best_key = tl.full([], float("inf"), tl.float32)
    best_pos = tl.full([], 2147483647, tl.int32)
    best_slot = tl.full([], 2147483647, tl.int32)
    any_nan = tl.full([], 0, tl.int32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        ok = offs < S
        score = tl.load(Score + b * ssb + h * ssh + offs * sss, mask=ok, other=0.0).to(tl.float32)
        valid = tl.load(Valid + b * svb + h * svh + offs * svs, mask=ok, other=0) != 0
        pos = tl.load(Pos + b * spb + h * sph + offs * sps, mask=ok, other=0)
        nan = score != score
        any_nan = tl.maximum(any_nan, tl.max((nan & ok).to(tl.int32), 0))
        key = tl.where(nan, float("-inf"), score)
        key = tl.where(valid & ok, key, float("inf"))
        kmin = tl.min(key, 0)
        cand = (key == kmin) & ok
        pmin = tl.min(tl.where(cand, pos, 2147483647), 0)
        smin = tl.min(tl.where(cand & (pos == pmin), offs, 2147483647), 0)
        better = (kmin < best_key) | ((kmin == best_key) & (pmin < best_pos))
        best_key = tl.where(better, kmin, best_key)
        best_pos = tl.where(better, pmin, best_pos)
        best_slot = tl.where(better, smin, best_slot)
    victim = best_slot
    tl.store(Victim + pid, victim.to(tl.int64))
    if any_nan > 0:
        tl.store(NanFlag, 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(KNew + b * snb + h * snh + offs_d * snd, mask=d_ok)
    v = tl.load(VNew + b * smb + h * smh + offs_d * smd, mask=d_ok)
    tl.store(Keys + b * skb + h * skh + victim * sks + offs_d * skd, k, mask=d_ok)
    tl.store(Values + b * sxb + h * sxh + victim * sxs + offs_d * sxd, v, mask=d_ok)
    new_pos = tl.load(NewPos + b)
    tl.store(Pos + b * spb + h * sph + victim * sps, new_pos.to(tl.int32))
    if HAS_STAT:
        tl.store(Stat + b * sab + h * sah + victim * sas, Fill)


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_steady_write)


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernel serves tensors on ``tensor``'s device now (on, not failed before)."""
    return use("steady", tensor)


def steady_write(
    score: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    stat: torch.Tensor | None,
    fill: float,
    k: torch.Tensor,
    v: torch.Tensor,
    new_pos: torch.Tensor,
    nan_flag: torch.Tensor,
) -> torch.Tensor | None:
    """Replace each row's victim slot by the new token, in place; returns the victims (B, H, 1) long, or None when
    the kernel is off for this device (or failed before: the caller then runs its plain path).

    score/valid/positions (B, H, S); keys/values (B, H, S, D); stat (B, H, S) fp32 or None: a per-slot statistic
    whose victim slot is reset to ``fill``; k/v (B, H, 1, D); new_pos (B, 1) long; nan_flag: a bool scalar tensor
    set to True when a score is NaN.
    """
    if not use("steady", keys):
        return None
    B, H, S, D = keys.shape
    victim = torch.empty(B, H, 1, dtype=torch.long, device=keys.device)

    def run() -> torch.Tensor:
        kernel = _kernel()
        valid8 = valid.view(torch.int8) if valid.dtype == torch.bool else valid
        flag8 = nan_flag.view(torch.uint8) if nan_flag.dtype == torch.bool else nan_flag
        pos = new_pos.reshape(B).contiguous()
        stat_ = stat if stat is not None else score  # never written without HAS_STAT
        block_s = min(1024, max(16, triton.next_power_of_2(S)))
        kernel[(B * H,)](
            score, valid8, positions, keys, values, stat_, float(fill), k, v, pos, victim, flag8,
            *score.stride(), *valid8.stride(), *positions.stride(), *keys.stride(), *values.stride(), *stat_.stride(),
            k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
            H, S, D, HAS_STAT=stat is not None, BLOCK_S=16 if interpreting() else block_s,
            BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4,
        )  # fmt: skip
        return victim

    return launch("steady", keys, run)

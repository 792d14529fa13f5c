"""The steady decode step's slot write in one Triton kernel: victim selection, quantization, writing the new token.

At steady state (squeezekit.layers.BudgetedLayer.steady) each decode step replaces, in every (sequence, KV head) row,
the slot the evictor ranks lowest by the new token. The plain path takes ~15 small kernels per layer for it (NaN
check of the scores, the ranking key, min, ties, argmin, four scatters), and ~15 more per part with quantized slots
(squeezekit.quantized.SlotCodec.encode); this kernel does it in one, with the same choice as
`squeezekit.selection.victim_slots` (``protect_newest=False``): the lowest score (NaN counts as -inf, an invalid
slot as +inf), ties to the older token, then to the lower slot. It also records, without a host sync, whether any
score is NaN (what `SqueezeCache.check_nan_later` records).

Where it writes: a layer's rectangular slot buffers (B, H, C, n), or a pool of per-head segments (rows (N, n),
squeezekit.layers.HeadPool: logical slot i of head (b, h) is row ``offsets[b, h] + i``; slots past a segment are
invalid, so never the victim); in buffers with free slots (rows of unequal budgets), the victim's slot is freed
and the new token takes the first free one, as the plain path does. What it writes: the new key and value in the
model's dtype, or their 8-bit or 4-bit codes and scales, bit for bit what `SlotCodec.encode` gives: the same fp32
operations in the same order, IEEE division (``div_rn``), round-to-nearest-even conversions and roundings, and no
fused multiply-adds (``enable_fp_fusion=False``), so that the kernel and the torch path keep identical caches
(tests). On an H100 the 8-bit bytes were identical and the 4-bit ones were not, so 4-bit slots take the plain path
(`FUSED_BITS`) until that is mended.
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

    from ..quantized import SlotCodec
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)


def _steady_write(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Score, Valid, Pos, Stat, Fill, KNew, VNew, NewPos, Victim, NanFlag, Offsets,
    KCodes, KScale, KLow, VCodes, VScale, VLow,
    ssb, ssh, sss,
    svb, svh, svs,
    spb, sph, sps,
    sab, sah, sas,
    snb, snh, snd,
    smb, smh, smd,
    kcb, kch, kcs, kcd,
    vcb, vch, vcs, vcd,
    xsb, xsh, xss, xsg,
    H, S, D,
    HAS_STAT: tl.constexpr, POOLED: tl.constexpr, HOLES: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_GR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # 64-bit offsets: large batches of long buffers
    h = pid % H
    best_key = tl.full([], float("inf"), tl.float32)
    best_pos = tl.full([], 2147483647, tl.int32)
    best_slot = tl.full([], 2147483647, tl.int32)
    any_nan = tl.full([], 0, tl.int32)
    first_free = tl.full([], 2147483647, tl.int32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        ok = offs < S
        score = tl.load(Score + b * ssb + h * ssh + offs * sss, mask=ok, other=0.0).to(tl.float32)
        valid = tl.load(Valid + b * svb + h * svh + offs * svs, mask=ok, other=0) != 0
        pos = tl.load(Pos + b * spb + h * sph + offs * sps, mask=ok, other=0)
        nan = score != score
        any_nan = tl.maximum(any_nan, tl.max((nan & ok).to(tl.int32), 0))
        if HOLES:
            first_free = tl.minimum(first_free, tl.min(tl.where(ok & ~valid, offs, 2147483647), 0))
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
    if HOLES:  # free the victim's slot, write into the first free one (the general path's _make_room + _append)
        tl.store(Valid + b * svb + h * svh + victim * svs, 0)
        victim = tl.minimum(victim, first_free)
        tl.store(Valid + b * svb + h * svh + victim * svs, 1)
    tl.store(Victim + pid, victim.to(tl.int64))
    if any_nan > 0:
        tl.store(NanFlag, 1)
    new_pos = tl.load(NewPos + b)
    tl.store(Pos + b * spb + h * sph + victim * sps, new_pos.to(tl.int32))
    if HAS_STAT:
        tl.store(Stat + b * sab + h * sah + victim * sas, Fill)
    # where the victim's slot is stored: (b, h, victim) of the buffers, or its pool row (strides of b and h are 0)
    slot = victim.to(tl.int64)
    if POOLED:
        slot += tl.load(Offsets + pid)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(KNew + b * snb + h * snh + offs_d * snd, mask=d_ok, other=0.0)
    v = tl.load(VNew + b * smb + h * smh + offs_d * smd, mask=d_ok, other=0.0)
    k_at = b * kcb + h * kch + slot * kcs
    v_at = b * vcb + h * vch + slot * vcs
    s_at = b * xsb + h * xsh + slot * xss
    if QBITS == 16:
        tl.store(KCodes + k_at + offs_d * kcd, k, mask=d_ok)
        tl.store(VCodes + v_at + offs_d * vcd, v, mask=d_ok)
    elif QBITS == 8:
        _encode8(k.to(tl.float32), d_ok, KCodes + k_at, kcd, KScale + s_at, BLOCK_D)
        _encode8(v.to(tl.float32), d_ok, VCodes + v_at, vcd, VScale + s_at, BLOCK_D)
    else:
        _encode4(k.to(tl.float32), D, KCodes + k_at, kcd, KScale + s_at, KLow + s_at, xsg, GROUP, BLOCK_D, BLOCK_GR)
        _encode4(v.to(tl.float32), D, VCodes + v_at, vcd, VScale + s_at, VLow + s_at, xsg, GROUP, BLOCK_D, BLOCK_GR)


def _up(h):  # type: ignore[no-untyped-def]  # (a Triton function)
    """The next fp16 above a non-negative ``h`` (torch.nextafter toward +inf)."""
    return (h.to(tl.int16, bitcast=True) + 1).to(tl.int16).to(tl.float16, bitcast=True)


def _down(h):  # type: ignore[no-untyped-def]  # (a Triton function)
    """The next fp16 below ``h`` (torch.nextafter toward -inf; from either zero: -2**-24)."""
    bits = h.to(tl.int16, bitcast=True)
    bits = tl.where(h > 0, bits - 1, tl.where(h < 0, bits + 1, -32767))
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


def _at_least(x):  # type: ignore[no-untyped-def]  # (a Triton function)
    """``x`` (fp32, >= 0) in fp16, rounded up (squeezekit.quantized._fp16_at_least)."""
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) < x, _up(h), h)


def _rint(x):  # type: ignore[no-untyped-def]  # (a Triton function)
    """``x`` (fp32, magnitude below 2**22) to the nearest integer, ties to even (torch.round's rule): adding and
    subtracting 1.5 * 2**23 rounds away the fraction, with no libdevice call (which Triton's interpreter lacks)."""
    return (x + 12582912.0) - 12582912.0


def _encode8(x, d_ok, Codes, scd, Scale, BLOCK_D: tl.constexpr):  # type: ignore[no-untyped-def]
    """One slot's 8-bit codes and scale, as SlotCodec.encode: symmetric, absmax / 127 rounded up to fp16."""
    absmax = tl.max(tl.abs(x), 0)
    scale = _at_least(tl.math.div_rn(absmax, 127.0))
    scale = tl.where(scale.to(tl.float32) * 127.0 < absmax, _up(scale), scale)
    s = scale.to(tl.float32)
    q = tl.where(s > 0, tl.math.div_rn(x, tl.where(s > 0, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(_rint(q), -127.0), 127.0)
    tl.store(Codes + tl.arange(0, BLOCK_D) * scd, q.to(tl.int8), mask=d_ok)
    tl.store(Scale, scale)


def _encode4(  # type: ignore[no-untyped-def]  # (a Triton function)
    x, D, Codes, scd, Scale, Low, ssg, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_GR: tl.constexpr
):
    """One slot's 4-bit codes, scales and lows, as SlotCodec.encode: per group of GROUP channels, low = min rounded
    down to fp16, scale = (max - low) / 15 rounded up (and once more if low + 15 scale falls short of max); two
    channels a byte, the even one low."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_GR)
    member = ((offs_d[None, :] // GROUP) == offs_g[:, None]) & (offs_d < D)[None, :]  # (group, channel)
    low = tl.min(tl.where(member, x[None, :], float("inf")), 1)
    high = tl.max(tl.where(member, x[None, :], float("-inf")), 1)
    g_ok = offs_g * GROUP < D
    low = tl.where(g_ok, low, 0.0)
    high = tl.where(g_ok, high, 0.0)
    low16 = low.to(tl.float16)
    low16 = tl.where(low16.to(tl.float32) > low, _down(low16), low16)
    lowf = low16.to(tl.float32)
    scale16 = _at_least(tl.math.div_rn(high - lowf, 15.0))
    top = lowf + 15.0 * scale16.to(tl.float32)
    scale16 = tl.where(top < high, _up(scale16), scale16)
    tl.store(Scale + offs_g * ssg, scale16, mask=g_ok)
    tl.store(Low + offs_g * ssg, low16, mask=g_ok)
    # each channel's group's low and scale
    s = tl.max(tl.where(member, scale16.to(tl.float32)[:, None], float("-inf")), 0)
    lo = tl.max(tl.where(member, lowf[:, None], float("-inf")), 0)
    q = tl.where(s > 0, tl.math.div_rn(x - lo, tl.where(s > 0, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(_rint(q), 0.0), 15.0)
    q = tl.where(offs_d < D, q, 0.0).to(tl.uint8)
    even, odd = tl.split(tl.reshape(q, [BLOCK_D // 2, 2]))
    offs_h = tl.arange(0, BLOCK_D // 2)
    tl.store(Codes + offs_h * scd, even | (odd << 4), mask=offs_h < (D + 1) // 2)


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl, _up, _down, _at_least, _rint, _encode8, _encode4
    import triton
    import triton.language as tl

    # (the kernel finds its functions among its globals when it compiles)
    _up, _down, _at_least, _rint = (triton.jit(f) for f in (_up, _down, _at_least, _rint))
    _encode8, _encode4 = triton.jit(_encode8), triton.jit(_encode4)
    return triton.jit(_steady_write)


def available(tensor: torch.Tensor, codec: SlotCodec | None = None) -> bool:
    """Whether the kernel serves tensors on ``tensor``'s device now (on, not failed before), for slots stored
    with ``codec`` (None: the model's dtype; see `FUSED_BITS`)."""
    return use("steady", tensor) and (16 if codec is None else codec.bits) in FUSED_BITS


#: the slot precisions the fused write serves. 4-bit slots take the plain path: on an H100 (2026-12-07,
#: ``benchmarks/gpu_perf.py --stages correctness``) the kernel's 4-bit codes and scales differed from what
#: `SlotCodec.encode` writes, although they are equal under Triton's interpreter (tests/test_quantized.py sets 4 here to
#: test the kernel itself); 8-bit ones were the same, bit for bit
FUSED_BITS: tuple[int, ...] = (16, 8)


def steady_write(
    score: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    keys: tuple[torch.Tensor, ...],
    values: tuple[torch.Tensor, ...],
    stat: torch.Tensor | None,
    fill: float,
    k: torch.Tensor,
    v: torch.Tensor,
    new_pos: torch.Tensor,
    nan_flag: torch.Tensor,
    codec: SlotCodec | None = None,
    offsets: torch.Tensor | None = None,
    holes: bool = False,
) -> torch.Tensor | None:
    """Replace each row's victim slot by the new token, in place; returns the victims (B, H, 1) long, or None when
    the kernel is off for this device (or failed before, or the scales and lows are laid out unlike each other:
    the caller then runs its plain path).

    score/valid/positions (B, H, S); keys/values: the parts the layer stores them in, (keys,) / (values,) in the
    model's dtype or with ``codec`` its parts (codes, scale[, low]: squeezekit.quantized), each (B, H, C, n), or
    (N, n) rows of a pool with ``offsets`` (B, H) int64 contiguous, each head's first row; stat (B, H, S) fp32 or
    None: a per-slot statistic whose victim slot is reset to ``fill``; k/v (B, H, 1, D); new_pos (B, 1) long;
    nan_flag: a bool scalar tensor set to True when a score is NaN. ``holes`` (buffers only): some slots are free;
    the victim's slot is freed and the new token goes into the first free slot (``valid`` is updated), which the
    returned slots then name.
    """
    if not available(k, codec):
        return None
    bits = 16 if codec is None else codec.bits
    B, H, S = score.shape
    D = k.shape[-1]
    victim = torch.empty(B, H, 1, dtype=torch.long, device=k.device)
    pooled = offsets is not None

    def strides(t: torch.Tensor) -> tuple[int, ...]:  # (b, h, slot, channel): a pool row stands for the slot
        return (0, 0, *t.stride()) if pooled else tuple(t.stride())

    k_codes, v_codes = keys[0], values[0]
    k_scale, k_low = (keys[1], keys[-1]) if codec is not None else (k_codes, k_codes)
    v_scale, v_low = (values[1], values[-1]) if codec is not None else (v_codes, v_codes)
    scale_strides = strides(k_scale) if codec is not None else (0, 0, 0, 0)  # (unused at 16 bits)
    if codec is not None and any(strides(t) != scale_strides for t in (k_low, v_scale, v_low)):
        return None  # the kernel takes one layout for the scales and lows (they are made alike): the plain path
    assert offsets is None or (offsets.is_contiguous() and offsets.dtype == torch.int64 and offsets.shape == (B, H))
    group = D if codec is None else codec.group

    def run() -> torch.Tensor:
        kernel = _kernel()
        valid8 = valid.view(torch.int8) if valid.dtype == torch.bool else valid
        flag8 = nan_flag.view(torch.uint8) if nan_flag.dtype == torch.bool else nan_flag
        pos = new_pos.reshape(B).contiguous()
        stat_ = stat if stat is not None else score  # never written without HAS_STAT
        block_s = min(1024, max(16, triton.next_power_of_2(S)))
        block_d = max(16, triton.next_power_of_2(D))
        extra = {} if interpreting() else {"enable_fp_fusion": False}  # (the interpreter rounds every operation)
        kernel[(B * H,)](
            score, valid8, positions, stat_, float(fill), k, v, pos, victim, flag8,
            offsets if offsets is not None else pos,
            k_codes, k_scale, k_low, v_codes, v_scale, v_low,
            *score.stride(), *valid8.stride(), *positions.stride(), *stat_.stride(),
            k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
            *strides(k_codes), *strides(v_codes), *scale_strides,
            H, S, D, HAS_STAT=stat is not None, POOLED=pooled, HOLES=holes and not pooled, QBITS=bits, GROUP=group,
            BLOCK_S=16 if interpreting() else block_s, BLOCK_D=block_d,
            BLOCK_GR=max(2, triton.next_power_of_2(-(-D // group))), num_warps=4, **extra,
        )  # fmt: skip
        return victim

    return launch("steady", k, run)

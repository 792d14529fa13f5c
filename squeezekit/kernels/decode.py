"""Decode attention over a full slot buffer (the steady decode step) in Triton: split-KV flash decoding with the
query heads of a KV head processed together (grouped-query attention reads each key and value once).

The plain path folds the G query heads of a KV head into SDPA's query axis and copies the output back into
transformers' layout; this kernel writes (B, 1, Hq, D) directly. Stage 1: each program takes one (sequence, KV head)
and a contiguous share of the slots, and keeps an online softmax for its G heads (padded to 16 rows for the tensor
cores); stage 2 merges the shares by their log-sum-exp. With one share per row (large batches) stage 1 writes the
output itself. No mask: every slot is valid and within any window (``full_buffer`` in squeezekit.attention).

The same kernel reads a layer's keys and values as rows (``POOLED``: a pool of per-head segments, or a buffer's
slots laid out as rows), with a slot mask applied to the scores (the K/V loads depend on the slot range alone, so
that they pipeline); with quantized slots (``QBITS`` 8 or 4, squeezekit.quantized) it loads the codes and their
scales, so a step reads about a half or a quarter of the bytes: 8-bit codes go into the dot products as they are
(integers up to 127 are exact in bf16) and each slot's scale multiplies its score and its probability; 4-bit tiles
are unpacked and dequantized in registers (fp32, then the query's dtype).

The dots run with the G query heads on their M axis, or (``SLOTS_M``) with the tile's slots on it: scores as
``K @ Q^T`` and the output as ``V^T @ P^T``, so that the key and value tiles are the dots' first operand, which
Hopper's tensor cores take from registers (where a quantized tile is converted) rather than from shared memory.
The same products in either orientation; `TILES` picks the orientation with the tile (benchmarks/decode_tiles.py).

With a 16-bit query, quantized tiles may enter fp16 dots with no conversion instruction (``FP16_CODES``; those run
at a quarter of the integer and fp16 rate on Hopper and bound a quantized tile's conversion): an 8-bit code c is
the mantissa of the fp16 1024 + (c + 128), minus 1152 (exact); a 4-bit nibble n that of 1024 + n, times its fp16
scale plus its fp16 low in one fused multiply-add (rounded once, as the torch path's fp32 dequantization rounded to
fp16). The query goes into fp16 with each row scaled by a power of two into [1, 2), and an 8-bit tile's weights
(probability times the slot's scale) by a power of two to at most 2, both undone in fp32: exact rescalings, so
the products keep fp16's 11 bits where bf16 keeps 8, and no weight of a tiny value falls into fp16's subnormals.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from . import interpreting, launch, processors, use

if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface

    from ..quantized import SlotCodec
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)
LOG2E = 1.4426950408889634


def _split(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, V, Out, PartAcc, PartM, PartL, Offsets, Valid, Lengths, KScale, KLow, VScale, VLow,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, sod,
    smb, smh, smn,
    sks, svs,
    H, G, S, D, per_split, scale_log2,
    ONE_SPLIT: tl.constexpr, POOLED: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QBITS: tl.constexpr = 16, GROUP: tl.constexpr = 1, SLOTS_M: tl.constexpr = False,
    FP16_CODES: tl.constexpr = False,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: tensors past 2**31 elements
    h = pid_bh % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    hq = h * G + offs_g
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if FP16_CODES:  # the query in fp16, each row scaled by a power of two into [1, 2) (exact); see _codes16
        q_inv, q_back = _pow2(tl.max(tl.abs(q.to(tl.float32)), 1))
        q_dot = (q.to(tl.float32) * q_inv[:, None]).to(tl.float16)
    else:
        q_dot = q
    if SLOTS_M:  # the slots on the dots' M axis: the key and value tiles are their first operand, in registers
        q_t = tl.trans(q_dot)
        acc = tl.zeros([BLOCK_D, BLOCK_G], tl.float32)  # transposed
    else:
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    lo = split * per_split
    hi = tl.minimum(S, lo + per_split)
    if POOLED:  # a head's segment ends at its length: the work follows the sum of the heads' budgets, not the largest
        hi = tl.minimum(hi, tl.load(Lengths + pid_bh))
        base = tl.load(Offsets + pid_bh)  # the segment's first pool row: its slots are consecutive rows
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_in = offs_n < hi
        # K/V loads depend on the slot range alone, so that they pipeline; validity masks the scores (a free slot
        # holds a finite stale or zero entry, whose probability is 0)
        kv_ok = n_in[:, None] & d_ok[None, :]
        if POOLED:  # logical slot i of a head is its segment's row base + i (contiguous loads)
            rows = base + offs_n
            n_ok = n_in & (tl.load(Valid + b * smb + h * smh + offs_n * smn, mask=n_in, other=0) != 0)
            k_ptr = K + rows[:, None] * skn + offs_d[None, :] * skd
            v_ptr = V + rows[:, None] * svn + offs_d[None, :] * svd
        else:
            n_ok = n_in
            k_ptr = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
            v_ptr = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
        if QBITS == 16:
            k = tl.load(k_ptr, mask=kv_ok, other=0.0)
        elif QBITS == 8:  # int8 codes (exact in the query's dtype); the slot's scale multiplies its score
            codes = tl.load(k_ptr, mask=kv_ok, other=0)
            k = _codes16(codes) if FP16_CODES else codes.to(q.dtype)
        else:  # 4 bits: a slot's bytes, two channels each (even channel low); code * scale + low per group
            k = _unpack4(K, KScale, KLow, rows, n_in, skn, skd, sks, D, BLOCK_N, BLOCK_D, GROUP, FP16_CODES)
            k = k if FP16_CODES else k.to(q.dtype)
        if SLOTS_M:
            s = tl.trans(tl.dot(k, q_t, input_precision=DOT_PREC))
        else:
            s = tl.dot(q_dot, tl.trans(k), input_precision=DOT_PREC)
        if QBITS == 8:
            k_s = tl.load(KScale + rows * sks, mask=n_in, other=0.0).to(tl.float32)
            s = s * (k_s * scale_log2)[None, :]
        else:
            s = s * scale_log2
        if FP16_CODES:
            s = s * q_back[:, None]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QBITS == 16:
            v = tl.load(v_ptr, mask=kv_ok, other=0.0)
            pw = p.to(q.dtype)
        elif QBITS == 8:  # the slot's scale multiplies its probability
            codes = tl.load(v_ptr, mask=kv_ok, other=0)
            v_s = tl.load(VScale + rows * svs, mask=n_in, other=0.0).to(tl.float32)
            pw = p * v_s[None, :]
            if FP16_CODES:  # the tile's weights scaled by a power of two to at most 2, into fp16's range
                p_inv, p_back = _pow2(tl.max(tl.max(pw, 1), 0))
                v = _codes16(codes)
                pw = (pw * p_inv).to(tl.float16)
            else:
                v = codes.to(q.dtype)
                pw = pw.to(q.dtype)
        else:  # (probabilities are at most 1: in fp16's range as they are)
            v = _unpack4(V, VScale, VLow, rows, n_in, svn, svd, svs, D, BLOCK_N, BLOCK_D, GROUP, FP16_CODES)
            v = v if FP16_CODES else v.to(q.dtype)
            pw = p.to(v.dtype)
        if SLOTS_M:
            pv = tl.dot(tl.trans(v), tl.trans(pw), input_precision=DOT_PREC)
        else:
            pv = tl.dot(pw, v, input_precision=DOT_PREC)
        if FP16_CODES and QBITS == 8:
            pv = pv * p_back
        if SLOTS_M:
            acc = acc * alpha[None, :] + pv
        else:
            acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SLOTS_M:
        acc = tl.trans(acc)
    mask = g_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * sob + hq[:, None] * soh + offs_d[None, :] * sod, out.to(Out.dtype.element_ty), mask=mask)
    else:
        row = (pid_bh * nsplit + split) * BLOCK_G + offs_g  # (B*H, nsplit, BLOCK_G[, BLOCK_D]) fp32 partials
        tl.store(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask)
        tl.store(PartM + row, m_i, mask=g_ok)
        tl.store(PartL + row, l_i, mask=g_ok)


def _codes16(codes):  # type: ignore[no-untyped-def]  # (a Triton function, called by _split)
    """int8 codes in [-127, 127] as fp16, exactly, with integer operations and one fp16 subtraction: c + 128 as the
    mantissa of 1024 + (c + 128), minus 1152. Converting instructions run at a quarter of the integer and fp16
    rate on Hopper and bound an 8-bit tile's conversion to the query's dtype (``codes.to(q.dtype)``)."""
    u = (codes.to(tl.uint8, bitcast=True) ^ 128).to(tl.int16)
    return (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - tl.full((), 1152.0, tl.float16)


def _pow2(x):  # type: ignore[no-untyped-def]  # (a Triton function, called by _split)
    """For x >= 0 (fp32): (2**-e, 2**e) with x * 2**-e in [1, 2) (both 1 for zero or a subnormal x): an exact
    rescaling into fp16's range and back."""
    e = (x.to(tl.int32, bitcast=True) >> 23) & 255
    e = tl.where(e == 0, 127, tl.minimum(e, 253))
    return ((254 - e) << 23).to(tl.float32, bitcast=True), (e << 23).to(tl.float32, bitcast=True)


def _unpack4(  # type: ignore[no-untyped-def]  # (a Triton function, called by _split)
    Codes, Scale, Low, rows, n_in, scn, scd, ss, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, F16: tl.constexpr = False,
):  # fmt: skip
    """(BLOCK_N, BLOCK_D) fp32: the 4-bit slots ``rows`` dequantized (two channels a byte, the even one low; code *
    scale + low per group of GROUP channels, one group a slot when GROUP >= BLOCK_D). ``F16``: in fp16, with no
    conversion instruction (a nibble n is the mantissa of 1024 + n; the scales and lows are stored in fp16)."""
    offs_h = tl.arange(0, BLOCK_D // 2)
    h_ok = n_in[:, None] & (offs_h < (D + 1) // 2)[None, :]
    byte = tl.load(Codes + rows[:, None] * scn + offs_h[None, :] * scd, mask=h_ok, other=0)
    nibbles = tl.interleave(byte & 15, byte >> 4)
    if F16:
        one = (nibbles.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        code = one - tl.full((), 1024.0, tl.float16)
        kind = tl.float16
    else:
        code = nibbles.to(tl.float32)
        kind = tl.float32
    if GROUP >= BLOCK_D:
        scale = tl.load(Scale + rows * ss, mask=n_in, other=0.0).to(kind)
        low = tl.load(Low + rows * ss, mask=n_in, other=0.0).to(kind)
        x = tl.fma(code, scale[:, None], low[:, None])  # (in fp16: rounded once, as torch's fp32 then fp16)
    else:
        offs_gr = tl.arange(0, BLOCK_D // GROUP)
        g_ptr = rows[:, None] * ss + offs_gr[None, :]
        g_ok = n_in[:, None] & (offs_gr < (D + GROUP - 1) // GROUP)[None, :]
        scale = tl.load(Scale + g_ptr, mask=g_ok, other=0.0).to(kind)
        low = tl.load(Low + g_ptr, mask=g_ok, other=0.0).to(kind)
        code3 = tl.reshape(code, [BLOCK_N, BLOCK_D // GROUP, GROUP])
        x = tl.reshape(tl.fma(code3, scale[:, :, None], low[:, :, None]), [BLOCK_N, BLOCK_D])
    return x


def _merge(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Out, PartAcc, PartM, PartL,
    sob, soh, sod,
    H, G, D, nsplit,
    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one (b, hq)
    b = (pid // (H * G)).to(tl.int64)
    hq = pid % (H * G)
    h = hq // G
    g = hq % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.full([], float("-inf"), tl.float32)
    for i in range(0, nsplit):
        m = tl.maximum(m, tl.load(PartM + ((b * H + h) * nsplit + i) * BLOCK_G + g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, nsplit):
        row = ((b * H + h) * nsplit + i) * BLOCK_G + g
        w = tl.exp2(tl.load(PartM + row) - m_safe)
        den += w * tl.load(PartL + row)
        acc += w * tl.load(PartAcc + row * BLOCK_D + offs_d, mask=d_ok, other=0.0)
    out = acc / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + b * sob + hq * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[KernelInterface, KernelInterface]:
    global triton, tl, _unpack4, _codes16, _pow2
    import triton
    import triton.language as tl

    # (the kernel finds its functions among its globals when it compiles)
    _unpack4, _codes16, _pow2 = triton.jit(_unpack4), triton.jit(_codes16), triton.jit(_pow2)
    return triton.jit(_split), triton.jit(_merge)


def splits(B: int, H: int, S: int, sms: int, block_n: int) -> int:
    """Shares of the slots per (sequence, KV head): enough programs for ~4 per SM, each at least 2 tiles long."""
    if B * H >= 2 * sms:
        return 1
    want = -(-4 * sms // (B * H))
    return max(1, min(want, S // (2 * block_n)))


#: (slot bits, head_dim <= 128) -> (BLOCK_N, num_warps, num_stages[, SLOTS_M]) of the decode kernel on CUDA; others take
#: (64 slots, or 32 past 128 channels; 4 warps; 3 stages). The fastest of 24 tiles each on an H200 (Mistral-7B
#: shapes, B = 256 and 512, 820 slots a head: benchmarks/decode_tiles.py, docs/benchmarks/kv-bits/): 16 bits read at
#: 4.2 TB/s (SDPA's speed), 8 bits at 2.0-2.2 TB/s, 4 bits at 0.6 TB/s (bound by the unpacking, not the bytes).
#: 4 bits since 2026-12-07: slots on the M axis with the nibbles entered into fp16 dots (SLOTS_M, FP16_CODES), 370 us
#: against 410 us for (32, 4, 2) on an H100 at B = 256, and closer to fp32 (max error 0.0021 against 0.0039); for 8
#: bits neither option paid there (docs/benchmarks/kv-bits/).
TILES: dict[tuple[int, bool], tuple[int, ...]] = {
    (16, True): (64, 4, 2),
    (8, True): (128, 4, 3),
    (4, True): (64, 4, 2, 1, 1),
}


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """query (B, Hq, 1, D); key/value (B, H, S, D), every slot valid. Returns (B, 1, Hq, D), or None when the kernel
    is off for this device (or failed before: the caller then runs its plain path)."""
    if not use("decode", query) or query.shape[2] != 1:
        return None
    return _launch("decode", query, (key,), (value,), scaling, None, None)


def pooled_decode_attention(
    query: torch.Tensor,
    key_parts: tuple[torch.Tensor, ...],
    value_parts: tuple[torch.Tensor, ...],
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    codec: SlotCodec | None = None,
    tile: tuple[int, ...] | None = None,
) -> torch.Tensor | None:
    """Decode attention over a layer's keys and values as rows (squeezekit.layers.SlotRows: a pool of per-head
    segments, or quantized slots): query (B, Hq, 1, D); key_parts/value_parts: (N, D) rows in the query's dtype, or
    with ``codec`` the quantized parts (codes, scale[, low]: squeezekit.quantized), dequantized inside the tiles;
    offsets (B, H) int64 contiguous, each head's first row (logical slot i of the head is row offsets + i); lengths
    (B, H) int32 contiguous, each head's segment length (its program reads no slot past it); valid (B, H, S) bool:
    the slots attended to (every real token held: a decode query may see them all). Only the valid slots' rows are
    read, as contiguous tiles. Returns (B, 1, Hq, D), or None when the kernel is off for this device. ``tile``:
    (BLOCK_N, num_warps, num_stages) instead of `TILES`' (benchmarks/decode_tiles.py)."""
    if not use("pooled", query) or query.shape[2] != 1:
        return None
    return _launch("pooled", query, key_parts, value_parts, scaling, offsets, valid, lengths, codec, tile)


def _launch(
    name: str,
    query: torch.Tensor,
    key_parts: tuple[torch.Tensor, ...],
    value_parts: tuple[torch.Tensor, ...],
    scaling: float,
    offsets: torch.Tensor | None,
    valid: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
    codec: SlotCodec | None = None,
    tile: tuple[int, ...] | None = None,
) -> torch.Tensor | None:
    B, Hq, _, D = query.shape
    key, value = key_parts[0], value_parts[0]
    bits = 16 if codec is None else codec.bits
    # 4 bits: channels per scale group, or the whole tile when a slot is one group (GROUP >= BLOCK_D)
    group = 1 if codec is None else (codec.group if codec.groups > 1 else 1 << 30)
    # the scales (and 4-bit lows) of keys and values: (N, groups) contiguous rows; unused at 16 bits
    k_scale, k_low = (key_parts[1], key_parts[-1]) if codec is not None else (key, key)
    v_scale, v_low = (value_parts[1], value_parts[-1]) if codec is not None else (value, value)
    for t in (k_scale, v_scale):
        assert codec is None or (t.stride(-1) == 1 and t.dim() == 2), "scales must be (N, groups) rows"
    pooled = offsets is not None
    if offsets is not None and valid is not None:
        H, S = valid.shape[1], valid.shape[2]
        valid8 = valid.view(torch.int8) if valid.dtype == torch.bool else valid
        key_strides = (0, 0, *key.stride())  # (pool rows: the row stride stands for the slot stride)
        value_strides = (0, 0, *value.stride())
        map_strides = tuple(valid8.stride())
        assert offsets.is_contiguous() and offsets.dtype == torch.int64 and offsets.shape == (B, H)
        assert lengths is not None and lengths.is_contiguous() and lengths.dtype == torch.int32
    else:
        H, S = key.shape[1], key.shape[2]
        offsets = valid8 = lengths = query  # never read without POOLED
        key_strides, value_strides, map_strides = tuple(key.stride()), tuple(value.stride()), (0, 0, 0)
    G = Hq // H
    interpret = interpreting()

    def run() -> torch.Tensor:
        split, merge = _kernels()
        block_n, warps, stages, *variant = tile or TILES.get((bits, D <= 128), (64 if D <= 128 else 32, 4, 3))
        slots_m = bool(variant and variant[0])
        # 8-bit codes into fp16 dots (_codes16) for 16-bit queries; an fp32 query keeps its exact fp32 products
        fp16_codes = bits < 16 and query.dtype != torch.float32 and len(variant) > 1 and bool(variant[1])
        if interpret:
            block_n = 16
        block_g = max(16, triton.next_power_of_2(G))
        block_d = max(16, triton.next_power_of_2(D))
        nsplit = splits(B, H, S, processors(query.device), block_n)
        per_split = triton.cdiv(triton.cdiv(S, nsplit), block_n) * block_n
        nsplit = triton.cdiv(S, per_split)
        out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)
        if nsplit > 1:
            part_acc = torch.empty(B * H * nsplit * block_g, block_d, dtype=torch.float32, device=query.device)
            part_m = torch.empty(B * H * nsplit * block_g, dtype=torch.float32, device=query.device)
            part_l = torch.empty_like(part_m)
        else:
            part_acc = part_m = part_l = out
        prec = "ieee" if query.dtype == torch.float32 else "tf32"
        extra = {} if interpret else {"num_warps": warps, "num_stages": stages}
        split[(B * H, nsplit)](
            query, key, value, out, part_acc, part_m, part_l, offsets, valid8, lengths, k_scale, k_low, v_scale, v_low,
            query.stride(0), query.stride(1), query.stride(3), *key_strides, *value_strides,
            out.stride(0), out.stride(2), out.stride(3), *map_strides, k_scale.stride(0), v_scale.stride(0),
            H, G, S, D, per_split, float(scaling) * LOG2E,
            ONE_SPLIT=nsplit == 1, POOLED=pooled, DOT_PREC=prec, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
            QBITS=bits, GROUP=group, SLOTS_M=slots_m, FP16_CODES=fp16_codes, **extra,
        )  # fmt: skip
        if nsplit > 1:
            merge[(B * Hq,)](
                out, part_acc, part_m, part_l, out.stride(0), out.stride(2), out.stride(3), H, G, D, nsplit,
                BLOCK_D=block_d, BLOCK_G=block_g, **({} if interpret else {"num_warps": 4}),
            )  # fmt: skip
        return out

    return launch(name, query, run)

"""Decode attention over a full slot buffer (the steady decode step) in Triton: split-KV flash decoding with the
query heads of a KV head processed together (grouped-query attention reads each key and value once).

The plain path folds the G query heads of a KV head into SDPA's query axis and copies the output back into
transformers' layout; this kernel writes (B, 1, Hq, D) directly. Stage 1: each program takes one (sequence, KV head)
and a contiguous share of the slots, and keeps an online softmax for its G heads (padded to 16 rows for the tensor
cores); stage 2 merges the shares by their log-sum-exp. With one share per row (large batches) stage 1 writes the
output itself. No mask: every slot is valid and within any window (``full_buffer`` in squeezekit.attention).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from . import failed, interpreting, is_oom, settings, use

if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)
LOG2E = 1.4426950408889634


def _split(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, V, Out, PartAcc, PartM, PartL, Offsets, Valid, Lengths,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, sod,
    smb, smh, smn,
    H, G, S, D, per_split, scale_log2,
    ONE_SPLIT: tl.constexpr, POOLED: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    lo = split * per_split
    hi = tl.minimum(S, lo + per_split)
    if POOLED:  # a head's segment ends at its length: the work follows the sum of the heads' budgets, not the largest
        hi = tl.minimum(hi, tl.load(Lengths + pid_bh))
        base = tl.load(Offsets + pid_bh)  # the segment's first pool row: its slots are consecutive rows
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if POOLED:  # logical slot i of a head is its segment's row base + i (contiguous loads); valid slots only
            rows = base + offs_n
            n_ok = n_ok & (tl.load(Valid + b * smb + h * smh + offs_n * smn, mask=n_ok, other=0) != 0)
            k_ptr = K + rows[:, None] * skn + offs_d[None, :] * skd
            v_ptr = V + rows[:, None] * svn + offs_d[None, :] * svd
        else:
            k_ptr = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
            v_ptr = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
        k = tl.load(k_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    mask = g_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * sob + hq[:, None] * soh + offs_d[None, :] * sod, out.to(Out.dtype.element_ty), mask=mask)
    else:
        row = (pid_bh * nsplit + split) * BLOCK_G + offs_g  # (B*H, nsplit, BLOCK_G[, BLOCK_D]) fp32 partials
        tl.store(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask)
        tl.store(PartM + row, m_i, mask=g_ok)
        tl.store(PartL + row, l_i, mask=g_ok)


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
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_split), triton.jit(_merge)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits(B: int, H: int, S: int, sms: int, block_n: int) -> int:
    """Shares of the slots per (sequence, KV head): enough programs for ~4 per SM, each at least 2 tiles long."""
    if B * H >= 2 * sms:
        return 1
    want = -(-4 * sms // (B * H))
    return max(1, min(want, S // (2 * block_n)))


def _fall_back_on_error(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """query (B, Hq, 1, D); key/value (B, H, S, D), every slot valid. Returns (B, 1, Hq, D), or None when the kernel
    is off for this device (or failed before: the caller then runs its plain path)."""
    if not use("decode", query) or query.shape[2] != 1:
        return None
    return _launch("decode", query, key, value, scaling, None, None)


def pooled_decode_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """Decode attention over a pool of per-head segments (squeezekit.layers.HeadPool): query (B, Hq, 1, D);
    key_pool/value_pool (N, D); offsets (B, H) int64 contiguous, each head's first pool row (logical slot i of the
    head is row offsets + i); lengths (B, H) int32 contiguous, each head's segment length (its program reads no slot
    past it); valid (B, H, S) bool: the slots attended to (every real token held: a decode query may see them all).
    Only the valid slots' rows are read, as contiguous tiles. Returns (B, 1, Hq, D), or None when the kernel is off
    for this device."""
    if not use("pooled", query) or query.shape[2] != 1:
        return None
    return _launch("pooled", query, key_pool, value_pool, scaling, offsets, valid, lengths)


def _launch(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    offsets: torch.Tensor | None,
    valid: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    B, Hq, _, D = query.shape
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
    try:
        split, merge = _kernels()
        block_n = 16 if interpret else (64 if D <= 128 else 32)
        block_g = max(16, triton.next_power_of_2(G))
        block_d = max(16, triton.next_power_of_2(D))
        nsplit = splits(B, H, S, _sm_count(query.device), block_n)
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
        extra = {} if interpret else {"num_warps": 4, "num_stages": 3}
        split[(B * H, nsplit)](
            query, key, value, out, part_acc, part_m, part_l, offsets, valid8, lengths,
            query.stride(0), query.stride(1), query.stride(3), *key_strides, *value_strides,
            out.stride(0), out.stride(2), out.stride(3), *map_strides,
            H, G, S, D, per_split, float(scaling) * LOG2E,
            ONE_SPLIT=nsplit == 1, POOLED=pooled, DOT_PREC=prec, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
            **extra,
        )  # fmt: skip
        if nsplit > 1:
            merge[(B * Hq,)](
                out, part_acc, part_m, part_l, out.stride(0), out.stride(2), out.stride(3), H, G, D, nsplit,
                BLOCK_D=block_d, BLOCK_G=block_g, **({} if interpret else {"num_warps": 4}),
            )  # fmt: skip
    except Exception as exc:
        if is_oom(exc) or not _fall_back_on_error(query):
            raise
        failed(name, exc)
        return None
    settings.calls[name] += 1
    return out

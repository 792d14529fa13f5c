"""Masked attention over a layer's slots for multi-token steps, and per-slot column sums, in Triton.

The mask is exactly `squeezekit.attention._mask`, built on the fly per tile instead of materialised: a query at
position ``qp`` sees slot ``j`` when the slot is valid, ``pos[j] <= qp`` and, with a sliding window,
``qp - pos[j] < window``; a padding query (``q_valid`` False: it sees no slot) sees every slot, so that its unused
output stays finite, as in the explicit path. Grouped-query attention: query head ``hq`` reads KV head ``hq // G``
(keys and values are never repeated).

Two kernels:

- `_fwd`: flash-style forward (online softmax, fp32 accumulators) returning the output in transformers' layout
  (B, q, Hq, D) and each query row's log-sum-exp (base 2, of the scaled scores).
- `_colsum`: per key block, walks the query rows of the G query heads sharing the KV head, recomputes
  ``p = exp2(s - lse)`` under the same mask and sums it over the valid queries (fp32): the per-slot attention
  H2O accumulates (`squeezekit.policies.Stat.ATTENTION`). Each output element is owned by one program: no atomics,
  the sums are deterministic.

``causal_slots`` (a fresh prefill layer: slot ``i`` holds the step's token ``i``) lets both kernels skip the tiles
above the diagonal; the mask inside the tiles still decides.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import interpreting, is_oom, launch, use

#: Triton is imported on first use (squeezekit.kernels.use checks that it imports); the kernels' annotations are
#: strings (postponed evaluation), so these names need no value before then. The kernels' parameters carry no type
#: annotations besides ``tl.constexpr``: Triton reads a parameter's annotation as its type when it compiles them.
if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface
else:
    triton = tl = None

LOG2E = 1.4426950408889634


def _fwd(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, V, Out, Lse, KVValid, KVPos, QPos, QValid,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, som, soh, sod,
    slb, slh, slm,
    smb, smh, smn,
    spb, spm,
    HQ, G, NQ, NK, D, window, scale_log2, BUCKET,
    HAS_WINDOW: tl.constexpr, CAUSAL_SLOTS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)  # 64-bit offsets: tensors past 2**31 elements
    hq = pid_bh % HQ
    h = hq // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < D
    q = tl.load(
        Q + b * sqb + hq * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    qp = tl.load(QPos + b * spb + offs_m * spm, mask=m_ok, other=-1)
    pad_row = tl.load(QValid + b * spb + offs_m * spm, mask=m_ok, other=0) == 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL_SLOTS:  # a real query i sees slots <= i; a block with padding rows (which see everything) runs to the end
        any_pad = tl.max((pad_row & m_ok).to(tl.int32), 0)
        hi = tl.where(any_pad > 0, NK, tl.minimum(NK, (pid_m + 1) * BLOCK_M))
    kv_base = b * smb + h * smh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        k = tl.load(
            K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        kv = tl.load(KVValid + kv_base + offs_n * smn, mask=n_ok, other=0) != 0
        kp = tl.load(KVPos + kv_base + offs_n * smn, mask=n_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        allowed = kv[None, :] & (kp[None, :] <= qp[:, None])
        if HAS_WINDOW:
            allowed = allowed & ((qp[:, None] - kp[None, :]) < window)
        allowed = (allowed | pad_row[:, None]) & n_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        Out + b * sob + offs_m[:, None] * som + hq * soh + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )  # fmt: skip
    tl.store(Lse + b * slb + hq * slh + offs_m * slm, m_i + tl.log2(l_safe), mask=m_ok)


def _colsum(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, Lse, KVValid, KVPos, QPos, QValid, Sums,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    slb, slh, slm,
    smb, smh, smn,
    spb, spm,
    H, G, NQ, NK, D, window, scale_log2, BUCKET,
    HAS_WINDOW: tl.constexpr, CAUSAL_SLOTS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: tensors past 2**31 elements
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NK
    d_ok = offs_d < D
    k = tl.load(
        K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=n_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    kv_base = b * smb + h * smh
    kv = tl.load(KVValid + kv_base + offs_n * smn, mask=n_ok, other=0) != 0
    kp = tl.load(KVPos + kv_base + offs_n * smn, mask=n_ok, other=0)
    kv = kv & n_ok
    # (slots x queries) tiles: the probabilities accumulate elementwise in the dot's own layout and are reduced over
    # the queries once at the end (no cross-warp reduction per tile)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    lo = 0
    if CAUSAL_SLOTS:  # real queries before this block's first slot see none of it (padding rows are not summed)
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        hq = h * G + g
        for start_m in range(lo, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < NQ
            q = tl.load(
                Q + b * sqb + hq * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0,
            )  # fmt: skip
            lse = tl.load(Lse + b * slb + hq * slh + offs_m * slm, mask=m_ok, other=0.0)
            qp = tl.load(QPos + b * spb + offs_m * spm, mask=m_ok, other=-1)
            qv = tl.load(QValid + b * spb + offs_m * spm, mask=m_ok, other=0) != 0
            s = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
            allowed = kv[:, None] & (kp[:, None] <= qp[None, :]) & (qv & m_ok)[None, :]
            if HAS_WINDOW:
                allowed = allowed & ((qp[None, :] - kp[:, None]) < window)
            acc += tl.where(allowed, tl.exp2(s - lse[None, :]), 0.0)
    tl.store(Sums + pid_bh * NK + offs_n, tl.sum(acc, 1), mask=n_ok)


def _configs(kind: str, wide: bool = False) -> list[triton.Config]:
    """Tile configurations the autotuner tries (bf16/fp16 on the GPU; wgmma tiles for Hopper). ``wide``: head dim
    above 128 (smaller tiles, so that they fit in shared memory)."""
    if wide:
        shapes = [(64, 32, 4, 2), (64, 64, 8, 2)] if kind == "fwd" else [(32, 64, 4, 2), (64, 64, 8, 2)]
    elif kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
    else:
        shapes = [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


#: the tile sizes the interpreter uses (small, so that tests cross many tile boundaries)
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
#: fp32 on the GPU (tests and checks only): one small configuration, no autotuning (fp32 tiles compile slowly)
FP32_LAUNCH = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
FP32_LAUNCH_WIDE = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _launch_options(dtype: torch.dtype, head_dim: int = 128) -> dict[str, int]:
    if interpreting():
        return dict(INTERPRET_BLOCKS)
    if dtype == torch.float32:
        return dict(FP32_LAUNCH if head_dim <= 128 else FP32_LAUNCH_WIDE)
    return {}


def _import_triton() -> None:
    global triton, tl
    import triton
    import triton.language as tl


@functools.lru_cache(maxsize=1)
def _jitted() -> tuple[KernelInterface, KernelInterface]:
    _import_triton()
    return triton.jit(_fwd), triton.jit(_colsum)


@functools.lru_cache(maxsize=2)
def _tuned(wide: bool) -> tuple[KernelInterface, KernelInterface]:
    fwd, colsum = _jitted()
    key = ["BUCKET", "G", "D"]
    return (
        triton.autotune(_configs("fwd", wide), key=key)(fwd),
        triton.autotune(_configs("colsum", wide), key=key)(colsum),
    )


def _kernels(dtype: torch.dtype, head_dim: int = 128) -> tuple[KernelInterface, KernelInterface]:
    """(forward, colsum): autotuned for half precision on the GPU, plain under the interpreter or in fp32."""
    return _jitted() if interpreting() or dtype == torch.float32 else _tuned(head_dim > 128)


def _bucket(n: int) -> int:
    """Tile configurations are tuned per power-of-two bucket of the query count, not per exact length."""
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))


def _mask_inputs(
    kv_valid: torch.Tensor, kv_pos: torch.Tensor, q_pos: torch.Tensor, q_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """The slot and query masks as both kernels read them: ``(valid int8, kv_pos int32 laid out like it, its head
    stride (0 when one mask serves every KV head), q_pos int32, q_valid int8)``."""
    valid8 = kv_valid.view(torch.int8) if kv_valid.dtype == torch.bool else kv_valid
    kv_pos = kv_pos.to(torch.int32)
    if kv_pos.stride() != valid8.stride():
        kv_pos = kv_pos.expand_as(valid8).contiguous()
        valid8 = valid8.contiguous()
    head_stride = valid8.stride(1) if valid8.shape[1] > 1 else 0
    return valid8, kv_pos, head_stride, q_pos.to(torch.int32).contiguous(), q_valid.to(torch.int8).contiguous()


def attention_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_pos: torch.Tensor,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    window: int | None,
    scaling: float,
    causal_slots: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention and its log-sum-exp. query (B, Hq, q, D); key/value (B, H, C, D); kv_valid/kv_pos
    (B, Hm, C) with Hm 1 or H; q_pos/q_valid (B, q). Returns (out (B, q, Hq, D), lse2 (B, Hq, q) fp32, base 2)."""
    B, Hq, nq, D = query.shape
    H, C = key.shape[1], key.shape[2]
    fwd, _ = _kernels(query.dtype, D)
    out = torch.empty(B, nq, Hq, D, dtype=query.dtype, device=query.device)
    lse = torch.empty(B, Hq, nq, dtype=torch.float32, device=query.device)
    valid8, kv_pos, head_stride, qp, qv = _mask_inputs(kv_valid, kv_pos, q_pos, q_valid)
    blocks = _launch_options(query.dtype, D)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(nq, meta["BLOCK_M"]), B * Hq)

    fwd[grid](
        query, key, value, out, lse, valid8, kv_pos, qp, qv,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *lse.stride(),
        valid8.stride(0), head_stride, valid8.stride(2), qp.stride(0), qp.stride(1),
        Hq, Hq // H, nq, C, D, int(window or 0), float(scaling) * LOG2E, _bucket(nq),
        HAS_WINDOW=window is not None, CAUSAL_SLOTS=bool(causal_slots),
        DOT_PREC="ieee" if query.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(D)), **blocks,
    )  # fmt: skip
    return out, lse


def column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_pos: torch.Tensor,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    window: int | None,
    scaling: float,
    causal_slots: bool,
) -> torch.Tensor:
    """(B, H, C) fp32: per slot, the softmax probability it received summed over the valid queries and over the
    query heads sharing its KV head (``lse`` from `attention_lse`)."""
    B, Hq, nq, D = query.shape
    H, C = key.shape[1], key.shape[2]
    _, colsum = _kernels(query.dtype, D)
    sums = torch.empty(B, H, C, dtype=torch.float32, device=query.device)
    valid8, kv_pos, head_stride, qp, qv = _mask_inputs(kv_valid, kv_pos, q_pos, q_valid)
    blocks = _launch_options(query.dtype, D)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(C, meta["BLOCK_N"]), B * H)

    colsum[grid](
        query, key, lse, valid8, kv_pos, qp, qv, sums,
        *query.stride(), *key.stride(), *lse.stride(),
        valid8.stride(0), head_stride, valid8.stride(2), qp.stride(0), qp.stride(1),
        H, Hq // H, nq, C, D, int(window or 0), float(scaling) * LOG2E, _bucket(nq),
        HAS_WINDOW=window is not None, CAUSAL_SLOTS=bool(causal_slots),
        DOT_PREC="ieee" if query.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(D)), **blocks,
    )  # fmt: skip
    return sums


#: where the dense causal case (a fresh prefill without padding, no window inside the prompt) gets its output and
#: log-sum-exp: ``triton`` (`_fwd`) or ``flash`` (torch's own flash-attention op, which returns the log-sum-exp;
#: the column sums still come from `_colsum`). ``SQUEEZEKIT_LSE_SOURCE``; the GPU script measures both.
LSE_SOURCE = os.environ.get("SQUEEZEKIT_LSE_SOURCE", "triton")


def flash_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's flash attention, causal, with its log-sum-exp: (out (B, q, Hq, D), lse2 (B, Hq, q) base 2)."""
    if query.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)
    else:  # the CPU op (tests)
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scaling)
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse.float() * LOG2E


def _flash_or_none(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """`flash_lse`, or (None, None) after switching `LSE_SOURCE` back to ``triton`` when torch's op refuses."""
    global LSE_SOURCE
    try:
        return flash_lse(query, key, value, scaling)
    except RuntimeError as exc:
        if is_oom(exc) or query.device.type != "cuda":  # (under the interpreter, in tests: raised)
            raise
        LSE_SOURCE = "triton"
        warnings.warn(
            f"squeezekit: torch's flash attention refused ({str(exc)[:200]}); using the Triton forward",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, None


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_pos: torch.Tensor,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    window: int | None,
    scaling: float,
    causal_slots: bool,
    colsum: bool,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The fused path of `squeezekit.attention` for a multi-token step: ``(out (B, q, Hq, D), sums)`` with
    ``sums`` (B, H, C) fp32 when ``colsum`` else None; None when the kernel is off for this device (or failed
    before: the caller then runs its plain path). ``dense``: plain causal attention over the step's own tokens (no
    padding, no window inside the step), where `LSE_SOURCE` may be torch's flash attention."""
    if not use("attention", query):
        return None

    def run() -> tuple[torch.Tensor, torch.Tensor | None]:
        flash_ok = query.shape[-1] <= 256 and (query.dtype != torch.float32 or query.device.type == "cpu")
        out = None
        if dense and LSE_SOURCE == "flash" and flash_ok:
            out, lse = _flash_or_none(query, key, value, scaling)
        if out is None:
            out, lse = attention_lse(query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal_slots)
        assert lse is not None  # _flash_or_none returns both or neither
        sums = (
            column_sums(query, key, lse, kv_valid, kv_pos, q_pos, q_valid, window, scaling, causal_slots)
            if colsum
            else None
        )
        return out, sums

    return launch("attention", query, run)

"""The window queries' attention output over a layer's slots, or over subsets of them, in one Triton kernel that
never writes the probabilities (`squeezekit.policies.LayerView.window_output`).

An allocator that measures how much eviction moves a layer's attention output (``lost_attention``) needs, per
layer, the output of the last prompt queries over all slots and over the slots each budget keeps. The plain path
upcasts the keys and values to fp32 copies, writes the (B, H, G, W, S) logits and probabilities, and reads them once
more per subset: several passes over (B, H, S, D) fp32 tensors a layer. This kernel is flash-style, split over the
slots: one program per (sequence, KV head, subset, span of slots) holds the ``G x W`` query rows of that KV head
(the query heads of a GQA group together), streams its span's slots in blocks, reads each block's keys and values
once in their dtype, and keeps a running max, sum and fp32 accumulator. Each span writes its partial (max, sum,
accumulator); a few torch ops merge the spans (log-sum-exp weights), so only (spans, K, B, H, G, W, D) fp32 partials
and the outputs are written. `window_outputs` takes many layers: one launch a layer into one set of partials, and
one merge for them all (the allocator's host time was ~60 small operations a layer, 2026-12-07 on an H100).
A program serving two subsets from one read of the keys and values (two accumulators) was tried and measured 2.8x
slower a layer on an H100 (1.13 ms against 0.40 ms for `rule="sqrt"`'s two subsets, 2026-12-08): one subset a
program it is.
The split over the slots is what makes it fast: a layer has only B x H x K (sequence, head, subset) rows, fewer
than a GPU's processors for ``rule="sqrt"``, and one program walking all 4096 slots of a row serially left most of
the GPU idle (measured on an H100: 5-10x slower than the plain path before the split).

Same masks as the plain path: a query sees a valid slot at or before its position, allowed by the subset's mask; a
padded query (position -1), or one that sees no slot, gets 0. The logits of 16-bit inputs are taken on the tensor
cores from the inputs' own dtype (the products of two 16-bit numbers are exact in fp32, accumulated in fp32), of
fp32 inputs in fp32 (``ieee``: no TF32); the probabilities times the values are fp32 (``ieee``). The sums are taken
in another order, so an output differs from the plain path's by fp32 rounding (tests/test_kernels.py bounds it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import interpreting, launch, processors, use

if TYPE_CHECKING:
    import triton
    import triton.language as tl
    from triton.runtime import KernelInterface
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)


def block_s(head_dim: int) -> int:
    """Slots a program reads at a time: fewer for wide heads, so that the fp32 blocks fit in shared memory."""
    return 64 if head_dim <= 128 else 32


def _window_rows(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, V, Allow, Pos, QPos, Out, M, L,
    sqb, sqh, sqg, sqw, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sak, sab, sah, sas,
    spb, sph, sps,
    sqpb, sqpw,
    sos, sok, sob, soh, sog, sow, sod,
    sms, smk, smb, smh, smg, smw,
    Kn, H, G, W, S, D, span, scale,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE_QK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)  # this program's subset
    part = tl.program_id(2).to(tl.int64)  # the span of slots [part * span, (part + 1) * span)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: large batches of long prompts
    h = (bh % H).to(tl.int64)
    r = tl.arange(0, BLOCK_R)  # query rows, g-major: row r is query head g = r // W, window query w = r % W
    g, w = r // W, r % W
    rows = r < G * W
    d = tl.arange(0, BLOCK_D)
    dims = d < D
    q = tl.load(
        Q + b * sqb + h * sqh + g[:, None] * sqg + w[:, None] * sqw + d[None, :] * sqd,
        mask=rows[:, None] & dims[None, :], other=0.0,
    )  # fmt: skip
    if not NATIVE_QK:
        q = q.to(tl.float32)
    qpos = tl.load(QPos + b * sqpb + w * sqpw, mask=rows, other=-1)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    end = tl.minimum(S, (part + 1) * span)
    for s0 in range(part * span, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        inside = s < end
        keys = tl.load(
            K + b * skb + h * skh + s[:, None] * sks + d[None, :] * skd, mask=inside[:, None] & dims[None, :], other=0.0
        )
        if not NATIVE_QK:
            keys = keys.to(tl.float32)
        values = tl.load(
            V + b * svb + h * svh + s[:, None] * svs + d[None, :] * svd, mask=inside[:, None] & dims[None, :], other=0.0
        ).to(tl.float32)
        allow = tl.load(Allow + k * sak + b * sab + h * sah + s * sas, mask=inside, other=0) != 0
        pos = tl.load(Pos + b * spb + h * sph + s * sps, mask=inside, other=0)
        if NATIVE_QK:  # 16-bit inputs: exact products, fp32 sums
            logits = tl.dot(q, tl.trans(keys), out_dtype=tl.float32) * scale  # (BLOCK_R, BLOCK_S)
        else:
            logits = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
        causal = (pos[None, :] <= qpos[:, None]) & (qpos[:, None] >= 0)
        m, total, acc = _absorb(logits, allow[None, :] & causal, values, m, total, acc)
    at = k * sok + b * sob + h * soh + g[:, None] * sog + w[:, None] * sow + d[None, :] * sod
    tl.store(Out + part * sos + at, acc, mask=rows[:, None] & dims[None, :])
    at_row = part * sms + k * smk + b * smb + h * smh + g * smg + w * smw
    tl.store(M + at_row, m, mask=rows)
    tl.store(L + at_row, total, mask=rows)


def _absorb(logits, ok, values, m, total, acc):  # type: ignore[no-untyped-def]  # (a Triton function)
    """One block of slots into a subset's running max ``m``, sum and accumulator (the slots ``ok`` allows)."""
    logits = tl.where(ok, logits, float("-inf"))
    new = tl.maximum(m, tl.max(logits, 1))
    base = tl.where(new == float("-inf"), 0.0, new)  # (a row that has seen nothing yet: no inf - inf)
    p = tl.where(ok, tl.exp(logits - base[:, None]), 0.0)
    alpha = tl.exp(m - base)  # 0 while m is -inf
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
    return new, total, acc


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl, _absorb
    import triton
    import triton.language as tl

    _absorb = triton.jit(_absorb)  # (the kernel finds it among its globals when it compiles)
    return triton.jit(_window_rows)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # (tl.dot wants at least 16 along each side)


class Window(NamedTuple):
    """One layer's inputs to `window_outputs`: ``queries`` (B, H, G, W, D) over ``keys`` / ``values`` (B, H, S, D),
    once for each of the ``K`` slot masks ``allowed`` (K, B, H, S) bool, causal by ``positions`` (B, H, S) and
    ``query_positions`` (B, W) (-1: a padded query), softmax scale ``scaling``."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    allowed: torch.Tensor
    positions: torch.Tensor
    query_positions: torch.Tensor
    scaling: float


#: the most bytes of span partials one merge takes: layers beyond it are merged in further chunks
PARTIAL_BYTES = 1 << 28


def window_outputs(layers: Sequence[Window]) -> torch.Tensor | None:
    """(L, K, B, H, G, W, D) float32: the attention output of each of ``L`` layers' window queries over its slots,
    once for each of its ``K`` masks; the layers share (K, B, H, G, W, D) and a device, not necessarily their slot
    count. One kernel launch a layer, a program per (sequence, head, mask, span of slots), and one merge of the
    spans for all the layers (`PARTIAL_BYTES` at a time). None when the kernel is off for this device or failed
    before, or the inputs are not on one device (the caller then takes the plain path)."""
    first = layers[0]
    B, H, G, W, D = first.queries.shape
    Kn, device = first.allowed.shape[0], first.keys.device
    devices = {t.device for x in layers for t in x[:6]}
    if len(devices) > 1 or not use("window", first.keys) or G * W > 128:
        return None
    if Kn * B * H * G * W == 0:
        return torch.zeros((len(layers), Kn, B, H, G, W, D), dtype=torch.float32, device=device)
    S = max(x.keys.shape[2] for x in layers)
    S_block = 16 if interpreting() else block_s(D)  # (tests: small blocks, several spans a row)
    parts = spans(B * H * Kn, S, S_block, processors(device))  # (8 processors under the interpreter)
    span = max(1, _cdiv(_cdiv(S, parts), S_block)) * S_block  # (whole blocks; a layer of fewer slots: empty spans)
    parts = max(1, _cdiv(S, span))
    chunk = max(1, PARTIAL_BYTES // (parts * Kn * B * H * G * W * (D + 2) * 4))
    outs = []
    for c0 in range(0, len(layers), chunk):
        part = layers[c0 : c0 + chunk]
        out = launch("window", first.keys, functools.partial(_run, part, parts, span, S_block))
        if out is None:
            return None
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _run(layers: Sequence[Window], parts: int, span: int, S_block: int) -> torch.Tensor:
    """Each layer's spans into one (parts, L, K, ...) set of partials, merged once."""
    B, H, G, W, D = layers[0].queries.shape
    Kn, device = layers[0].allowed.shape[0], layers[0].keys.device
    acc = torch.empty((parts, len(layers), Kn, B, H, G, W, D), dtype=torch.float32, device=device)
    m = torch.empty((parts, len(layers), Kn, B, H, G, W), dtype=torch.float32, device=device)
    total = torch.empty_like(m)
    kernel = _kernel()
    for i, x in enumerate(layers):
        allow = x.allowed.view(torch.uint8)  # (same strides: bool is one byte)
        qpos = x.query_positions.to(torch.int64)
        pos = x.positions.to(torch.int32)
        # (Triton's interpreter multiplies bf16 as raw bits: there bf16 takes the fp32 path, fp16 tests the native)
        native = x.keys.dtype == x.queries.dtype and (
            x.queries.dtype == torch.float16 or (x.queries.dtype == torch.bfloat16 and not interpreting())
        )
        acc_i, m_i, total_i = acc[:, i], m[:, i], total[:, i]
        kernel[(B * H, Kn, parts)](
            x.queries, x.keys, x.values, allow, pos, qpos, acc_i, m_i, total_i,
            *x.queries.stride(), *x.keys.stride(), *x.values.stride(), *allow.stride(), *pos.stride(),
            *qpos.stride(), *acc_i.stride(), *m_i.stride(), Kn, H, G, W, x.keys.shape[2], D, span, float(x.scaling),
            BLOCK_R=_pow2(G * W), BLOCK_S=S_block, BLOCK_D=_pow2(D), NATIVE_QK=native, num_warps=4,
        )  # fmt: skip
    return merge(acc, m, total)


def merge(acc: torch.Tensor, m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The outputs from the spans' partials: each span's accumulator and sum are relative to its own running max
    ``m`` (-inf where it saw no slot); weighted by exp(m - the largest m), summed over the spans (dim 0), divided.
    A query row that no span saw gets 0."""
    top = m.amax(0)
    weight = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # (-inf - finite: 0)
    seen = (weight * total).sum(0)
    out = (weight.unsqueeze(-1) * acc).sum(0)
    return torch.where(seen.unsqueeze(-1) > 0, out / seen.clamp_min(1e-30).unsqueeze(-1), 0.0)


def spans(rows: int, S: int, block: int, processors: int) -> int:
    """How many spans a row's ``S`` slots are split into: enough programs for about eight per processor, each span at
    least four blocks long (fewer, longer spans waste less on the merge)."""
    return max(1, min(_cdiv(8 * processors, max(1, rows)), _cdiv(S, 4 * block)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

"""The window queries' attention output over a layer's slots, or over subsets of them, in one Triton kernel that
never writes the probabilities (`squeezekit.policies.LayerView.window_output`).

An allocator that measures how much eviction moves a layer's attention output (``lost_attention``) needs, per
layer, the output of the last prompt queries over all slots and over the slots each budget keeps. The plain path
upcasts the keys and values to fp32 copies, writes the (B, H, G, W, S) logits and probabilities, and reads them once
more per subset: several passes over (B, H, S, D) fp32 tensors a layer. This kernel is flash-style: one program per
(sequence, KV head, subset) holds the ``G x W`` query rows of that KV head (the query heads of a GQA group
together), streams the slots in blocks, reads each block's keys and values once in their dtype, and keeps a running
max, sum and fp32 accumulator, so only the (K, B, H, G, W, D) outputs are written.

Same masks as the plain path: a query sees a valid slot at or before its position, allowed by the subset's mask; a
padded query (position -1), or one that sees no slot, gets 0. The products are fp32 (``ieee``: no TF32) and the sums
are taken in another order, so an output differs from the plain path's by fp32 rounding (tests/test_kernels.py
bounds it).
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
else:
    triton = tl = None  # imported on first use (see squeezekit.kernels.attention)


def block_s(head_dim: int) -> int:
    """Slots a program reads at a time: fewer for wide heads, so that the fp32 blocks fit in shared memory."""
    return 64 if head_dim <= 128 else 32


def _window_rows(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    Q, K, V, Allow, Pos, QPos, Out,
    sqb, sqh, sqg, sqw, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sak, sab, sah, sas,
    spb, sph, sps,
    sqpb, sqpw,
    sok, sob, soh, sog, sow, sod,
    H, G, W, S, D, scale,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
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
    ).to(tl.float32)  # fmt: skip
    qpos = tl.load(QPos + b * sqpb + w * sqpw, mask=rows, other=-1)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        inside = s < S
        keys = tl.load(
            K + b * skb + h * skh + s[:, None] * sks + d[None, :] * skd, mask=inside[:, None] & dims[None, :], other=0.0
        ).to(tl.float32)
        values = tl.load(
            V + b * svb + h * svh + s[:, None] * svs + d[None, :] * svd, mask=inside[:, None] & dims[None, :], other=0.0
        ).to(tl.float32)
        allow = tl.load(Allow + k * sak + b * sab + h * sah + s * sas, mask=inside, other=0) != 0
        pos = tl.load(Pos + b * spb + h * sph + s * sps, mask=inside, other=0)
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale  # (BLOCK_R, BLOCK_S)
        ok = allow[None, :] & (pos[None, :] <= qpos[:, None]) & (qpos[:, None] >= 0)
        logits = tl.where(ok, logits, float("-inf"))
        new = tl.maximum(m, tl.max(logits, 1))
        base = tl.where(new == float("-inf"), 0.0, new)  # (a row that has seen nothing yet: no inf - inf)
        p = tl.where(ok, tl.exp(logits - base[:, None]), 0.0)
        alpha = tl.exp(m - base)  # 0 while m is -inf
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
        m = new
    out = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
    tl.store(
        Out + k * sok + b * sob + h * soh + g[:, None] * sog + w[:, None] * sow + d[None, :] * sod,
        out, mask=rows[:, None] & dims[None, :],
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_window_rows)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # (tl.dot wants at least 16 along each side)


def window_output(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """(K, B, H, G, W, D) float32: the attention output of ``queries`` (B, H, G, W, D) over ``keys`` / ``values``
    (B, H, S, D), once for each of the ``K`` slot masks ``allowed`` (K, B, H, S) bool, causal by ``positions``
    (B, H, S) and ``query_positions`` (B, W) (-1: a padded query); None when the kernel is off for this device or
    failed before, or the inputs are not on one device (the caller then takes the plain path)."""
    B, H, G, W, D = queries.shape
    S = keys.shape[2]
    devices = {t.device for t in (queries, keys, values, allowed, positions, query_positions)}
    if len(devices) > 1 or not use("window", keys) or G * W > 128:
        return None
    Kn = allowed.shape[0]
    out = torch.empty((Kn, B, H, G, W, D), dtype=torch.float32, device=keys.device)
    if out.numel() == 0:
        return out
    allow = allowed.view(torch.uint8)  # (same strides: bool is one byte)
    qpos = query_positions.to(torch.int64)
    pos = positions.to(torch.int32)

    def run() -> torch.Tensor:
        _kernel()[(B * H, Kn)](
            queries, keys, values, allow, pos, qpos, out,
            *queries.stride(), *keys.stride(), *values.stride(), *allow.stride(), *pos.stride(), *qpos.stride(),
            *out.stride(), H, G, W, S, D, float(scaling),
            BLOCK_R=_pow2(G * W), BLOCK_S=block_s(D), BLOCK_D=_pow2(D), num_warps=4,
        )  # fmt: skip
        return out

    return launch("window", keys, run)

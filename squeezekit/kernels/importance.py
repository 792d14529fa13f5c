"""A layer's importance at prefill in one Triton kernel: each token's cosine between the layer's input ``x`` and
``x + attention(x)``, reading both once.

SqueezeAttention's measure (`squeezekit.statistics.Importance`) is the mean over a row's real tokens of
cos(x, h), h = x + out. The plain path takes it from three fp32-accumulated norms, x.h = (|x|^2 + |h|^2 - |out|^2) / 2,
which costs about five passes over (B, T, E) activations a layer: one for each norm, and a write and a read of the
sum ``x + out`` in the activations' dtype. This kernel reads ``x`` and ``out`` once per token, forms ``h`` in
registers rounded to the activations' dtype as the model's residual add rounds it, and accumulates the three sums
of squares in fp32; the torch side then averages the (B, T) cosines over the real tokens. Same formula, same
roundings of ``h``; the fp32 sums are accumulated in another order, so a cosine differs from the plain path's by a
few fp32 ulps (tests/test_kernels.py bounds it). On an H100, (16, 4096, 4096) bf16: 0.38 ms against the plain path's
1.14 ms (docs/benchmarks/policy-share-2026-12).
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

#: the channels a program reads at a time (a row of E channels takes ceil(E / BLOCK) loads)
BLOCK = 1024


def _cosine_rows(  # type: ignore[no-untyped-def]  # (a Triton kernel: it reads annotations as types)
    X, Out, Cos,
    sxb, sxt, sxe,
    sob, sot, soe,
    T, E,
    BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)  # 64-bit offsets: large batches of long prompts
    t = (pid % T).to(tl.int64)
    x_row = X + b * sxb + t * sxt
    o_row = Out + b * sob + t * sot
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK], dtype=tl.float32)
    for e0 in range(0, E, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        ok = offs < E
        x = tl.load(x_row + offs * sxe, mask=ok, other=0.0)
        o = tl.load(o_row + offs * soe, mask=ok, other=0.0)
        xf, of = x.to(tl.float32), o.to(tl.float32)
        s = xf + of  # the residual stream as the model adds it, rounded to its dtype (to nearest, ties to even)
        if BF16:  # by hand: Triton's interpreter (the CPU tests) truncates a cast to bfloat16
            bits = s.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            hf = tl.where(s != s, s, bits.to(tl.float32, bitcast=True))
        else:
            hf = s.to(x.dtype).to(tl.float32)
        acc_x += xf * xf
        acc_h += hf * hf
        acc_o += of * of
    nx = tl.sqrt(tl.sum(acc_x, 0))
    nh = tl.sqrt(tl.sum(acc_h, 0))
    no = tl.sqrt(tl.sum(acc_o, 0))
    cos = (nx * nx + nh * nh - no * no) / tl.maximum(2 * nx * nh, 1e-12)
    tl.store(Cos + pid.to(tl.int64), cos)


@functools.lru_cache(maxsize=1)
def _kernel() -> KernelInterface:
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_cosine_rows)


def cosines(hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor | None:
    """(B, T) float32: cos(x, x + out) of every token, ``hidden`` (B, T, E) the layer's input and ``attended`` its
    attention output as added to it; None when the kernel is off for this device, the two differ in dtype or shape,
    or it failed before (the caller then takes the plain path)."""
    if hidden.dim() != 3 or hidden.shape != attended.shape or hidden.dtype != attended.dtype:
        return None
    if hidden.device != attended.device or not use("importance", hidden):
        return None
    B, T, E = hidden.shape
    out = torch.empty((B, T), dtype=torch.float32, device=hidden.device)
    if B * T == 0:
        return out
    block = min(BLOCK, max(16, 1 << (E - 1).bit_length()))  # (the next power of two)

    def run() -> torch.Tensor:
        _kernel()[(B * T,)](
            hidden, attended, out, *hidden.stride(), *attended.stride(), T, E,
            BF16=hidden.dtype == torch.bfloat16, BLOCK=block, num_warps=4,
        )  # fmt: skip
        return out

    return launch("importance", hidden, run)

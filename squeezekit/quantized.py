"""Quantized slots (``kv_bits=8`` or ``4``): the keys and values a budgeted layer keeps, stored in fewer bits.

**When.** Prefill attends over the unquantized keys and values (the projections themselves); the tokens a budgeted
layer keeps are quantized once its budget is enforced at the end of prefill (`squeezekit.layers.BudgetedLayer`), and
every later token is quantized as it is written. No full-precision window of recent tokens is kept: a decode step
already attends to its own token in its quantized form (transformers' ``QuantizedCache`` keeps a residual of
``residual_length`` tokens instead; on a compressed cache the budget's slots are what memory is about). Layers that
keep everything (budget 1, the model's own sliding-window layers) stay in the model's dtype. The statistics the
policies take (accumulated attention, window queries) see the attention the model computes, over the dequantized
keys, and the policies' views hand over dequantized keys and values.

**Layout.** A slot's key (or value) of ``D`` channels becomes ``codes`` and per-slot ``scale`` (and ``low``), one set
per token and KV head, as extra slot tensors of the layer's table ((B, H, C, ...): they grow, compact, merge and
move with the other slot tensors, and into a pool of per-head segments):

- 8 bits, symmetric: ``codes`` (..., D) int8 in [-127, 127], one ``scale`` = absmax / 127 per slot (fp16);
  x = code * scale. D + 2 bytes a slot (0.52 of bf16's 2 D at D = 64). The scale is rounded up to fp16 (no code
  clamps), 2^-10 relative; a slot whose absmax is under 127 * 2^-14 (7.8e-3) has a subnormal scale, whose fixed
  spacing 2^-24 bounds its error at 127 * 2^-24 (7.6e-6) instead: too small to move an attention score.
- 4 bits, asymmetric per group of ``GROUP4`` channels (the whole head when D <= 64): ``codes`` (..., D / 2) uint8,
  two channels a byte (the even channel in the low nibble), ``scale`` = (max - min) / 15 and ``low`` = min per
  group (fp16); x = code * scale + low. D / 2 + 4 D / GROUP4 bytes a slot (0.28 of bf16's at D = 64 and 128).

Per token and head because that is the unit the cache writes, evicts and moves: a decode step writes one slot per
head and never rescales the others. Keys have outlier channels that per-token scales do not isolate (KIVI quantizes
keys per channel for that reason); 8 bits absorb them, 4 bits pay for them, which the quality figures show.
The torch path (CPU; statistics that need the keys; the policies' views) dequantizes in fp32 and rounds
once to the model's dtype. The CUDA decode kernel (squeezekit.kernels.decode) reads the codes: at 8 bits the codes
enter the dot products as they are (exact in bf16) and each slot's scale multiplies its score and its probability,
at 4 bits each tile is dequantized in registers; both equal dequantize-then-attend in fp32 (tests). At steady
state the fused steady write (squeezekit.kernels.steady) quantizes each decode token in the kernel that picks
its slot, bit for bit as `SlotCodec.encode` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the slot precisions a config may ask for (`squeezekit.Config.kv_bits`); 16 is the model's own dtype
BITS = (16, 8, 4)
#: channels per 4-bit scale group (a head of D <= GROUP4 channels is one group)
GROUP4 = 64
#: the part names of a layer's quantized keys and values, as they appear in its slot table
PARTS = {8: ("codes", "scale"), 4: ("codes", "scale", "low")}


@dataclass(frozen=True)
class SlotCodec:
    """How ``bits``-bit slots of ``dim`` channels are encoded (see the module docstring)."""

    bits: int
    dim: int

    @property
    def group(self) -> int:
        return self.dim if self.bits == 8 or self.dim <= GROUP4 else GROUP4

    @property
    def groups(self) -> int:
        return -(-self.dim // self.group)

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS[self.bits]

    def names(self, which: str) -> tuple[str, ...]:
        """The slot-table names of the keys' (``which="k"``) or the values' (``"v"``) parts: ``k_codes``, ..."""
        return tuple(f"{which}_{p}" for p in self.parts)

    def slot_bytes(self) -> int:
        """Bytes one slot's key (or value) takes, scales included."""
        code_bytes = self.dim if self.bits == 8 else -(-self.dim // 2)
        return code_bytes + 2 * self.groups * len(self.parts[1:])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(..., D) in any float dtype -> the parts, each (..., n): codes, scale[, low]."""
        xf = x.float()
        if self.bits == 8:
            absmax = xf.abs().amax(-1, keepdim=True)
            scale = _fp16_at_least(absmax / 127.0)
            scale = torch.where(scale.float() * 127.0 < absmax, _up(scale), scale)
            s = scale.float()
            codes = torch.where(s > 0, xf / torch.where(s > 0, s, 1.0), 0.0).round_().clamp_(-127, 127)
            return codes.to(torch.int8), scale
        *lead, D = xf.shape
        pad = self.groups * self.group - D
        g = torch.nn.functional.pad(xf, (0, pad)).view(*lead, self.groups, self.group)
        if pad:  # the padding channels take the group's first value: they widen no range
            g[..., -1, self.group - pad :] = g[..., -1, :1]
        low, high = g.amin(-1), g.amax(-1)
        low16 = low.to(torch.float16)  # rounded down, so that no channel lies below the grid
        low16 = torch.where(low16.float() > low, _down(low16), low16)
        scale16 = _fp16_at_least((high - low16.float()) / 15.0)
        top = low16.float() + 15.0 * scale16.float()
        scale16 = torch.where(top < high, _up(scale16), scale16)
        s = scale16.float()[..., None]
        q = torch.where(s > 0, (g - low16.float()[..., None]) / torch.where(s > 0, s, 1.0), 0.0)
        q = q.round_().clamp_(0, 15).to(torch.uint8).view(*lead, self.groups * self.group)[..., :D]
        if D % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        codes = q[..., 0::2] | (q[..., 1::2] << 4)
        return codes.contiguous(), scale16, low16

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The parts (..., n) -> (..., D) in ``dtype`` (computed in fp32, rounded once)."""
        if self.bits == 8:
            codes, scale = parts
            return (codes.float() * scale.float()).to(dtype)
        codes, scale, low = parts
        q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[..., : self.dim].float()
        reps = self.group
        s = scale.float().repeat_interleave(reps, dim=-1)[..., : self.dim]
        lo = low.float().repeat_interleave(reps, dim=-1)[..., : self.dim]
        return (q * s + lo).to(dtype)


def _up(h: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(h, torch.full_like(h, float("inf")))


def _down(h: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(h, torch.full_like(h, float("-inf")))


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, >= 0) in fp16, rounded up: a scale never shrinks the range it must cover (no channel clamps)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _up(h), h)


def codec(bits: int, dim: int) -> SlotCodec | None:
    """The codec of ``bits``-bit slots, or None for the model's own dtype (16)."""
    return None if bits == 16 else SlotCodec(bits, dim)

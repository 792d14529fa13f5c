"""Random evictor: keeps random tokens, the floor any scoring rule must beat.

Each token gets a pseudo-random priority, a 32-bit integer hash of ``(position, seed, layer, KV head)``, and the
layer keeps the highest priorities besides the ``window`` most recent tokens (protected, as h2o and snapkv protect
theirs; ``window=0`` protects none, the engine still keeps the newest token). A token's priority is fixed for its
life, so what a layer holds is a uniformly random subset of the older tokens it has seen, and it depends on nothing
but those four numbers: not on the batch, its micro-batching, the slot layout or the device (a ``torch.Generator``
drawing per slot would give a batched run other tokens than the same prompt alone, and a CUDA one seeded per step
would wait on the host). The random baseline of the KV-cache eviction literature, e.g. kvpress's ``RandomPress``.
"""

from dataclasses import dataclass

import squeezekit

_MASK = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of an int or an int64 tensor holding values < 2**32; the
    multipliers are below 2**31, so no product leaves int64."""
    for m in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 16)) * m) & _MASK
    return x ^ (x >> 16)


@dataclass
class RandomTokens(squeezekit.TokenEvictor):
    """Random: a seeded random subset of the tokens, plus the most recent ones."""

    name = "random"
    #: seed of the tokens' random priorities (the same seed keeps the same tokens)
    seed: int = 0
    #: the most recent tokens, always kept (0: none besides the newest)
    window: int = 8

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 0, "must be an integer >= 0")

    def floor(self):
        return max(self.window, 1)

    def score(self, view):
        import torch

        heads = torch.arange(view.positions.shape[1], device=view.positions.device).view(1, -1, 1)
        x = view.positions.long() & _MASK
        for salt in (self.seed & _MASK, view.layer_idx, heads):
            x = _mix(x ^ salt)
        protected = view.recent(self.window)
        return (x >> 8).float().masked_fill(protected, float("inf"))  # 24 bits: exact in float32


@squeezekit.hookimpl
def register_evictors(register):
    register(RandomTokens)

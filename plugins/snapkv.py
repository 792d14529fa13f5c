"""SnapKV evictor: score prompt tokens by the attention of an observation window of the last prompt queries.

At the end of prefill, the last ``window`` prompt queries attend to every cached key; their attention, summed over
the window and the query heads sharing a KV head and pooled over neighbouring tokens, ranks the prompt. The window
itself is always kept. SnapKV selects once: while decoding, a full layer drops its oldest token.
"""

from dataclasses import dataclass
from typing import Literal

import squeezekit


@dataclass
class SnapKV(squeezekit.TokenEvictor):
    """SnapKV: pooled attention of the last prompt queries, plus that window."""

    name = "snapkv"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: observation window: the last prompt tokens whose queries score the rest (always kept)
    window: int = 8
    #: neighbouring tokens pooled together when scoring (odd)
    kernel_size: int = 7
    #: how scores are pooled over `kernel_size` neighbours: max or avg
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check(
            "kernel_size",
            self.kernel_size,
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            "must be an odd integer >= 1",
        )
        squeezekit.check("pooling", self.pooling, self.pooling in ("max", "avg"), "must be 'max' or 'avg'")

    def floor(self):
        return self.window

    def score(self, view):
        import torch.nn.functional as F

        protected = view.recent(self.window)
        if view.window_queries is None:  # decoding: oldest first
            return view.positions.float().masked_fill(protected, float("inf"))
        votes = view.window_attention().sum(dim=(2, 3))  # (B, H, S); at prefill, slots are in token order
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        B, H, S = votes.shape
        pad = self.kernel_size // 2
        pooled = pool(votes.view(B * H, 1, S), self.kernel_size, stride=1, padding=pad).view(B, H, S)
        return pooled.masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(SnapKV)

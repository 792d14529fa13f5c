"""Key-norm evictor: keep the tokens whose keys have the smallest L2 norm, plus a window of recent tokens.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv 2406.11430): a low key norm goes with high attention, so the score of a slot is ``-||k||_2``, the negated L2
norm of its key over the head dimension. The cache holds keys with RoPE applied; RoPE rotates pairs of dimensions,
so the norm is the one before RoPE too. The paper ranks by the norm alone; like h2o and snapkv here, the ``window``
most recent tokens are also protected (``window=0``: the paper's rule, the engine still keeps the newest token).
"""

from dataclasses import dataclass

import squeezekit


@dataclass
class KNorm(squeezekit.TokenEvictor):
    """Key norm: the tokens whose keys have the smallest L2 norm, plus the most recent ones."""

    name = "knorm"
    #: the most recent tokens, always kept (0: none besides the newest)
    window: int = 8

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 0, "must be an integer >= 0")

    def floor(self):
        return max(self.window, 1)

    def score(self, view):
        protected = view.recent(self.window)
        return (-view.keys.float().norm(dim=-1)).masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(KNorm)

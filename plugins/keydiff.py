"""KeyDiff evictor: keep the tokens whose keys differ most from the layer's mean key direction, plus recent ones.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv 2504.15364 (2025). For each sequence and KV head, the anchor is the mean
of the unit-normalised keys of the valid slots, ``a = mean_j k_j / ||k_j||`` (as kvpress's ``KeyDiffPress``
computes it), and the score of a slot is ``-cos(k_i, a)``: keys least similar to the anchor are kept. Keys are the
cache's, RoPE applied. The paper evicts block by block as the cache fills; the engine does the same, scoring again
whenever a layer is full. Like h2o and snapkv here, the ``window`` most recent tokens are protected
(``window=0``: none, the engine still keeps the newest token).
"""

from dataclasses import dataclass

import squeezekit


@dataclass
class KeyDiff(squeezekit.TokenEvictor):
    """KeyDiff: the tokens whose keys are least similar to the mean key, plus the most recent ones."""

    name = "keydiff"
    #: the most recent tokens, always kept (0: none besides the newest)
    window: int = 8

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 0, "must be an integer >= 0")

    def floor(self):
        return max(self.window, 1)

    def score(self, view):
        import torch.nn.functional as F

        keys = view.keys.float()
        valid = view.valid.unsqueeze(-1)
        unit = F.normalize(keys, dim=-1).masked_fill(~valid, 0.0)  # (invalid slots may hold anything)
        anchor = unit.sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        protected = view.recent(self.window)
        return (-F.cosine_similarity(keys, anchor, dim=-1)).masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(KeyDiff)

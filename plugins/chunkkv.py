"""ChunkKV evictor (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference", arXiv 2502.00299).

ChunkKV keeps whole chunks of consecutive tokens rather than single tokens. The prompt is cut into chunks of
``chunk_size`` positions (chunk ``position // chunk_size``); a token's base score is SnapKV's vote, the attention the
last ``window`` prompt queries give it, summed over the window and the query heads of its KV head (no pooling: the
chunks take its place); a chunk's score is the sum of its tokens' votes, and every token of a chunk gets its chunk's
score, so the engine keeps the top chunks (the last one it reaches may be cut by the budget). The observation window
is always kept, as in SnapKV. ChunkKV selects once, at the end of prefill: while decoding, a full layer drops its
oldest token (SnapKV's rule).
"""

from dataclasses import dataclass

import squeezekit


@dataclass
class ChunkKV(squeezekit.TokenEvictor):
    """ChunkKV: keeps whole chunks of the prompt, ranked by their summed SnapKV vote, plus that window."""

    name = "chunkkv"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: consecutive positions per chunk (10 in the paper)
    chunk_size: int = 10
    #: observation window: the last prompt tokens whose queries score the rest (always kept)
    window: int = 8

    def __post_init__(self):
        squeezekit.check("chunk_size", self.chunk_size, self.chunk_size >= 1, "must be an integer >= 1")
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")

    def floor(self):
        return self.window

    def score(self, view):
        from squeezekit.plugins.snapkv import SnapKV

        # SnapKV's per-token vote without pooling: the window +inf; at decode, oldest first
        votes = SnapKV(window=self.window, kernel_size=1).score(view)
        if view.window_queries is None:
            return votes
        protected = votes.isinf()
        chunk = (view.positions.clamp(min=0) // self.chunk_size).long()
        counted = votes.masked_fill(protected | ~view.valid, 0.0)
        sums = votes.new_zeros(*votes.shape[:2], int(chunk.max()) + 1).scatter_add_(2, chunk, counted)
        return sums.gather(2, chunk).masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(ChunkKV)

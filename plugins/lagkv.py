"""LagKV evictor (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which KV Items Are
Important", arXiv 2504.04704): attention-free, scored against the next chunk's statistics.

After ``sinks`` attention-sink tokens (always kept), the sequence is cut into chunks of ``lag`` positions. A token of
chunk ``c`` is compared with the chunk that follows it (its "lag" reference, ``c + 1``): its key is min-max
normalised per channel by the reference chunk's keys, ``(k - min_{c+1}) / (max_{c+1} - min_{c+1})``, and the spread
of the result over the channels (its standard deviation) says how much the token departs from what comes next; the
same for its value. Within each chunk the two spreads are turned into shares by a softmax over the chunk's tokens
and added, so every chunk's scores sum to 2 and the chunks compete evenly:

    score(s) = softmax_chunk(std(k_hat_s)) + softmax_chunk(std(v_hat_s))

The chunks with no complete chunk after them (the last full chunk and the partial tail) have no reference and are
kept, as the paper keeps them until the next chunk arrives (scored above every share; when the budget cannot hold
them all, the most recent), after the sinks (always kept). The paper keeps a fixed share
of each chunk; squeezekit keeps the layer's top scores overall (the per-chunk softmax keeps the shares near equal),
and while decoding it scores the tokens still held the same way (a reference chunk's statistics from its tokens that
are left). No attention is computed, so it works with any attention implementation and costs no statistics.
"""

from dataclasses import dataclass

import squeezekit

#: the score of a token whose chunk has no complete successor yet: kept after the sinks, before any scored token
UNREFERENCED = 4.0


@dataclass
class LagKV(squeezekit.TokenEvictor):
    """LagKV: each chunk's tokens scored by their spread against the next chunk's key and value ranges."""

    name = "lagkv"
    #: the first tokens, always kept (attention sinks)
    sinks: int = 4
    #: positions per chunk; a chunk is scored against the next one
    lag: int = 32

    def __post_init__(self):
        squeezekit.check("sinks", self.sinks, self.sinks >= 0, "must be an integer >= 0")
        squeezekit.check("lag", self.lag, self.lag >= 2, "must be an integer >= 2")

    def floor(self):
        return self.sinks + 1

    def score(self, view):
        import torch

        B, H, S, _ = view.keys.shape
        pos = view.positions.long()
        chunk = torch.div(pos - self.sinks, self.lag, rounding_mode="floor")  # (B, H, S); < 0 for the sinks
        complete = torch.div(view.seen.to(pos.device) - self.sinks, self.lag, rounding_mode="floor").view(B, 1, 1)
        scored = view.valid & (chunk >= 0) & (chunk + 1 < complete)
        # Chunks renumbered 0.. in token order among the held slots (no host sync: decode steps replay in a CUDA
        # graph), then two more groups: OTHER (sinks, invalid slots) and EMPTY (no slot: a reference chunk gone)
        OTHER, EMPTY, C = S, S + 1, S + 2
        big = torch.iinfo(torch.long).max
        by_chunk = torch.where(view.valid, chunk, big)
        ordered, order = by_chunk.sort(dim=-1, stable=True)
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
        dense = torch.empty_like(order).scatter_(-1, order, starts.long().cumsum(-1) - 1)  # (B, H, S) in [0, S)
        number = torch.full((B, H, C), -big, dtype=torch.long, device=pos.device)
        number = number.scatter_reduce(-1, dense, by_chunk, "amax")  # the chunk number of each renumbered chunk
        follows = number.gather(-1, (dense + 1).clamp_max(C - 1)) == chunk + 1  # the next chunk has held slots
        member = torch.where(view.valid & (chunk >= 0), dense, OTHER)
        group = torch.where(scored, dense, OTHER)
        ref = torch.where(scored & follows, dense + 1, EMPTY)
        score = spread_share(view.keys, view.valid, member, ref, group, scored, C)
        score = score + spread_share(view.values, view.valid, member, ref, group, scored, C)
        # the sinks first, then the chunks with no reference (above any share: shares sum to at most 2), most recent
        # first when the budget cannot hold them all
        score = score.masked_fill(view.valid & ~scored & (chunk >= 0), UNREFERENCED)
        return score.masked_fill(view.valid & (chunk < 0), float("inf"))


def spread_share(x, valid, member, ref, group, scored, C):
    """Per scored slot, the softmax within its ``group`` of the channel std of ``x`` min-max normalised by the
    range of chunk ``ref`` (the valid slots of each chunk ``member`` says); 0 elsewhere."""

    B, H, S, D = x.shape
    x = x.float().nan_to_num(0.0)
    idx = member.unsqueeze(-1).expand(B, H, S, D)
    inf = float("inf")
    low = x.new_full((B, H, C, D), inf).scatter_reduce(2, idx, x.masked_fill(~valid[..., None], inf), "amin")
    high = x.new_full((B, H, C, D), -inf).scatter_reduce(2, idx, x.masked_fill(~valid[..., None], -inf), "amax")
    r = ref.unsqueeze(-1).expand(B, H, S, D)
    lo, hi = low.gather(2, r), high.gather(2, r)
    normalised = ((x - lo) / (hi - lo).clamp_min(1e-6)).masked_fill(~(lo <= hi), 0.0)  # (an emptied reference: 0)
    spread = normalised.std(dim=-1)
    spread = spread.masked_fill(~scored, float("-inf"))
    top = spread.new_full((B, H, C), float("-inf")).scatter_reduce(2, group, spread, "amax")
    e = (spread - top.gather(2, group)).exp().masked_fill(~scored, 0.0)
    return (e / group_total(e, group).clamp_min(1e-30)).masked_fill(~scored, 0.0)


def group_total(e, group):
    """Per slot, the sum of ``e`` over the slots of its ``group`` (same shape as ``e``), in float64 and in a fixed
    order (sorted by group, then a prefix sum): CUDA's scatter_add adds in no fixed order, and a decode step
    replayed in a CUDA graph could then keep other tokens than ``model.generate``'s eager step."""
    import torch

    ids, order = group.sort(dim=-1, stable=True)
    prefix = e.double().gather(-1, order).cumsum(-1)
    S = ids.shape[-1]
    pos = torch.arange(S, device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    last = torch.ones_like(ids, dtype=torch.bool)
    last[..., :-1] = ids[..., :-1] != ids[..., 1:]
    start = torch.where(first, pos, 0).cummax(-1).values  # each slot's group: where it starts, where it ends
    end = torch.where(last, pos, S).flip(-1).cummin(-1).values.flip(-1)
    before = torch.where(start > 0, prefix.gather(-1, (start - 1).clamp_min(0)), 0.0)
    sums = prefix.gather(-1, end) - before
    return torch.empty_like(sums).scatter_(-1, order, sums).to(e.dtype)


@squeezekit.hookimpl
def register_evictors(register):
    register(LagKV)

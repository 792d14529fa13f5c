"""TOVA evictor (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104).

TOVA keeps the tokens the newest query attends to most: whenever the cache is over its budget it drops the token
with the lowest attention from the current query. The score of a held token is

    softmax over the held slots of (q_newest . k * scaling), averaged over the query heads of its KV head

(the paper averages over all heads of the layer and evicts the same token from every head; squeezekit evicts per
KV head, so each KV head averages over the query heads that read it). ``q_newest`` is the newest query the layer has
seen: at the end of prefill, the last prompt token's; while decoding, the previous step's, because room for a new
token is made before its query is computed. That is TOVA's order: it attends with the current query, then drops
the lowest-scored token; here that drop happens when the next token is written. As with every squeezekit evictor,
the prompt's last token is always kept at prefill. The statistic stores the
probabilities per slot, so they follow their token through every eviction and batch operation.
"""

from dataclasses import dataclass

import squeezekit


class NewestAttention(squeezekit.Statistic):
    """Per slot, the attention probability from the newest query of the layer, averaged over the query heads of its
    KV head (rewritten at every attention call, prefill and decode)."""

    name = "tova_attention"
    fields = ("tova_attention",)
    per_slot = True

    def observe(self, stats, call):
        import torch

        B, Hq, q, D = call.query.shape
        H = call.keys.shape[1]
        order = torch.arange(q, device=call.query_valid.device)
        last = torch.where(call.query_valid, order, -1).amax(dim=-1)  # (B,) the newest real query; -1: none
        newest = call.query.gather(2, last.clamp(min=0).view(B, 1, 1, 1).expand(B, Hq, 1, D))
        newest = newest.view(B, H, Hq // H, D).float()
        logits = torch.einsum("bhgd,bhsd->bhgs", newest, call.keys.float()) * call.scaling
        logits = logits.masked_fill(~call.keys_valid[:, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=2)  # (B, H, S)
        field = stats["tova_attention"]
        field.copy_(torch.where((last >= 0).view(B, 1, 1), probs, field))


@dataclass
class TOVA(squeezekit.TokenEvictor):
    """TOVA: keeps the tokens the newest query attends to most."""

    name = "tova"
    needs = NewestAttention

    def score(self, view):
        return view.tova_attention


@squeezekit.hookimpl
def register_evictors(register):
    register(TOVA)

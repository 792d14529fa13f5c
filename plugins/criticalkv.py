"""CriticalKV evictor (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv 2502.03805).

Dropping token ``s`` moves the attention output of query head ``g`` by at most ``a_g(s) * ||W_g v_s||``, where
``a_g(s)`` is the head's attention to ``s`` and ``W_g`` the slice of the layer's output projection (``o_proj``) that
head ``g``'s output passes through: attention alone ignores how large a token's contribution is once projected.
The score of a slot of a KV head is

    critical(s) = sum over the query heads g of the KV head of a_g(s) * ||W_g v_s||_2

with ``a_g(s)`` SnapKV's attention (the last ``window`` prompt queries, averaged over the window, max-pooled over
7 neighbours as SnapKV does). As in the paper, selection has two stages: each head first keeps its ``first_stage``
share of its budget by attention alone, then fills the rest by ``critical``. (The paper bounds the perturbation with
the L1 norm; the L2 norm used here is computed from the Gram matrix ``W_g^T W_g``, D x D per query head, read once in
`prepare`, so scoring costs one D x D product per slot instead of a projection to the hidden size.) The window itself
is always kept; while decoding, a full layer drops its oldest token (SnapKV's rule). A layer `prepare` has not read
(a `LayerView` built by hand, in a test) is scored with the identity projection, ``||v_s||_2``.
"""

from dataclasses import dataclass

import squeezekit

#: neighbouring tokens max-pooled together (SnapKV's default kernel)
POOL = 7
#: the output projection's name in each supported architecture's attention module
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")


@dataclass
class CriticalKV(squeezekit.TokenEvictor):
    """CriticalKV: attention times the norm of the value through the output projection, after an attention stage."""

    name = "criticalkv"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: observation window: the last prompt tokens whose queries score the rest (always kept)
    window: int = 8
    #: share of each head's budget kept by attention alone before the projected score fills the rest
    first_stage: float = 0.5

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("first_stage", self.first_stage, 0 <= self.first_stage <= 1, "must be in [0, 1]")
        self.grams = {}

    def floor(self):
        return self.window

    def prepare(self, model):
        """Per layer, ``W_g^T W_g`` of each query head's slice of the output projection: (Hq, D, D) float32."""
        self.grams = {}
        for idx, attention in enumerate(squeezekit.attention_modules(model)):
            proj = next((getattr(attention, n) for n in _OUTPUT_PROJECTIONS if hasattr(attention, n)), None)
            if proj is None or getattr(proj, "weight", None) is None:
                accepted = f"needs an output projection ({', '.join(_OUTPUT_PROJECTIONS)}) in every attention module"
                raise squeezekit.ConfigError("evictor", self.name, accepted)
            w = proj.weight
            w = (w.to_local() if hasattr(w, "to_local") else w).detach().float()  # (hidden, Hq * D): a rank's heads
            D = getattr(attention, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
            per_head = w.view(w.shape[0], -1, D).transpose(0, 1)  # (Hq, hidden, D)
            self.grams[idx] = per_head.transpose(1, 2) @ per_head

    def score(self, view):
        import torch
        import torch.nn.functional as F

        protected = view.recent(self.window)
        if view.window_queries is None:  # decoding: oldest first
            return view.positions.float().masked_fill(protected, float("inf"))
        attn = view.window_attention().mean(dim=3)  # (B, H, G, S)
        B, H, G, S = attn.shape
        attn = F.max_pool1d(attn.reshape(-1, 1, S), POOL, stride=1, padding=POOL // 2).view(B, H, G, S)
        v = view.values.float().nan_to_num(0.0)
        gram = self.grams.get(view.layer_idx)
        if gram is None:  # a view built by hand, no model prepared: the identity projection, ||v_s||_2
            norms = v.norm(dim=-1)[:, :, None, :].expand(B, H, G, S)
        else:
            gram = gram.to(v.device).view(H, G, *gram.shape[1:])
            norms = torch.einsum("bhsd,hgde,bhse->bhgs", v, gram, v).clamp_min(0).sqrt()  # ||W_g v_s||_2
        critical = (attn * norms).sum(dim=2).masked_fill(~view.valid, float("-inf"))
        attention = attn.sum(dim=2).masked_fill(~view.valid | protected, float("-inf"))
        # stage one: each head's first_stage share of its budget, by attention alone, ranked above the rest
        budget = view.per_head_budget().to(attention.device)
        first = (self.first_stage * (budget - self.window).clamp_min(0)).floor().long()
        rank = attention.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        top = (rank < first.unsqueeze(-1)) & attention.isfinite()
        above = critical.masked_fill(~view.valid, float("-inf")).amax(dim=-1, keepdim=True).clamp_min(0) + 1
        score = torch.where(top, above + attention, critical)
        return score.masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(CriticalKV)

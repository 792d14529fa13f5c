"""Expected attention evictor: keep the tokens that future queries are expected to attend to (the idea of kvpress's
ExpectedAttentionPress, Devoto et al., 2025), derived here from the prompt's last queries under RoPE.

Derivation. Before RoPE, model the queries still to come as drawn from the distribution of the last ``window``
prompt queries (their mean ``mu`` and covariance ``Sigma``). RoPE rotates a query by its position: the query at a
future position ``t`` is ``R_t q``, and a window query seen at position ``p`` is ``R_p q``, so ``R_{t-p}`` carries
it to ``t``. Take ``x_w = R_{T-p_w} q_w`` (each window query carried to ``T``, the next position), and let a future
query be ``R_j x`` with ``x ~ N(mu, Sigma)`` (``mu``, ``Sigma``: the mean and covariance of the ``x_w``) and ``j``
uniform over the next ``horizon`` positions. For a cached key ``k`` (RoPE applied), the Gaussian moment generating
function gives ``E_x[exp(s k . R_j x)] = exp(s k'.mu + s^2/2 k'^T Sigma k')`` with ``k' = R_j^T k``; replacing
``R_j`` by its mean over ``j`` (a rotation scaled by ``mean cos``, ``mean sin`` per frequency, kvpress's
approximation too) makes it one number per key: with ``z_w = s (R_bar^T k) . x_w``,

    expected logit = mean_w z_w + var_w z_w / 2

The score of a slot is the softmax of that over the layer's slots (its expected attention), averaged over the query
heads of its KV head and, with ``value_norm``, times ``||v||`` (a token's share of the output also scales with its
value, as in kvpress). The ``window`` newest tokens are always kept; while decoding, a full layer drops its oldest
token (SnapKV's rule). RoPE's frequencies are read from the model in `prepare` (models with partial rotary rotate
their first dimensions only; the rest pass through); ``attention_scaling`` (YaRN) is not modelled. Without
`prepare` (a `LayerView` built by hand, in a test) they are RoPE's defaults for the head dim, base 10000.
"""

from dataclasses import dataclass

import squeezekit


@dataclass
class ExpectedAttention(squeezekit.TokenEvictor):
    """Expected attention: the attention the next queries are expected to pay, from the prompt's last queries."""

    name = "expected_attention"
    needs = squeezekit.Stat.WINDOW_QUERIES
    #: the last prompt tokens whose queries model the future ones (always kept)
    window: int = 8
    #: how many future positions the expectation averages RoPE over
    horizon: int = 512
    #: multiply the expected attention by the value's L2 norm
    value_norm: bool = True

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")
        squeezekit.check("horizon", self.horizon, self.horizon >= 1, "must be an integer >= 1")
        squeezekit.check("value_norm", self.value_norm, isinstance(self.value_norm, bool), "must be true or false")
        self.inv_freq = None

    def floor(self):
        return self.window

    def prepare(self, model):
        from squeezekit.architectures import rope_frequencies

        freq = rope_frequencies(model)
        if freq is None:
            raise squeezekit.ConfigError("evictor", self.name, "needs a model with rotary position embeddings (RoPE)")
        self.inv_freq = freq.detach().float().cpu()

    def score(self, view):
        import torch

        protected = view.recent(self.window)
        if view.window_queries is None:  # decoding: oldest first
            return view.positions.float().masked_fill(protected, float("inf"))
        q = view.window_queries.float()  # (B, H, G, W, D)
        B, H, G, W, D = q.shape
        freq = self.inv_freq
        if freq is None:  # a view built by hand, no model prepared: RoPE's default, base 10000
            freq = 1.0 / (10000.0 ** (torch.arange(0, D - D % 2, 2, dtype=torch.float32) / D))
        freq = freq.to(q.device)
        real = view.window_positions >= 0  # (B, W)
        shift = (view.seen.to(q.device).view(B, 1) - view.window_positions).clamp_min(0).float()  # T - p_w
        angle = shift.view(B, 1, 1, W, 1) * freq
        x = rotate(q, angle.cos(), angle.sin())  # each window query carried to position T
        j = torch.arange(self.horizon, device=q.device, dtype=torch.float32).view(-1, 1) * freq  # (J, F)
        keys = rotate(view.keys.float().nan_to_num(0.0), j.cos().mean(0), -j.sin().mean(0))  # R_bar^T k
        z = torch.einsum("bhgwd,bhsd->bhgws", x, keys) * view.scaling  # (B, H, G, W, S)
        n = real.sum(-1).view(B, 1, 1, 1, 1).float()
        w = real.view(B, 1, 1, W, 1).float()
        mean = (z * w).sum(3, keepdim=True) / n
        var = (((z - mean) ** 2) * w).sum(3, keepdim=True) / (n - 1).clamp_min(1)
        logit = (mean + var / 2).squeeze(3).masked_fill(~view.valid[:, :, None, :], float("-inf"))  # (B, H, G, S)
        score = torch.softmax(logit, dim=-1).nan_to_num(0.0).mean(dim=2)
        if self.value_norm:
            score = score * view.values.float().nan_to_num(0.0).norm(dim=-1)
        return score.masked_fill(protected, float("inf"))


def rotate(x, cos, sin):
    """RoPE's rotation in transformers' rotate-half layout (dimension ``i`` pairs with ``i + F``, ``F`` the number
    of frequencies, the last dimension of ``cos`` and ``sin``) of the first ``2F`` dimensions of ``x``; the other
    dimensions pass through. A negated ``sin`` rotates back; scaled ``cos`` / ``sin`` give a scaled rotation."""
    import torch

    F = cos.shape[-1]
    x1, x2, rest = x[..., :F], x[..., F : 2 * F], x[..., 2 * F :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@squeezekit.hookimpl
def register_evictors(register):
    register(ExpectedAttention)

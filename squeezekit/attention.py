"""squeezekit's attention function, registered with transformers' `AttentionInterface` as ``"squeezekit"``.

transformers builds one mask for all layers; once layers keep different tokens that is wrong, so this function
ignores the mask it is given and builds each layer's own from the cache's slots (validity and token positions):
exact for left or right padding and for layers of different lengths. Grouped-query attention folds the query heads
of a group into the query axis, so keys and values are never repeated, and per-KV-head masks stay per KV head.

Backends: ``sdpa`` (torch's scaled_dot_product_attention; no mask at all on the hot paths: causal prefill without
padding, decode over a full buffer) and ``eager`` (explicit softmax, in query blocks so memory stays bounded). The
explicit path also serves evictors that need accumulated attention (H2O): the probabilities of the queries actually
run are summed per slot as a by-product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import InputError
from .kernels import attention as kernels
from .kernels import decode as decode_kernel
from .statistics import Observation

if TYPE_CHECKING:
    from .cache import SqueezeCache, Step
    from .runner import PolicyRunner

NAME = "squeezekit"
#: the keyword argument that carries a forward's `Forward` from the decoder stack down to every attention call
KWARG = "squeezekit_forward"
#: most bytes of attention probabilities one query block may hold in the explicit path (CPU, CUDA)
BLOCK_BYTES = {"cpu": 1 << 27, "cuda": 1 << 30}


@dataclass
class Forward:
    """What every attention call of one forward needs. The compressor's hook on the decoder stack builds it and adds
    it to the forward's keyword arguments, which transformers passes down to the attention function unchanged."""

    step: Step
    cache: SqueezeCache | None  #: None for a forward without a cache (``use_cache=False``)
    runner: PolicyRunner
    backend: str  #: "sdpa" or "eager"


def _mask(kv_valid, kv_pos, q_pos, window):
    """(B, Hm, q, C) bool: slot holds a real token at or before the query (and inside its window)."""
    kp = kv_pos[:, :, None, :]
    qp = q_pos[:, None, :, None]
    allowed = kv_valid[:, :, None, :] & (kp <= qp)
    if window is not None:
        allowed &= (qp - kp) < window
    # Padding queries see nothing; let them attend to everything so their (unused) outputs stay finite.
    return allowed | ~allowed.any(-1, keepdim=True)


def _fold(query, n_kv):
    B, Hq, q, D = query.shape
    return query.reshape(B, n_kv, (Hq // n_kv) * q, D)


def _unfold(out, Hq, q):
    B, H, _, D = out.shape
    return out.reshape(B, Hq, q, D).transpose(1, 2).contiguous()


def _explicit(query, key, value, mask_for, scaling, softcap, q_valid, want_probs):
    """Softmax attention in query blocks; also returns per-slot attention summed over (valid) queries."""
    B, Hq, q, D = query.shape
    H, C = key.shape[1], key.shape[2]
    G = Hq // H
    qg = query.view(B, H, G, q, D)
    budget = BLOCK_BYTES.get(query.device.type, BLOCK_BYTES["cpu"])
    block = max(1, min(q, budget // max(1, B * Hq * C * 4)))
    outs = []
    probs_sum = torch.zeros(B, H, C, dtype=torch.float32, device=query.device) if want_probs else None
    for start in range(0, q, block):
        end = min(q, start + block)
        b = end - start
        qb = qg[:, :, :, start:end].reshape(B, H, G * b, D)
        scores = torch.matmul(qb, key.transpose(-1, -2)) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        m = mask_for(start, end)
        if m is not None:
            m = m[:, :, None].expand(B, m.shape[1], G, b, C).reshape(B, m.shape[1], G * b, C)
            scores = scores.masked_fill(~m, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs_sum is not None:
            weights = probs.view(B, H, G, b, C) * q_valid[:, None, None, start:end, None]
            probs_sum += weights.sum(dim=(2, 3))
        outs.append(torch.matmul(probs.to(value.dtype), value).view(B, H, G, b, D))
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return out.reshape(B, Hq, q, D).transpose(1, 2).contiguous(), probs_sum


def squeezekit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    forward: Forward | None = kwargs.get(KWARG)
    if forward is None:
        raise InputError(
            "attn_implementation 'squeezekit' only works inside a squeezekit.compress(model, ...) block; load the "
            "model with 'sdpa' or 'eager' and compress() switches it"
        )
    step, cache, runner = forward.step, forward.cache, forward.runner
    B, Hq, q, D = query.shape
    H = key.shape[1]
    scaling = D**-0.5 if scaling is None else scaling
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    layer = cache.layers[module.layer_idx] if cache is not None else None
    q_pos = step.new_pos.to(query.device)
    q_valid = step.new_valid.to(query.device)
    if layer is not None:
        layer.window = window
        cache.scaling[module.layer_idx] = scaling
        kv_valid, kv_pos = layer.valid, layer.positions
        if not layer.heads_differ:
            kv_valid, kv_pos = kv_valid[:, :1], kv_pos[:, :1]
        fresh = layer.capacity == q and step.prefill
    else:  # use_cache=False: the keys are exactly this step's tokens
        kv_valid, kv_pos = q_valid[:, None, :], q_pos[:, None, :]
        fresh = True

    if layer is not None and runner.observers:  # statistics the policies need (squeezekit.statistics)
        call = Observation(
            query=query, query_positions=q_pos, query_valid=q_valid, keys=key, values=value,
            new_slots=layer.new_slots, prefill=step.prefill,
        )  # fmt: skip
        runner.observe(layer.stats, call)
    want_probs = layer is not None and bool(runner.mass_statistics)

    causal_only = fresh and step.all_valid and (window is None or window >= q)
    if layer is not None and layer.steady and q == 1:
        full_buffer = not layer.holes  # host-known (no sync on the hot path); free slots: masked below
    else:
        full_buffer = (
            q == 1
            and bool(kv_valid.all())
            and (
                window is None
                or bool((q_pos.max() - kv_pos.masked_fill(~kv_valid, torch.iinfo(kv_pos.dtype).max).min()) < window)
            )
        )

    if q > 1 and not softcap and not full_buffer and forward.backend == "sdpa" and (want_probs or not causal_only):
        # masked multi-token steps (H2O's prefill, chunked or padded prefill): fused Triton kernels on CUDA
        fused = kernels.masked_attention(
            query, key, value, kv_valid, kv_pos, q_pos, q_valid, window, scaling, fresh, want_probs, dense=causal_only
        )
        if fused is not None:
            if want_probs:
                runner.add_attention(layer.stats, fused[1])
            return fused[0], None
    if forward.backend == "eager" or want_probs or softcap:
        if full_buffer:
            mask_for = lambda s, e: None  # noqa: E731
        else:
            mask_for = lambda s, e: _mask(kv_valid, kv_pos, q_pos[:, s:e], window)  # noqa: E731
        out, probs = _explicit(query, key, value, mask_for, scaling, softcap, q_valid.float(), want_probs)
        if want_probs:
            runner.add_attention(layer.stats, probs)
        return out, None

    gqa = Hq != H
    if causal_only:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q > 1, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if full_buffer:  # one query per sequence: fold the group into the query axis, no mask, no repeated K/V
        out = decode_kernel.decode_attention(query, key, value, scaling)  # opt-in Triton kernel (CUDA), else None
        if out is not None:
            return out, None
        out = F.scaled_dot_product_attention(_fold(query, H), key, value, scale=scaling)
        return _unfold(out, Hq, q), None
    shared = step.shared_masks if (fresh and layer is not None) else None
    key_ = (window, query.device)  # layers of a sharded model live on different devices
    mask = shared.get(key_) if shared is not None else None
    if mask is None:
        mask = _mask(kv_valid, kv_pos, q_pos, window)
        if shared is not None:
            shared[key_] = mask
    Hm = mask.shape[1]
    mask = mask[:, :, None].expand(B, Hm, Hq // H, q, mask.shape[-1]).reshape(B, Hm, (Hq // H) * q, -1)
    out = F.scaled_dot_product_attention(_fold(query, H), key, value, attn_mask=mask, scale=scaling)
    return _unfold(out, Hq, q), None


def register() -> None:
    """Make ``attn_implementation="squeezekit"`` known to transformers (idempotent)."""
    from .transformers_api import register_attention

    register_attention(NAME, squeezekit_attention)

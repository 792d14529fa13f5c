"""squeezekit's attention function, registered with transformers' `AttentionInterface` as ``"squeezekit"``.

transformers builds one mask for all layers; once layers keep different tokens that is wrong, so this function
ignores the mask it is given and attends over each layer's own slots (validity and token positions): exact for left
or right padding and for layers of different lengths. Grouped-query attention folds the query heads of a group into
the query axis, so keys and values are never repeated, and per-KV-head masks stay per KV head.

**The plan.** Which way a layer attends in a step is decided once, on the host, when the layer has written the
step's tokens (`plan_layer`, from what the step and the layer know there: no host sync), and the attention function
only dispatches to one of six small paths:

- ``causal``: a fresh prefill without padding or a window inside the step: SDPA ``is_causal``, no mask;
- ``full``: a one-token step over a buffer whose every slot holds a real token (a steady layer without free slots):
  no mask, no repeated K/V (SDPA with the group folded into the query axis, or the Triton decode kernel);
- ``masked``: SDPA with the layer's slot mask (padding, free slots, a window; shared by the fresh layers of a step);
- ``fused``: a multi-token step through the fused Triton kernel (squeezekit.kernels.attention), which builds the
  slot mask on the fly and also sums the attention per slot for the statistics that take it; where the kernel is
  off or fails, the plan's fallback path runs;
- ``pooled``: a one-token step over a layer whose KV heads hold different budgets (its pool of per-head segments)
  or whose slots are quantized, read as rows by a fused kernel that dequantizes in its tiles
  (squeezekit.kernels.decode; on the CPU, and with statistics that must see the keys or the probabilities, the
  layer hands over gathered, dequantized buffers and the step is ``masked`` or ``explicit``);
- ``explicit``: softmax in query blocks (the ``eager`` backend, logit soft-capping, or statistics that take the
  attention mass), summing the probabilities per slot as a by-product.

The statistics the policies need (squeezekit.statistics) observe each call through the runner's guard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import InputError, UnsupportedModelError
from .kernels import attention as kernels
from .kernels import decode as decode_kernel
from .statistics import Observation

if TYPE_CHECKING:
    from .cache import SqueezeCache
    from .layers import SlotLayer, SlotRows
    from .runner import PolicyRunner
    from .step import Step
    from .transformers_api import Geometry

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
    geometry: list[Geometry]  #: each layer's window, scale and soft-capping (read from the model once)

    def plan(self, layer_idx: int, device: torch.device) -> LayerPlan:
        """The layer's plan for this step: made by its write, or (no cache) now, over the step's own tokens."""
        plan = self.step.plans.get(layer_idx)
        if plan is None:
            if self.cache is not None:
                raise InputError(f"layer {layer_idx} attends before writing its keys into the squeezekit cache")
            plan = plan_uncached(self.step, self.geometry[layer_idx], self.backend, device)
            self.step.plans[layer_idx] = plan
        return plan


@dataclass(frozen=True)
class LayerPlan:
    """How one layer attends in one step (see the module docstring)."""

    path: str  #: "causal", "full", "masked", "fused" or "explicit"
    fallback: str  #: the path that runs when ``fused``'s kernel is off or fails
    q_pos: torch.Tensor  #: (B, q) the queries' positions, on the layer's device
    q_valid: torch.Tensor  #: (B, q) real queries
    kv_valid: torch.Tensor  #: (B, Hm, S) the slots' validity (Hm: 1 while the KV heads hold the same tokens)
    kv_pos: torch.Tensor  #: (B, Hm, S) the slots' positions
    window: int | None
    scaling: float
    softcap: float | None
    fresh: bool  #: slot i holds the step's token i (a fresh prefill): the kernels skip the tiles above the diagonal
    causal: bool  #: ``fresh`` without padding or a window inside the step: plain causal attention
    full: bool  #: every slot holds a real token the queries may see: no mask
    mass: bool  #: some statistic takes the attention each slot received
    layer: SlotLayer | None  #: the layer (its statistics), None without a cache
    shared: dict[Any, torch.Tensor] | None  #: the step's masks shared by fresh layers, None where not shared
    #: ``pooled``: the layer's keys and values as rows (a pool of per-head segments, or quantized slots)
    rows: SlotRows | None = None


def plan_layer(layer: SlotLayer, step: Step, runner: PolicyRunner, backend: str) -> LayerPlan:
    """The plan of ``layer`` once it has written ``step``'s tokens (host state only: no sync)."""
    device = layer.device
    q = step.q
    kv_valid, kv_pos = layer.valid, layer.positions
    if not layer.heads_differ:
        kv_valid, kv_pos = kv_valid[:, :1], kv_pos[:, :1]
    fresh = step.prefill and layer.capacity == q
    full = q == 1 and ((not layer.holes) if layer.steady else layer.full_after_write())
    plan = _plan(
        step, device, kv_valid, kv_pos, layer.window, layer.scaling, layer.softcap, fresh, full,
        bool(runner.mass_statistics), backend, layer, step.shared_masks if fresh else None,
    )  # fmt: skip
    rows = layer.decode_rows(q) if layer.budgeted else None  # type: ignore[attr-defined]  # (a BudgetedLayer's)
    if rows is not None:
        return dataclasses.replace(plan, path="pooled", fallback="pooled", rows=rows)
    return plan


def plan_uncached(step: Step, geometry: Geometry, backend: str, device: torch.device) -> LayerPlan:
    """A forward without a cache (``use_cache=False``): the keys are exactly this step's tokens."""
    q_pos, q_valid = step.new_pos.to(device), step.new_valid.to(device)
    return _plan(
        step, device, q_valid[:, None, :], q_pos[:, None, :], geometry.window, geometry.scaling, geometry.softcap,
        True, False, False, backend, None, None,
    )  # fmt: skip


def _plan(
    step: Step,
    device: torch.device,
    kv_valid: torch.Tensor,
    kv_pos: torch.Tensor,
    window: int | None,
    scaling: float,
    softcap: float | None,
    fresh: bool,
    full: bool,
    mass: bool,
    backend: str,
    layer: SlotLayer | None,
    shared: dict[Any, torch.Tensor] | None,
) -> LayerPlan:
    q = step.q
    causal = fresh and step.all_valid and (window is None or window >= q)
    explicit = backend == "eager" or mass or softcap is not None
    if explicit:
        fallback = "explicit"
    elif causal:
        fallback = "causal"
    elif full:
        fallback = "full"
    else:
        fallback = "masked"
    path = fallback
    if q > 1 and softcap is None and not full and backend == "sdpa" and (mass or not causal):
        if kernels.use("attention", device):
            path = "fused"
    return LayerPlan(
        path=path, fallback=fallback, q_pos=step.new_pos.to(device), q_valid=step.new_valid.to(device),
        kv_valid=kv_valid, kv_pos=kv_pos, window=window, scaling=scaling, softcap=softcap, fresh=fresh,
        causal=causal, full=full, mass=mass, layer=layer, shared=shared,
    )  # fmt: skip


# -- the paths ---------------------------------------------------------------------------------------------------------
def _mask(kv_valid: torch.Tensor, kv_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, Hm, q, C) bool: slot holds a real token at or before the query (and inside its window)."""
    kp = kv_pos[:, :, None, :]
    qp = q_pos[:, None, :, None]
    allowed = kv_valid[:, :, None, :] & (kp <= qp)
    if window is not None:
        allowed &= (qp - kp) < window
    # Padding queries see nothing; let them attend to everything so their (unused) outputs stay finite.
    return allowed | ~allowed.any(-1, keepdim=True)


def _fold(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    B, Hq, q, D = query.shape
    return query.reshape(B, n_kv, (Hq // n_kv) * q, D)


def _unfold(out: torch.Tensor, Hq: int, q: int) -> torch.Tensor:
    B, H, _, D = out.shape
    return out.reshape(B, Hq, q, D).transpose(1, 2).contiguous()


def _explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask_for: Callable[[int, int], torch.Tensor | None],
    scaling: float,
    softcap: float | None,
    q_valid: torch.Tensor,
    want_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _add_mass(plan: LayerPlan, runner: PolicyRunner, mass: torch.Tensor | None) -> None:
    if plan.mass and mass is not None and plan.layer is not None:
        runner.add_attention(plan.layer.stats, mass)


def _explicit_path(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    if plan.full:
        mask_for: Callable[[int, int], torch.Tensor | None] = lambda s, e: None  # noqa: E731
    else:
        mask_for = lambda s, e: _mask(plan.kv_valid, plan.kv_pos, plan.q_pos[:, s:e], plan.window)  # noqa: E731
    out, probs = _explicit(query, key, value, mask_for, plan.scaling, plan.softcap, plan.q_valid.float(), plan.mass)
    _add_mass(plan, runner, probs)
    return out, None


def _fused(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    fused = kernels.masked_attention(
        query, key, value, plan.kv_valid, plan.kv_pos, plan.q_pos, plan.q_valid, plan.window, plan.scaling,
        plan.fresh, plan.mass, dense=plan.causal,
    )  # fmt: skip
    if fused is None:  # the kernel is off or failed: the plain path
        return PATHS[plan.fallback](plan, runner, query, key, value)
    _add_mass(plan, runner, fused[1])
    return fused[0], None


def _causal(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    q = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, is_causal=q > 1, scale=plan.scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _full(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    """One query per sequence over a buffer of real tokens: the group folded into the query axis, no mask."""
    out = decode_kernel.decode_attention(query, key, value, plan.scaling)  # Triton (CUDA, when chosen), else None
    if out is not None:
        return out, None
    B, Hq, q, D = query.shape
    H = key.shape[1]
    out = F.scaled_dot_product_attention(_fold(query, H), key, value, scale=plan.scaling)
    return _unfold(out, Hq, q), None


def _pooled(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    """One query per sequence over a layer's rows (per-head segments of a pool, quantized slots): the fused kernel
    reads the valid slots' rows, dequantizing them in its tiles."""
    rows, layer = plan.rows, plan.layer
    assert rows is not None and layer is not None
    out = decode_kernel.pooled_decode_attention(
        query, rows.keys, rows.values, rows.offsets, rows.lengths, rows.valid, plan.scaling, rows.codec
    )
    if out is None:  # the kernel failed on its first use: gather (and dequantize) the buffers and mask them
        plain = dataclasses.replace(plan, path="masked", rows=None)
        return _masked(plain, runner, query, layer.keys, layer.values)
    return out, None


def _masked(
    plan: LayerPlan,
    runner: PolicyRunner,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, None]:
    B, Hq, q, D = query.shape
    H = key.shape[1]
    shared_key = (plan.window, query.device)  # layers of a sharded model live on different devices
    mask = plan.shared.get(shared_key) if plan.shared is not None else None
    if mask is None:
        mask = _mask(plan.kv_valid, plan.kv_pos, plan.q_pos, plan.window)
        if plan.shared is not None:
            plan.shared[shared_key] = mask
    Hm = mask.shape[1]
    mask = mask[:, :, None].expand(B, Hm, Hq // H, q, mask.shape[-1]).reshape(B, Hm, (Hq // H) * q, -1)
    out = F.scaled_dot_product_attention(_fold(query, H), key, value, attn_mask=mask, scale=plan.scaling)
    return _unfold(out, Hq, q), None


#: the paths, by name (the plan names one)
PATHS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {
    "causal": _causal, "full": _full, "masked": _masked, "fused": _fused, "explicit": _explicit_path,
    "pooled": _pooled,
}  # fmt: skip


def _check_geometry(plan: LayerPlan, layer_idx: int, scaling: Any, kwargs: dict[str, Any]) -> None:
    """At prefill: transformers passes the window, scale and soft-capping squeezekit read from the model when it
    built the cache (squeezekit.transformers_api.attention_geometry); a release that passes others is refused."""
    given = (kwargs.get("sliding_window") or None, scaling, kwargs.get("softcap") or None)
    mine = (plan.window, plan.scaling, plan.softcap)
    if given[0] != mine[0] or (given[1] is not None and abs(float(given[1]) - mine[1]) > 1e-12) or given[2] != mine[2]:
        raise UnsupportedModelError(
            f"layer {layer_idx}'s attention passes sliding_window={given[0]}, scaling={given[1]}, softcap={given[2]}, "
            f"but squeezekit read sliding_window={mine[0]}, scaling={mine[1]}, softcap={mine[2]} from the model: this "
            f"model or transformers release is not supported (squeezekit/transformers_api.py, attention_geometry)"
        )


def squeezekit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    forward: Forward | None = kwargs.get(KWARG)
    if forward is None:
        raise InputError(
            "attn_implementation 'squeezekit' only works inside a squeezekit.compress(model, ...) block; load the "
            "model with 'sdpa' or 'eager' and compress() switches it"
        )
    layer_idx = int(module.layer_idx)  # type: ignore[arg-type]  # (every supported attention module sets it)
    plan = forward.plan(layer_idx, query.device)
    step, runner = forward.step, forward.runner
    if step.prefill:
        _check_geometry(plan, layer_idx, scaling, kwargs)
    layer = plan.layer
    observers = runner.observers if step.prefill else runner.step_observers  # (squeezekit.statistics)
    if layer is not None and layer.new_slots is not None and observers:
        call = Observation(
            query=query, query_positions=plan.q_pos, query_valid=plan.q_valid, keys=key, values=value,
            keys_valid=plan.kv_valid, new_slots=layer.new_slots, prefill=step.prefill, scaling=plan.scaling,
        )  # fmt: skip
        runner.observe(layer.stats, call)
    return PATHS[plan.path](plan, runner, query, key, value)


def register() -> None:
    """Make ``attn_implementation="squeezekit"`` known to transformers (idempotent)."""
    from .transformers_api import register_attention

    register_attention(NAME, squeezekit_attention)

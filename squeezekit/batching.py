"""Serving many sequences: prefill in micro-batches (each compressed right after its prefill), then merge the
compressed caches into one batch for decoding. The prefill peak then holds one micro-batch's full KV, not the
whole batch's: the freed memory becomes batch size."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .allocation import BatchAllocation
from .attention import NAME as ATTENTION
from .cache import SqueezeCache
from .errors import InputError
from .layers import BudgetedLayer, SlotLayer
from .transformers_api import attn_implementation, output_cache

if TYPE_CHECKING:
    from .compressor import Compressor


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    compressor: Compressor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    micro_batch: int = 8,
    chunk: int | None = None,
    logits_to_keep: int = 1,
    on_logits: Callable[[slice, torch.Tensor], None] | None = None,
    pool_rows: bool = True,
) -> tuple[SqueezeCache, torch.Tensor]:
    """Prefill ``input_ids`` (B, T) in micro-batches inside ``compressor``'s active ``compress`` block on ``model``
    (what ``with squeezekit.compress(model, ...) as compressor`` gives).

    With ``chunk``, each micro-batch's prompt goes through the model ``chunk`` tokens at a time and every layer is
    evicted back to its budget after each chunk, so no layer ever holds more than its budget plus one chunk: the
    prefill never holds the whole prompt's KV. Layer importance (hence the budgets) then comes from the first chunk
    (a left-padded row whose first chunk is all padding takes the mean importance of the rows that have tokens there).

    The micro-batches are one batch: with a batch-level allocator (``LayerBudgetAllocator.batch_level``, e.g.
    ``squeeze`` with ``per="batch"``) the first micro-batch's allocation holds for the whole batch (a
    `squeezekit.allocation.BatchAllocation` passed to every micro-batch's cache). So rows with equal prompt lengths
    get equal budgets, and the assembled cache can take the CUDA-graph decode path.

    Left padding (``attention_mask``) gets the positions ``model.generate`` gives it: each sequence starts at 0.

    ``on_logits(rows, logits)``, if given, is called once per micro-batch, as it comes, with its rows (a slice of the
    batch) and the logits of their last ``logits_to_keep`` input positions, (rows, logits_to_keep, vocab) (scoring
    prompts needs more than the last one; ``chunk`` keeps only the last).

    ``pool_rows``: a layer whose rows got unequal budgets (a per-prompt allocator, prompts of different lengths)
    moves into a pool of per-(row, head) segments, so it holds the sum of the rows' budgets rather than the longest
    row's for every row (`squeezekit.layers.BudgetedLayer.pack`). False for a cache that multi-token steps extend
    next (scoring), which would take it back to rectangular buffers at once.

    Returns ``(cache, last_logits)``: one `SqueezeCache` for the whole batch and the (B, vocab) logits of each
    sequence's last prompt token.
    """
    if chunk and logits_to_keep > 1:
        raise InputError(
            "squeezekit.batching.prefill keeps the logits of the last position only with a chunked prefill"
        )
    if not (getattr(compressor, "active", False) and compressor.model is model):
        if attn_implementation(model) == ATTENTION:  # the model is in a block, but not this one
            raise InputError(
                "squeezekit.batching.prefill got the Compressor of another compress() block than the model's"
            )
        raise InputError("squeezekit.batching.prefill needs the model inside a squeezekit.compress(model, ...) block")
    batch = input_ids.shape[0]
    shared = BatchAllocation()
    cache: SqueezeCache | None = None
    logits, peak = [], 0
    for start in range(0, batch, micro_batch):
        rows = slice(start, start + micro_batch)
        mask = None if attention_mask is None else attention_mask[rows]
        part, last = _prefill_one(model, compressor, input_ids[rows], mask, chunk, shared, logits_to_keep)
        if on_logits is not None:
            on_logits(rows, last)
        logits.append(last[:, -1] if last.shape[1] == 1 else last[:, -1].clone())  # not a view of all kept
        del last
        if micro_batch >= batch:
            cache = part
            break
        if cache is None:  # the first micro-batch: preallocate the batch cache
            cache = _batch_cache(compressor, part, batch)
            peak = max(part.peak_kv_bytes_prefill, cache.kv_nbytes() + part.kv_nbytes())
        else:
            peak = max(peak, cache.kv_nbytes() + part.peak_kv_bytes_prefill)
        _copy_rows(cache, part, rows)
        del part
    assert cache is not None
    for layer in cache.layers:  # unequal budgets: into their pool (the batch was assembled rectangular, see below)
        if isinstance(layer, BudgetedLayer):
            layer.pool_if_unequal(rows=pool_rows)
    if batch > micro_batch:
        cache.peak_kv_bytes_prefill = max(peak, cache.kv_nbytes())
    cache.kv_bytes_prefill = cache.kv_nbytes()
    compressor.last_cache = cache
    return cache, torch.cat(logits)


def _prefill_one(
    model: torch.nn.Module,
    compressor: Compressor,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    chunk: int | None,
    shared: BatchAllocation,
    keep: int = 1,
) -> tuple[SqueezeCache, torch.Tensor]:
    """One micro-batch: ``(cache, logits of its last ``keep`` positions (b, keep, vocab))``."""
    T = ids.shape[1]
    # left padding: positions count real tokens only, as model.generate (and every later decode step) counts them
    positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp_min(0)
    if not chunk or chunk >= T:
        cache = compressor.new_cache(shared=shared)
        cache.pool_rows = False  # (pooled once the batch is assembled: `prefill`)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **compressor.cache_kwargs(cache),
        )
        return output_cache(out), out.logits
    if mask is None:
        mask = torch.ones_like(ids)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    assert positions is not None  # from the given mask, or from the all-ones one
    cache = compressor.new_cache(shared=shared, expected_prompt_len=mask.sum(-1))
    cache.pool_rows = False
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        out = model(
            input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], use_cache=True,
            logits_to_keep=1, **compressor.cache_kwargs(cache),
        )  # fmt: skip
        last = out.logits[:, -1:]
        del out
        # buffers keep their room for a chunk until compact(): this is the most the prefill holds
        cache.peak_kv_bytes_prefill = max(cache.peak_kv_bytes_prefill, cache.kv_nbytes())
    cache.compact()
    return cache, last


# -- building one batch cache from the micro-batches' ---------------------------------------------------------------
def _batch_cache(compressor: Compressor, first: SqueezeCache, batch: int) -> SqueezeCache:
    """An empty cache of ``batch`` rows laid out like ``first`` (the first micro-batch), to `_copy_rows` into."""
    out = compressor.new_cache()
    out.sync_timings = first.sync_timings
    out.length = first.length
    out.seen = first.seen.new_zeros(batch)
    out.prompt_len = first.prompt_len.new_zeros(batch)
    out.importance = first.importance.new_zeros(batch, first.importance.shape[1])
    out.budgets = first.budgets.new_zeros(batch, first.budgets.shape[1])
    for layer, like in zip(out.layers, first.layers, strict=True):
        if isinstance(like, BudgetedLayer):  # a micro-batch's pooled heads are copied as rectangular buffers
            like.unpack()
        layer.initialize_like(like)
        with torch.inference_mode(False):  # slot tensors carry version counters (see squeezekit.layers)
            for name, t, fill in like.slot_items():
                layer.set_slot(name, torch.full((batch, *t.shape[1:]), fill, dtype=t.dtype, device=t.device))
            if like.budget is not None:
                layer.budget = like.budget.new_zeros(batch)
        if like.held is not None:
            layer.held = np.zeros((batch, like.held.shape[1]), dtype=np.int64)
        if isinstance(layer, BudgetedLayer) and isinstance(like, BudgetedLayer) and like.head_budget is not None:
            layer.head_budget = like.head_budget.new_zeros(batch, like.head_budget.shape[1])
            layer.budget_host = np.zeros(batch, dtype=np.int64)
            layer.head_budget_host = np.zeros((batch, like.head_budget.shape[1]), dtype=np.int64)
        if like.budgeted:
            layer.steady, layer.holes = like.steady, like.holes
    return out


def _copy_rows(cache: SqueezeCache, part: SqueezeCache, rows: slice) -> None:
    """Copy a micro-batch's compressed cache into ``rows`` of the batch cache (its tensors are freed as they are
    copied)."""
    if part.length != cache.length or part.runner is not cache.runner:
        raise ValueError("caches to merge must come from one compress() block and have the same padded length")
    for name in ("seen", "prompt_len", "importance", "budgets"):
        getattr(cache, name)[rows] = getattr(part, name)
    cache.full_kv_bytes_prefill += part.full_kv_bytes_prefill
    cache.kv_bytes_prefill += part.kv_bytes_prefill
    cache.host_seen_max = max(cache.host_seen_max, part.host_seen_max)
    for key in cache.timings:
        cache.timings[key] += part.timings[key]
    for layer, piece in zip(cache.layers, part.layers, strict=True):
        _copy_layer_rows(layer, piece, rows)


def _copy_layer_rows(layer: SlotLayer, part: SlotLayer, rows: slice) -> None:
    """Copy ``part``'s rows into ``rows`` of ``layer`` (growing its slots if ``part`` holds more), then free it.
    A micro-batch whose heads hold unequal budgets comes out of its pool first; the batch's layers are rectangular
    while they are assembled (at most the largest head budget per head) and go into their own pool at the end."""
    if isinstance(part, BudgetedLayer):
        part.unpack()
    if part.capacity > layer.capacity:  # rare: this micro-batch got a larger budget for the layer
        layer.pad_to(part.capacity)
        layer.holes = True  # the rows so far now have free slots
    # a row padded to the batch's buffer has free slots: still steady (see BudgetedLayer.holes)
    layer.holes = layer.holes or part.holes or part.capacity < layer.capacity
    mine = {name: t for name, t, _ in layer.slot_items()}
    for name, t, fill in part.slot_items():
        extra = layer.capacity - t.shape[2]
        if extra:
            t = torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 4 else (0, extra), value=fill)
        mine[name][rows] = t
    if isinstance(layer, BudgetedLayer) and isinstance(part, BudgetedLayer) and part.budget is not None:
        assert layer.budget is not None and layer.head_budget is not None and part.head_budget is not None
        assert layer.budget_host is not None and layer.head_budget_host is not None
        layer.budget[rows] = part.budget
        layer.head_budget[rows] = part.head_budget
        layer.budget_host[rows] = part.budget_host
        layer.head_budget_host[rows] = part.head_budget_host
    if layer.held is not None and part.held is not None:
        layer.held[rows] = part.held
    layer.heads_differ |= part.heads_differ
    layer.steady = layer.steady and part.steady
    part.reset()

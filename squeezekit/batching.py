"""Serving many sequences: prefill in micro-batches (each compressed right after its prefill), then merge the
compressed caches into one batch for decoding. The prefill peak then holds one micro-batch's full KV, not the
whole batch's: the freed memory becomes batch size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import SqueezeCache
from .errors import InputError
from .transformers_api import cache_argument, output_cache


def _pad_slots(t: torch.Tensor | None, capacity: int, value) -> torch.Tensor | None:
    if t is None:
        return None
    extra = capacity - t.shape[2]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 4 else (0, extra)
    return F.pad(t, pad, value=value)


_SLOT_TENSORS = (("keys", 0.0), ("values", 0.0), ("valid", False), ("positions", -1), ("attention", 0.0))


class Assembler:
    """Builds one batch cache from compressed micro-batch caches, copying each into preallocated rows as it comes,
    so the merge never holds two copies of the compressed cache."""

    def __init__(self, first: SqueezeCache, batch: int):
        self.out = out = SqueezeCache(first.compressor, len(first.layers))
        self.batch, self.rows = batch, 0
        out.length = first.length
        out.seen = first.seen.new_zeros(batch)
        out.prompt_len = first.prompt_len.new_zeros(batch)
        out.importance = first.importance.new_zeros(batch, first.importance.shape[1])
        out.budgets = first.budgets.new_zeros(batch, first.budgets.shape[1])
        out.scaling = dict(first.scaling)
        for layer, part in zip(out.layers, first.layers, strict=True):
            for name, fill in _SLOT_TENSORS:
                t = getattr(part, name)
                if t is not None:
                    setattr(layer, name, torch.full((batch, *t.shape[1:]), fill, dtype=t.dtype, device=t.device))
            if part.budget is not None:
                layer.budget = part.budget.new_zeros(batch)
            layer.window, layer.steady, layer.holes = part.window, part.steady, part.holes
            layer.lazy_initialization(layer.keys, layer.values)

    def add(self, cache: SqueezeCache) -> None:
        out, r0 = self.out, self.rows
        if cache.length != out.length or cache.compressor is not out.compressor:
            raise ValueError("caches to merge must come from one compress() block and have the same padded length")
        r1 = r0 + cache.seen.shape[0]
        rows = slice(r0, r1)
        for name in ("seen", "prompt_len", "importance", "budgets"):
            getattr(out, name)[rows] = getattr(cache, name)
        out.full_kv_bytes_prefill += cache.full_kv_bytes_prefill
        out.kv_bytes_prefill += cache.kv_bytes_prefill
        out.host_seen_max = max(out.host_seen_max, cache.host_seen_max)
        for key in out.timings:
            out.timings[key] += cache.timings[key]
        for layer, part in zip(out.layers, cache.layers, strict=True):
            if part.capacity > layer.capacity:  # rare: this micro-batch got a larger budget for the layer
                for name, fill in _SLOT_TENSORS:
                    setattr(layer, name, _pad_slots(getattr(layer, name), part.capacity, fill))
                layer.holes = True  # the rows so far now have free slots
            # a row padded to the batch's buffer has free slots: still steady (squeezekit.cache.SqueezeLayer.holes)
            layer.holes = layer.holes or part.holes or part.capacity < layer.capacity
            steady = part.steady
            for name, fill in _SLOT_TENSORS:
                t = getattr(part, name)
                if t is not None:
                    getattr(layer, name)[rows] = _pad_slots(t, layer.capacity, fill)
            if part.budget is not None:
                layer.budget[rows] = part.budget
            layer.heads_differ |= part.heads_differ
            layer.steady = layer.steady and steady
            part.reset()  # its tensors are copied: free them now
        self.rows = r1

    def finish(self) -> SqueezeCache:
        if self.rows != self.batch:
            raise ValueError(f"assembled {self.rows} of {self.batch} rows")
        return self.out


@torch.inference_mode()
def prefill(
    model,
    compressor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    micro_batch: int = 8,
    chunk: int | None = None,
    logits_to_keep: int = 1,
    on_logits=None,
):
    """Prefill ``input_ids`` (B, T) in micro-batches inside an active ``compress`` block.

    ``compressor`` is that block's `Compressor` (what ``with squeezekit.compress(...) as c`` gives), or None for
    the one the model is in.

    With ``chunk``, each micro-batch's prompt goes through the model ``chunk`` tokens at a time and every layer is
    evicted back to its budget after each chunk, so no layer ever holds more than its budget plus one chunk: the
    prefill never holds the whole prompt's KV. Layer importance (hence the budgets) then comes from the first chunk.

    The micro-batches are one batch: with a batch-level allocator (``LayerBudgetAllocator.batch_level``, e.g.
    ``squeeze`` with ``per="batch"``) the first micro-batch's allocation holds for the whole batch. Later rows with a
    prompt length it has seen reuse its budgets; other lengths are allocated from its mean importance. So rows with
    equal prompt lengths get equal budgets, and the assembled cache can take the CUDA-graph decode path.

    Left padding (``attention_mask``) gets the positions ``model.generate`` gives it: each sequence starts at 0.

    ``on_logits(rows, logits)``, if given, is called once per micro-batch, as it comes, with its rows (a slice of the
    batch) and the logits of their last ``logits_to_keep`` input positions, (rows, logits_to_keep, vocab) (scoring
    prompts needs more than the last one; ``chunk`` keeps only the last).

    Returns ``(cache, last_logits)``: one `SqueezeCache` for the whole batch and the (B, vocab) logits of each
    sequence's last prompt token.
    """
    if chunk and logits_to_keep > 1:
        raise InputError("squeezekit.batching.prefill keeps the logits of the last position only with a chunked prefill")
    active = model_compressor(model)  # InputError outside a compress block
    if compressor is None:
        compressor = active
    elif compressor is not active:
        raise InputError("squeezekit.batching.prefill got the Compressor of another compress() block than the model's")
    batch = input_ids.shape[0]
    assembler, cache, logits, peak = None, None, [], 0
    try:
        for start in range(0, batch, micro_batch):
            sl = slice(start, start + micro_batch)
            mask = None if attention_mask is None else attention_mask[sl]
            part, last = _prefill_one(model, input_ids[sl], mask, chunk, logits_to_keep)
            if on_logits is not None:
                on_logits(sl, last)
            logits.append(last[:, -1] if last.shape[1] == 1 else last[:, -1].clone())  # not a view of all kept
            del last
            if micro_batch >= batch:
                cache = part
                break
            if assembler is None:  # the first micro-batch: its allocation holds for the batch
                compressor.batch_importance = part.importance.mean(0)
                lengths = part.prompt_len.cpu()
                layers = compressor.compressible
                compressor.batch_allocation = {int(k): part.budgets[i, layers] for i, k in enumerate(lengths)}
                assembler = Assembler(part, batch)  # preallocates the batch cache
                peak = max(part.peak_kv_bytes_prefill, assembler.out.kv_nbytes() + part.kv_nbytes())
            else:
                peak = max(peak, assembler.out.kv_nbytes() + part.peak_kv_bytes_prefill)
            assembler.add(part)
            del part
    finally:
        compressor.batch_importance = compressor.batch_allocation = None
    if assembler is not None:
        cache = assembler.finish()
        cache.peak_kv_bytes_prefill = peak
    compressor.last_cache = cache
    return cache, torch.cat(logits)


def _prefill_one(model, ids: torch.Tensor, mask: torch.Tensor | None, chunk: int | None, keep: int = 1):
    """One micro-batch: ``(cache, logits of the last ``keep`` positions (b, keep, vocab))``."""
    T = ids.shape[1]
    # left padding: positions count real tokens only, as model.generate (and every later decode step) counts them
    positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp_min(0)
    if not chunk or chunk >= T:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep)
        return output_cache(out), out.logits
    if mask is None:
        mask = torch.ones_like(ids)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        kwargs = dict(attention_mask=mask[:, :e], position_ids=positions[:, s:e], use_cache=True, logits_to_keep=1)
        if cache is None:
            from .cache import SqueezeCache

            cache = SqueezeCache(model_compressor(model), len(model_compressor(model).resolved.layers))
            cache.expected_prompt_len = mask.sum(-1)
        out = model(input_ids=ids[:, s:e], **{cache_argument(model): cache}, **kwargs)
        last = out.logits[:, -1:]
        del out
        # buffers keep their room for a chunk until compact(): this is the most the prefill holds
        cache.peak_kv_bytes_prefill = max(cache.peak_kv_bytes_prefill, cache.kv_nbytes())
    cache.compact()
    return cache, last


def model_compressor(model):
    """The `Compressor` currently applied to ``model`` (inside its ``compress`` block)."""
    from .attention import COMPRESSORS

    for module in model.modules():
        if module in COMPRESSORS:
            return COMPRESSORS[module]
    raise InputError("squeezekit.batching.prefill needs the model inside a squeezekit.compress(model, ...) block")

"""Serving many sequences: prefill in micro-batches (each compressed right after its prefill), then merge the
compressed caches into one batch for decoding. The prefill peak then holds one micro-batch's full KV, not the
whole batch's: the freed memory becomes batch size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import SqueezeCache


def _pad_slots(t: torch.Tensor | None, capacity: int, value) -> torch.Tensor | None:
    if t is None:
        return None
    extra = capacity - t.shape[2]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 4 else (0, extra)
    return F.pad(t, pad, value=value)


def merge(caches: list[SqueezeCache]) -> SqueezeCache:
    """Concatenate compressed caches of the same compressor along the batch (same padded prompt width)."""
    first = caches[0]
    if len({c.length for c in caches}) != 1 or any(c.compressor is not first.compressor for c in caches):
        raise ValueError("caches to merge must come from one compress() block and have the same padded length")
    out = SqueezeCache(first.compressor, len(first.layers))
    out.length = first.length
    out.seen = torch.cat([c.seen for c in caches])
    out.prompt_len = torch.cat([c.prompt_len for c in caches])
    out.importance = torch.cat([c.importance for c in caches])
    out.budgets = torch.cat([c.budgets for c in caches])
    out.full_kv_bytes_prefill = sum(c.full_kv_bytes_prefill for c in caches)
    out.kv_bytes_prefill = sum(c.kv_bytes_prefill for c in caches)
    out.scaling = dict(first.scaling)
    out.host_seen_max = max(c.host_seen_max for c in caches)
    for key in out.timings:
        out.timings[key] = sum(c.timings[key] for c in caches)
    for i, layer in enumerate(out.layers):
        parts = [c.layers[i] for c in caches]
        capacity = max(p.capacity for p in parts)
        layer.keys = torch.cat([_pad_slots(p.keys, capacity, 0.0) for p in parts])
        layer.values = torch.cat([_pad_slots(p.values, capacity, 0.0) for p in parts])
        layer.valid = torch.cat([_pad_slots(p.valid, capacity, False) for p in parts])
        layer.positions = torch.cat([_pad_slots(p.positions, capacity, -1) for p in parts])
        if parts[0].attention is not None:
            layer.attention = torch.cat([_pad_slots(p.attention, capacity, 0.0) for p in parts])
        if parts[0].budget is not None:
            layer.budget = torch.cat([p.budget for p in parts])
        layer.window = parts[0].window
        layer.heads_differ = any(p.heads_differ for p in parts)
        layer.steady = all(p.steady and p.capacity == capacity for p in parts)
        layer.lazy_initialization(layer.keys, layer.values)
    for c in caches:  # the parts' tensors now live in the merged cache only
        for layer in c.layers:
            layer.reset()
    return out


@torch.inference_mode()
def prefill(model, compressor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, micro_batch: int = 8):
    """Prefill ``input_ids`` (B, T) in micro-batches inside an active ``compress`` block.

    Returns ``(cache, last_logits)``: one merged `SqueezeCache` for the whole batch and the (B, vocab) logits of each
    sequence's last prompt token.
    """
    caches, logits = [], []
    for start in range(0, input_ids.shape[0], micro_batch):
        sl = slice(start, start + micro_batch)
        out = model(
            input_ids=input_ids[sl],
            attention_mask=None if attention_mask is None else attention_mask[sl],
            use_cache=True,
            logits_to_keep=1,
        )
        caches.append(out.past_key_values)
        logits.append(out.logits[:, -1])
        del out
    cache = caches[0] if len(caches) == 1 else merge(caches)
    compressor.last_cache = cache
    return cache, torch.cat(logits)

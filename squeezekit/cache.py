"""The compressed KV cache: a transformers `Cache` whose layers are slot buffers that really shrink.

Each layer holds ``keys``/``values`` of shape (B, H, C, D) plus, per slot, whether it is ``valid`` and the
``positions`` of the token it holds. Slots are unordered (RoPE is already applied to cached keys), so a decode step
writes its token into a free slot, or into the slot of the token the evictor drops, instead of concatenating.

One forward is one *step*: `SqueezeCache.begin_step` (called by the compressor's hook on the decoder stack) records
which new tokens are real and their positions; every layer's `update` writes its new keys/values; the attention
function (squeezekit.attention) masks each layer by its own slots; `SqueezeCache.end_step` then, on the first step
(prefill), plans per-layer budgets (squeezekit.allocation) and, on every step, evicts each layer down to its budget.
The policies are called only through the cache's `PolicyRunner`.

The slot tensors are ordinary (not inference-mode) tensors, also under ``torch.inference_mode``, so that the
runner's version counters can tell when a plugin writes into them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .allocation import BatchAllocation, plan_budgets
from .errors import InputError
from .kernels import steady as steady_kernel
from .policies import LayerView
from .runner import LIVE_FIELDS, PolicyRunner
from .selection import top_slots
from .transformers_api import Cache, CacheLayerMixin

#: creates tensors that are not inference tensors (they carry a version counter), whatever the caller's mode
_plain = torch.inference_mode(False)


def _plain_copy(t: Any) -> Any:
    if t is None or not t.is_inference():
        return t
    with _plain:
        return t.clone()


class PrefillViews(Sequence[LayerView]):
    """The prefill views of some layers, for an allocator that needs them (``AllocationRequest.layers``). Each view
    is built when it is read, so the copies a view makes (the prefill's inference tensors, the request's rows) exist
    for one layer at a time. ``sources``: the layers themselves, whose tensors the `PolicyRunner` watches."""

    def __init__(self, layers: list[SqueezeLayer], rows: torch.Tensor | None = None):
        self.sources = layers
        self._rows = rows  # only these sequences (None: all)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        view = self.sources[i].view("prefill")
        if self._rows is None or self._rows.numel() == view.keys.shape[0]:
            return view
        return view.rows(self._rows)


@dataclass
class Step:
    """What the current forward adds to every layer."""

    new_valid: torch.Tensor  # (B, q) bool: real (non-padding) new tokens
    new_pos: torch.Tensor  # (B, q) long: their positions in their sequences, -1 for padding
    prefill: bool  # first step of this cache
    all_valid: bool = False  # host-side: no padding among the new tokens (lets hot paths skip masks and syncs)
    counted: bool = False  # end_step has added the new tokens to `seen`
    #: masks shared by layers whose slots are laid out alike in this step, keyed by (window, device)
    shared_masks: dict = field(default_factory=dict)
    #: `SqueezeCache.seen_after_step`, computed once per step (every layer's evictor view asks for it)
    seen_after: torch.Tensor | None = None


#: the slot tensors every layer has, and the value of a free slot (per-slot statistics add theirs: see `slot_items`)
_SLOTS = tuple(zip(LIVE_FIELDS, (0.0, 0.0, False, -1), strict=True))


class SqueezeLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    # The slot tensors are set by the first `append` (until then, and after `reset`, they are None and
    # ``is_initialized`` is False); the code below only runs once they exist.
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor  #: (B, H, C) bool
    positions: torch.Tensor  #: (B, H, C) int32

    def __init__(self, cache: SqueezeCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.keys = self.values = self.valid = self.positions = None  # type: ignore[assignment]
        #: the statistics the policies need (squeezekit.statistics), by field: per-slot ones are part of the slot
        #: table (see `slot_items`), the others live for one step
        self.stats: dict[str, torch.Tensor] = {}
        self.budget: torch.Tensor | None = None  # (B,) long; None = unbounded
        self.window: int | None = None  # the model's own sliding window for this layer, if any
        self.new_slots: torch.Tensor | None = None  # (B, H, q) slots written by the current step
        self.heads_differ = False  # once per-head eviction happened, masks are per KV head
        #: host-side: every row is at its budget. A decode step then evicts one token and writes the new one: shapes
        #: never change, no host sync (CUDA-graph safe). Without `holes`, in the evicted token's slot and no mask.
        self.steady = False
        #: host-side, with `steady`: some rows have free slots (a smaller budget than the buffer, or padding). A step
        #: then writes where the general path would (the first free slot once the victim's is freed) and attention
        #: masks by slot: bitwise what the general path computes, without its host syncs.
        self.holes = False

    # -- transformers' layer API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.13 (see transformers_api)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only used by transformers' own mask builders, which squeezekit's attention does not use.
        return self.capacity + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.positions = None  # type: ignore[assignment]
        self.budget = None
        self.stats = {}
        self.is_initialized = False

    # -- the slot table ------------------------------------------------------------------------------------------
    def slot_items(self) -> list[tuple[str, torch.Tensor, Any]]:
        """``(name, tensor, free-slot value)`` of every slot tensor: keys, values, valid, positions and the per-slot
        statistics. Every operation on slots (growth, compaction, copies between caches) goes through this list."""
        items = [(name, getattr(self, name), fill) for name, fill in _SLOTS]
        items += [(name, self.stats[name], fill) for name, fill in self.cache.runner.slot_fields if name in self.stats]
        return [item for item in items if item[1] is not None]

    def _set_slot(self, name: str, tensor: torch.Tensor) -> None:
        if name in LIVE_FIELDS:
            setattr(self, name, tensor)
        else:
            self.stats[name] = tensor

    def map_rows(self, fn: Any) -> None:
        """Replace every per-sequence tensor ``t`` of the layer (slots, statistics, budget) by ``fn(t)``."""
        with _plain:
            for name in (*LIVE_FIELDS, "budget", "new_slots"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, fn(t))
            self.stats = {name: fn(t) for name, t in self.stats.items()}

    def end_step(self) -> None:
        """Drop the statistics that live for one step (those not in the slot table), and any no longer collected
        (after a policy fell back to one that needs fewer)."""
        runner = self.cache.runner
        for name in runner.step_fields:
            self.stats.pop(name, None)
        for name in [n for n in self.stats if n not in runner.fields]:
            del self.stats[name]

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def counts(self) -> torch.Tensor:
        """(B, H) number of valid slots."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (keys, values and bookkeeping)."""
        tensors = [t for _, t, _ in self.slot_items()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def kv_bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens held (valid slots), without the free slots' room."""
        if self.keys is None:
            return 0
        per_slot = 2 * self.keys.shape[-1] * self.keys.element_size()
        return int(self.valid.sum()) * per_slot

    def view(self, phase: str, for_plugin: bool = True) -> LayerView:
        """What an evictor sees: the layer's own slot tensors (writes to them are detected, see PolicyRunner) and
        fresh copies of the small per-sequence tensors."""
        cache = self.cache
        B = self.keys.shape[0]
        budget = self.budget if self.budget is not None else torch.full((B,), self.capacity, dtype=torch.long)
        plain = _plain_copy if for_plugin else (lambda t: t)  # a copy only of the prefill's inference tensors
        return LayerView(
            keys=plain(self.keys),
            values=plain(self.values),
            valid=self.valid,
            positions=self.positions,
            seen=cache.seen_after_step().to(self.keys.device, copy=True),
            budget=budget.to(self.keys.device, copy=True),
            layer_idx=self.layer_idx,
            n_layers=len(cache.layers),
            phase=phase,
            scaling=cache.scaling.get(self.layer_idx, 1.0),
            stats={name: plain(t) for name, t in self.stats.items() if name in cache.runner.fields},
        )

    # -- writing ---------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Write one step's new keys/values into free slots and return the whole buffers."""
        step = self.cache.step
        B, H, q, _ = k.shape
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        if self.keys is None:  # first step: the projections become the buffers, slot i = token i (no copy)
            self.keys, self.values = k, v
            with _plain:
                self.valid = step.new_valid.to(k.device)[:, None, :].expand(B, H, q).clone()
                self.positions = step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q).clone()
                for name, fill in self.cache.runner.slot_fields:
                    self.stats[name] = torch.full((B, H, q), fill, dtype=torch.float32, device=k.device)
            self.new_slots = torch.arange(q, device=k.device).expand(B, H, q)
            return self.keys, self.values
        if self.steady and q == 1 and step.all_valid:
            return self._steady_append(k, v)
        self.steady = False
        if q == 1 and self.budget is not None:
            self._make_room(step)
        free = ~self.valid
        need = q - int(free.sum(-1).min())
        if need > 0:
            self._grow(need)
            free = ~self.valid
        # The first q free slots of every row, in slot order.
        slots = torch.sort(free.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :q]
        idx = slots[..., None].expand(B, H, q, k.shape[-1])
        self.keys.scatter_(2, idx, k)
        self.values.scatter_(2, idx, v)
        self.valid.scatter_(2, slots, step.new_valid.to(k.device)[:, None, :].expand(B, H, q))
        self.positions.scatter_(2, slots, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q))
        self.reset_stats(slots)
        self.new_slots = slots
        return self.keys, self.values

    def _steady_append(self, k: torch.Tensor, v: torch.Tensor):
        """Decode at steady state: replace each row's lowest-ranked token by the new one, in place."""
        victim = steady_kernel.append_steady(self, k, v)
        if victim is not None:  # one fused kernel did it all (CUDA; squeezekit.kernels.steady)
            self.new_slots, self.heads_differ = victim, True
            return self.keys, self.values
        # the new token will be the newest: every held token competes (protect_newest=False)
        victim = self.cache.runner.victims(lambda: self.view("decode"), protect_newest=False, defer_nan=True)
        step = self.cache.step
        if self.holes:  # as _make_room + append: free the victim's slot, write into the first free one
            self.valid.scatter_(2, victim, False)
            victim = (~self.valid).to(torch.int8).argmax(-1, keepdim=True)
            self.valid.scatter_(2, victim, True)
        B, H, _, D = self.keys.shape
        self.keys.scatter_(2, victim[..., None].expand(B, H, 1, D), k)
        self.values.scatter_(2, victim[..., None].expand(B, H, 1, D), v)
        self.positions.scatter_(2, victim, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, 1))
        self.reset_stats(victim)
        self.new_slots = victim
        self.heads_differ = True
        return self.keys, self.values

    def reset_stats(self, slots: torch.Tensor, skip: int = 0) -> None:
        """Per-slot statistics of the slots that receive new tokens start again from their fill value (all but the
        first ``skip`` fields, which a kernel reset already)."""
        for name, fill in self.cache.runner.slot_fields[skip:]:
            self.stats[name].scatter_(2, slots, fill)

    def _grow(self, need: int) -> None:
        """Add free slots (amortised: at least double, capped near the budget for bounded layers)."""
        cap = self.capacity
        # Unbounded layers grow by an eighth (amortised O(1) per token without doubling the memory); bounded ones
        # only up to their budget.
        extra = max(need, 64, cap // 8)
        if self.budget is not None:
            extra = max(need, min(extra, int(self.budget.max()) + need - cap))
        self._pad_to(cap + extra)

    def _pad_to(self, capacity: int) -> None:
        """Grow every slot tensor to ``capacity`` slots (new slots free)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        with _plain:
            for name, t, fill in self.slot_items():
                pad = (0, 0, 0, extra) if t.dim() == 4 else (0, extra)
                self._set_slot(name, torch.nn.functional.pad(t, pad, value=fill))

    def _make_room(self, step: Step) -> None:
        """Before a one-token decode step: rows at their budget drop one token (the evictor picks which)."""
        counts, budget = self.counts(), self.budget
        assert budget is not None  # (only bounded layers make room)
        full = (counts >= budget.to(counts.device).view(-1, 1)) & step.new_valid.to(counts.device)[:, :1]
        if not bool(full.any()):
            return
        keep = torch.where(full, counts - 1, counts).amax(-1)  # counts are equal across heads of a row
        self.evict(keep, "decode", making_room=True)

    def evict(self, keep: torch.Tensor, phase: str, compact: bool = False, making_room: bool = False) -> None:
        """Keep ``keep[b]`` slots of each row, as chosen by the evictor. ``compact`` also shrinks the buffers.

        ``making_room``: before a decode step writes its token, which will be the most recent one; the engine then
        does not also protect the newest held token (that would take a slot of the evictor's, e.g. a sink).
        """
        runner = self.cache.runner
        keep = torch.minimum(keep.to(self.valid.device), self.counts().amin(-1))
        protect = not making_room
        if not compact and bool((self.counts() - keep.view(-1, 1) <= 1).all()):
            # The hot decode path: drop the lowest-ranked slot of each row that is over.
            victim = runner.victims(lambda: self.view(phase), protect_newest=protect)
            over = self.counts() > keep.view(-1, 1)
            self.valid.scatter_(2, victim, ~over[..., None] & torch.gather(self.valid, 2, victim))
            self.heads_differ = True
            return
        self._keep(runner.keep_slots(lambda: self.view(phase), keep, protect_newest=protect), compact)

    def _keep(self, idx: torch.Tensor, compact: bool) -> None:
        used = idx >= 0
        safe = idx.clamp_min(0)
        if compact:  # gather into new, smaller tensors: the old buffers are freed
            D = self.keys.shape[-1]
            gi = safe[..., None].expand(*safe.shape, D)
            with _plain:
                for name, t, fill in self.slot_items():
                    if name == "valid":
                        self.valid = used.clone()
                    elif t.dim() == 4:  # keys, values
                        self._set_slot(name, torch.gather(t, 2, gi))
                    else:
                        self._set_slot(name, torch.gather(t, 2, safe).masked_fill(~used, fill))
        else:
            # a row's -1 padding marks a spare column, not slot 0: scattering "not kept" into slot 0 would race with
            # (on CUDA) or overwrite (on the CPU) the row's own "kept" for slot 0, dropping e.g. an attention sink
            B, H, C = self.valid.shape
            kept = torch.zeros(B, H, C + 1, dtype=torch.bool, device=self.valid.device)
            kept.scatter_(2, torch.where(used, idx, C), True)
            self.valid &= kept[..., :C]
        self.heads_differ = True

    def make_plain(self) -> None:
        """Turn inference-mode buffers (a prefill run under ``torch.inference_mode`` that evicted nothing from this
        layer) into ordinary tensors, once, so that every later plugin call sees tensors with a version counter."""
        self.keys, self.values = _plain_copy(self.keys), _plain_copy(self.values)

    def shrink_to_fit(self) -> None:
        """Gather the valid slots into buffers just large enough (the oldest tokens first)."""
        counts = self.counts().amax(-1)
        if int(counts.max()) < self.capacity:
            self._keep(top_slots(self.positions.float(), self.view("prefill", for_plugin=False), counts), compact=True)

    def drop_out_of_window(self, compact: bool) -> None:
        """Sliding-window layers: forget tokens no future query can attend to (after prefill, shrink to fit)."""
        if self.window is None or self.keys is None:
            return
        horizon = (self.cache.seen.to(self.positions.device) - self.window).view(-1, 1, 1)
        stale = self.valid & (self.positions <= horizon)
        if bool(stale.any()):
            self.valid &= ~stale
            if compact:
                self.shrink_to_fit()

    def update_steady(self) -> None:
        """Recompute `steady` (every row at its budget) and `holes` (some slot free) from the slots (host sync: only
        between steps that change shapes). Sliding-window layers are never steady."""
        if self.window is None and self.budget is not None:
            counts = self.counts()
            self.steady = bool((counts == self.budget.to(counts.device).view(-1, 1)).all())
            self.holes = self.steady and not bool(self.valid.all())

    # -- building a batch cache from micro-batches (squeezekit.batching) --------------------------------------------
    def preallocate(self, like: SqueezeLayer, batch: int) -> None:
        """Empty slot tensors for ``batch`` rows shaped like ``like``'s (before `copy_rows`)."""
        with _plain:
            for name, t, fill in like.slot_items():
                self._set_slot(name, torch.full((batch, *t.shape[1:]), fill, dtype=t.dtype, device=t.device))
            if like.budget is not None:
                self.budget = like.budget.new_zeros(batch)
        self.window, self.steady, self.holes = like.window, like.steady, like.holes
        self.lazy_initialization(self.keys, self.values)

    def copy_rows(self, part: SqueezeLayer, rows: slice) -> None:
        """Copy ``part``'s rows into ``rows`` (growing the slots if ``part`` holds more), then free ``part``."""
        if part.capacity > self.capacity:  # rare: this micro-batch got a larger budget for the layer
            self._pad_to(part.capacity)
            self.holes = True  # the rows so far now have free slots
        # a row padded to the batch's buffer has free slots: still steady (see `holes`)
        self.holes = self.holes or part.holes or part.capacity < self.capacity
        steady = part.steady
        mine = {name: t for name, t, _ in self.slot_items()}
        for name, t, fill in part.slot_items():
            extra = self.capacity - t.shape[2]
            if extra:
                t = torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 4 else (0, extra), value=fill)
            mine[name][rows] = t
        if part.budget is not None and self.budget is not None:
            self.budget[rows] = part.budget
        self.heads_differ |= part.heads_differ
        self.steady = self.steady and steady
        part.reset()


class SqueezeCache(Cache):
    """A transformers `Cache` of `SqueezeLayer`s whose policies a `PolicyRunner` calls (see squeezekit.compress).

    ``layers``: the indices of the layers the budget applies to (full-attention layers); ``shared``: the allocation
    a micro-batched prefill shares across its micro-batches; ``expected_prompt_len`` (B,): the whole prompt's real
    length, known before a chunked prefill's first chunk, so that budgets are fractions of the prompt, not of the
    chunk; ``sync_timings``: synchronize the device around policy work so that `timings` are exact (benchmarks).
    """

    layers: list[SqueezeLayer]  # type: ignore[assignment]  # transformers' Cache holds any layer kind
    # Per-sequence state, set by the first step (None before it, like the layers' slot tensors):
    seen: torch.Tensor  #: (B,) real tokens per sequence
    prompt_len: torch.Tensor  #: (B,) real tokens of each prompt
    importance: torch.Tensor  #: (B, L) prefill cosine similarity
    budgets: torch.Tensor  #: (B, L) per-layer budgets (-1 = unbounded)
    step: Step  #: the step running now (None between steps)

    def __init__(
        self,
        runner: PolicyRunner,
        n_layers: int,
        layers: list[int],
        *,
        shared: BatchAllocation | None = None,
        expected_prompt_len: torch.Tensor | None = None,
        sync_timings: bool = False,
        branches: int = 1,
    ):
        self.runner = runner
        #: each row's prefill is computed once and its cache repeated this many times before budgets are planned
        #: (see `branch`); later steps pass ``rows x branches`` sequences
        self.branches = branches
        super().__init__(layers=[SqueezeLayer(self, i) for i in range(n_layers)])
        self.budget_layers = list(layers)
        self.shared, self.expected_prompt_len, self.sync_timings = shared, expected_prompt_len, sync_timings
        self.length = 0  # tokens processed per row, padding included (what DynamicCache would report)
        self.seen = self.step = self.prompt_len = self.importance = self.budgets = None  # type: ignore[assignment]
        self.full_kv_bytes_prefill = 0  # keys + values of the whole prompt, as a full cache would hold them
        self.kv_bytes_prefill = 0  # keys + values kept at the end of prefill
        self.peak_kv_bytes_prefill = 0  # the most keys + values allocated at any point of the prefill
        self.scaling: dict[int, float] = {}
        self.host_seen_max = 0  # host-side copy of seen.max(), so that hot paths never sync
        self.timings: dict[str, float] = {"importance": 0.0, "allocation": 0.0, "eviction": 0.0}

    # -- transformers' cache API ---------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].append(key_states, value_states)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (evicted tokens are gone)")

    # -- steps -----------------------------------------------------------------------------------------------------
    def begin_step(self, new_valid: torch.Tensor, all_valid: bool | None = None) -> Step:
        B, q = new_valid.shape
        new_valid = new_valid.bool()
        if self.seen is None:
            self.seen = torch.zeros(B, dtype=torch.long, device=new_valid.device)
        elif self.seen.shape[0] != B:
            raise InputError(f"batch size changed from {self.seen.shape[0]} to {B} within one compressed generation")
        if all_valid is None:
            all_valid = bool(new_valid.all())
        if all_valid:
            pos = self.seen.view(-1, 1) + torch.arange(q, device=new_valid.device)
        else:
            pos = self.seen.view(-1, 1) + new_valid.long().cumsum(-1) - 1
            pos = pos.masked_fill(~new_valid, -1)
        self.step = Step(new_valid=new_valid, new_pos=pos, prefill=self.length == 0, all_valid=all_valid)
        return self.step

    def seen_after_step(self) -> torch.Tensor:
        """(B,) tokens per sequence once the current step is done."""
        if self.step is not None and not self.step.counted:
            if self.step.seen_after is None:
                self.step.seen_after = self.seen + self.step.new_valid.sum(-1)
            return self.step.seen_after
        return self.seen

    def end_step(self, importance: torch.Tensor | None = None) -> None:
        """After every layer has written the step's tokens: at prefill, plan budgets from ``importance`` (B, L);
        then evict every layer down to its budget."""
        if self.step.prefill and self.branches > 1:
            importance = self.branch(importance)
        step = self.step
        self.length += step.new_valid.shape[1]
        self.seen.add_(step.new_valid.sum(-1))  # in place: CUDA graphs replay this
        step.counted = True
        self.host_seen_max += step.new_valid.shape[1] if step.all_valid else int(step.new_valid.sum(-1).max())
        if step.prefill:
            self.importance = importance  # type: ignore[assignment]  # (given at every prefill)
            self.full_kv_bytes_prefill = self.kv_nbytes()
            self.peak_kv_bytes_prefill = max(self.peak_kv_bytes_prefill, self.full_kv_bytes_prefill)
        for layer in self.layers:
            layer.drop_out_of_window(compact=step.prefill)
        if step.prefill:
            self._finish_prefill()
        else:
            self._enforce_budgets(compact=False)
        for layer in self.layers:
            layer.end_step()
        self.step = None  # type: ignore[assignment]

    def branch(self, importance: torch.Tensor | None) -> torch.Tensor | None:
        """Repeat every row of the prefill just computed ``branches`` times (row ``b`` becomes rows ``b x branches``
        to ``b x branches + branches - 1``), with its statistics, before any budget is planned: the copies can then
        be compressed differently (``squeezekit calibrate`` evicts one layer per copy) for the cost of one prefill.
        Returns ``importance`` repeated the same way."""
        n = self.branches

        def rep(t: Any) -> Any:
            return None if t is None else t.repeat_interleave(n, dim=0)

        step = self.step
        self.step = dataclasses.replace(step, new_valid=rep(step.new_valid), new_pos=rep(step.new_pos),
                                        shared_masks={}, seen_after=None)  # fmt: skip
        self.seen = rep(self.seen)
        for layer in self.layers:
            layer.batch_repeat_interleave(n)
        return rep(importance)

    def advance(self) -> None:
        """Account for one decode step whose work ran without Python (a CUDA-graph replay of a steady step)."""
        self.length += 1
        self.host_seen_max += 1

    def clock(self) -> float:
        """perf_counter, after a device sync when timings must be exact (benchmarks)."""
        if self.sync_timings and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _finish_prefill(self) -> None:
        self.prompt_len = (self.seen if self.expected_prompt_len is None else self.expected_prompt_len).clone()
        config = self.runner.config
        if config.full:
            self.budgets = torch.full((self.prompt_len.shape[0], len(self.layers)), -1, dtype=torch.long)
            for layer in self.layers:
                layer.heads_differ = False
        else:
            t0 = self.clock()
            layers = [self.layers[li] for li in self.budget_layers]
            self.budgets = plan_budgets(
                self.prompt_len, self.importance, self.budget_layers, len(self.layers), config.budget, self.runner,
                self.shared, views=lambda rows: PrefillViews(layers, rows),
            )  # fmt: skip
            t1 = self.clock()
            self.timings["allocation"] += t1 - t0
            for li in self.budget_layers:
                self.layers[li].budget = self.budgets[:, li].to(self.layers[li].keys.device)
            self._enforce_budgets(compact=True)
            for layer in self.layers:
                if layer.budget is not None:
                    layer.make_plain()
            self.timings["eviction"] += self.clock() - t1
        self.kv_bytes_prefill = sum(layer.kv_nbytes() for layer in self.layers)

    def _enforce_budgets(self, compact: bool) -> None:
        for layer in self.layers:
            if layer.budget is None or layer.keys is None or layer.steady:
                continue
            counts = layer.counts().amax(-1)
            if bool((counts > layer.budget).any()):
                keep = torch.minimum(counts, layer.budget)
                layer.evict(keep, "prefill" if compact else "decode", compact=compact)
            layer.update_steady()

    def compact(self) -> None:
        """Shrink every bounded layer's buffers to the slots it holds (a chunked prefill left room for a chunk)."""
        for layer in self.layers:
            if layer.keys is None or layer.budget is None:
                continue
            layer.shrink_to_fit()
            layer.update_steady()
        # The prefill saw the prompt one chunk at a time: account as if it had gone through at once.
        self.full_kv_bytes_prefill = sum(
            2 * layer.keys[:, :, :1].numel() * self.length * layer.keys.element_size()
            for layer in self.layers
            if layer.keys is not None
        )
        self.kv_bytes_prefill = self.kv_nbytes()

    def check_nan(self) -> None:
        """Report NaN scores the hot path recorded without a host sync (see PolicyRunner.check_nan)."""
        self.runner.check_nan()

    # -- building a batch cache from micro-batches (squeezekit.batching) --------------------------------------------
    @classmethod
    def for_batch(cls, first: SqueezeCache, batch: int) -> SqueezeCache:
        """An empty cache of ``batch`` rows laid out like ``first`` (a micro-batch), to `copy_rows` into."""
        out = cls(first.runner, len(first.layers), first.budget_layers, sync_timings=first.sync_timings)
        out.length = first.length
        out.seen = first.seen.new_zeros(batch)
        out.prompt_len = first.prompt_len.new_zeros(batch)
        out.importance = first.importance.new_zeros(batch, first.importance.shape[1])
        out.budgets = first.budgets.new_zeros(batch, first.budgets.shape[1])
        out.scaling = dict(first.scaling)
        for layer, part in zip(out.layers, first.layers, strict=True):
            layer.preallocate(part, batch)
        return out

    def copy_rows(self, part: SqueezeCache, rows: slice) -> None:
        """Copy a micro-batch's compressed cache into ``rows`` (its tensors are freed as they are copied)."""
        if part.length != self.length or part.runner is not self.runner:
            raise ValueError("caches to merge must come from one compress() block and have the same padded length")
        for name in ("seen", "prompt_len", "importance", "budgets"):
            getattr(self, name)[rows] = getattr(part, name)
        self.full_kv_bytes_prefill += part.full_kv_bytes_prefill
        self.kv_bytes_prefill += part.kv_bytes_prefill
        self.host_seen_max = max(self.host_seen_max, part.host_seen_max)
        for key in self.timings:
            self.timings[key] += part.timings[key]
        for layer, part_layer in zip(self.layers, part.layers, strict=True):
            layer.copy_rows(part_layer, rows)

    # -- accounting --------------------------------------------------------------------------------------------------
    def kv_nbytes(self) -> int:
        """Bytes of keys and values held now, over all layers."""
        return sum(layer.kv_nbytes() for layer in self.layers)

    def kv_bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens held now (the buffers' free slots not counted)."""
        return sum(layer.kv_bytes_held() for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes of every tensor held now (keys, values and per-slot bookkeeping)."""
        return sum(layer.nbytes() for layer in self.layers)

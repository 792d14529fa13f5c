"""The layers of a compressed cache, one class per kind, chosen when the cache is built (`squeezekit.cache`).

Every kind keeps the same *slot table* (`SlotLayer`): ``keys``/``values`` (B, H, C, D) and, per slot, whether it is
``valid``, the ``positions`` of the token it holds and the per-slot statistics the policies need (`stats`). Slots are
unordered (RoPE is already applied to cached keys), so a step writes its tokens into free slots, or into the slot of
the token the evictor drops, instead of concatenating. The kinds differ in what happens to the table:

- `FullLayer`: nothing is ever evicted (budget 1, the full cache); it grows as tokens come.
- `WindowLayer`: the model's own sliding window (Gemma3's sliding layers): tokens no future query can see leave.
- `BudgetedLayer`: the compressed layer, at most its budget per sequence. It is the one owner of eviction: making
  room for a decode token (`write`), the steady decode write (one token replaces the one the evictor drops, no host
  sync: CUDA-graph safe) and enforcing the budget after a multi-token step (`settle`). A budgeted layer of a model
  whose attention is windowed (Mistral's ``sliding_window``) also drops what the window drops.

Each layer's attention geometry (window, softmax scale, soft-capping) is fixed when the cache is built
(`squeezekit.transformers_api.attention_geometry`); the attention function never writes it.

**Host state.** A layer tracks how many tokens each KV head of each row holds on the host (`SlotLayer.held`, a
(B, H) array), updated by every write and eviction from what the step already knows (the evictor keeps exactly the
counts it is asked for). The attention plan (`squeezekit.attention.plan_layer`) and the steady flags read it without
a host sync. A layer whose window drops tokens on the device does not know its counts on the host (``held`` is
None): it is never steady and always attends with a mask.

**Head budgets.** A budgeted layer's budget is per row (``budget``, what the allocator gives the layer) and per KV
head (``head_budget``, what the head split gives each head of it at the end of prefill: the same for every head with
the default ``uniform`` split).

**Memory of unequal head budgets.** A rectangular (B, H, C, D) buffer would hold the largest head's budget for
every head. Once the heads of a budgeted layer hold different budgets, its keys and values move into a *pool*
(`HeadPool`): each (row, head) owns a packed segment of exactly its budget, ``slot_map`` (B, H, C) names the pool
row of each logical slot (-1 past the segment), so the bytes held are the sum of the heads' budgets. Why packed
segments rather than pages: after prefill a head never grows (at steady state each decode token replaces one), so
segments need no allocator and waste nothing; a multi-token step that must grow (scoring's extend steps) unpacks the
layer and the next settle packs it again. Rows whose heads hold equal budgets but whose budgets differ from row to
row (a per-prompt allocator such as lost_attention, prompts of different lengths) go into a pool too, once the
batch's prefill is done, where the pool holds at most `ROW_POOL_SHARE` of the rectangular buffer's slots. The small
per-slot tensors (validity, positions, statistics: a few bytes a slot, against 2 x head_dim x 2 for bf16 K/V) stay
rectangular, so every policy still sees (B, H, C) tensors; the keys and values a view reads are gathered from the
pool, and on CUDA the decode attention reads the pool in place (the ``pooled`` kernel, squeezekit.kernels).

**Quantized slots.** With ``kv_bits`` 8 or 4 (squeezekit.quantized) a budgeted layer stores what it keeps, from
the end of prefill on, as quantized parts instead of ``keys``/``values`` (``quant``: ``k_codes``, ``k_scale``, ...,
each (B, H, C, n)): they are slot tensors like the others, so growth, compaction, merging micro-batches, reordering
rows and pooling move them without dequantizing; every write of keys and values quantizes (`write_kv`), and a read of
`keys`/`values` dequantizes a copy (the CPU path, statistics that need the keys, the policies' views). On CUDA the
decode attention reads the parts in place (`decode_rows`).

The slot tensors are ordinary (not inference-mode) tensors, also under ``torch.inference_mode``, so that the
runner's version counters can tell when a plugin writes into them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from . import kernels, quantized
from .kernels import steady as steady_kernel
from .policies import LIVE_FIELDS, LayerView
from .quantized import SlotCodec
from .selection import Ranking, top_slots
from .transformers_api import CacheLayerMixin, Geometry

if TYPE_CHECKING:
    from .cache import SqueezeCache
    from .step import Step

#: creates tensors that are not inference tensors (they carry a version counter), whatever the caller's mode
_plain = torch.inference_mode(False)


def plain_copy(t: Any) -> Any:
    """``t``, or a copy of it that is not an inference tensor (so that writes into it can be detected)."""
    if t is None or not t.is_inference():
        return t
    with _plain:
        return t.clone()


#: the slot tensors every layer has, and the value of a free slot (per-slot statistics add theirs: see `slot_items`)
_SLOTS = tuple(zip(LIVE_FIELDS, (0.0, 0.0, False, -1), strict=True))


def first_free(free: torch.Tensor, q: int) -> torch.Tensor:
    """(..., q): the first ``q`` free slots of each row of ``free`` (..., C), in slot order (then the taken ones, in
    slot order, where a row has fewer): one top-``q`` selection of distinct values, not a sort of every slot."""
    C = free.shape[-1]
    order = torch.arange(2 * C, C, -1, device=free.device, dtype=torch.int32)  # 2C - i: earlier slots rank higher
    return torch.topk(torch.where(free, order, order - C), q, dim=-1).indices


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slot table (see the module docstring); the base of every kind."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    #: the allocator gives this kind a budget
    budgeted: ClassVar[bool] = False
    #: host-side: a decode step has fixed shapes and no host sync (only a budgeted layer at its budget is); with
    #: `holes`, some slots are free (see `BudgetedLayer`)
    steady = False
    holes = False

    # The slot tensors are set by the first write (until then, and after `reset`, they are None and
    # ``is_initialized`` is False); the code below only runs once they exist.
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor  #: (B, H, C) bool
    positions: torch.Tensor  #: (B, H, C) int32

    def __init__(self, cache: SqueezeCache, layer_idx: int, geometry: Geometry):
        super().__init__()
        # the cache owns its layers: a weak reference back, so that no cycle keeps a cache's GPU memory alive once
        # its user lets go of it (until Python's cyclic collector ran, which may be many generations later)
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.window, self.scaling, self.softcap = geometry.window, geometry.scaling, geometry.softcap
        self.keys = self.values = self.valid = self.positions = None  # type: ignore[assignment]
        #: the statistics the policies need (squeezekit.statistics), by field: per-slot ones are part of the slot
        #: table (see `slot_items`), the others live for one step
        self.stats: dict[str, torch.Tensor] = {}
        self.new_slots: torch.Tensor | None = None  # (B, H, q) slots written by the current step
        self.heads_differ = False  # once per-head eviction happened, masks are per KV head
        #: host-side (B, H): the tokens each KV head of each row holds, None when only the device knows (see the module
        #: docstring)
        self.held: np.ndarray | None = None

    # -- transformers' layer API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = int(key_states.shape[-1])
        self.is_initialized = True

    @property
    def cache(self) -> SqueezeCache:
        """The cache this layer belongs to."""
        cache = self._cache()
        assert cache is not None, "a layer outlived its cache"
        return cache

    def initialize_like(self, other: SlotLayer) -> None:
        """Take ``other``'s dtype, device and head size (a cache assembled from another's rows)."""
        self.dtype, self.device, self.head_dim = other.dtype, other.device, other.head_dim
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.write(key_states, value_states)

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
        if self.held is not None:
            self.held = self.held[indices.cpu().numpy()]
        self.map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.held is not None:
            self.held = np.repeat(self.held, repeats, axis=0)
        self.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.positions = None  # type: ignore[assignment]
        self.stats = {}
        self.held = None
        self.is_initialized = False

    # -- the slot table ------------------------------------------------------------------------------------------
    def slot_items(self) -> list[tuple[str, torch.Tensor, Any]]:
        """``(name, tensor, free-slot value)`` of every slot tensor: keys, values, valid, positions and the per-slot
        statistics. Every operation on slots (growth, compaction, copies between caches) goes through this list."""
        items = [(name, getattr(self, name), fill) for name, fill in _SLOTS]
        items += [(name, self.stats[name], fill) for name, fill in self.cache.runner.slot_fields if name in self.stats]
        return [item for item in items if item[1] is not None]

    def set_slot(self, name: str, tensor: torch.Tensor) -> None:
        if name in LIVE_FIELDS:
            setattr(self, name, tensor)
        else:
            self.stats[name] = tensor

    #: per-sequence tensors besides the slot table and the statistics (a budgeted layer adds its budget)
    row_fields: ClassVar[tuple[str, ...]] = ("new_slots",)

    def map_rows(self, fn: Any) -> None:
        """Replace every per-sequence tensor ``t`` of the layer (slots, statistics, budget) by ``fn(t)``."""
        with _plain:
            slots = self.slot_items()  # (a quantized layer's keys and values are its parts)
            for name, t, _ in slots:
                self.set_slot(name, fn(t))
            for name in self.row_fields:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, fn(t))
            mapped = {name for name, _, _ in slots}
            self.stats = {name: t if name in mapped else fn(t) for name, t in self.stats.items()}

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
    def empty(self) -> bool:
        """No slot table yet (before the first write, after `reset`). Reads no keys: a pooled layer's would be
        gathered."""
        return self.valid is None

    @property
    def capacity(self) -> int:
        return 0 if self.valid is None else self.valid.shape[2]

    def counts(self) -> torch.Tensor:
        """(B, H) number of valid slots (on the device; `held` is the host's copy where it is known)."""
        return self.valid.sum(-1)

    def host_state(self) -> tuple:
        """The host's bookkeeping of this layer that shapes a step: buffer size, held counts, steady flags, where
        the keys and values live. Equal before and after a step: the step is a fixed point (`squeezekit.replay`)."""
        held = None if self.held is None else self.held.tobytes()
        return (self.capacity, held, self.steady, self.holes, self._storage())

    def _storage(self) -> Any:
        return None

    def full_after_write(self) -> bool:
        """Host-side: every slot holds a real token now (this step's written): attention needs no mask."""
        return self.held is not None and bool((self.held == self.capacity).all())

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (keys, values and bookkeeping)."""
        return sum(t.numel() * t.element_size() for _, t, _ in self.slot_items())

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def kv_bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens held (valid slots), without the free slots' room."""
        if self.valid is None:
            return 0
        return int(self.valid.sum()) * self.slot_kv_bytes()

    def slot_kv_bytes(self) -> int:
        """Bytes one slot's key and value take (in the model's dtype; `BudgetedLayer`: as stored)."""
        return 2 * self.head_dim * self.dtype.itemsize

    #: (B,) long on the layer's device: the most tokens a row may hold; None: unbounded (see `BudgetedLayer`)
    budget: torch.Tensor | None = None

    def budget_tensor(self) -> torch.Tensor:
        """(B,) long on the layer's device, a fresh tensor: the budget, or the capacity for an unbounded layer."""
        if self.budget is not None:
            return self.budget.clone()
        return torch.full((self.valid.shape[0],), self.capacity, dtype=torch.long, device=self.valid.device)

    def view(self, phase: str, for_plugin: bool = True) -> LayerView:
        """What an evictor sees: the layer's own slot tensors (writes to them are detected, see PolicyRunner) and
        fresh copies of the small per-sequence tensors."""
        cache = self.cache
        plain = plain_copy if for_plugin else (lambda t: t)  # a copy only of the prefill's inference tensors
        keys, values = self.view_kv(plain)
        return LayerView(
            keys=keys,
            values=values,
            valid=self.valid,
            positions=self.positions,
            seen=cache.seen_after_step().to(self.device, copy=True),
            budget=self.budget_tensor(),
            layer_idx=self.layer_idx,
            n_layers=len(cache.layers),
            phase=phase,
            scaling=self.scaling,
            head_budget=None if self.budget is None else self.head_budget_tensor(),
            stats={name: plain(t) for name, t in self.stats.items() if name in cache.runner.fields},
        )

    def view_kv(self, plain: Any) -> tuple[Any, Any]:
        """The keys and values a view hands over, or callables that make them on first use: the copies ``plain``
        makes of the prefill's inference tensors (a whole layer's keys and values, which an evictor scoring by
        position never reads: streaming's prefill eviction copied 2 x 134 MB a layer at 16 x 4096 of Mistral-7B)."""
        keys, values = self.keys, self.values
        if keys is not None and keys.is_inference():
            return (lambda: plain(keys)), (lambda: plain(values))
        return plain(keys), plain(values)

    def head_budget_tensor(self) -> torch.Tensor:
        """(B, H) long on the layer's device, a fresh tensor: each KV head's budget."""
        assert self.budget is not None
        return self.budget.view(-1, 1).expand(-1, self.valid.shape[1]).clone()

    # -- writing ---------------------------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's new keys/values into free slots and return the whole buffers (a budgeted layer first
        makes room: `BudgetedLayer.write`)."""
        if self.empty:
            return self._first_write(k, v)
        return self._append(k, v)

    def _first_write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first step: the projections become the buffers, slot i = token i (no copy)."""
        step = self.cache.step
        B, H, q, _ = k.shape
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self.keys, self.values = k, v
        with _plain:
            self.valid = step.new_valid.to(k.device)[:, None, :].expand(B, H, q).clone()
            self.positions = step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q).clone()
            for name, fill in self.cache.runner.slot_fields:
                self.stats[name] = torch.full((B, H, q), fill, dtype=torch.float32, device=k.device)
        self.new_slots = torch.arange(q, device=k.device).expand(B, H, q)
        self.held = (
            np.repeat(np.asarray(step.real, dtype=np.int64)[:, None], H, axis=1) if self.window is None else None
        )
        return self.keys, self.values

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write into the first ``q`` free slots of every row (growing the buffers if a row has fewer)."""
        step = self.cache.step
        B, H, q, _ = k.shape
        free = ~self.valid
        if self.held is not None:
            need = q - (self.capacity - int(self.held.max()))
        else:
            need = q - int(free.sum(-1).min())
        if need > 0:
            self._grow(need)
            free = ~self.valid
        # The first q free slots of every row, in slot order.
        slots = first_free(free, q)
        self.write_kv(slots, k, v)
        self.valid.scatter_(2, slots, step.new_valid.to(k.device)[:, None, :].expand(B, H, q))
        self.positions.scatter_(2, slots, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q))
        self.reset_stats(slots)
        self.new_slots = slots
        if self.held is not None:
            self.held = self.held + np.asarray(step.real, dtype=np.int64)[:, None]
        return self.attended(q)

    def write_kv(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` (B, H, q, D) into the slots ``slots`` (B, H, q) of every head."""
        idx = slots[..., None].expand(*slots.shape, k.shape[-1])
        self.keys.scatter_(2, idx, k)
        self.values.scatter_(2, idx, v)

    def attended(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What `write` returns for the attention of a ``q``-token step: the (B, H, C, D) keys and values."""
        return self.keys, self.values

    def reset_stats(self, slots: torch.Tensor, skip: int = 0) -> None:
        """Per-slot statistics of the slots that receive new tokens start again from their fill value (all but the
        first ``skip`` fields, which a kernel reset already)."""
        for name, fill in self.cache.runner.slot_fields[skip:]:
            self.stats[name].scatter_(2, slots, fill)

    def _grow(self, need: int) -> None:
        """Add free slots: unbounded layers grow by an eighth (amortised O(1) per token without doubling the
        memory), at least 64 slots."""
        self.pad_to(self.capacity + max(need, 64, self.capacity // 8))

    def pad_to(self, capacity: int) -> None:
        """Grow every slot tensor to ``capacity`` slots (new slots free)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        with _plain:
            for name, t, fill in self.slot_items():
                pad = (0, 0, 0, extra) if t.dim() == 4 else (0, extra)
                self.set_slot(name, torch.nn.functional.pad(t, pad, value=fill))

    # -- keeping ---------------------------------------------------------------------------------------------------
    def keep_slots(self, idx: torch.Tensor, compact: bool) -> None:
        """Keep the slots ``idx`` (B, H, K) of every row (-1: none); ``compact`` gathers them into smaller buffers."""
        used = idx >= 0
        safe = idx.clamp_min(0)
        if compact:  # gather into new, smaller tensors: the old buffers are freed
            with _plain:
                for name, t, fill in self.slot_items():
                    if name == "valid":
                        self.valid = used.clone()
                    elif t.dim() == 4:  # keys, values (or their quantized parts)
                        self.set_slot(name, torch.gather(t, 2, safe[..., None].expand(*safe.shape, t.shape[-1])))
                    else:
                        self.set_slot(name, torch.gather(t, 2, safe).masked_fill(~used, fill))
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
        self.keys, self.values = plain_copy(self.keys), plain_copy(self.values)

    def shrink_to_fit(self) -> None:
        """Gather the valid slots into buffers just large enough (the oldest tokens first)."""
        counts = self.counts().amax(-1)
        if int(counts.max()) < self.capacity:
            self.keep_slots(
                top_slots(self.positions.float(), self.view("prefill", for_plugin=False), counts), compact=True
            )

    # -- after a step ----------------------------------------------------------------------------------------------
    def ranking(self, step: Step) -> Ranking | None:
        """After every layer wrote the step's tokens, before any settles: the evictor's scores of the slots this
        layer will choose from, for the cache to rank with the other layers' (`BudgetedLayer.ranking`); None when
        this layer settles alone."""
        return None

    def settle(self, step: Step, kept: torch.Tensor | None = None) -> None:
        """After every layer wrote the step's tokens: what this kind does then (nothing, for a full layer).
        ``kept``: the (B, H, C) mask of the slots to keep that this layer's `ranking` asked for."""

    def compact(self) -> None:
        """Shrink the buffers to the slots held (after a chunked prefill, which left room for a chunk)."""


class FullLayer(SlotLayer):
    """The full cache: nothing is ever evicted (``budget=1``); the buffers grow as tokens come."""


class WindowLayer(SlotLayer):
    """The model's own sliding window (e.g. Gemma3's sliding layers, which take no part in budget allocation): a
    token leaves once no future query can attend to it. Otherwise nothing is evicted."""

    def settle(self, step: Step, kept: torch.Tensor | None = None) -> None:
        self.drop_out_of_window(compact=step.prefill)

    def drop_out_of_window(self, compact: bool) -> None:
        """Forget tokens no future query can attend to (after prefill, shrink to fit)."""
        if self.empty or self.window is None:
            return
        horizon = (self.cache.seen.to(self.positions.device) - self.window).view(-1, 1, 1)
        self.valid &= ~(self.positions <= horizon)
        if compact:
            differ = self.heads_differ
            self.shrink_to_fit()
            self.heads_differ = differ  # (dropped by position: the KV heads of a row still hold the same tokens)


#: rows of equal head budgets go into a pool (`BudgetedLayer.pack`) when it holds at most this share of the slots of
#: their rectangular buffer (as long as its longest row): below it, the bytes saved pay for the pooled reads
ROW_POOL_SHARE = 0.9


class HeadPool:
    """The keys and values of a budgeted layer whose KV heads hold different budgets (see the module docstring):
    ``parts``, each (N, n) with N the sum of the heads' capacities ``caps`` (B, H): ``keys``/``values`` (N, D), or
    the quantized slots' parts (``k_codes``, ``k_scale``, ...: squeezekit.quantized); ``slot_map`` (B, H, C), each
    logical slot's pool row, -1 past its head's segment; ``lengths`` (B, H) int32 on the device, the segments'
    lengths (the decode kernel reads no slot past them), and ``offsets`` (B, H) int64, their first rows."""

    def __init__(self, parts: dict[str, torch.Tensor], slot_map: torch.Tensor, caps: np.ndarray):
        self.parts, self.slot_map, self.caps = parts, slot_map, caps
        device = slot_map.device
        self.lengths = torch.as_tensor(caps, dtype=torch.int32).contiguous().to(device)
        #: (B, H) int64: each segment's first row; logical slot i of head (b, h) is row offsets[b, h] + i, so the decode
        #: kernel loads a head's slots as consecutive rows instead of through `slot_map` (a dependent load per tile)
        flat = torch.as_tensor(caps, dtype=torch.int64).reshape(-1)
        self.offsets = (torch.cumsum(flat, 0) - flat).view(caps.shape).contiguous().to(device)

    @classmethod
    def pack(cls, parts: dict[str, torch.Tensor], caps: np.ndarray) -> HeadPool:
        """Pool rectangular ``parts`` (each (B, H, C0, n)) whose head (b, h) holds what it keeps in its first slots
        (after a compaction), into segments of ``caps[b, h]`` slots (C0 <= caps.max())."""
        first = next(iter(parts.values()))
        B, H, C0, _ = first.shape
        device = first.device
        caps_t = torch.as_tensor(caps, device=device)
        offsets = (torch.cumsum(caps_t.view(-1), 0) - caps_t.view(-1)).view(B, H)
        C = int(caps.max())
        slot = torch.arange(C, device=device)
        # int32: 4 bytes a slot of bookkeeping fewer than int64 (a pool of up to 2**31 rows)
        slot_map = torch.where(slot < caps_t[..., None], offsets[..., None] + slot, -1).to(torch.int32)
        inside = slot[:C0] < caps_t[..., None]  # (B, H, C0)
        rows = slot_map[..., :C0][inside].long()
        pooled = {}
        with _plain:
            for name, t in parts.items():
                pooled[name] = t.new_zeros(int(caps.sum()), t.shape[-1])
                pooled[name][rows] = t[inside]
        return cls(pooled, slot_map, caps.copy())

    def gather(self, name: str) -> torch.Tensor:
        """(B, H, C, n): part ``name`` in the logical slot layout (past a segment: any row; those slots are invalid)."""
        return self.parts[name][self.slot_map.clamp_min(0)]

    def rect(self) -> dict[str, torch.Tensor]:
        """Every part gathered into the logical slot layout (back to rectangular buffers)."""
        return {name: self.gather(name) for name in self.parts}

    def mapped(self) -> torch.Tensor:
        """(B, H, C) bool: the logical slots inside their head's segment."""
        return self.slot_map >= 0

    def write(self, slots: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
        """Write each part's ``new[name]`` (B, H, q, n) into the logical ``slots`` (B, H, q), all inside their
        segments."""
        rows = self.slot_map.gather(2, slots).reshape(-1).long()
        for name, t in new.items():
            part = self.parts[name]
            part.index_copy_(0, rows, t.reshape(-1, part.shape[-1]).to(part.dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def map_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slot_map, self.lengths, self.offsets))


@dataclass(frozen=True)
class SlotRows:
    """What the fused decode kernel reads of a layer (squeezekit.kernels.decode.pooled_decode_attention): its keys'
    and values' parts as rows (N, n), each head's slots the consecutive rows ``offsets + i`` for i < ``lengths``,
    ``valid`` (B, H, S) the slots attended to, ``codec`` the slots' quantization (None: the model's dtype)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    offsets: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    codec: SlotCodec | None


class BudgetedLayer(WindowLayer):
    """A compressed layer: each row holds at most its budget, set at the end of prefill (`set_budget`), each KV head
    at most its head budget (`split_heads`), and this class alone decides what leaves (see the module docstring).
    Windowed when the model's attention is. With ``kv_bits`` below 16 it stores the slots it keeps quantized
    (squeezekit.quantized) from the end of prefill on."""

    budgeted = True
    row_fields = ("new_slots", "budget", "head_budget")

    def __init__(self, cache: SqueezeCache, layer_idx: int, geometry: Geometry):
        super().__init__(cache, layer_idx, geometry)
        self.budget: torch.Tensor | None = None  # (B,) long on the layer's device; None until prefill ends
        self.head_budget: torch.Tensor | None = None  # (B, H) long on the layer's device, with `budget`
        #: host-side copies: (B,) and (B, H)
        self.budget_host: np.ndarray | None = None
        self.head_budget_host: np.ndarray | None = None
        #: host-side: every head of every row is at its budget. A decode step then evicts one token and writes the
        #: new one: shapes never change, no host sync (CUDA-graph safe). Without `holes`, in the evicted token's slot
        #: and no mask.
        self.steady = False
        #: host-side, with `steady`: some slots are free (a smaller budget than the buffer, or padding). A step then
        #: writes where the general path would (the first free slot once the victim's is freed) and attention masks
        #: by slot: bitwise what the general path computes, without its host syncs.
        self.holes = False
        #: how kept slots are stored below 16 bits (None: in the model's dtype), set with the head dimension
        self.codec: SlotCodec | None = None
        #: (shape key, offsets, lengths) of `_buffer_rows`
        self._rows_of: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    # -- where the keys and values live -------------------------------------------------------------------------
    # Three places, one at a time: rectangular buffers in the model's dtype (``_keys``/``_values``), their quantized
    # parts (``quant``: name -> (B, H, C, n) slot tensors, e.g. ``k_codes``), or a pool of per-head segments of either
    # (``pool``). `keys`/`values` read any of them as (B, H, C, D) in the model's dtype; every write of keys and
    # values goes through `write_kv`.
    pool: HeadPool | None = None
    quant: dict[str, torch.Tensor] | None = None
    _keys: torch.Tensor | None = None
    _values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.codec = quantized.codec(self.cache.runner.config.kv_bits, self.head_dim)

    def initialize_like(self, other: SlotLayer) -> None:
        super().initialize_like(other)
        self.codec = getattr(other, "codec", None)

    @property
    def quantized(self) -> bool:
        """The kept slots are stored quantized now (from the end of prefill on, with ``kv_bits`` below 16)."""
        return self.quant is not None or (self.pool is not None and "keys" not in self.pool.parts)

    def _storage(self) -> Any:
        caps = None if self.pool is None else self.pool.caps.tobytes()
        budget = None if self.head_budget_host is None else self.head_budget_host.tobytes()
        return budget, caps, self.quant is not None, self.quantized

    def _read(self, which: str) -> torch.Tensor:
        """(B, H, C, D) keys (``"k"``) or values (``"v"``) in the model's dtype, from wherever they live."""
        if self.pool is None and self.quant is None:
            return self._keys if which == "k" else self._values  # type: ignore[return-value]
        if not self.quantized:
            return self.pool.gather("keys" if which == "k" else "values")  # type: ignore[union-attr]
        assert self.codec is not None
        pool, quant = self.pool, self.quant
        get = pool.gather if pool is not None else (lambda name: quant[name])  # type: ignore[index]
        return self.codec.decode(tuple(get(n) for n in self.codec.names(which)), self.dtype)

    @property
    def keys(self) -> torch.Tensor:
        """(B, H, C, D): the buffer, or a copy gathered from the pool or dequantized: write through `write_kv`."""
        return self._read("k")

    @keys.setter
    def keys(self, t: torch.Tensor) -> None:
        self._keys = t

    @property
    def values(self) -> torch.Tensor:
        return self._read("v")

    @values.setter
    def values(self, t: torch.Tensor) -> None:
        self._values = t

    def _rect_parts(self) -> dict[str, torch.Tensor]:
        """The rectangular (B, H, C, n) tensors the keys and values are stored in now (not pooled)."""
        if self.quant is not None:
            return self.quant
        return {"keys": self._keys, "values": self._values}  # type: ignore[dict-item]

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """New tokens' keys and values (B, H, q, D) as the parts they are stored in."""
        if not self.quantized:
            return {"keys": k, "values": v}
        assert self.codec is not None
        out = dict(zip(self.codec.names("k"), self.codec.encode(k), strict=True))
        out.update(zip(self.codec.names("v"), self.codec.encode(v), strict=True))
        return out

    def write_kv(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.pool is None and self.quant is None:
            return super().write_kv(slots, k, v)
        new = self._encode(k, v)
        if self.pool is not None:
            self.pool.write(slots, new)
            return
        for name, t in new.items():
            part = self.quant[name]  # type: ignore[index]
            part.scatter_(2, slots[..., None].expand(*slots.shape, part.shape[-1]), t.to(part.dtype))

    def quantize(self) -> None:
        """At the end of prefill, with ``kv_bits`` below 16: the kept slots' keys and values into their quantized
        parts (the model-dtype buffers are freed)."""
        if self.codec is None or self.quantized or self.budget is None or self.empty:
            return
        with _plain:
            keys, values = self.keys, self.values  # (gathered from a pool)
            parts = dict(zip(self.codec.names("k"), self.codec.encode(keys), strict=True))
            parts.update(zip(self.codec.names("v"), self.codec.encode(values), strict=True))
            parts = {n: t.contiguous() for n, t in parts.items()}
        self._keys = self._values = None
        if self.pool is not None:
            self.pool = HeadPool.pack(parts, self.pool.caps)
        else:
            self.quant = parts

    def pool_if_unequal(self, rows: bool) -> None:
        """`pack` at the end of a batch's prefill (``rows``: rows of unequal budgets too), then the steady flags."""
        self.pack(rows=rows)
        self.update_steady()

    def pack(self, rows: bool = False) -> None:
        """After a settle: the heads' budgets differ, so their keys and values move into a pool of segments of
        exactly each head's budget (the buffers were compacted to the largest). ``rows`` (once the batch's prefill
        is done): also when only the rows' budgets differ (per-prompt allocators such as lost_attention, prompts of
        different lengths), if the pool holds at most `ROW_POOL_SHARE` of the rectangular buffer's slots."""
        hb = self.head_budget_host
        if self.pool is not None or hb is None or self.empty:
            return
        caps = np.maximum(hb, self.held if self.held is not None else hb)
        if int(caps.max()) < self.capacity:
            return  # (a rare wider buffer, e.g. a merged micro-batch: stay rectangular)
        if bool((hb == hb[:, :1]).all()) and not (rows and int(caps.sum()) <= ROW_POOL_SHARE * caps.size * caps.max()):
            return
        pool = HeadPool.pack(self._rect_parts(), caps)
        C = pool.slot_map.shape[2]
        with _plain:
            for name, t, fill in self.slot_items():
                if t.dim() == 3 and t.shape[2] < C:
                    self.set_slot(name, torch.nn.functional.pad(t, (0, C - t.shape[2]), value=fill))
        self._keys = self._values = self.quant = None
        self.pool = pool

    def unpack(self) -> None:
        """Back to rectangular buffers (before growing, merging or reordering rows)."""
        if self.pool is None:
            return
        with _plain:
            parts = self.pool.rect()
        quantized = self.quantized
        self.pool = None
        if quantized:
            self.quant = parts
        else:
            self._keys, self._values = parts["keys"], parts["values"]

    def slot_items(self) -> list[tuple[str, torch.Tensor, Any]]:
        items = super().slot_items()
        if self.pool is None and self.quant is None:
            return items
        # the keys and values are the pool's (see nbytes) or their quantized parts
        items = [item for item in items if item[0] not in ("keys", "values")]
        if self.quant is not None:
            items += [(name, t, 0) for name, t in self.quant.items()]
        return items

    def set_slot(self, name: str, tensor: torch.Tensor) -> None:
        if self.codec is not None and name in (*self.codec.names("k"), *self.codec.names("v")):
            self._keys = self._values = None
            self.quant = {**(self.quant or {}), name: tensor}
        else:
            super().set_slot(name, tensor)

    def nbytes(self) -> int:
        extra = 0 if self.pool is None else self.pool.nbytes() + self.pool.map_nbytes()
        return super().nbytes() + extra

    def kv_nbytes(self) -> int:
        if self.pool is not None:
            return self.pool.nbytes()
        if self.quant is not None:
            return sum(t.numel() * t.element_size() for t in self.quant.values())
        return super().kv_nbytes()

    def slot_kv_bytes(self) -> int:
        if self.quantized:
            assert self.codec is not None
            return 2 * self.codec.slot_bytes()
        return super().slot_kv_bytes()

    def pad_to(self, capacity: int) -> None:
        self.unpack()
        super().pad_to(capacity)

    def keep_slots(self, idx: torch.Tensor, compact: bool) -> None:
        if compact:
            self.unpack()
        super().keep_slots(idx, compact)

    def map_rows(self, fn: Any) -> None:
        self.unpack()
        super().map_rows(fn)

    def make_plain(self) -> None:
        if self.pool is None and self.quant is None:
            super().make_plain()
        elif self.pool is not None:
            self.pool.parts = {name: plain_copy(t) for name, t in self.pool.parts.items()}

    def view_kv(self, plain: Any) -> tuple[Any, Any]:
        if self.pool is None and self.quant is None:
            return super().view_kv(plain)
        return (lambda: self._read("k")), (lambda: self._read("v"))

    def head_budget_tensor(self) -> torch.Tensor:
        assert self.head_budget is not None
        return self.head_budget.clone()

    def decode_rows(self, q: int) -> SlotRows | None:
        """What this step's attention reads in the fused decode kernel (squeezekit.kernels.decode), or None: a
        pooled or quantized layer, a one-token step on a device the kernel serves, and no statistic that must see
        the attention's keys (an observer of later steps) or its probabilities (the attention mass). Otherwise the
        attention gets (B, H, C, D) buffers, gathered or dequantized."""
        runner = self.cache.runner
        if (
            (self.pool is None and self.quant is None) or q != 1 or not kernels.use("pooled", self.device)
            or runner.step_observers or runner.mass_statistics
        ):  # fmt: skip
            return None
        if self.pool is not None:
            parts, offsets, lengths = self.pool.parts, self.pool.offsets, self.pool.lengths
        else:
            assert self.quant is not None
            parts = {name: t.reshape(-1, t.shape[-1]) for name, t in self.quant.items()}
            offsets, lengths = self._buffer_rows(*self.valid.shape)
        codec, names_k, names_v = self._part_names()
        return SlotRows(
            tuple(parts[n] for n in names_k), tuple(parts[n] for n in names_v), offsets, lengths, self.valid, codec,
        )  # fmt: skip

    def _part_names(self) -> tuple[SlotCodec | None, tuple[str, ...], tuple[str, ...]]:
        """The codec the keys and values are stored with now (None: the model's dtype) and their parts' names."""
        codec = self.codec if self.quantized else None
        if codec is None:
            return None, ("keys",), ("values",)
        return codec, codec.names("k"), codec.names("v")

    def _buffer_rows(self, B: int, H: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectangular (B, H, C) slot buffers read as rows: each head's first row and its length (made once per
        shape, not at every decode step: two kernels a layer and step fewer inside the replayed graph)."""
        key = (B, H, C, self.device)
        if self._rows_of is None or self._rows_of[0] != key:
            offsets = (torch.arange(B * H, device=self.device, dtype=torch.int64) * C).view(B, H)
            lengths = torch.full((B, H), C, dtype=torch.int32, device=self.device)
            self._rows_of = (key, offsets, lengths)
        return self._rows_of[1], self._rows_of[2]

    def attended(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What `write` returns for the attention: for the fused decode kernel (`decode_rows`), the first parts of
        the keys' and values' rows (the kernel reads the plan's `SlotRows`); else (B, H, C, D) buffers."""
        rows = self.decode_rows(q)
        if rows is not None:
            return rows.keys[0], rows.values[0]
        return self.keys, self.values

    def free_slots(self) -> torch.Tensor:
        """(B, H, C) bool: the slots a new token may take (inside its head's segment, when pooled)."""
        return ~self.valid if self.pool is None else ~self.valid & self.pool.mapped()

    def reset(self) -> None:
        super().reset()
        self.pool = None
        self.quant = None
        self._keys = self._values = None
        self.budget = self.head_budget = None
        self.budget_host = self.head_budget_host = None
        self.steady = self.holes = False

    def set_budget(self, budget: torch.Tensor) -> None:
        """(B,) long: each row's budget from now on, the same for each of its KV heads until `split_heads`."""
        H = self.valid.shape[1]
        self.budget_host = budget.cpu().numpy().astype(np.int64)
        self.head_budget_host = np.repeat(self.budget_host[:, None], H, axis=1)
        self.budget = budget.to(self.device)
        self.head_budget = self.budget.view(-1, 1).expand(-1, H).clone()

    def split_heads(self) -> None:
        """At the end of prefill, once the budget is set: the head split (``heads=...``) gives each KV head its own
        budget, from the evictor's ranking of the layer's tokens (`squeezekit.runner.PolicyRunner.split_heads`).
        An equal split (the default ``uniform``) keeps the row's budget for every head and is not called."""
        runner = self.cache.runner
        if self.budget is None or not runner.splits_heads:
            return
        heads = runner.split_heads(self.view("prefill"))
        self.head_budget_host = heads.numpy().astype(np.int64)
        self.head_budget = heads.to(self.device)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.budget_host is not None and self.head_budget_host is not None:
            picked = indices.cpu().numpy()
            self.budget_host, self.head_budget_host = self.budget_host[picked], self.head_budget_host[picked]
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.budget_host is not None and self.head_budget_host is not None:
            self.budget_host = np.repeat(self.budget_host, repeats, axis=0)
            self.head_budget_host = np.repeat(self.head_budget_host, repeats, axis=0)
        super().batch_repeat_interleave(repeats)

    def _grow(self, need: int) -> None:
        """Add free slots, only up to the largest head budget once there is one."""
        if self.head_budget_host is None:
            return super()._grow(need)
        cap = self.capacity
        extra = max(need, min(max(need, 64, cap // 8), int(self.head_budget_host.max()) + need - cap))
        self.pad_to(cap + extra)

    # -- the one owner of eviction ---------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's tokens, after making room for a decode token in the heads at their budget; at steady
        state, in one step with no host sync (`_steady_write`)."""
        if self.empty:
            return self._first_write(k, v)
        step = self.cache.step
        q = k.shape[2]
        if self.steady and q == 1 and step.all_valid:
            return self._steady_write(k, v)
        self.steady = False
        if q == 1 and self.budget is not None:
            self._make_room(step)
        return self._append(k, v)

    def _steady_write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode at steady state: replace each head's lowest-ranked token by the new one, in place."""
        cache = self.cache
        runner, step = cache.runner, cache.step
        view_of = lambda: self.view("decode")  # noqa: E731
        victim = None
        # one fused kernel selects, quantizes and writes (with free slots in rectangular buffers, into the first
        # free one once the victim's is freed, as the plain path below)
        codec, names_k, names_v = self._part_names()
        if runner.scores_only:
            score = runner.kernel_scores(view_of) if steady_kernel.available(k, codec) else None
            if score is not None:
                # the kernel resets the first per-slot statistic of the victim's slot, `reset_stats` any others
                stat, fill = next(((self.stats[name], fill) for name, fill in runner.slot_fields), (None, 0.0))
                parts = self.pool.parts if self.pool is not None else self._rect_parts()
                victim = steady_kernel.steady_write(
                    score, self.valid, self.positions, tuple(parts[n] for n in names_k),
                    tuple(parts[n] for n in names_v), stat, fill, k, v, step.new_pos.to(k.device),
                    runner.nan_flag(score.device), codec, None if self.pool is None else self.pool.offsets,
                    holes=self.holes,
                )  # fmt: skip
                if victim is not None:
                    self.reset_stats(victim, skip=1)
        if victim is None:
            # the new token will be the newest: every held token competes (protect_newest=False)
            victim = runner.victims(view_of, protect_newest=False, defer_nan=True)
            # With free slots, as _make_room + _append: free the victim's slot, write into the first free one. (In a
            # pool every head is at its budget, which is its segment: the victim's slot is the only free one.)
            if self.holes and self.pool is None:
                self.valid.scatter_(2, victim, False)
                victim = (~self.valid).to(torch.int8).argmax(-1, keepdim=True)
                self.valid.scatter_(2, victim, True)
            self.write_kv(victim, k, v)
            B, H = victim.shape[:2]
            self.positions.scatter_(2, victim, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, 1))
            self.reset_stats(victim)
        self.new_slots = victim
        self.heads_differ = True
        return self.attended(1)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write into the first free slots of every head; into a pool's segments while they have room (else back to
        rectangular buffers, which grow; the next settle packs them again)."""
        if self.pool is None:
            return super()._append(k, v)
        step = self.cache.step
        B, H, q, _ = k.shape
        free = self.free_slots()
        room = int((self.pool.caps - self.held).min()) if self.held is not None else int(free.sum(-1).min())
        if room < q:
            self.unpack()
            return super()._append(k, v)
        slots = first_free(free, q)
        self.write_kv(slots, k, v)
        self.valid.scatter_(2, slots, step.new_valid.to(k.device)[:, None, :].expand(B, H, q))
        self.positions.scatter_(2, slots, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q))
        self.reset_stats(slots)
        self.new_slots = slots
        if self.held is not None:
            self.held = self.held + np.asarray(step.real, dtype=np.int64)[:, None]
        return self.attended(q)

    def _make_room(self, step: Step) -> None:
        """Before a one-token decode step: heads at their budget drop one token (the evictor picks which)."""
        assert self.head_budget is not None and self.head_budget_host is not None  # (only bounded layers make room)
        if self.held is not None:
            real = np.asarray(step.real)[:, None] > 0
            full = (self.held >= self.head_budget_host) & real
            if not full.any():
                return
            keep: np.ndarray | torch.Tensor = self.held - full
        else:
            counts = self.counts()
            at = (counts >= self.head_budget.to(counts.device)) & step.new_valid.to(counts.device)[:, :1]
            if not bool(at.any()):
                return
            keep = torch.where(at, counts - 1, counts)
        self.evict(keep, "decode", making_room=True)

    def ranking(self, step: Step) -> Ranking | None:
        """At a step after prefill that leaves a head more than one token over its budget (an extend chunk), with
        the host's counts: the evictor's scores, which the cache ranks together with the other layers' (one set of
        kernels for all: `squeezekit.selection.kept_together`), and the counts `_enforce` will keep."""
        if step.prefill or self.window is not None or self.steady or self.budget is None:
            return None
        keep = self._host_keep()
        if keep is None or bool((self.held - keep <= 1).all()):  # `evict`'s victim path, one token over at most
            return None
        per_row = bool((keep == keep[:, :1]).all())
        score = self.cache.runner.ranking_scores(lambda: self.view("decode"), per_row)
        if score is None:
            return None
        counts = self._counts_tensor(keep, copy=False).to(self.device)
        return Ranking(score, self.positions, self.valid, counts, int((self.held - keep).max()))

    def settle(self, step: Step, kept: torch.Tensor | None = None) -> None:
        """After a step: drop what the model's window drops, then every head down to its budget (at prefill, first
        split over the heads, then into buffers just large enough; ``kept``: the slots the cache ranked for this
        layer, see `ranking`); quantize what is kept (``kv_bits`` below 16, once), pool unequal heads; update the
        steady flags."""
        if self.window is not None:
            self.drop_out_of_window(compact=False)
        if step.prefill:
            self.split_heads()
        if self.budget is not None and not self.steady:
            self._enforce(compact=step.prefill, kept=kept)
        elif step.prefill and self.window is not None:
            self.shrink_to_fit()
        self.quantize()
        self.pack()
        self.update_steady()

    def _enforce(self, compact: bool, kept: torch.Tensor | None = None) -> None:
        assert self.head_budget is not None and self.head_budget_host is not None
        keep: torch.Tensor | np.ndarray | None = None
        if self.held is not None:
            keep = self._host_keep()
        else:
            counts = self.counts()
            budget = self.head_budget.to(counts.device)
            if bool((counts > budget).any()):
                keep = torch.minimum(counts, budget)
        if keep is not None:
            self.evict(keep, "prefill" if compact else "decode", compact=compact, kept=kept)
        elif compact:
            self.shrink_to_fit()

    def _host_keep(self) -> np.ndarray | None:
        """(B, H): what each head keeps when some head holds more than its budget (the host's counts), else None."""
        hb, held = self.head_budget_host, self.held
        if hb is None or held is None or not (held > hb).any():
            return None
        return np.minimum(held, hb)

    def compact(self) -> None:
        if not self.empty and self.budget is not None:
            self.shrink_to_fit()
            self.update_steady()

    def evict(
        self,
        keep: torch.Tensor | np.ndarray,
        phase: str,
        compact: bool = False,
        making_room: bool = False,
        kept: torch.Tensor | None = None,
    ) -> None:
        """Keep ``keep[b, h]`` slots of each head of each row ((B, H), or (B,) for every head alike; an array when
        the host knows the counts), as chosen by the evictor. ``compact`` also shrinks the buffers. ``kept``: the
        mask of those slots, ranked already (`ranking`).

        ``making_room``: before a decode step writes its token, which will be the most recent one; the engine then
        does not also protect the newest held token (that would take a slot of the evictor's, e.g. a sink).
        """
        runner = self.cache.runner
        protect = not making_room
        B, H = self.valid.shape[:2]
        held = self.held
        most = None
        if held is not None:  # the host knows every head's count: no sync
            counts = keep.cpu().numpy() if isinstance(keep, torch.Tensor) else keep
            keep_np = np.minimum(np.broadcast_to(counts.reshape(B, -1), (B, H)), held)
            keep, most = self._counts_tensor(keep_np), int(keep_np.max())
            over_host = held > keep_np
            one_each = bool((held - keep_np <= 1).all())
        else:
            keep = torch.as_tensor(keep, device=self.valid.device)
            keep = torch.minimum(keep.view(B, -1).expand(B, H), self.counts())
            one_each = bool((self.counts() - keep <= 1).all())
        defer = phase == "decode"  # NaN scores are reported later, without a host sync (on CUDA)
        if not compact and one_each:
            # The hot decode path: drop the lowest-ranked slot of each head that is over.
            victim = runner.victims(lambda: self.view(phase), protect_newest=protect, defer_nan=defer)
            if held is not None:
                over = torch.from_numpy(over_host).to(self.valid.device)[..., None]
            else:
                over = (self.counts() > keep)[..., None]
            self.valid.scatter_(2, victim, ~over & torch.gather(self.valid, 2, victim))
            self.heads_differ = True
        elif kept is not None:
            self.valid &= kept
            self.heads_differ = True
        else:
            # the same count in every head: an evictor's own select (known on the host when `held` is)
            per_row = bool((keep_np == keep_np[:, :1]).all()) if held is not None else bool((keep == keep[:, :1]).all())
            wanted = keep[:, 0] if per_row else keep
            idx = runner.keep_slots(lambda: self.view(phase), wanted, protect, defer_nan=defer, most=most)
            self.keep_slots(idx, compact)
        if held is not None:
            self.held = keep_np.astype(np.int64)

    def _counts_tensor(self, counts: np.ndarray, copy: bool = True) -> torch.Tensor:
        """(B, H) ``counts`` as a tensor: the layer's own head budgets (on its device; ``copy=False``: themselves,
        for a reader) when they are, so that a step which ends at the budget copies nothing from the host (it
        replays as a CUDA graph); else on the host."""
        if (
            self.head_budget is not None
            and self.head_budget_host is not None
            and np.array_equal(counts, self.head_budget_host)
        ):
            return self.head_budget.clone() if copy else self.head_budget
        return torch.from_numpy(np.ascontiguousarray(counts))

    def update_steady(self) -> None:
        """Recompute `steady` (every head at its budget) and `holes` (some slot free) from the host's counts.
        Windowed layers are never steady."""
        if self.window is None and self.head_budget_host is not None and self.held is not None:
            self.steady = bool((self.held == self.head_budget_host).all())
            self.holes = self.steady and bool((self.held < self.capacity).any())
        else:
            self.steady = self.holes = False


def layer_kinds(budget_layers: Sequence[int], n_layers: int, full: bool, windows: Sequence[int | None]) -> list[type]:
    """The class of each layer: budgeted where the allocator sets a budget (below the full budget), else the
    model's own sliding window where it has one, else full."""
    kinds: list[type] = []
    budgeted = set(budget_layers)
    for i in range(n_layers):
        if i in budgeted and not full:
            kinds.append(BudgetedLayer)
        elif windows[i] is not None:
            kinds.append(WindowLayer)
        else:
            kinds.append(FullLayer)
    return kinds

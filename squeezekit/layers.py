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

**Host state.** Every row keeps as many tokens in every KV head (an evictor keeps ``keep[b]`` slots per row and
head), so a layer tracks each row's count on the host (`SlotLayer.held`), updated by every write and eviction from
what the step already knows. The attention plan (`squeezekit.attention.plan_layer`) and the steady flags read it
without a host sync. A layer whose window drops tokens on the device does not know its counts on the host
(``held`` is None): it is never steady and always attends with a mask.

The slot tensors are ordinary (not inference-mode) tensors, also under ``torch.inference_mode``, so that the
runner's version counters can tell when a plugin writes into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .kernels import steady as steady_kernel
from .policies import LayerView
from .runner import LIVE_FIELDS
from .selection import top_slots
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
        self.cache, self.layer_idx = cache, layer_idx
        self.window, self.scaling, self.softcap = geometry.window, geometry.scaling, geometry.softcap
        self.keys = self.values = self.valid = self.positions = None  # type: ignore[assignment]
        #: the statistics the policies need (squeezekit.statistics), by field: per-slot ones are part of the slot
        #: table (see `slot_items`), the others live for one step
        self.stats: dict[str, torch.Tensor] = {}
        self.new_slots: torch.Tensor | None = None  # (B, H, q) slots written by the current step
        self.heads_differ = False  # once per-head eviction happened, masks are per KV head
        #: host-side: the tokens each row holds in every KV head, None when only the device knows (see the module
        #: docstring)
        self.held: list[int] | None = None

    # -- transformers' layer API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
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
            self.held = [self.held[i] for i in indices.tolist()]
        self.map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.held is not None:
            self.held = [n for n in self.held for _ in range(repeats)]
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
            for name in (*LIVE_FIELDS, *self.row_fields):
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
        """(B, H) number of valid slots (on the device; `held` is the host's copy where it is known)."""
        return self.valid.sum(-1)

    def full_after_write(self) -> bool:
        """Host-side: every slot holds a real token now (this step's written): attention needs no mask."""
        return self.held is not None and all(n == self.capacity for n in self.held)

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (keys, values and bookkeeping)."""
        return sum(t.numel() * t.element_size() for _, t, _ in self.slot_items())

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def kv_bytes_held(self) -> int:
        """Bytes of the keys and values of the tokens held (valid slots), without the free slots' room."""
        if self.keys is None:
            return 0
        per_slot = 2 * self.keys.shape[-1] * self.keys.element_size()
        return int(self.valid.sum()) * per_slot

    #: (B,) long on the layer's device: the most tokens a row may hold; None: unbounded (see `BudgetedLayer`)
    budget: torch.Tensor | None = None

    def budget_tensor(self) -> torch.Tensor:
        """(B,) long on the layer's device, a fresh tensor: the budget, or the capacity for an unbounded layer."""
        if self.budget is not None:
            return self.budget.clone()
        return torch.full((self.keys.shape[0],), self.capacity, dtype=torch.long, device=self.keys.device)

    def view(self, phase: str, for_plugin: bool = True) -> LayerView:
        """What an evictor sees: the layer's own slot tensors (writes to them are detected, see PolicyRunner) and
        fresh copies of the small per-sequence tensors."""
        cache = self.cache
        plain = plain_copy if for_plugin else (lambda t: t)  # a copy only of the prefill's inference tensors
        return LayerView(
            keys=plain(self.keys),
            values=plain(self.values),
            valid=self.valid,
            positions=self.positions,
            seen=cache.seen_after_step().to(self.keys.device, copy=True),
            budget=self.budget_tensor(),
            layer_idx=self.layer_idx,
            n_layers=len(cache.layers),
            phase=phase,
            scaling=self.scaling,
            stats={name: plain(t) for name, t in self.stats.items() if name in cache.runner.fields},
        )

    # -- writing ---------------------------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's new keys/values into free slots and return the whole buffers (a budgeted layer first
        makes room: `BudgetedLayer.write`)."""
        if self.keys is None:
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
        self.held = list(step.real) if self.window is None else None
        return self.keys, self.values

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write into the first ``q`` free slots of every row (growing the buffers if a row has fewer)."""
        step = self.cache.step
        B, H, q, _ = k.shape
        free = ~self.valid
        if self.held is not None:
            need = q - (self.capacity - max(self.held))
        else:
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
        if self.held is not None:
            self.held = [n + r for n, r in zip(self.held, step.real, strict=True)]
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
            D = self.keys.shape[-1]
            gi = safe[..., None].expand(*safe.shape, D)
            with _plain:
                for name, t, fill in self.slot_items():
                    if name == "valid":
                        self.valid = used.clone()
                    elif t.dim() == 4:  # keys, values
                        self.set_slot(name, torch.gather(t, 2, gi))
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
    def settle(self, step: Step) -> None:
        """After every layer wrote the step's tokens: what this kind does then (nothing, for a full layer)."""

    def compact(self) -> None:
        """Shrink the buffers to the slots held (after a chunked prefill, which left room for a chunk)."""


class FullLayer(SlotLayer):
    """The full cache: nothing is ever evicted (``budget=1``); the buffers grow as tokens come."""


class WindowLayer(SlotLayer):
    """The model's own sliding window (e.g. Gemma3's sliding layers, which take no part in budget allocation): a
    token leaves once no future query can attend to it. Otherwise nothing is evicted."""

    def settle(self, step: Step) -> None:
        self.drop_out_of_window(compact=step.prefill)

    def drop_out_of_window(self, compact: bool) -> None:
        """Forget tokens no future query can attend to (after prefill, shrink to fit)."""
        if self.keys is None or self.window is None:
            return
        horizon = (self.cache.seen.to(self.positions.device) - self.window).view(-1, 1, 1)
        self.valid &= ~(self.positions <= horizon)
        if compact:
            differ = self.heads_differ
            self.shrink_to_fit()
            self.heads_differ = differ  # (dropped by position: the KV heads of a row still hold the same tokens)


class BudgetedLayer(WindowLayer):
    """A compressed layer: each row holds at most its budget, set at the end of prefill (`set_budget`), and this
    class alone decides what leaves (see the module docstring). Windowed when the model's attention is."""

    budgeted = True
    row_fields = ("new_slots", "budget")

    def __init__(self, cache: SqueezeCache, layer_idx: int, geometry: Geometry):
        super().__init__(cache, layer_idx, geometry)
        self.budget: torch.Tensor | None = None  # (B,) long on the layer's device; None until prefill ends
        self.budget_host: list[int] | None = None
        #: host-side: every row is at its budget. A decode step then evicts one token and writes the new one: shapes
        #: never change, no host sync (CUDA-graph safe). Without `holes`, in the evicted token's slot and no mask.
        self.steady = False
        #: host-side, with `steady`: some rows have free slots (a smaller budget than the buffer, or padding). A step
        #: then writes where the general path would (the first free slot once the victim's is freed) and attention
        #: masks by slot: bitwise what the general path computes, without its host syncs.
        self.holes = False

    def reset(self) -> None:
        super().reset()
        self.budget = self.budget_host = None
        self.steady = self.holes = False

    def set_budget(self, budget: torch.Tensor) -> None:
        """(B,) long: each row's budget from now on."""
        self.budget_host = [int(b) for b in budget.tolist()]
        self.budget = budget.to(self.keys.device)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.budget_host is not None:
            self.budget_host = [self.budget_host[i] for i in indices.tolist()]
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.budget_host is not None:
            self.budget_host = [b for b in self.budget_host for _ in range(repeats)]
        super().batch_repeat_interleave(repeats)

    def _grow(self, need: int) -> None:
        """Add free slots, only up to the budget once there is one."""
        if self.budget_host is None:
            return super()._grow(need)
        cap = self.capacity
        extra = max(need, min(max(need, 64, cap // 8), max(self.budget_host) + need - cap))
        self.pad_to(cap + extra)

    # -- the one owner of eviction ---------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's tokens, after making room for a decode token in the rows at their budget; at steady
        state, in one step with no host sync (`_steady_write`)."""
        if self.keys is None:
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
        """Decode at steady state: replace each row's lowest-ranked token by the new one, in place."""
        cache = self.cache
        runner, step = cache.runner, cache.step
        view_of = lambda: self.view("decode")  # noqa: E731
        victim = None
        if not self.holes and runner.scores_only:  # one fused kernel selects and writes (CUDA: kernels/steady)
            score = runner.kernel_scores(view_of) if steady_kernel.available(k) else None
            if score is not None:
                # the kernel resets the first per-slot statistic of the victim's slot, `reset_stats` any others
                stat, fill = next(((self.stats[name], fill) for name, fill in runner.slot_fields), (None, 0.0))
                victim = steady_kernel.steady_write(
                    score, self.valid, self.positions, self.keys, self.values, stat, fill, k, v,
                    step.new_pos.to(k.device), runner.nan_flag(score.device),
                )  # fmt: skip
                if victim is not None:
                    self.reset_stats(victim, skip=1)
        if victim is None:
            # the new token will be the newest: every held token competes (protect_newest=False)
            victim = runner.victims(view_of, protect_newest=False, defer_nan=True)
            if self.holes:  # as _make_room + _append: free the victim's slot, write into the first free one
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

    def _make_room(self, step: Step) -> None:
        """Before a one-token decode step: rows at their budget drop one token (the evictor picks which)."""
        assert self.budget is not None and self.budget_host is not None  # (only bounded layers make room)
        if self.held is not None:
            full = [n >= b and r > 0 for n, b, r in zip(self.held, self.budget_host, step.real, strict=True)]
            if not any(full):
                return
            keep = torch.tensor([n - f for n, f in zip(self.held, full, strict=True)], dtype=torch.long)
        else:
            counts = self.counts()
            at = (counts >= self.budget.view(-1, 1)) & step.new_valid.to(counts.device)[:, :1]
            if not bool(at.any()):
                return
            keep = torch.where(at, counts - 1, counts).amax(-1)  # counts are equal across heads of a row
        self.evict(keep, "decode", making_room=True)

    def settle(self, step: Step) -> None:
        """After a step: drop what the model's window drops, then every row down to its budget (at prefill, into
        buffers just large enough); update the steady flags."""
        if self.window is not None:
            self.drop_out_of_window(compact=False)
        if self.budget is not None and not self.steady:
            self._enforce(compact=step.prefill)
        elif step.prefill and self.window is not None:
            self.shrink_to_fit()
        self.update_steady()

    def _enforce(self, compact: bool) -> None:
        assert self.budget is not None and self.budget_host is not None
        keep: torch.Tensor | None = None
        if self.held is not None:
            if any(n > b for n, b in zip(self.held, self.budget_host, strict=True)):
                keep = torch.tensor([min(n, b) for n, b in zip(self.held, self.budget_host, strict=True)])
        else:
            counts = self.counts().amax(-1)
            if bool((counts > self.budget).any()):
                keep = torch.minimum(counts, self.budget)
        if keep is not None:
            self.evict(keep, "prefill" if compact else "decode", compact=compact)
        elif compact:
            self.shrink_to_fit()

    def compact(self) -> None:
        if self.keys is not None and self.budget is not None:
            self.shrink_to_fit()
            self.update_steady()

    def evict(self, keep: torch.Tensor, phase: str, compact: bool = False, making_room: bool = False) -> None:
        """Keep ``keep[b]`` slots of each row, as chosen by the evictor. ``compact`` also shrinks the buffers.

        ``making_room``: before a decode step writes its token, which will be the most recent one; the engine then
        does not also protect the newest held token (that would take a slot of the evictor's, e.g. a sink).
        """
        runner = self.cache.runner
        protect = not making_room
        held = self.held
        if held is not None:  # the host knows every row's count: no sync
            keep = torch.minimum(keep.cpu(), torch.tensor(held))
            over_host = [n > k for n, k in zip(held, keep.tolist(), strict=True)]
            one_each = all(n - k <= 1 for n, k in zip(held, keep.tolist(), strict=True))
        else:
            keep = torch.minimum(keep.to(self.valid.device), self.counts().amin(-1))
            one_each = bool((self.counts() - keep.view(-1, 1) <= 1).all())
        if not compact and one_each:
            # The hot decode path: drop the lowest-ranked slot of each row that is over.
            victim = runner.victims(lambda: self.view(phase), protect_newest=protect)
            if held is not None:
                over = torch.tensor(over_host).to(self.valid.device).view(-1, 1, 1).expand_as(victim)
            else:
                over = (self.counts() > keep.view(-1, 1))[..., None]
            self.valid.scatter_(2, victim, ~over & torch.gather(self.valid, 2, victim))
            self.heads_differ = True
        else:
            self.keep_slots(runner.keep_slots(lambda: self.view(phase), keep, protect_newest=protect), compact)
        if held is not None:
            self.held = keep.tolist()

    def update_steady(self) -> None:
        """Recompute `steady` (every row at its budget) and `holes` (some slot free) from the host's counts.
        Windowed layers are never steady."""
        if self.window is None and self.budget_host is not None and self.held is not None:
            self.steady = self.held == self.budget_host
            self.holes = self.steady and any(n < self.capacity for n in self.held)
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

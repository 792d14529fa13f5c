"""The compressed KV cache: a transformers `Cache` whose layers are slot buffers that really shrink.

Each layer holds ``keys``/``values`` of shape (B, H, C, D) plus, per slot, whether it is ``valid`` and the
``positions`` of the token it holds. Slots are unordered (RoPE is already applied to cached keys), so a decode step
writes its token into a free slot, or into the slot of the token the evictor drops, instead of concatenating.

One forward is one *step*: `SqueezeCache.begin_step` (called by the compressor's hook on the decoder stack) records
which new tokens are real and their positions; every layer's `update` writes its new keys/values; the attention
function (squeezekit.attention) masks each layer by its own slots; `SqueezeCache.end_step` then, on the first step
(prefill), asks the allocator for per-layer budgets and, on every step, evicts each layer down to its budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .budget import check_budgets
from .config import floor_hint
from .errors import BudgetError, InputError, PluginError  # noqa: F401
from .kernels import steady as steady_kernel
from .policies import AllocationRequest, LayerView, Stat, TokenEvictor
from .selection import check_selection, victim_slots
from .transformers_api import Cache, CacheLayerMixin


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


class SqueezeLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: SqueezeCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.valid: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.attention: torch.Tensor | None = None  # accumulated attention, when the evictor needs it
        self.window_queries: torch.Tensor | None = None
        self.window_positions: torch.Tensor | None = None
        self.budget: torch.Tensor | None = None  # (B,) long; None = unbounded
        self.window: int | None = None  # the model's own sliding window for this layer, if any
        self.new_slots: torch.Tensor | None = None  # (B, H, q) slots written by the current step
        self.heads_differ = False  # once per-head eviction happened, masks are per KV head
        #: host-side: every slot of every row is valid and every row is at its budget. A decode step then evicts one
        #: token and writes the new one in its slot: shapes never change, no mask, no host sync (CUDA-graph safe).
        self.steady = False

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

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only used by transformers' own mask builders, which squeezekit's attention does not use.
        return self.capacity + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("keys", "values", "valid", "positions", "attention", "budget"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("keys", "values", "valid", "positions", "attention", "budget"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.positions = self.attention = None
        self.budget, self.is_initialized = None, False

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def counts(self) -> torch.Tensor:
        """(B, H) number of valid slots."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (keys, values and bookkeeping)."""
        tensors = (self.keys, self.values, self.valid, self.positions, self.attention)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def view(self, phase: str) -> LayerView:
        cache = self.cache
        B = self.keys.shape[0]
        budget = self.budget if self.budget is not None else torch.full((B,), self.capacity, dtype=torch.long)
        return LayerView(
            keys=self.keys,
            values=self.values,
            valid=self.valid,
            positions=self.positions,
            seen=cache.seen_after_step().to(self.keys.device),
            budget=budget.to(self.keys.device),
            layer_idx=self.layer_idx,
            n_layers=len(cache.layers),
            phase=phase,
            attention=self.attention,
            window_queries=self.window_queries,
            window_positions=self.window_positions,
            scaling=cache.scaling.get(self.layer_idx, 1.0),
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
            self.valid = step.new_valid.to(k.device)[:, None, :].expand(B, H, q).clone()
            self.positions = step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, q).clone()
            self.new_slots = torch.arange(q, device=k.device).expand(B, H, q)
            if self.cache.evictor.needs is Stat.ATTENTION:
                self.attention = torch.zeros(B, H, q, dtype=torch.float32, device=k.device)
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
        if self.attention is not None:
            self.attention.scatter_(2, slots, torch.zeros_like(slots, dtype=torch.float32))
        self.new_slots = slots
        return self.keys, self.values

    def _steady_append(self, k: torch.Tensor, v: torch.Tensor):
        """Decode at steady state: replace each row's lowest-ranked token by the new one, in place."""
        victim = self.cache.with_fallback("evictor", lambda: steady_kernel.append_steady(self, k, v))
        if victim is not None:  # one fused kernel did it all (CUDA; squeezekit.kernels.steady)
            self.new_slots, self.heads_differ = victim, True
            return self.keys, self.values
        victim = self.cache.with_fallback("evictor", self._steady_victim)
        step = self.cache.step
        B, H, _, D = self.keys.shape
        self.keys.scatter_(2, victim[..., None].expand(B, H, 1, D), k)
        self.values.scatter_(2, victim[..., None].expand(B, H, 1, D), v)
        self.positions.scatter_(2, victim, step.new_pos.to(k.device, torch.int32)[:, None, :].expand(B, H, 1))
        if self.attention is not None:
            self.attention.scatter_(2, victim, torch.zeros(B, H, 1, device=k.device))
        self.new_slots = victim
        self.heads_differ = True
        return self.keys, self.values

    def _steady_victim(self) -> torch.Tensor:
        """(B, H, 1): the slot each row gives up for the new token (no side effects: a fallback may retry)."""
        evictor = self.cache.evictor
        view = self.view("decode")
        if type(evictor).select is TokenEvictor.select:
            score = self.scores(view, defer_nan=True)
            return victim_slots(score, view, protect_newest=False)  # the new token will be the newest
        # a plugin's own select: generic path (validated)
        keep = self.budget.to(self.valid.device) - 1
        idx = self.cache.call_evictor(evictor.select, view, keep)
        problem = check_selection(idx, view, keep)
        if problem:
            raise PluginError(evictor.name, self.cache.origin("evictor"), problem)
        dropped = torch.ones_like(self.valid)
        dropped.scatter_(2, idx.long().clamp_min(0), False)
        return dropped.to(torch.int8).argmax(-1, keepdim=True)

    def scores(self, view: LayerView, defer_nan: bool = False) -> torch.Tensor:
        """The evictor's ``score(view)``, checked: a tensor of the slots' shape and device, no NaN for a cached token.

        ``defer_nan`` (the CUDA decode hot path): record NaN without a host sync, reported by `SqueezeCache.check_nan`.
        """
        cache = self.cache
        evictor = cache.evictor
        score = cache.call_evictor(evictor.score, view)
        if not isinstance(score, torch.Tensor):
            raise PluginError(evictor.name, cache.origin("evictor"), f"score() must return a tensor, got {type(score).__name__}")
        if tuple(score.shape) != tuple(self.valid.shape):
            raise PluginError(evictor.name, cache.origin("evictor"), f"score() returned shape {tuple(score.shape)}, expected {tuple(self.valid.shape)}")
        if score.device != self.valid.device:
            raise PluginError(evictor.name, cache.origin("evictor"), f"score() returned a tensor on {score.device}, expected {self.valid.device}")
        if defer_nan == "fused":  # the caller's kernel records NaN (squeezekit.kernels.steady)
            pass
        elif defer_nan and score.is_cuda:
            cache.check_nan_later(score)
        elif bool((torch.isnan(score) & self.valid).any()):
            raise PluginError(evictor.name, cache.origin("evictor"), "score() returned NaN for a cached token")
        return score

    def _grow(self, need: int) -> None:
        """Add free slots (amortised: at least double, capped near the budget for bounded layers)."""
        cap = self.capacity
        # Unbounded layers grow by an eighth (amortised O(1) per token without doubling the memory); bounded ones
        # only up to their budget.
        extra = max(need, 64, cap // 8)
        if self.budget is not None:
            extra = max(need, min(extra, int(self.budget.max()) + need - cap))
        B, H, _, D = self.keys.shape
        pad = (0, 0, 0, extra)
        self.keys = torch.nn.functional.pad(self.keys, pad)
        self.values = torch.nn.functional.pad(self.values, pad)
        self.valid = torch.nn.functional.pad(self.valid, (0, extra), value=False)
        self.positions = torch.nn.functional.pad(self.positions, (0, extra), value=-1)
        if self.attention is not None:
            self.attention = torch.nn.functional.pad(self.attention, (0, extra))

    def _make_room(self, step: Step) -> None:
        """Before a one-token decode step: rows at their budget drop one token (the evictor picks which)."""
        counts = self.counts()
        full = (counts >= self.budget.to(counts.device).view(-1, 1)) & step.new_valid.to(counts.device)[:, :1]
        if not bool(full.any()):
            return
        keep = torch.where(full, counts - 1, counts).amax(-1)  # counts are equal across heads of a row
        self.evict(keep, "decode", making_room=True)

    def evict(self, keep: torch.Tensor, phase: str, compact: bool = False, making_room: bool = False) -> None:
        """Keep ``keep[b]`` slots of each row, as chosen by the evictor. ``compact`` also shrinks the buffers.

        ``making_room``: before a decode step writes its token, which will be the most recent one; the engine then
        does not also protect the newest held token (that would take a slot of the evictor's, e.g. a sink).
        """
        self.cache.with_fallback("evictor", lambda: self._evict(keep, phase, compact, making_room))

    def _evict(self, keep: torch.Tensor, phase: str, compact: bool, making_room: bool = False) -> None:
        # Every check of the evictor's output happens before the first change: a fallback can redo it all.
        evictor = self.cache.evictor
        view = self.view(phase)
        keep = torch.minimum(keep.to(self.valid.device), self.counts().amin(-1))
        if type(evictor).select is TokenEvictor.select:
            score = self.scores(view)
            if not compact and bool((self.counts() - keep.view(-1, 1) <= 1).all()):
                # The hot decode path: drop the lowest-ranked slot of each row that is over.
                victim = victim_slots(score, view, protect_newest=not making_room)
                over = self.counts() > keep.view(-1, 1)
                self.valid.scatter_(2, victim, ~over[..., None] & torch.gather(self.valid, 2, victim))
                self.heads_differ = True
                return
            from .selection import top_slots

            idx = top_slots(score, view, keep, protect_newest=not making_room)
        else:
            idx = self.cache.call_evictor(evictor.select, view, keep)
            problem = check_selection(idx, view, keep)
            if problem:
                raise PluginError(evictor.name, self.cache.origin("evictor"), problem)
        self._keep(idx.long(), compact)

    def _keep(self, idx: torch.Tensor, compact: bool) -> None:
        used = idx >= 0
        safe = idx.clamp_min(0)
        if compact:  # gather into new, smaller tensors: the old buffers are freed
            D = self.keys.shape[-1]
            gi = safe[..., None].expand(*safe.shape, D)
            self.keys = torch.gather(self.keys, 2, gi)
            self.values = torch.gather(self.values, 2, gi)
            self.positions = torch.gather(self.positions, 2, safe).masked_fill(~used, -1)
            if self.attention is not None:
                self.attention = torch.gather(self.attention, 2, safe).masked_fill(~used, 0.0)
            self.valid = used.clone()
        else:
            kept = torch.zeros_like(self.valid)
            kept.scatter_(2, safe, used)
            self.valid &= kept
        self.heads_differ = True

    def drop_out_of_window(self, compact: bool) -> None:
        """Sliding-window layers: forget tokens no future query can attend to (after prefill, shrink to fit)."""
        if self.window is None or self.keys is None:
            return
        horizon = (self.cache.seen.to(self.positions.device) - self.window).view(-1, 1, 1)
        stale = self.valid & (self.positions <= horizon)
        if bool(stale.any()):
            self.valid &= ~stale
            if compact:
                from .selection import top_slots

                counts = self.counts().amax(-1)
                self._keep(top_slots(self.positions.float(), self.view("prefill"), counts), compact=True)


class SqueezeCache(Cache):
    """A transformers `Cache` of `SqueezeLayer`s driven by one `Compressor` (squeezekit.compress)."""

    def __init__(self, compressor, n_layers: int):
        self.compressor = compressor
        super().__init__(layers=[SqueezeLayer(self, i) for i in range(n_layers)])
        self.length = 0  # tokens processed per row, padding included (what DynamicCache would report)
        self.seen: torch.Tensor | None = None  # (B,) real tokens per sequence
        self.step: Step | None = None
        self.prompt_len: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None  # (B, L) prefill cosine similarity
        self.budgets: torch.Tensor | None = None  # (B, L) per-layer budgets (-1 = unbounded)
        self.full_kv_bytes_prefill = 0  # keys + values of the whole prompt, as a full cache would hold them
        self.kv_bytes_prefill = 0  # keys + values kept at the end of prefill
        self.peak_kv_bytes_prefill = 0  # the most keys + values allocated at any point of the prefill
        self.scaling: dict[int, float] = {}
        self.host_seen_max = 0  # host-side copy of seen.max(), so that hot paths never sync
        #: chunked prefill (squeezekit.batching): the whole prompt's real length per sequence, known before its
        #: first chunk, so that budgets are fractions of the prompt, not of the chunk
        self.expected_prompt_len: torch.Tensor | None = None
        self._nan_flag: torch.Tensor | None = None
        self.timings: dict[str, float] = {"importance": 0.0, "allocation": 0.0, "eviction": 0.0}

    @property
    def allocator(self):
        return self.compressor.allocator

    @property
    def evictor(self):
        return self.compressor.evictor

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

    def end_step(self) -> None:
        step = self.step
        self.length += step.new_valid.shape[1]
        self.seen.add_(step.new_valid.sum(-1))  # in place: CUDA graphs replay this
        step.counted = True
        self.host_seen_max += step.new_valid.shape[1] if step.all_valid else int(step.new_valid.sum(-1).max())
        if step.prefill:
            self.full_kv_bytes_prefill = self.kv_nbytes()
            self.peak_kv_bytes_prefill = max(self.peak_kv_bytes_prefill, self.full_kv_bytes_prefill)
        for layer in self.layers:
            layer.drop_out_of_window(compact=step.prefill)
        if step.prefill:
            self._finish_prefill()
        else:
            self._enforce_budgets(compact=False)
        for layer in self.layers:
            layer.window_queries = layer.window_positions = None
        self.step = None

    def clock(self) -> float:
        """perf_counter, after a device sync when the compressor times policies exactly (benchmarks)."""
        if self.compressor.sync_timings and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _finish_prefill(self) -> None:
        self.prompt_len = self.seen.clone() if self.expected_prompt_len is None else self.expected_prompt_len.clone()
        n = self.prompt_len.cpu()  # budgets are bookkept on the host
        config = self.compressor.config
        layers = self.compressor.compressible
        L = len(layers)
        B = n.shape[0]
        self.budgets = torch.full((B, len(self.layers)), -1, dtype=torch.long)
        if not config.full:
            t0 = self.clock()
            mean = n.double() * config.budget if not config.absolute else torch.full((B,), float(config.budget), dtype=torch.float64)
            floor = self.compressor.floor
            total = torch.round(mean * L).long()
            over = mean >= n.double()  # prompt not longer than the budget: nothing to evict at prefill
            self._check_budget(mean, total, over, n, floor, L)
            budgets = torch.empty(B, L, dtype=torch.long)
            if bool(over.any()):
                budgets[over] = torch.round(mean[over]).long().clamp_min(n[over]).view(-1, 1).expand(-1, L)
            squeeze_rows = (~over).nonzero().view(-1)
            batch_level = getattr(self.allocator, "batch_level", False)
            known = self.compressor.batch_allocation if batch_level else None
            if squeeze_rows.numel() and known is not None and all(int(k) in known for k in n[squeeze_rows]):
                # a later micro-batch of a batch-level allocation: the budgets of its prompt lengths are known
                budgets[squeeze_rows] = torch.stack([known[int(k)] for k in n[squeeze_rows]])
            elif squeeze_rows.numel():
                importance = self.importance[squeeze_rows][:, layers].float()
                shared = self.compressor.batch_importance
                if shared is not None and batch_level:
                    importance = shared[layers].float().expand_as(importance)
                request = AllocationRequest(
                    importance=importance,
                    total=total[squeeze_rows],
                    floor=floor,
                    cap=n[squeeze_rows],
                )
                budgets[squeeze_rows] = self.with_fallback("allocator", lambda: self.allocate(request)).long().cpu()
                if known is not None:
                    known.update((int(k), row) for k, row in zip(n[squeeze_rows], budgets[squeeze_rows], strict=True))
            self.budgets[:, layers] = budgets
            t1 = self.clock()
            self.timings["allocation"] += t1 - t0
            for j, li in enumerate(layers):
                self.layers[li].budget = budgets[:, j].to(self.layers[li].keys.device)
            self._enforce_budgets(compact=True)
            self.timings["eviction"] += self.clock() - t1
        else:
            for layer in self.layers:
                layer.heads_differ = False
        self.kv_bytes_prefill = sum(layer.kv_nbytes() for layer in self.layers)

    def _check_budget(self, mean, total, over, n, floor: int, L: int) -> None:
        """Every layer keeps at least ``floor`` (>= 1) tokens; a fractional budget too small for some prompt of the
        batch is an error whose suggested budget works for every sequence of the batch."""
        short = ~over & (total < floor * L)
        if not bool(short.any()):
            return
        budget = self.compressor.config.budget
        # The shortest prompt fails first: name it, and suggest what works for it (hence for the whole batch).
        b = int(n.masked_fill(~short, torch.iinfo(n.dtype).max).argmin())
        prompt = int(n[b])
        setter = self.compressor.floor_setter
        if floor == 1:
            what = "which rounds to 0 tokens for some layers"
        else:
            what = f"below the floor of evictor {setter.name!r} ({floor} tokens per layer)"
        if floor <= prompt:
            remedy = f"raise the budget to at least {math.ceil(floor / prompt * 1000) / 1000:g}"
        else:
            remedy = f"use an absolute budget of at least {max(floor, 2)} tokens (shorter prompts are kept whole)"
        if floor > 1:
            remedy += floor_hint(setter)
        raise BudgetError(
            f"budget {budget:g} keeps {float(mean[b]):.1f} tokens per layer of a {prompt}-token prompt (sequence {b} "
            f"of the batch), {what}; {remedy}"
        )

    def allocate(self, request: AllocationRequest) -> torch.Tensor:
        """The allocator's budgets for ``request``, checked (`squeezekit.budget.check_budgets`)."""
        got = self.call_allocator(request)
        problem = check_budgets(got, request.total, request.floor, request.cap, (request.total.shape[0], request.importance.shape[1]))
        if problem:
            raise PluginError(self.allocator.name, self.origin("allocator"), problem)
        return got

    def with_fallback(self, kind: str, fn):
        """``fn()``; if the ``kind`` plugin fails (a `PluginError`) and the config names a fallback, again with it."""
        while True:
            try:
                return fn()
            except PluginError as exc:
                if not self.compressor.fall_back(kind, exc):
                    raise

    def _enforce_budgets(self, compact: bool) -> None:
        for layer in self.layers:
            if layer.budget is None or layer.keys is None or layer.steady:
                continue
            counts = layer.counts().amax(-1)
            if bool((counts > layer.budget).any()):
                keep = torch.minimum(counts, layer.budget)
                layer.evict(keep, "prefill" if compact else "decode", compact=compact)
            if layer.window is None:
                layer.steady = bool((layer.counts() == layer.capacity).all()) and bool((layer.budget == layer.capacity).all())

    def check_nan_later(self, score: torch.Tensor) -> None:
        """Record, without a host sync, whether an evictor scored a cached token NaN (checked by `check_nan`)."""
        if self._nan_flag is None:
            self._nan_flag = torch.zeros((), dtype=torch.bool, device=score.device)
        self._nan_flag.logical_or_(torch.isnan(score.float()).any().to(self._nan_flag.device, non_blocking=True))

    def check_nan(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        if self._nan_flag is not None and bool(self._nan_flag):
            self._nan_flag.zero_()
            error = PluginError(self.evictor.name, self.origin("evictor"), "score() returned NaN for a cached token")
            if not self.compressor.fall_back("evictor", error):
                raise error

    def compact(self) -> None:
        """Shrink every bounded layer's buffers to the slots it holds (after a chunked prefill left room for a chunk)."""
        from .selection import top_slots

        for layer in self.layers:
            if layer.keys is None or layer.budget is None:
                continue
            counts = layer.counts().amax(-1)
            if int(counts.max()) < layer.capacity:
                layer._keep(top_slots(layer.positions.float(), layer.view("prefill"), counts), compact=True)
            if layer.window is None:
                layer.steady = bool((layer.counts() == layer.capacity).all()) and bool((layer.budget == layer.capacity).all())
        # The prefill saw the prompt one chunk at a time: account as if it had gone through at once.
        self.full_kv_bytes_prefill = sum(
            2 * layer.keys[:, :, :1].numel() * self.length * layer.keys.element_size()
            for layer in self.layers
            if layer.keys is not None
        )
        self.kv_bytes_prefill = self.kv_nbytes()

    # -- plugin calls ----------------------------------------------------------------------------------------------
    def origin(self, kind: str) -> str:
        return self.compressor.origins[kind]

    def call_evictor(self, fn, *args):
        try:
            return fn(*args)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(self.evictor.name, self.origin("evictor"), f"{fn.__name__}() raised {type(exc).__name__}: {exc}") from exc

    def call_allocator(self, request: AllocationRequest):
        try:
            return self.allocator.allocate(request)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(self.allocator.name, self.origin("allocator"), f"allocate() raised {type(exc).__name__}: {exc}") from exc

    # -- accounting --------------------------------------------------------------------------------------------------
    def kv_nbytes(self) -> int:
        """Bytes of keys and values held now, over all layers."""
        return sum(layer.kv_nbytes() for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes of every tensor held now (keys, values and per-slot bookkeeping)."""
        return sum(layer.nbytes() for layer in self.layers)

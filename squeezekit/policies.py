"""The three policy contracts a plugin implements: `LayerBudgetAllocator` (how many tokens each layer keeps),
`TokenEvictor` (which ones) and `HeadBudgetSplitter` (how a layer's budget splits over its KV heads).

A plugin is a small dataclass: its fields are its parameters (config keys of the same name reach it, and each gets a
CLI flag whose help is the field's ``#:`` comment), its ``__post_init__`` validates them with `check`, and one method
does the work. The engine owns all mechanics: measuring importance, calling the policies (squeezekit.runner, which
also validates what they return), shrinking tensors (squeezekit.cache).

This module does not import torch, so that listing plugins (``squeezekit plugins``, ``--help``) stays fast; keep a
plugin module's own imports light for the same reason (import heavy libraries inside the methods that use them).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError, PluginError
from .statistics import Stat, Statistic, field_names

__all__ = [
    "AllocationRequest",
    "HeadBudgetSplitter",
    "HeadSplitRequest",
    "LayerBudgetAllocator",
    "LayerView",
    "Stat",
    "Statistic",
    "TokenEvictor",
    "check",
]

if TYPE_CHECKING:
    import torch


def check(key: str, value: object, ok: bool, accepted: str) -> None:
    """Raise the one-line `ConfigError` for parameter ``key`` unless ``ok``. For plugins' ``__post_init__``."""
    if not ok:
        raise ConfigError(key, value, accepted)


def evictor_floor(evictors: list[tuple[TokenEvictor, str]]) -> tuple[int, TokenEvictor]:
    """The fewest tokens a layer keeps, and the evictor that sets it: the largest ``floor()`` of ``evictors``
    (``(evictor, origin)`` pairs: the evictor and its fallback), each checked (an integer >= 0), at least 1 since a
    layer always keeps its newest token. The one rule for the floor: `Config` and the runner both use it."""
    import operator

    floors = []
    for evictor, origin in evictors:
        try:
            floor = evictor.floor()
        except Exception as exc:
            raise PluginError(evictor.name, origin, f"floor() raised {type(exc).__name__}: {exc}") from exc
        try:
            value = operator.index(floor)
        except TypeError:
            value = -1
        if isinstance(floor, bool) or value < 0:
            raise PluginError(evictor.name, origin, f"floor() must return an integer >= 0, got {floor!r}")
        floors.append((max(1, value), evictor))
    return max(floors, key=lambda t: t[0])


def slot_tensor() -> Any:
    """A `LayerView` field that is the cache's own slot tensor (one entry per slot; handed as it is, watched)."""
    return field(metadata={"live": True})


def per_sequence(default: Any = dataclasses.MISSING) -> Any:
    """A `LayerView` field with one entry per sequence (a view of some rows indexes it, `LayerView.rows`)."""
    return field(default=default, metadata={"rows": True})


@dataclass(init=False)
class LayerView:
    """One layer's cache as an evictor sees it. ``B`` sequences, ``H`` KV heads, ``S`` slots, ``D`` head dim.

    Slots are unordered: use ``positions`` for token order. Invalid slots (free, padding) have ``valid`` False and
    ``positions`` -1; never keep them.

    The statistics the policies need (squeezekit.statistics) are attributes too, None when not collected:
    ``attention`` (B, H, S) float32 with `Stat.ATTENTION`; ``window_queries`` (B, H, G, W, D) and
    ``window_positions`` (B, W) long (-1 for padding) with `Stat.WINDOW_QUERIES`, at prefill. They live in `stats`
    and may be passed to the constructor by name (``LayerView(..., attention=a)``). ``keys`` and ``values`` may be
    given as zero-argument callables: the engine gathers them on first use only (a layer whose heads hold different
    budgets keeps them in a pool).
    """

    keys: torch.Tensor = slot_tensor()  #: (B, H, S, D), RoPE already applied
    values: torch.Tensor = slot_tensor()  #: (B, H, S, D)
    valid: torch.Tensor = slot_tensor()  #: (B, H, S) bool
    #: (B, H, S) int32, 0-based position of the token in its sequence (-1 if invalid)
    positions: torch.Tensor = slot_tensor()
    #: (B,) long, tokens of each sequence once this step is done (at decode: incl. the new one)
    seen: torch.Tensor = per_sequence()
    budget: torch.Tensor = per_sequence()  #: (B,) long, the most tokens this layer may hold for each sequence
    layer_idx: int = 0
    n_layers: int = 1
    phase: str = "prefill"  #: "prefill" (once, at the end of the prompt) or "decode" (making room for one new token)
    scaling: float = 1.0  #: the attention's softmax scale, for evictors that recompute attention
    #: (B, H) long, the most tokens each KV head may hold (the head split's, ``heads=``); None: ``budget`` for each
    head_budget: torch.Tensor | None = per_sequence(None)
    stats: dict[str, Any] = field(default_factory=dict)  #: the statistics collected, by field name

    def __init__(self, *args: Any, stats: dict[str, Any] | None = None, **kwargs: Any):
        # (into __dict__, not through __setattr__: the hot path builds a view per layer and step)
        values = dict(_VIEW_DEFAULTS)
        if len(args) > len(_VIEW_NAMES):
            raise TypeError(f"LayerView() takes at most {len(_VIEW_NAMES)} positional arguments")
        values.update(zip(_VIEW_NAMES, args, strict=False))
        for name, value in kwargs.items():
            if name in _VIEW_DEFAULTS or name in _VIEW_REQUIRED:
                values[name] = value
            elif name in field_names():
                stats = {**(stats or {}), name: value}
            else:
                raise TypeError(f"LayerView() got an unexpected keyword argument {name!r}")
        missing = [name for name in _VIEW_REQUIRED if name not in values]
        if missing:
            raise TypeError(f"LayerView() missing required arguments: {', '.join(missing)}")
        lazy = {name: values.pop(name) for name in _LAZY_OK if callable(values.get(name))}
        self.__dict__.update(values, stats=dict(stats or {}), _lazy=lazy)

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not attributes: keys/values given as callables, and statistics' fields
        lazy = self.__dict__.get("_lazy", {})
        if name in lazy:
            value = lazy.pop(name)()
            self.__dict__[name] = value
            return value
        if name != "stats" and name in field_names():
            return self.stats.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in field_names():
            self.stats[name] = value
        else:
            self.__dict__.get("_lazy", {}).pop(name, None)
            object.__setattr__(self, name, value)

    def per_head_budget(self) -> torch.Tensor:
        """(B, H) long on the slots' device: the most tokens each KV head may hold, ``head_budget`` where a head
        split gave the heads their own, else ``budget`` for every head. What a window sized as a share of the
        budget is a share of."""
        if self.head_budget is not None:
            return self.head_budget.to(self.valid.device)
        return self.budget.to(self.valid.device).view(-1, 1).expand(-1, self.valid.shape[1])

    def recent(self, n: int | torch.Tensor) -> torch.Tensor:
        """(B, H, S) bool: the slots holding one of each sequence's ``n`` most recent tokens (``n`` an int, (B,) one
        per sequence, or (B, H) one per KV head, e.g. a share of ``head_budget``), the window an evictor protects by
        scoring it +inf."""
        if not isinstance(n, int) and n.dim() == 2:
            return self.positions >= (self.seen.view(-1, 1) - n.to(self.seen.device)).unsqueeze(-1)
        return self.positions >= (self.seen - n).view(-1, 1, 1)

    def window_attention(self) -> torch.Tensor:
        """(B, H, G, W, S) float32: the attention probabilities of the ``W`` window queries (``window_queries``,
        ``G`` query heads per KV head) over this layer's slots, causal (a query sees the slots at or before its
        position), invalid slots and padded queries 0. What snapkv votes with; needs `Stat.WINDOW_QUERIES`."""
        return self._window_probs(self._window_logits(), self._window_allowed())

    def window_output(self, kept: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, G, W, D) float32: the attention output of the window queries over this layer's slots (masked as
        `window_attention`), or over the ``kept`` slots alone ((B, H, S) bool; (K, B, H, S) for K subsets at once,
        giving (K, B, H, G, W, D)), as if the layer held those only. 0 for a padded query or one that sees no slot.
        On CUDA one Triton kernel (`squeezekit.kernels.window`) reads the keys and values once per two subsets and
        writes no probabilities. Many layers at once: `window_outputs`."""
        masks = self.valid[None] if kept is None else (kept if kept.dim() == 4 else kept[None])
        out = LayerView.window_outputs([self], [masks])[0]
        return out if kept is not None and kept.dim() == 4 else out[0]

    @staticmethod
    def window_outputs(views: Sequence[LayerView], kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """(L, K, B, H, G, W, D) float32: each of ``L`` views' `window_output` over its ``kept`` masks ((K, B, H, S)
        bool, the same K for every layer), on the first view's device. On CUDA one kernel launch a layer and one
        merge for all the layers of a device (an allocator measuring every layer pays a few launches a layer, not
        dozens of small operations); elsewhere a layer at a time."""
        import torch

        from .kernels import window as fused

        masks = [m & v.valid for v, m in zip(views, kept, strict=True)]
        groups: dict[Any, list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(v.valid.device, []).append(i)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for index in groups.values():
            layers = [
                fused.Window(v.window_queries, v.keys, v.values, masks[i], v.positions, v.window_positions, v.scaling)
                for i, v in ((i, views[i]) for i in index)
            ]  # fmt: skip
            out = fused.window_outputs(layers)
            if out is None:
                out = torch.stack([views[i]._plain_window_output(masks[i]) for i in index])
            parts.append((index, out))
        if len(parts) == 1:
            return parts[0][1]
        first = parts[0][1]
        out = torch.empty((len(views), *first.shape[1:]), dtype=first.dtype, device=first.device)
        for index, part in parts:
            out[torch.tensor(index, device=out.device)] = part.to(out.device)
        return out

    def _plain_window_output(self, masks: torch.Tensor) -> torch.Tensor:
        """`window_output` in torch: the probabilities over all slots once; a subset's output is the kept
        probabilities renormalized (the softmax over the subset, to fp32 rounding). Where a query's kept mass is
        under 1e-30 although it sees a kept slot, the kept probabilities have underflowed (a dropped slot drew some
        70 nats more attention than any kept one): that subset takes its own softmax."""
        import torch

        logits, allowed, values = self._window_logits(), self._window_allowed(), self.values.float()
        probs = self._window_probs(logits, allowed)  # (B, H, G, W, S)
        B, H, G, W, S = probs.shape

        def attend(p: torch.Tensor) -> torch.Tensor:  # (the G query heads of a KV head as rows: no copies of V)
            return torch.matmul(p.reshape(B, H, G * W, S), values).view(B, H, G, W, -1)

        outs = []
        for m in masks:
            kept = m[:, :, None, None, :]
            w = probs * kept
            mass = w.sum(-1, keepdim=True)
            if bool(((mass < 1e-30) & (allowed & kept).any(-1, keepdim=True)).any()):
                outs.append(attend(self._window_probs(logits, allowed & kept)))
            else:
                outs.append(attend(w) / mass.clamp_min(1e-30))
        return torch.stack(outs)

    def _window_logits(self) -> torch.Tensor:
        import torch

        q = self.window_queries.float()  # (B, H, G, W, D)
        return torch.einsum("bhgwd,bhsd->bhgws", q, self.keys.float()) * self.scaling

    def _window_allowed(self) -> torch.Tensor:
        """(B, H, 1, W, S) bool: which slots each window query sees (valid, at or before its position)."""
        qpos = self.window_positions.view(self.valid.shape[0], 1, 1, -1, 1)
        return self.valid[:, :, None, None, :] & (self.positions[:, :, None, None, :] <= qpos) & (qpos >= 0)

    @staticmethod
    def _window_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)

    def live(self) -> list[tuple[str, Any]]:
        """The cache's own tensors it holds (not those it would gather on first use): the slot tensors and every
        statistic, which a plugin must not write to (squeezekit.runner watches them)."""
        return [(f, self.__dict__[f]) for f in LIVE_FIELDS if f in self.__dict__] + list(self.stats.items())

    def rows(self, index: torch.Tensor) -> LayerView:
        """A view of the sequences ``index`` (a long tensor) only: every per-sequence tensor indexed along dim 0."""

        def pick(v: Any) -> Any:
            return v.index_select(0, index.to(v.device)) if hasattr(v, "index_select") else v

        return LayerView(
            **{f.name: (pick(getattr(self, f.name)) if f.name in _ROW_FIELDS else getattr(self, f.name))
               for f in dataclasses.fields(self) if f.name != "stats"},
            stats={k: pick(v) for k, v in self.stats.items()},
        )  # fmt: skip


#: every field of a `LayerView`, in order, and which are the cache's own slot tensors (`LayerView.live`) or
#: per-sequence (indexed by `LayerView.rows`): read from the class, its one declaration
_VIEW_NAMES = tuple(f.name for f in dataclasses.fields(LayerView) if f.name != "stats")
_VIEW_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LayerView) if f.default is not dataclasses.MISSING}
_VIEW_REQUIRED = tuple(n for n in _VIEW_NAMES if n not in _VIEW_DEFAULTS)
LIVE_FIELDS = tuple(f.name for f in dataclasses.fields(LayerView) if f.metadata.get("live"))
_ROW_FIELDS = frozenset(
    f.name for f in dataclasses.fields(LayerView) if f.metadata.get("live") or f.metadata.get("rows")
)
_LAZY_OK = ("keys", "values")
#: the names a statistic's fields may not take
VIEW_FIELDS = frozenset((*_VIEW_NAMES, "stats"))


class TokenEvictor(ABC):
    """Decides which cached tokens a layer keeps, per sequence and KV head.

    Called by the engine once at the end of prefill (``phase="prefill"``, keep each layer's budget) and again
    whenever a decode step would push a layer past its budget (``phase="decode"``, keep ``budget - 1`` so the new
    token fits). Implement `score` (higher = keep); the engine keeps the top scores, breaking ties in favour of
    more recent tokens, and always keeps the most recent token. Override `select` only for full control; what it
    returns is validated (shape, range, duplicates, counts) and a violation stops the run naming the plugin.
    """

    #: the name users select it by (``evictor=NAME``)
    name: ClassVar[str] = ""
    #: which statistics the engine must collect for it (squeezekit.statistics): a `Stat`, a `Statistic` class of
    #: the plugin's own, or a tuple of them; each appears in the `LayerView` under its field names
    needs: ClassVar[Stat | type[Statistic] | tuple[Stat | type[Statistic], ...]] = Stat.NONE

    def floor(self) -> int:
        """The smallest per-layer budget this evictor can honour (e.g. sinks + window). Allocators respect it."""
        return 1

    def prepare(self, model: Any) -> None:
        """Called once when a ``compress`` block starts, with the model, before any token is seen: read what the
        score needs from the weights (e.g. each layer's output projection) and keep it on ``self``; raise
        `squeezekit.ConfigError` when this evictor cannot serve the model (the block then does not start). Each
        layer's attention module is ``squeezekit.attention_modules(model)[view.layer_idx]``. Default: nothing.
        """
        return None

    @abstractmethod
    def score(self, view: LayerView) -> torch.Tensor:
        """Return a (B, H, S) float score per slot; higher is kept first. Invalid slots are ignored."""

    def select(self, view: LayerView, keep: torch.Tensor) -> torch.Tensor:
        """Return a (B, H, K) long tensor of slot indices to keep, ``K = keep.max()``.

        ``keep`` is (B,): how many slots row ``b`` keeps (never more than it holds). Rows keeping fewer than ``K``
        pad their tail with -1. Indices must be distinct valid slots.
        """
        from .selection import top_slots  # (torch, imported only when evicting)

        return top_slots(self.score(view), view, keep)


@dataclass
class AllocationRequest:
    """What an allocator sees at the end of prefill. ``B`` sequences, ``L`` compressible layers."""

    #: (B, L) float: per sequence, the mean over its real tokens of the cosine similarity between each layer's
    #: input hidden state and its hidden state after attention + residual. High = attention changed little =
    #: a less important layer.
    importance: torch.Tensor
    #: (B,) long: exactly how many tokens the layers of each sequence hold together (round(mean budget x L))
    total: torch.Tensor
    #: the evictor's floor: every layer gets at least this many tokens
    floor: int
    #: (B,) long: no layer can hold more than this many tokens (the sequence's prompt length)
    cap: torch.Tensor
    #: only for an allocator that ``needs`` statistics (else None): the prefill view of each of the ``L`` layers as
    #: the evictor is about to see it (rows: this request's sequences), with the statistics the allocator needs
    #: (``window_queries`` of at least its ``window`` last prompt tokens). Read them; never write to them.
    layers: Sequence[LayerView] | None = None
    #: only with ``layers``: the evictor that will keep each layer's budget (to rank tokens as it will); its
    #: ``score`` and ``select`` are checked like the engine's own calls, and a failure there is the evictor's error
    evictor: TokenEvictor | None = None


class LayerBudgetAllocator(ABC):
    """Splits a total token budget across layers, per sequence.

    Called once per prefill, after every layer's importance is known and before any token is evicted.
    `allocate` returns integer budgets whose rows sum exactly to ``request.total`` with every entry in
    ``[request.floor, request.cap]``; the engine checks this and stops the run naming the plugin otherwise.
    `squeezekit.budget.distribute` turns real-valued targets into such budgets.
    """

    name: ClassVar[str] = ""
    #: True when the budgets follow the batch as a whole (for example its mean importance), not each sequence on
    #: its own. A micro-batched prefill (`squeezekit.batching.prefill`) then keeps the first micro-batch's
    #: allocation for the whole batch: later rows with a prompt length it has seen reuse its budgets (the
    #: allocator is not called again), other lengths get a request whose every row is its mean importance. Rows
    #: with equal prompt lengths get equal budgets, so the layers keep equal-size buffers (what the CUDA-graph
    #: decode path needs).
    batch_level: ClassVar[bool] = False
    #: statistics the engine collects for it at prefill and hands over as ``AllocationRequest.layers``: Stat.NONE
    #: (no views, no cost), or statistics that live for one step (not ``per_slot``: those would be collected for the
    #: whole generation), e.g. Stat.WINDOW_QUERIES (it must then have a ``window`` field)
    needs: ClassVar[Stat | type[Statistic] | tuple[Stat | type[Statistic], ...]] = Stat.NONE

    def prepare(self, model: Any, evictor: TokenEvictor) -> None:
        """Called once when a ``compress`` block starts, with the model and the evictor it will use.

        Raise `squeezekit.ConfigError` when this allocator cannot serve them (for example a calibration profile
        made for another model or evictor): the block then does not start. Default: nothing to check.
        """
        return None

    @abstractmethod
    def allocate(self, request: AllocationRequest) -> torch.Tensor:
        """Return (B, L) long per-layer token budgets (see the class docstring for the invariants)."""


@dataclass
class HeadSplitRequest:
    """What a head split sees, once per budgeted layer at the end of prefill, after the layer budgets are known and
    before the layer's tokens are evicted. ``B`` sequences, ``H`` KV heads, ``S`` slots."""

    #: (B, H, S) float64: the evictor's ranking of the layer's slots, higher kept first (its scores, ties broken
    #: towards recent tokens); -inf for invalid slots, +inf for each head's newest token (always kept)
    scores: torch.Tensor
    #: (B,) long: the layer's budget per head; the heads of sequence ``b`` hold ``budget[b] * H`` tokens together
    budget: torch.Tensor
    #: (B, H) long: how many tokens each head holds now (none can keep more)
    cap: torch.Tensor
    #: every head keeps at least ``min(floor, budget[b])`` tokens (the evictor's floor)
    floor: int
    layer_idx: int = 0
    n_layers: int = 1


class HeadBudgetSplitter(ABC):
    """Splits each layer's budget over its KV heads, per sequence (config key ``heads``).

    `split` returns (B, H) integer budgets whose rows sum exactly to ``budget[b] * H`` with every entry in
    ``[min(floor, budget[b]), cap[b, h]]`` (`squeezekit.budget.check_head_budgets`; the engine checks it and stops
    the run naming the plugin otherwise). The layer then holds exactly what its heads' budgets add up to, and keeps
    each head within its own budget at every decode step. A split reads the evictor's ranking, so it serves the
    evictors that only score (the engine keeps the top of each head's scores); with an evictor that overrides
    ``select`` the config refuses any split but an equal one.
    """

    #: the name users select it by (``heads=NAME``)
    name: ClassVar[str] = ""
    #: True when every head keeps its layer's budget (the bundled ``uniform``): the engine then skips the call and
    #: its equal-budget path runs unchanged
    equal: ClassVar[bool] = False

    @abstractmethod
    def split(self, request: HeadSplitRequest) -> torch.Tensor:
        """Return (B, H) long per-head budgets (see the class docstring for the invariants)."""

"""The statistics the engine collects for the policies: one `Statistic` class each, everything about it in one place.

A policy names what it reads in its ``needs``: a `Stat`, a `Statistic` subclass of its own, or a tuple of them. A
``compress`` block collects the union of what its allocator and evictor need, nothing else, and the policies read
each statistic as an attribute of the `squeezekit.LayerView` they get (``view.attention``). What the engine does with
a statistic follows from its class:

- ``fields``: the view attributes it fills; each layer stores them under these names
  (`squeezekit.layers.SlotLayer.stats`);
- ``per_slot``: its fields are (B, H, S) float32 tensors in the layer's slot table, like the token positions: they
  follow their token through every eviction, growth, compaction and batch operation, and a slot that receives a new
  token is reset to ``fill``. Otherwise the fields live for one step: the prefill's are read by the allocator and
  the prefill eviction, and they are dropped when the step ends;
- `observe`: called on every attention call of a layer with what the call sees (an `Observation`); it writes what
  it measures into ``stats`` (the layer's statistic tensors, by field);
- ``attention_mass``: the attention then also computes, per slot, the attention probability it received from this
  call's real queries, summed over them and over the query heads of its KV head (the fused kernel or the explicit
  softmax path compute it as a by-product), and hands it to `add_attention`;
- `problem`: what a policy that needs it must declare (a ``window`` field, say).
- `observe_residual`: called at prefill with each layer's residual stream before and after its attention (the
  input hidden state and the attention output); `Importance`, the allocators' input, is measured this way and is
  collected in every block.

Adding a statistic to squeezekit touches this file alone (a `Stat` member and a subclass whose ``name`` is the
member's value) plus the plugin that reads it. A plugin can also bring its own: subclass `Statistic` in the plugin's
module and list the class in ``needs`` (tests/test_statistics.py does this).

This module does not import torch (see squeezekit.policies).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class Stat(enum.Enum):
    """The statistics squeezekit collects for a policy that names them in its ``needs``."""

    NONE = "none"
    #: per slot, the attention probability it received, summed over every query run so far (prefill in query
    #: blocks, then one row per decode step) and over the query heads that share its KV head: ``view.attention``
    ATTENTION = "attention"
    #: at the end of prefill, the (RoPE-applied) queries of the last ``window`` prompt tokens:
    #: ``view.window_queries`` (B, H, G, W, D) and their positions ``view.window_positions`` (B, W)
    WINDOW_QUERIES = "window_queries"


@dataclass
class Observation:
    """One attention call of one layer, as a statistic's `Statistic.observe` sees it. ``B`` sequences, ``Hq`` query
    heads, ``H`` KV heads, ``q`` new tokens, ``S`` slots, ``D`` head dim."""

    query: torch.Tensor  #: (B, Hq, q, D) this call's queries, RoPE applied
    query_positions: torch.Tensor  #: (B, q) long, their positions in their sequences (-1 for padding)
    query_valid: torch.Tensor  #: (B, q) bool, real (non-padding) tokens
    keys: torch.Tensor  #: (B, H, S, D) the layer's key slots, this step's keys written
    values: torch.Tensor  #: (B, H, S, D)
    #: (B, H, S) bool, or (B, 1, S) while the KV heads hold the same tokens: the slots that hold a token (this
    #: step's included; the others' keys are stale or zero)
    keys_valid: torch.Tensor
    new_slots: torch.Tensor  #: (B, H, q) long, the slots this step's tokens were written to
    prefill: bool  #: the first step of the cache (the prompt, or its first chunk)
    scaling: float = 1.0  #: the attention's softmax scale (for a statistic that recomputes attention)


#: the tensors of an `Observation` (a statistic reads them; the guard checks it never writes to them)
OBSERVATION_TENSORS = ("query", "query_positions", "query_valid", "keys", "values", "keys_valid", "new_slots")


#: every field of the statistics defined so far (kept up to date by `Statistic.__init_subclass__`)
_FIELDS: frozenset[str] = frozenset()


def _view_fields() -> frozenset[str]:
    """The names of `squeezekit.LayerView`'s own fields, which no statistic may take (its one declaration is in
    squeezekit.policies, which imports this module: while the bundled statistics below are defined, none yet)."""
    import sys

    policies = sys.modules.get(__package__ + ".policies")
    return getattr(policies, "VIEW_FIELDS", frozenset())


class Statistic:
    """How one statistic is collected and stored (see the module docstring). Subclasses set ``name`` and
    ``fields``; the engine makes one instance per ``compress`` block, given the policies that need it."""

    #: unique name; for a bundled statistic, the value of its `Stat` member
    name: ClassVar[str] = ""
    #: the `LayerView` attributes it fills
    fields: ClassVar[tuple[str, ...]] = ()
    #: its fields are (B, H, S) float32 slot tensors that follow their tokens (else: they live for one step)
    per_slot: ClassVar[bool] = False
    #: a per-slot field's value in a slot that holds no token yet, or a new one
    fill: ClassVar[float] = 0.0
    #: `add_attention` receives each attention call's per-slot attention mass
    attention_mass: ClassVar[bool] = False
    #: `observe` is called at prefill only (``call.prefill``), never at a later step: decode steps then keep their
    #: fastest attention path (a layer whose heads hold different budgets is read by its fused pooled kernel,
    #: which hands no rectangular keys to observe)
    prefill_only: ClassVar[bool] = False

    _named: ClassVar[dict[str, type[Statistic]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return
        clash = _view_fields().intersection(cls.fields)
        if clash:
            raise TypeError(f"statistic {cls.name!r}: field names {sorted(clash)} are taken by LayerView")
        if cls.attention_mass and cls.add_attention is Statistic.add_attention:
            raise TypeError(f"statistic {cls.name!r} sets attention_mass but does not define add_attention")
        same = Statistic._named.get(cls.name)
        if same is not None and not _same_class(same, cls):
            raise TypeError(f"statistic {cls.name!r}: the name is taken by {same.__module__}.{same.__qualname__}")
        for other in Statistic._named.values():
            taken = set(other.fields).intersection(cls.fields)
            if taken and other.name != cls.name:
                raise TypeError(f"statistic {cls.name!r}: fields {sorted(taken)} belong to statistic {other.name!r}")
        Statistic._named[cls.name] = cls
        global _FIELDS
        _FIELDS = frozenset(f for named in Statistic._named.values() for f in named.fields)

    def __init__(self, policies: Sequence[Any]):
        #: the policies of the block that need it
        self.policies = list(policies)

    @classmethod
    def problem(cls, policy: type) -> str | None:
        """Why ``policy`` (a plugin class that needs this statistic) cannot have it, or None."""
        return None

    def observe(self, stats: dict[str, torch.Tensor], call: Observation) -> None:
        """Measure one attention call of a layer; write into ``stats`` (the layer's statistic tensors)."""
        return None

    def add_attention(self, stats: dict[str, torch.Tensor], mass: torch.Tensor) -> None:
        """With ``attention_mass``: ``mass`` (B, H, S) float32 is the attention each slot received in this call."""
        raise NotImplementedError(f"statistic {self.name!r} sets attention_mass but does not take it")

    def observe_residual(
        self, stats: dict[str, torch.Tensor], hidden: torch.Tensor, attended: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """At prefill, once per layer: ``hidden`` (B, T, E) is the layer's input residual stream, ``attended``
        (B, T, E) its attention output as added to it, ``valid`` (B, T) the real tokens."""
        return None


#: the field of the layer importance every block measures (`Importance`)
IMPORTANCE = "importance"


class Importance(Statistic):
    """Per sequence and layer, at prefill: the mean over its real tokens of the cosine similarity between the
    layer's input hidden state ``x`` and ``x + attention(x)`` (SqueezeAttention's measure): high = attention changed
    little = a less important layer. The allocators' input (``AllocationRequest.importance``), so every block
    collects it."""

    name = IMPORTANCE
    fields = (IMPORTANCE,)

    def observe_residual(
        self, stats: dict[str, torch.Tensor], hidden: torch.Tensor, attended: torch.Tensor, valid: torch.Tensor
    ) -> None:
        import torch

        from .kernels import importance as fused

        cos = fused.cosines(hidden, attended)  # one pass over both, on CUDA (None: the plain path)
        if cos is None:
            # cos(x, h) with h = x + out, from three fp32-accumulated norms (no fp32 copies of the activations):
            # x.h = (|x|^2 + |h|^2 - |out|^2) / 2
            nx = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)
            nh = torch.linalg.vector_norm(hidden + attended, dim=-1, dtype=torch.float32)
            no = torch.linalg.vector_norm(attended, dim=-1, dtype=torch.float32)
            cos = (nx.square() + nh.square() - no.square()) / (2 * nx * nh).clamp_min(1e-12)
        weight = valid.to(cos.device).float()
        stats[IMPORTANCE] = (cos * weight).sum(-1) / weight.sum(-1).clamp_min(1)


class AttentionMass(Statistic):
    """`Stat.ATTENTION`: what H2O ranks tokens by."""

    name = Stat.ATTENTION.value
    fields = ("attention",)
    per_slot = True
    attention_mass = True

    def add_attention(self, stats: dict[str, torch.Tensor], mass: torch.Tensor) -> None:
        stats["attention"] += mass


class WindowQueries(Statistic):
    """`Stat.WINDOW_QUERIES`: the prefill's last queries, for SnapKV's vote and lost_attention's allocation."""

    name = Stat.WINDOW_QUERIES.value
    fields = ("window_queries", "window_positions")
    prefill_only = True

    def __init__(self, policies: Sequence[Any]):
        super().__init__(policies)
        #: how many queries: the largest ``window`` of the policies that need them
        self.window = max(int(p.window) for p in policies)

    @classmethod
    def problem(cls, policy: type) -> str | None:
        if not hasattr(policy, "window"):
            return f"{policy.__name__} needs Stat.WINDOW_QUERIES, so it must have a 'window' field (how many queries)"
        return None

    def observe(self, stats: dict[str, torch.Tensor], call: Observation) -> None:
        B, Hq, q, D = call.query.shape
        w = min(q, self.window)
        if call.prefill and w > 0:
            H = call.keys.shape[1]
            stats["window_queries"] = call.query[:, :, -w:].reshape(B, H, Hq // H, w, D).clone()
            stats["window_positions"] = call.query_positions[:, -w:].clone()


def _same_class(a: type, b: type) -> bool:
    """The same class defined again (its module re-imported, as a plugin reloaded), not another one."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def needed(needs: Any) -> tuple[type[Statistic], ...]:
    """The statistic classes a policy's ``needs`` names, in order, without repeats (``Stat.NONE``: none).

    Raises TypeError for anything but a `Stat`, a `Statistic` subclass, or a tuple / list / set of them."""
    items: Iterable[Any] = needs if isinstance(needs, (tuple, list, set, frozenset)) else (needs,)
    out: list[type[Statistic]] = []
    for item in items:
        if isinstance(item, Stat):
            if item is Stat.NONE:
                continue
            cls = Statistic._named[item.value]
        elif isinstance(item, type) and issubclass(item, Statistic) and item.name:
            cls = item
        else:
            raise TypeError(f"not a squeezekit.Stat or Statistic class: {item!r}")
        if cls not in out:
            out.append(cls)
    return tuple(out)


def field_names() -> frozenset[str]:
    """Every statistic field known so far (bundled ones and those of the plugins imported)."""
    return _FIELDS

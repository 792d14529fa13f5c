"""`PolicyRunner`: the one owner of a ``compress`` block's policies and of every call into them.

It builds the allocator and the evictor (and their fallbacks) from the `Config`, computes the floor once, and is
the only code that calls a plugin. Every call is guarded the same way:

- the plugin gets copies of the small tensors (budgets, totals, caps, token counts) and the live cache tensors
  (keys, values, slot validity and positions, accumulated attention) whose in-place writes are detected through
  PyTorch's version counters (free on the hot path). Writes that bypass the version counters (through ``.data``,
  ``.numpy()``, DLPack) are caught where a call runs once per generation: at prefill, the tensors that decide what
  is kept (slot validity, positions, statistics) are also fingerprinted before and after the call (`_fingerprints`,
  one read of them); keys, values and queries (too large to read again per call) and every tensor at decode are
  not checked that way (docs/plugins.md says so);
- a statistic (`squeezekit.statistics.Statistic`, bundled or a plugin's) is called through the same guard on every
  attention call (`observe`, `add_attention`): what it raises, and writes into the call's tensors or into another
  statistic's fields, are the error of the policy that needs it (its fallback takes over);
- whatever it raises (any exception, and any BaseException but KeyboardInterrupt) and whatever is wrong with what it
  returns (checked against squeezekit's own copies, inside the same guard) becomes one `PluginError` naming the
  plugin, its package and the problem;
- with a ``fallback_allocator`` / ``fallback_evictor`` in the config, the fallback takes over for the rest of the
  block (with a `PluginFallbackWarning`) and the call is made again; otherwise the error stops the run.

NaN scores on CUDA are recorded without a host sync and reported by `check_nan` (every 32 steps and at the end).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from .budget import check_budgets, check_head_budgets
from .errors import PluginError, PluginFallbackWarning, SqueezekitError
from .policies import (
    LIVE_FIELDS,
    AllocationRequest,
    HeadBudgetSplitter,
    HeadSplitRequest,
    LayerBudgetAllocator,
    LayerView,
    TokenEvictor,
    evictor_floor,
)
from .selection import check_selection, top_slots, victim_slots
from .statistics import OBSERVATION_TENSORS, Importance, Observation, Statistic, needed

if TYPE_CHECKING:
    from .config import Config

T = TypeVar("T")
#: the policy kinds a config's ``fallback_*`` keys stand in for (a head split has none: its failure stops the run)
FALLBACK_KINDS = ("allocator", "evictor")


def _live_tensors(view: Any) -> list[tuple[str, Any]]:
    """The cache's own tensors in a `LayerView` (or a `squeezekit.layers.SlotLayer`): the slot tensors and every
    statistic."""
    if isinstance(view, LayerView):
        return view.live()
    return [*((f, getattr(view, f)) for f in LIVE_FIELDS), *view.stats.items()]


def _version(t: torch.Tensor | None) -> int | None:
    # inference tensors carry no version counter; the cache never hands its own to a plugin (see SlotLayer.view)
    return None if t is None or t.is_inference() else t._version


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprints(tensors: list[Any]) -> list[int | None]:
    """A content fingerprint of each of ``tensors`` (the sum of its bytes read as machine words, in 64 bits; None
    for what is not a tensor with elements): any write changes it unless crafted not to. Catches what version
    counters miss (``.data``, ``.numpy()``); costs one read of each and one host sync for them all, so it is taken
    only where a call runs once per generation (prefill)."""
    sums: list[Any] = [None] * len(tensors)
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            flat = t.detach().reshape(-1)
            sums[i] = flat.view(_WORDS[flat.element_size()]).sum(dtype=torch.int64)
    by_device: dict[Any, list[int]] = {}
    for i, total in enumerate(sums):
        if total is not None:
            by_device.setdefault(total.device, []).append(i)
    out: list[int | None] = [None] * len(tensors)
    for index in by_device.values():
        for i, value in zip(index, torch.stack([sums[i] for i in index]).tolist(), strict=True):
            out[i] = int(value)
    return out


def _copied(call: Observation) -> Observation:
    """``call`` with its inference tensors copied (the small ones of a decode step: query, positions, new slots)."""
    import dataclasses

    with torch.inference_mode(False):
        return dataclasses.replace(call, **{
            f: getattr(call, f).clone() for f in OBSERVATION_TENSORS if getattr(call, f).is_inference()
        })  # fmt: skip


#: tensors whose content is not fingerprinted at prefill (a read of the whole prompt's keys and values, or queries,
#: per call: 0.2 s of a 4 s prefill of Mistral-7B shapes at B=64 on an H200); version counters still watch them
_NOT_FINGERPRINTED = (".keys", ".values", ".query")


class _Watch:
    """The tensors a plugin call is handed, noted before the call so that `problem` can tell what it wrote to."""

    def __init__(self, named: list[tuple[str, Any]], deep: bool):
        named = [(name, t) for name, t in named if t is not None]
        marks = _fingerprints([t if deep and not name.endswith(_NOT_FINGERPRINTED) else None for name, t in named])
        self.named = [(name, t, _version(t), mark) for (name, t), mark in zip(named, marks, strict=True)]

    def problem(self, method: str) -> str | None:
        now = _fingerprints([t if mark is not None else None for _, t, _, mark in self.named])
        for (name, tensor, version, fingerprint), later in zip(self.named, now, strict=True):
            if (version is not None and _version(tensor) != version) or (
                fingerprint is not None and later != fingerprint
            ):
                return f"{method}() wrote to {name} in place; return new tensors instead"
        return None


class PolicyRunner:
    """The allocator and evictor of one ``compress`` block (see the module docstring)."""

    def __init__(self, config: Config):
        self.config = config
        #: tensor parallel: the process group of the ranks holding the layers' other heads (set by the Compressor)
        self.head_group: Any = None
        self._policies: dict[str, Any] = {
            "allocator": config.build_allocator(),
            "evictor": config.build_evictor(),
            "heads": config.build_heads(),
        }
        self._origins = {kind: config.origin(kind) for kind in self._policies}
        self._fallbacks: dict[str, Any] = {kind: config._build(kind, None, fallback=True) for kind in FALLBACK_KINDS}
        self._fallbacks["heads"] = None
        #: the errors that made a fallback take over, by kind
        self.failures: dict[str, PluginError] = {}
        evictors = [(self.evictor, self._origins["evictor"])]
        if self._fallbacks["evictor"] is not None:
            evictors.append((self._fallbacks["evictor"], config.origin("evictor", fallback=True)))
        #: the fewest tokens a layer keeps (the largest floor of the evictor and its fallback), and whose it is
        self.floor, self.floor_setter = evictor_floor(evictors)
        self._nan: torch.Tensor | None = None
        self._collect()

    def _collect(self) -> None:
        """Decide which statistics the block collects: those its evictor and allocators (a fallback allocator
        included; a fallback evictor needs no others, see Config) need, none at full budget; and, in every block, the
        engine's own: the layer importance (the allocators' input and the summaries')."""
        wanted: dict[type[Statistic], list[Any]] = {}
        if not self.config.full:
            for policy in (self.evictor, self.allocator, self._fallbacks["allocator"]):
                for cls in needed(policy.needs) if policy is not None else ():
                    wanted.setdefault(cls, []).append(policy)
        #: the statistics the policies need, one instance each
        self.statistics: tuple[Statistic, ...] = tuple(cls(policies) for cls, policies in wanted.items())
        collected = (*self.statistics, Importance([self.allocator]))
        #: those the attention calls on every call (`Statistic.observe`), and those that take the attention mass
        self.observers = tuple(s for s in collected if type(s).observe is not Statistic.observe)
        #: those it calls at the later steps too (not `Statistic.prefill_only`)
        self.step_observers = tuple(s for s in self.observers if not s.prefill_only)
        self.mass_statistics = tuple(s for s in collected if s.attention_mass)
        #: those that measure the residual stream around each layer's attention at prefill (`observe_residual`)
        self.residual_observers = tuple(
            s for s in collected if type(s).observe_residual is not Statistic.observe_residual
        )
        #: the per-slot fields and the value of a fresh slot (kept in the layers' slot tables), and the fields that
        #: live for one step
        self.slot_fields = tuple((f, s.fill) for s in collected if s.per_slot for f in s.fields)
        self.step_fields = tuple(f for s in collected if not s.per_slot for f in s.fields)
        #: every field the policies' views show (a layer's other statistic tensors, left by a policy that fell back,
        #: are dropped when the step ends)
        self.fields = frozenset(f for s in self.statistics for f in s.fields)
        self._collected = collected

    # -- the policies ----------------------------------------------------------------------------------------------
    @property
    def allocator(self) -> LayerBudgetAllocator:
        return self._policies["allocator"]

    @property
    def evictor(self) -> TokenEvictor:
        return self._policies["evictor"]

    @property
    def heads(self) -> HeadBudgetSplitter:
        return self._policies["heads"]

    @property
    def splits_heads(self) -> bool:
        """The head split gives heads budgets of their own (not the equal split, whose call the engine skips)."""
        return not self.heads.equal and not self.config.full

    @property
    def batch_level(self) -> bool:
        return bool(getattr(self.allocator, "batch_level", False))

    def use(self, kind: str, policy: LayerBudgetAllocator | TokenEvictor) -> None:
        """Run this policy object (not one the config names) for the rest of the block, as a plugin of the caller:
        for tools that measure policies (``squeezekit calibrate`` evicts one layer at a time with its own allocator)."""
        self._policies[kind] = policy
        self._origins[kind] = f"{type(policy).__module__} (set by the caller)"
        self._collect()

    def origin(self, kind: str) -> str:
        return self._origins[kind]

    def error(self, kind: str, problem: str) -> PluginError:
        error = PluginError(self._policies[kind].name, self._origins[kind], problem)
        error.kind = kind  # type: ignore[attr-defined]  # (whose fallback may take over: see `guarded`)
        return error

    def fall_back(self, kind: str, error: PluginError) -> bool:
        """Replace the failing ``kind`` policy by the config's fallback for the rest of the block, with a warning.

        Returns False (the caller raises ``error``) when no fallback is set or the fallback itself failed.
        """
        fallback = self._fallbacks[kind]
        if fallback is None or kind in self.failures:
            return False
        warnings.warn(
            f"squeezekit: {error}; falling back to {kind} {fallback.name!r} for the rest of this compress() block",
            PluginFallbackWarning,
            stacklevel=3,
        )
        self.failures[kind] = error
        self._policies[kind] = fallback
        self._origins[kind] = self.config.origin(kind, fallback=True)
        self._collect()  # the fallback may need fewer statistics (never more: see Config)
        return True

    def guarded(self, kind: str, fn: Callable[[], T]) -> T:
        """``fn()``; if the ``kind`` plugin fails (a `PluginError`) and the config names a fallback, again with it."""
        while True:
            try:
                return fn()
            except PluginError as exc:
                # an evictor failing inside an allocator's call (through `CheckedEvictor`) is not the allocator's
                if getattr(exc, "kind", kind) != kind or not self.fall_back(kind, exc):
                    raise

    def prepare(self, model: Any) -> None:
        """Let the evictors, then the allocators, read and check the model before any work (`TokenEvictor.prepare`,
        `LayerBudgetAllocator.prepare`; fallbacks included): a `ConfigError` they raise stops the block as it is;
        anything else they raise is a `PluginError`."""
        calls = [
            ("evictor", False, self.evictor, lambda p: p.prepare(model)),
            ("evictor", True, self._fallbacks["evictor"], lambda p: p.prepare(model)),
            ("allocator", False, self.allocator, lambda p: p.prepare(model, self.evictor)),
            ("allocator", True, self._fallbacks["allocator"], lambda p: p.prepare(model, self.evictor)),
        ]
        for kind, fallback, policy, call in calls:
            if policy is None:
                continue
            try:
                call(policy)
            except SqueezekitError:
                raise
            except Exception as exc:
                origin = self.config.origin(kind, fallback=fallback)
                raise PluginError(policy.name, origin, f"prepare() raised {type(exc).__name__}: {exc}") from exc

    def _call(
        self, kind: str, method: str, *args: Any, watch: Any = None, check: Callable[[Any], str | None] | None = None
    ) -> Any:
        """One call of a plugin method, its output checked: any failure is a `PluginError` (see the module doc).

        ``watch``: a `LayerView` (or a list of them) whose live tensors the plugin must not write to."""
        plugin = self._policies[kind]
        views = watch if isinstance(watch, list) else [] if watch is None else [watch]
        deep = any(getattr(v, "phase", "prefill") == "prefill" for v in views)  # (a SlotLayer: an allocator's)
        live = _Watch([(f"view.{f}", t) for v in views for f, t in _live_tensors(v)], deep)
        try:
            out = getattr(plugin, method)(*args)
        except PluginError:
            raise
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit and friends from a plugin are its errors too
            raise self.error(kind, f"{method}() raised {type(exc).__name__}: {exc}") from exc
        problem = live.problem(method)
        if problem:
            raise self.error(kind, problem)
        if check is not None:
            try:
                problem = check(out)
            except Exception as exc:  # e.g. a tensor on the meta device: whatever it is, it is the plugin's
                problem = f"{method}() returned something squeezekit cannot check ({type(exc).__name__}: {exc})"
            if problem:
                raise self.error(kind, problem)
        return out

    # -- the statistics -----------------------------------------------------------------------------------------------
    def observe(self, stats: dict[str, torch.Tensor], call: Observation) -> None:
        """Every collected statistic's `Statistic.observe` of one attention call of a layer (``stats``: the layer's
        statistic tensors), each through the guard (see the module docstring)."""
        if not call.prefill:  # decode: the call's small inference tensors are handed as copies (they carry no
            call = _copied(call)  # version counter; the slots' keys and values do, and are watched)
        for stat in self.observers if call.prefill else self.step_observers:
            self._statistic_call(stat, "observe", stats, call)

    def add_attention(self, stats: dict[str, torch.Tensor], mass: torch.Tensor) -> None:
        """Hand one attention call's per-slot attention mass to the statistics that take it, through the guard."""
        for stat in self.mass_statistics:
            self._statistic_call(stat, "add_attention", stats, mass)

    def observe_residual(
        self, stats: dict[str, torch.Tensor], hidden: torch.Tensor, attended: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """At prefill: a layer's residual stream before and after its attention, to the statistics that measure it
        (`squeezekit.statistics.Importance`), through the guard."""
        for stat in self.residual_observers:
            self._statistic_call(stat, "observe_residual", stats, (hidden, attended, valid))

    def _statistic_kind(self, stat: Statistic) -> str:
        """The kind of the policy a statistic is collected for (the evictor's first): whose error its failure is."""
        for kind in ("evictor", "allocator"):
            if any(policy is self._policies[kind] for policy in stat.policies):
                return kind
        return "allocator"  # needed by the fallback allocator alone

    def _statistic_call(self, stat: Statistic, method: str, stats: dict[str, torch.Tensor], arg: Any) -> None:
        kind = self._statistic_kind(stat)
        prefix = f"statistic {stat.name!r}: "

        def once() -> None:
            if stat not in self._collected:  # a fallback took over and does not need it
                return
            mine = set(stat.fields)
            others = {name: t for name, t in stats.items() if name not in mine}
            if isinstance(arg, Observation):
                handed = [(f"call.{f}", getattr(arg, f)) for f in OBSERVATION_TENSORS]
                deep, args = arg.prefill, (arg,)
            elif isinstance(arg, tuple):  # the residual stream, at prefill (activations: version counters only)
                handed = list(zip(("hidden", "attended", "valid"), arg, strict=True))
                deep, args = False, arg
            else:
                handed, deep, args = [("the attention mass", arg)], False, (arg,)
            watch = _Watch([*handed, *((f"stats[{n!r}] (another statistic's)", t) for n, t in others.items())], deep)
            try:
                getattr(stat, method)(stats, *args)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit and friends from a plugin are its errors too
                raise self.error(kind, f"{prefix}{method}() raised {type(exc).__name__}: {exc}") from exc
            problem = watch.problem(method)
            replaced = next((n for n, t in others.items() if stats.get(n) is not t), None)
            if problem is None and replaced is not None:
                problem = f"{method}() replaced stats[{replaced!r}], another statistic's field"
            if problem:
                raise self.error(kind, prefix + problem)

        self.guarded(kind, once)

    # -- the allocator ------------------------------------------------------------------------------------------------
    def allocate(
        self,
        importance: torch.Tensor,
        total: torch.Tensor,
        cap: torch.Tensor,
        floor: int,
        views: Sequence[LayerView] | None = None,
    ) -> torch.Tensor:
        """(B, L) long budgets on the CPU: rows summing to ``total``, entries in [floor, cap] (checked).

        ``views``: the request's layers, handed only to an allocator that needs them (`needs`); their live tensors
        are watched for writes (those of ``views.sources`` when it has them, see `squeezekit.cache.PrefillViews`)."""
        total, cap = total.cpu().long(), cap.cpu().long()
        shape = (total.shape[0], importance.shape[1])

        def once() -> torch.Tensor:
            request = AllocationRequest(
                importance=importance.clone(), total=total.clone(), floor=floor, cap=cap.clone()
            )
            watch = None
            if needed(self.allocator.needs) and views is not None:
                request.layers, request.evictor = views, cast(TokenEvictor, CheckedEvictor(self))  # (its stand-in)
                watch = list(getattr(views, "sources", views))
            check = lambda b: check_budgets(b, total, floor, cap, shape)  # noqa: E731 (against our own copies)
            return self._call("allocator", "allocate", request, watch=watch, check=check).long().cpu()

        return self.guarded("allocator", once)

    # -- the head split -----------------------------------------------------------------------------------------------
    def split_heads(self, view: LayerView) -> torch.Tensor:
        """(B, H) long per-head budgets of a layer at the end of prefill, on the CPU (checked: rows sum to
        ``budget * H``, each head in [min(floor, budget), what it holds]), from the evictor's checked scores of the
        layer's slots."""
        from .selection import rank_key

        scores = rank_key(self.head_scores(view), view, protect_newest=True)
        budget = view.budget.cpu().long()
        cap = view.valid.sum(-1).long()
        mine = None
        if self.head_group is not None:  # tensor parallel: split every head of the layer, keep this rank's share
            from .parallel import gather_heads

            H = cap.shape[1]
            start = torch.distributed.get_rank(self.head_group) * H
            mine = slice(start, start + H)
            scores, cap = gather_heads(scores, self.head_group), gather_heads(cap, self.head_group)
        cap = cap.cpu()
        floor = self.floor

        def check(out: Any) -> str | None:
            return check_head_budgets(out, budget, floor, cap)

        request = HeadSplitRequest(
            scores=scores, budget=budget.clone(), cap=cap.clone(), floor=floor, layer_idx=view.layer_idx,
            n_layers=view.n_layers,
        )  # fmt: skip
        out = self._call("heads", "split", request, check=check).long().cpu()
        return out if mine is None else out[:, mine]

    # -- the evictor --------------------------------------------------------------------------------------------------
    @property
    def scores_only(self) -> bool:
        """The evictor only scores (the engine selects): a fused kernel may select and write for it."""
        return type(self.evictor).select is TokenEvictor.select

    def kernel_scores(self, view_of: Callable[[], LayerView]) -> torch.Tensor:
        """Checked scores for a fused kernel that selects the victims itself and records NaN in `nan_flag`."""
        return self.guarded("evictor", lambda: self._scores(view_of(), defer_nan="kernel"))

    def nan_flag(self, device: torch.device) -> torch.Tensor:
        """The flag NaN scores are recorded in without a host sync (reported by `check_nan`)."""
        if self._nan is None:
            self._nan = torch.zeros((), dtype=torch.bool, device=device)
        return self._nan

    def _scores(self, view: LayerView, defer_nan: bool | str = False) -> torch.Tensor:
        valid = view.valid

        def check(score: Any) -> str | None:
            if not isinstance(score, torch.Tensor):
                return f"score() must return a tensor, got {type(score).__name__}"
            if tuple(score.shape) != tuple(valid.shape):
                return f"score() returned shape {tuple(score.shape)}, expected {tuple(valid.shape)}"
            if score.device != valid.device:
                return f"score() returned a tensor on {score.device}, expected {valid.device}"
            if score.dtype == torch.bool or not (score.is_floating_point() or score.dtype in _INTEGERS):
                return f"score() must return a real-valued tensor, got {score.dtype}"
            if defer_nan == "kernel":  # the caller's kernel records NaN (squeezekit.kernels.steady)
                pass
            elif defer_nan and score.is_cuda:
                self._nan_later(score)
            elif score.is_floating_point() and bool((torch.isnan(score) & valid).any()):
                return "score() returned NaN for a cached token"
            return None

        return self._call("evictor", "score", view, watch=view, check=check)

    def head_scores(self, view: LayerView) -> torch.Tensor:
        """The evictor's checked scores of a layer's slots, for the head split (`PolicyRunner.split_heads`)."""
        return self.guarded("evictor", lambda: self._scores(view))

    def keep_slots(
        self,
        view_of: Callable[[], LayerView],
        keep: torch.Tensor,
        protect_newest: bool,
        defer_nan: bool = False,
        most: int | None = None,
    ) -> torch.Tensor:
        """(B, H, K) slot indices to keep, ``keep[b]`` per row (or ``keep[b, h]`` per head: then the top of the
        evictor's scores, a head split being for evictors that only score), padded with -1 (checked). With
        ``defer_nan``, NaN scores are reported later on CUDA; ``most``: ``keep.max()`` when the host knows it (no
        host sync either way: `check_nan`)."""

        def once() -> torch.Tensor:
            view = view_of()
            if type(self.evictor).select is TokenEvictor.select or keep.dim() == 2:
                score = self._scores(view, defer_nan)
                return top_slots(score, view, keep, protect_newest=protect_newest, most=most)
            check = lambda idx: check_selection(idx, view, keep)  # noqa: E731
            return self._call("evictor", "select", view, keep, watch=view, check=check).long()

        return self.guarded("evictor", once)

    def ranking_scores(self, view_of: Callable[[], LayerView], per_row: bool) -> torch.Tensor | None:
        """The evictor's checked scores of a layer's slots at a decode-phase step, for the engine to rank with the
        other layers' (`squeezekit.selection.kept_together`; NaN reported later on CUDA), or None when the evictor's
        own `select` chooses (the same count in every head: ``per_row``), as in `keep_slots`. On CUDA the ranking
        records NaN scores in `nan_flag` (for all layers at once); the CPU checks them here."""

        def once() -> torch.Tensor | None:
            if per_row and type(self.evictor).select is not TokenEvictor.select:
                return None
            view = view_of()
            return self._scores(view, defer_nan="kernel" if view.valid.is_cuda else True)

        return self.guarded("evictor", once)

    def victims(self, view_of: Callable[[], LayerView], protect_newest: bool, defer_nan: bool = False) -> torch.Tensor:
        """(B, H, 1): the slot each row gives up (the decode hot path: no host sync when ``defer_nan`` on CUDA)."""

        def once() -> torch.Tensor:
            view = view_of()
            if type(self.evictor).select is TokenEvictor.select:
                return victim_slots(self._scores(view, defer_nan), view, protect_newest=protect_newest)
            keep = view.budget - 1  # a plugin's own select: the generic path (validated)
            check = lambda idx: check_selection(idx, view, keep)  # noqa: E731
            idx = self._call("evictor", "select", view, keep, watch=view, check=check)
            dropped = view.valid.clone()  # the victim: a valid slot select() did not keep
            dropped.scatter_(2, idx.long().clamp_min(0), False)
            return dropped.to(torch.int8).argmax(-1, keepdim=True)

        return self.guarded("evictor", once)

    # -- NaN scores found on CUDA without a host sync ------------------------------------------------------------------
    def _nan_later(self, score: torch.Tensor) -> None:
        flag = self.nan_flag(score.device)
        flag.logical_or_(torch.isnan(score.float()).any().to(flag.device, non_blocking=True))

    def check_nan(self) -> None:
        """Report NaN scores recorded on the hot path (falls back when the config names a fallback evictor)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        if self._nan is not None and bool(self._nan):
            self._nan.zero_()
            error = self.error("evictor", "score() returned NaN for a cached token")
            if not self.fall_back("evictor", error):
                raise error


_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class CheckedEvictor:
    """The evictor as an allocator sees it (``AllocationRequest.evictor``): its attributes, and `score` / `select`
    that go through the runner like the engine's own calls (checked; a failure is the evictor's `PluginError`, and
    the config's fallback evictor takes over for the rest of the block, this call included)."""

    def __init__(self, runner: PolicyRunner):
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner.evictor, name)

    def __repr__(self) -> str:
        return repr(self._runner.evictor)

    def score(self, view: LayerView) -> torch.Tensor:
        return self._runner.guarded("evictor", lambda: self._runner._scores(view))

    def select(self, view: LayerView, keep: torch.Tensor) -> torch.Tensor:
        """The slots the engine would keep: the evictor's own `select` (checked) or the top of its scores."""
        return self._runner.keep_slots(lambda: view, keep, protect_newest=True)

"""The compressed KV cache: a transformers `Cache` of layers that really shrink, one class per layer kind.

The layers (squeezekit.layers) are chosen when the cache is built, from the model's layer types and attention
geometry: budgeted layers where the allocator sets a budget, the model's own sliding-window layers, full layers at
budget 1. The cache owns what every layer shares: the sequences' token counts, the prompt lengths, the budgets, and
the step lifecycle:

1. `begin_step` (called by the compressor's hook on the decoder stack) opens the `squeezekit.step.Step`: which new
   tokens are real and their positions;
2. every layer's `update` writes its new keys and values (a budgeted layer first makes room for a decode token) and
   records its attention plan for the step (squeezekit.attention.plan_layer);
3. `end_step` closes it: at prefill it plans the budgets (squeezekit.allocation), then every layer settles (a
   budgeted layer evicts down to its budget, a windowed one drops what its window drops).

The policies are called only through the cache's `PolicyRunner`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import kernels
from .allocation import BatchAllocation, plan_budgets
from .attention import plan_layer
from .errors import InputError
from .kernels import evict
from .layers import BudgetedLayer, SlotLayer, layer_kinds
from .policies import LayerView
from .runner import PolicyRunner
from .selection import Ranking, kept_together
from .statistics import IMPORTANCE
from .step import Step, open_step
from .transformers_api import Cache, Geometry


class PrefillViews(Sequence[LayerView]):
    """The prefill views of some layers, for an allocator that needs them (``AllocationRequest.layers``). Each view
    is built when it is read, so the copies a view makes (the prefill's inference tensors, the request's rows) exist
    for one layer at a time. ``sources``: the layers themselves, whose tensors the `PolicyRunner` watches."""

    def __init__(self, layers: list[SlotLayer], rows: torch.Tensor | None = None, heads: Any = None):
        self.sources = layers
        self._rows = rows  # only these sequences (None: all)
        self._heads = heads  # tensor parallel: the group whose ranks hold the other heads (squeezekit.parallel)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        view = self.sources[i].view("prefill")
        if self._heads is not None:
            from .parallel import gathered_view

            view = gathered_view(view, self._heads)
        if self._rows is None or self._rows.numel() == view.valid.shape[0]:
            return view
        return view.rows(self._rows)


class SqueezeCache(Cache):
    """A transformers `Cache` of squeezekit layers whose policies a `PolicyRunner` calls (see squeezekit.compress).

    ``layers``: the indices of the layers the budget applies to (full-attention layers); ``geometry``: each layer's
    attention window, scale and soft-capping; ``shared``: the allocation a micro-batched prefill shares across its
    micro-batches; ``expected_prompt_len`` (B,): the whole prompt's real length, known before a chunked prefill's
    first chunk, so that budgets are fractions of the prompt, not of the chunk; ``sync_timings``: synchronize the
    device around policy work so that `timings` are exact (benchmarks); ``branches``: see `branch`.
    """

    layers: list[SlotLayer]  # type: ignore[assignment]  # transformers' Cache holds any layer kind
    # Per-sequence state, set by the first step (None before it, like the layers' slot tensors):
    seen: torch.Tensor  #: (B,) real tokens per sequence
    prompt_len: torch.Tensor  #: (B,) real tokens of each prompt
    importance: torch.Tensor  #: (B, L) prefill cosine similarity
    budgets: torch.Tensor  #: (B, L) per-layer budgets (-1 = unbounded)
    step: Step  #: the step running now (None between steps)

    def __init__(
        self,
        runner: PolicyRunner,
        geometry: list[Geometry],
        layers: list[int],
        *,
        backend: str = "sdpa",
        shared: BatchAllocation | None = None,
        expected_prompt_len: torch.Tensor | None = None,
        sync_timings: bool = False,
        branches: int = 1,
    ):
        self.runner, self.backend, self.geometry = runner, backend, geometry
        #: each row's prefill is computed once and its cache repeated this many times before budgets are planned
        #: (see `branch`); later steps pass ``rows x branches`` sequences
        self.branches = branches
        kinds = layer_kinds(layers, len(geometry), runner.config.full, [g.window for g in geometry])
        super().__init__(layers=[kind(self, i, g) for i, (kind, g) in enumerate(zip(kinds, geometry, strict=True))])
        self.budget_layers = list(layers)
        self.shared, self.expected_prompt_len, self.sync_timings = shared, expected_prompt_len, sync_timings
        self.length = 0  # tokens processed per row, padding included (what DynamicCache would report)
        self.seen = self.step = self.prompt_len = self.importance = self.budgets = None  # type: ignore[assignment]
        self.full_kv_bytes_prefill = 0  # keys + values of the whole prompt, as a full cache would hold them
        self.kv_bytes_prefill = 0  # keys + values kept at the end of prefill
        self.peak_kv_bytes_prefill = 0  # the most keys + values allocated at any point of the prefill
        self.host_seen_max = 0  # host-side copy of seen.max(), so that hot paths never sync
        #: at the end of prefill, a layer whose rows hold unequal budgets goes into a pool (`BudgetedLayer.pack`);
        #: False for a micro-batch's cache (`squeezekit.batching` pools the assembled batch's)
        self.pool_rows = True
        self.timings: dict[str, float] = {"importance": 0.0, "allocation": 0.0, "eviction": 0.0}

    # -- transformers' cache API ---------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        out = layer.write(key_states, value_states)
        self.step.plans[layer_idx] = plan_layer(layer, self.step, self.runner, self.backend)
        return out

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (evicted tokens are gone)")

    # -- steps -----------------------------------------------------------------------------------------------------
    def begin_step(self, new_valid: torch.Tensor, all_valid: bool | None = None) -> Step:
        B = new_valid.shape[0]
        if self.seen is None:
            self.seen = torch.zeros(B, dtype=torch.long, device=new_valid.device)
        elif self.seen.shape[0] != B:
            raise InputError(f"batch size changed from {self.seen.shape[0]} to {B} within one compressed generation")
        self.step = open_step(self.seen, new_valid, prefill=self.length == 0, all_valid=all_valid)
        return self.step

    def seen_after_step(self) -> torch.Tensor:
        """(B,) tokens per sequence once the current step is done."""
        if self.step is not None and not self.step.counted:
            if self.step.seen_after is None:
                self.step.seen_after = self.seen + self.step.new_valid.sum(-1)
            return self.step.seen_after
        return self.seen

    def end_step(self) -> None:
        """After every layer has written the step's tokens: at prefill, plan budgets from the layers' importance;
        then every layer settles (evicts down to its budget, drops what its window drops)."""
        if self.step.prefill and self.branches > 1:
            self.branch()
        step = self.step
        self.length += step.q
        self.seen.add_(step.new_valid.sum(-1))  # in place: CUDA graphs replay this
        step.counted = True
        self.host_seen_max += max(step.real)
        if step.prefill:
            self.importance = self.layer_importance()
            self.full_kv_bytes_prefill = self.kv_nbytes()
            self.peak_kv_bytes_prefill = max(self.peak_kv_bytes_prefill, self.full_kv_bytes_prefill)
            self._plan_prefill()
        t0 = self.clock() if step.prefill else 0.0
        for layer, kept in zip(self.layers, self._kept_together(step), strict=True):
            layer.settle(step, kept)
        if step.prefill:
            for layer in self.layers:
                if layer.budgeted:
                    layer.make_plain()
                if self.pool_rows and isinstance(layer, BudgetedLayer):
                    layer.pool_if_unequal(rows=True)
            self.timings["eviction"] += self.clock() - t0
            self.kv_bytes_prefill = self.kv_nbytes()
        for layer in self.layers:
            layer.end_step()
        self.step = None  # type: ignore[assignment]

    def _kept_together(self, step: Step) -> list[torch.Tensor | None]:
        """The slots each layer keeps at a step whose layers rank their slots together (`SlotLayer.ranking`: an
        extend chunk), one ranking for the layers of each device and shape; None for a layer that settles alone."""
        kept: list[torch.Tensor | None] = [None] * len(self.layers)
        if step.prefill or step.q == 1:  # (one token leaves a head one over at most: each layer's victim path)
            return kept
        groups: dict[tuple, list[tuple[int, Ranking]]] = {}
        for i, layer in enumerate(self.layers):
            ranking = layer.ranking(step)
            if ranking is not None:
                groups.setdefault((ranking.score.device, *ranking.keep.shape), []).append((i, ranking))
        for (device, *_), group in groups.items():
            flag = self.runner.nan_flag(device) if device.type == "cuda" else None
            if kernels.use("evict", device):  # one fused kernel a layer
                for i, r in group:
                    kept[i] = evict.kept(r, self.runner.nan_flag(device))
                group = [(i, r) for i, r in group if kept[i] is None]  # (a row too long for it, or it failed)
            if group:
                for (i, _), mask in zip(group, kept_together([r for _, r in group], flag), strict=True):
                    kept[i] = mask
        return kept

    def layer_importance(self) -> torch.Tensor:
        """(B, L) on the CPU: each layer's importance, measured at prefill (squeezekit.statistics.Importance).
        Rows without a real token in the measured step (the first chunk of a chunked prefill can be all padding for
        a left-padded row) have none of their own: they take the token-weighted mean of the rows that do."""
        rows = self.seen.shape[0]
        found = [layer.stats.get(IMPORTANCE) for layer in self.layers]
        importance = torch.stack([torch.zeros(rows) if t is None else t.float().cpu() for t in found], dim=1)
        tokens = torch.tensor(self.step.real, dtype=importance.dtype)
        empty = tokens == 0
        if bool(empty.any()) and not bool(empty.all()):
            weight = tokens.view(-1, 1)
            importance[empty] = (importance * weight).sum(0) / weight.sum()
        return importance

    def _plan_prefill(self) -> None:
        self.prompt_len = (self.seen if self.expected_prompt_len is None else self.expected_prompt_len).clone()
        if self.runner.config.full:
            self.budgets = torch.full((self.prompt_len.shape[0], len(self.layers)), -1, dtype=torch.long)
            return
        t0 = self.clock()
        layers = [self.layers[li] for li in self.budget_layers]
        self.budgets = plan_budgets(
            self.prompt_len, self.importance, self.budget_layers, len(self.layers), self.runner.config.budget,
            self.runner, self.shared, views=lambda rows: PrefillViews(layers, rows, self.runner.head_group),
        )  # fmt: skip
        self.timings["allocation"] += self.clock() - t0
        for li in self.budget_layers:
            self.layers[li].set_budget(self.budgets[:, li])  # type: ignore[attr-defined]

    def branch(self) -> None:
        """Repeat every row of the prefill just computed ``branches`` times (row ``b`` becomes rows ``b x branches``
        to ``b x branches + branches - 1``), with its statistics, before any budget is planned: the copies can then
        be compressed differently (``squeezekit calibrate`` evicts one layer per copy) for the cost of one prefill."""
        n = self.branches

        def rep(t: Any) -> Any:
            return None if t is None else t.repeat_interleave(n, dim=0)

        step = self.step
        self.step = dataclasses.replace(
            step, new_valid=rep(step.new_valid), new_pos=rep(step.new_pos), shared_masks={}, seen_after=None,
            real=[r for r in step.real for _ in range(n)], plans={},
        )  # fmt: skip
        self.seen = rep(self.seen)
        for layer in self.layers:
            layer.batch_repeat_interleave(n)

    def advance(self, tokens: int = 1) -> None:
        """Account for a step of ``tokens`` tokens per row whose work ran without Python (a CUDA-graph replay:
        `squeezekit.replay`)."""
        self.length += tokens
        self.host_seen_max += tokens

    def replayable(self) -> bool:
        """A step of this cache may be captured as a CUDA graph: every layer bounded, unwindowed, its counts known
        on the host, on one CUDA device (a full or windowed layer changes shape or syncs every step)."""
        layers = self.layers
        return (
            all(layer.budgeted and layer.budget is not None and layer.window is None and layer.held is not None
                for layer in layers)
            and len({layer.device for layer in layers}) == 1 and layers[0].device.type == "cuda"
        )  # fmt: skip

    def host_state(self) -> tuple:
        """What the host knows of every layer (`squeezekit.layers.SlotLayer.host_state`): a step that leaves it
        unchanged can be replayed (`squeezekit.replay`)."""
        return tuple(layer.host_state() for layer in self.layers)

    def clock(self) -> float:
        """perf_counter, after a device sync when timings must be exact (benchmarks)."""
        if self.sync_timings and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def compact(self) -> None:
        """Shrink every bounded layer's buffers to the slots it holds (a chunked prefill left room for a chunk)."""
        for layer in self.layers:
            layer.compact()
        # The prefill saw the prompt one chunk at a time: account as if it had gone through at once.
        self.full_kv_bytes_prefill = sum(
            2 * layer.valid.shape[0] * layer.valid.shape[1] * layer.head_dim * self.length * layer.dtype.itemsize
            for layer in self.layers
            if not layer.empty
        )
        self.kv_bytes_prefill = self.kv_nbytes()

    def check_nan(self) -> None:
        """Report NaN scores the hot path recorded without a host sync (see PolicyRunner.check_nan)."""
        self.runner.check_nan()

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

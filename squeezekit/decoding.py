"""Loops over a compressed cache whose steady steps replay as CUDA graphs (`squeezekit.replay`).

transformers' ``generate`` spends most of a small-batch decode step launching kernels from Python. Once every layer
is *steady* (each row at its budget), a step has fixed shapes and no host syncs, so it is captured once and
replayed: one launch per step instead of thousands. `GreedyDecoder` decodes one token per step; `ChunkExtender`
feeds whole chunks of known tokens (scoring a continuation against the compressed cache, as the lm-eval adapter
does): each chunk is written, attended and evicted back to the budget exactly as an eager forward would.
"""

from __future__ import annotations

import torch

from . import compiled
from .cache import SqueezeCache
from .replay import StepGraph
from .transformers_api import cache_argument


def _one_device(model: torch.nn.Module) -> bool:
    return len({p.device for p in model.parameters()}) == 1


class GreedyDecoder:
    """Greedy decoding of ``model`` from a prefilled `SqueezeCache` (inside its ``compress`` block)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: SqueezeCache,
        first_tokens: torch.Tensor,
        cuda_graph: bool = True,
        compile: bool | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.compile = compiled.wanted(compile, first_tokens)  # torch.compile'd layers (squeezekit.compiled)
        self.cache_kwargs = {cache_argument(model): cache}
        self.ids = first_tokens.view(-1, 1).clone()
        self.pos = cache.seen.view(-1, 1).clone().long()  # the next token's position in each sequence
        # only a cache whose every layer is at its budget already (the rest, CUDA included: `SqueezeCache.replayable`)
        self.use_graph = cuda_graph and _one_device(model) and all(layer.steady for layer in cache.layers)
        self.steps = StepGraph(cache, self._step, 1, self.use_graph)

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured step, once there is one."""
        return self.steps.graph

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, **self.cache_kwargs)
        nxt = out.logits[:, -1].argmax(-1)
        self.ids.copy_(nxt.view(-1, 1))
        self.pos.add_(1)
        return nxt

    @torch.inference_mode()
    def run(self, steps: int) -> torch.Tensor:
        """Decode ``steps`` tokens; returns them (B, steps). The first input is ``first_tokens``."""
        with compiled.compiled_layers(self.model, self.compile and self.graph is None):
            tokens = [self.steps().clone() for _ in range(steps)]
        self.cache.check_nan()
        return torch.stack(tokens, dim=1)


class ChunkExtender:
    """Extends a prefilled `SqueezeCache` (inside its ``compress`` block) by chunks of ``chunk`` known tokens of
    every row, no padding: each call is one forward, the chunk attends to the compressed cache and itself, and the
    cache is evicted back to its budget after it, exactly as ``model(ids, position_ids=..., cache=...)`` would do."""

    def __init__(self, model: torch.nn.Module, cache: SqueezeCache, chunk: int, cuda_graph: bool = True) -> None:
        self.model, self.cache = model, cache
        self.cache_kwargs = {cache_argument(model): cache}
        B = cache.seen.shape[0]
        device = cache.seen.device
        self.ids = torch.zeros(B, chunk, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, chunk, dtype=torch.long, device=device)
        self.steps = StepGraph(cache, self._step, chunk, cuda_graph and _one_device(model))

    def _step(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, **self.cache_kwargs).logits

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits (B, chunk, vocab) of ``ids`` (B, chunk) at ``positions`` (B, chunk); valid until the next
        call (a replayed graph's output)."""
        self.ids.copy_(ids)
        self.pos.copy_(positions)
        return self.steps()

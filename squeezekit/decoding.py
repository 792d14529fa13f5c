"""A lean greedy decode loop over a compressed cache, optionally captured once in a CUDA graph.

transformers' ``generate`` spends most of a small-batch decode step launching kernels from Python. Once every layer
is *steady* (each row at its budget, all slots valid), a decode step has fixed shapes and no host syncs, so it can
be captured in a CUDA graph and replayed: one launch per step instead of thousands.
"""

from __future__ import annotations

import torch

from . import compiled
from .cache import SqueezeCache
from .transformers_api import cache_argument


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
        devices = {p.device for p in model.parameters()}
        bounded = [layer for layer in cache.layers if layer.budget is not None]
        self.use_graph = (
            cuda_graph and self.ids.is_cuda and len(devices) == 1 and len(bounded) == len(cache.layers)
            and all(layer.steady for layer in bounded)
        )  # fmt: skip
        self.graph: torch.cuda.CUDAGraph | None = None
        self._next: torch.Tensor | None = None

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
            return self._run(steps)

    def _run(self, steps: int) -> torch.Tensor:
        tokens: list[torch.Tensor] = []
        if not self.use_graph:
            tokens = [self._step().clone() for _ in range(steps)]
        else:
            if self.graph is None:
                side = torch.cuda.Stream()  # warm up (real steps) off the default stream, as graph capture requires
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(min(2, steps)):
                        tokens.append(self._step().clone())
                torch.cuda.current_stream().wait_stream(side)
            replays = steps - len(tokens)
            if replays > 0 and self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._next = self._step()  # its host bookkeeping happens now, its GPU work at the first replay
                self.graph.replay()
                tokens.append(self._next.clone())
                replays -= 1
            graph, nxt = self.graph, self._next
            assert graph is not None and nxt is not None
            for _ in range(replays):
                self.cache.advance()
                graph.replay()
                tokens.append(nxt.clone())
        self.cache.check_nan()
        return torch.stack(tokens, dim=1)

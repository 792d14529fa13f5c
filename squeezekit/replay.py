"""One step of a compressed model, captured once as a CUDA graph and replayed.

A step of a small batch spends most of its time launching kernels from Python. Once the host side of a step is a
*fixed point* (it leaves every layer's host state as it found it: the buffers' sizes, each head's count of held
tokens, the steady flags; `SqueezeCache.host_state`), the step has fixed shapes and, on the paths squeezekit keeps
sync-free, no host syncs: it can be captured once and replayed, one launch per step. `StepGraph` runs a step eagerly
until two steps in a row were fixed points (the second one on a side stream, as capture requires after warm-up),
captures the third and replays every later one, accounting for each replay on the host (`SqueezeCache.advance`).

Where a step cannot be captured (a plugin that syncs with the host, e.g. ``.item()`` in its score), the capture
fails before any of its work ran on the device: the cache's and its layers' host state is put back as it was, the
step runs eagerly, and so does every later one (`StepGraph.failure` says why). Used by
`squeezekit.decoding.GreedyDecoder` (one token per step) and `squeezekit.decoding.ChunkExtender` (a chunk of tokens
per step, the lm-eval adapter's scoring against a compressed cache).
"""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .cache import SqueezeCache

#: eager fixed-point steps before a capture (the last of them runs on a side stream)
WARMUP = 2


class StepGraph:
    """``step()`` (a function of static input buffers that the caller refills) replayed as a CUDA graph once it can
    be (see the module docstring). ``tokens``: the tokens one step adds to each row."""

    def __init__(self, cache: SqueezeCache, step: Callable[[], Any], tokens: int, enabled: bool) -> None:
        self.cache, self.tokens, self.enabled = cache, tokens, enabled
        # a bound method (the decoder's own step) by a weak reference: the decoder holds this object, and a cycle
        # between them would keep the cache's GPU memory alive until Python's cyclic collector ran
        self._step: Callable[[], Callable[[], Any] | None] = (
            weakref.WeakMethod(step) if inspect.ismethod(step) else (lambda: step)
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None  #: the captured step's output (static: read it before the next call)
        self.failure: str | None = None  #: why the step could not be captured, once it could not
        self._fixed = 0  # eager fixed-point steps in a row

    def step(self) -> Any:
        """One eager call of the step function."""
        fn = self._step()
        assert fn is not None, "the decoder that owns this step is gone"
        return fn()

    def __call__(self) -> Any:
        if self.graph is not None:
            self.cache.advance(self.tokens)
            self.graph.replay()
            return self.out
        if not self.enabled or not self.cache.replayable():
            self._fixed = 0
            return self.step()
        if self._fixed >= WARMUP:
            return self._capture()
        before = self.cache.host_state()
        if self._fixed == WARMUP - 1:  # the warm-up step: off the default stream, as graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            out = self.step()
        self._fixed = self._fixed + 1 if self.cache.host_state() == before else 0
        return out

    def _capture(self) -> Any:
        saved = _host_copy(self.cache)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.step()  # its host bookkeeping happens now, its device work at the first replay
        except Exception as exc:  # a host sync (or an unsupported operation) inside the step
            _restore(self.cache, saved)
            self.enabled = False
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"squeezekit: the step could not be captured as a CUDA graph ({self.failure}); it runs "
                          "eagerly", RuntimeWarning, stacklevel=3)  # fmt: skip
            return self.step()
        self.graph, self.out = graph, out
        graph.replay()
        return out


def _host_copy(cache: SqueezeCache) -> list[tuple[Any, dict]]:
    """The host state of the cache and its layers (shallow: the tensors themselves are untouched by a capture that
    fails, since none of its device work ran)."""
    objs = [cache, *cache.layers]
    return [(o, {k: copy.copy(v) if isinstance(v, dict | list) else v for k, v in vars(o).items()}) for o in objs]


def _restore(cache: SqueezeCache, saved: list[tuple[Any, dict]]) -> None:
    for obj, state in saved:
        vars(obj).clear()
        vars(obj).update(state)

"""Optional fused GPU kernels (Triton) for squeezekit's hot paths, each behind a switch with a safe fallback.

- ``attention``: masked attention for multi-token steps (``attention.masked_attention``). A flash-style forward that
  builds each layer's slot mask on the fly (validity, token positions, optional sliding window, GQA without
  repeating K/V) and returns each query row's log-sum-exp; for evictors that need accumulated attention (H2O) a
  second kernel sums the softmax probabilities per slot from that log-sum-exp. Replaces the explicit softmax in
  fp32 query blocks (H2O's prefill) and the materialised boolean masks of chunked or padded prefill.
- ``steady``: the steady decode step's victim selection and slot write in one kernel (``steady.steady_write``),
  quantizing the new token for 8- and 4-bit slots, into buffers or a pool of per-head segments.
- ``evict``: an extend chunk's eviction, one kernel a layer (``evict.kept``): the slots each head gives up, exactly
  `squeezekit.selection.kept_together`'s.
- ``importance``: a layer's importance at prefill (``importance.cosines``): each token's cos(x, x + attention(x))
  from one read of the layer's input and attention output, instead of three norms over them and their sum.
- ``window``: the window queries' attention output over a layer's slots or subsets of them
  (``window.window_outputs``, `squeezekit.policies.LayerView.window_output`: what ``lost_attention`` measures),
  flash-style, reading the keys and values once per subset and writing no probabilities.
- ``pooled``: the decode step's attention over a layer whose KV heads hold different budgets, read from its pool
  of per-head segments (``decode.pooled_decode_attention``; squeezekit.layers.HeadPool), so no rectangular copy is
  gathered. On by default: it is the only path that reads such a layer without a gather.
- ``decode``: the steady decode step's attention over a full slot buffer, split-KV with the query heads of a KV
  head together, written in transformers' layout (``decode.decode_attention``). It rounds differently from SDPA's
  kernels in bf16 (the same tokens in fp32).
- ``compile``: torch.compile of the decoder layers inside `squeezekit.decoding.GreedyDecoder`'s CUDA graph
  (squeezekit.compiled).

Which run: ``SQUEEZEKIT_KERNELS`` is ``auto`` (default: every kernel, on CUDA tensors, when Triton imports; the
same as ``all``), ``off``,
or a comma-separated list of the kernels to use (``steady,compile``). CPU tensors always take the plain torch paths,
except under `configured(interpret=True)` in a process that set ``TRITON_INTERPRET=1`` before Triton was imported
(tests: Triton's interpreter then runs the kernels on CPU tensors).
A kernel that fails on its first use (an incompatible Triton, say) is switched off for the process with one warning
and the plain path runs instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

KERNELS = ("attention", "steady", "evict", "importance", "window", "pooled", "decode", "compile")
DEFAULT = ("attention", "steady", "evict", "importance", "window", "pooled", "decode", "compile")
ENV = "SQUEEZEKIT_KERNELS"
T = TypeVar("T")


def _parse(text: str | None) -> set[str]:
    """The kernels a ``SQUEEZEKIT_KERNELS`` value names; anything else is a one-line `ConfigError`."""
    from ..errors import ConfigError

    raw = text
    text = (text or "auto").strip().lower()
    if text == "auto":  # (decode and compile round bf16 differently from the plain path; fp32 tokens are the same)
        return set(DEFAULT)
    if text in ("all", "on", "1"):
        return set(KERNELS)
    if text in ("off", "none", "0", ""):
        return set()
    chosen = {k.strip() for k in text.split(",") if k.strip()}
    if not chosen or chosen - set(KERNELS):
        accepted = f"expected auto, all, off or a comma-separated list of {', '.join(KERNELS)}"
        raise ConfigError(ENV, raw, accepted, "environment")
    return chosen


class Settings:
    def __init__(self) -> None:
        self._enabled: set[str] | None = None  # read from the environment on first use (see `enabled`)
        self.interpret = False  # run the Triton kernels on CPU tensors through Triton's interpreter (tests)
        self.failed: dict[str, str] = {}  # kernel -> the error that switched it off
        #: how often each kernel ran (tests and the GPU script check which path was taken)
        self.calls: dict[str, int] = {k: 0 for k in KERNELS}

    @property
    def enabled(self) -> set[str]:
        """The kernels chosen: ``SQUEEZEKIT_KERNELS``, read when first needed (a bad value is a `ConfigError` then,
        and again at every use: `squeezekit.compress` checks it before any work)."""
        if self._enabled is None:
            self._enabled = _parse(os.environ.get(ENV))
        return self._enabled

    @enabled.setter
    def enabled(self, value: set[str]) -> None:
        self._enabled = set(value)


settings = Settings()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, on the host."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use(name: str, where: torch.Tensor | torch.device) -> bool:
    """Whether kernel ``name`` serves a computation on ``where``'s device (a tensor's, or a device)."""
    if name not in settings.enabled or name in settings.failed:
        return False
    device_type = getattr(where, "device", where).type
    if name == "compile":
        return device_type == "cuda"
    if device_type == "cuda":
        return triton_available() and not interpreting()
    return settings.interpret and interpreting() and triton_available()


def failed(name: str, exc: BaseException) -> None:
    """Switch kernel ``name`` off for the process after an error on its use (the caller then runs the plain path)."""
    settings.failed[name] = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"squeezekit: the fused {name!r} kernel failed ({type(exc).__name__}: {str(exc)[:300]}); using the plain torch "
        f"path for the rest of this process",
        RuntimeWarning,
        stacklevel=3,
    )


def launch(name: str, where: torch.Tensor, fn: Callable[[], T]) -> T | None:
    """Run ``fn``, the launch of kernel ``name`` (it returns what the kernel wrote, never None), on ``where``'s device
    (a layer of a sharded model: Triton launches on the current device, also inside a CUDA graph's capture) and count
    it. On the GPU an error other than running out of memory switches the kernel off (`failed`) and returns None: the
    caller then takes the plain path. Under the interpreter (tests) it is raised."""
    import torch

    cuda = where.device.type == "cuda"
    try:
        with torch.cuda.device(where.device) if cuda else contextlib.nullcontext():
            result = fn()
    except Exception as exc:
        if is_oom(exc) or not falls_back(where):
            raise
        failed(name, exc)
        return None
    settings.calls[name] += 1
    return result


@functools.lru_cache(maxsize=8)
def processors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA ``device`` (what split kernels size their grids by); 8 elsewhere
    (under the interpreter, in tests: a few splits, so that the merges are exercised)."""
    import torch

    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def falls_back(where: torch.Tensor) -> bool:
    """Whether a kernel that fails on ``where`` is switched off (on the GPU) rather than its error raised (under the
    interpreter, in tests)."""
    return where.device.type == "cuda"


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@contextlib.contextmanager
def configured(enabled: str | Iterable[str] | None = None, interpret: bool | None = None) -> Iterator[Settings]:
    """Temporarily choose the kernels (an iterable of names, or a ``SQUEEZEKIT_KERNELS`` string) and interpretation."""
    old = (settings._enabled, settings.interpret, dict(settings.failed))
    if enabled is not None:
        settings.enabled = _parse(enabled) if isinstance(enabled, str) else set(enabled)
    if interpret is not None:
        settings.interpret = interpret
    settings.failed = {}
    try:
        yield settings
    finally:
        settings._enabled, settings.interpret, settings.failed = old

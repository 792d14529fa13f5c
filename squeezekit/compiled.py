"""The decode step's per-layer work compiled with torch.compile, inside squeezekit's own CUDA graph.

A steady decode step of a 7B model runs ~50 small kernels per layer besides its GEMMs and attention: RMSNorm in
fp32 round trips, rotary embedding, residual adds, SiLU x up. Replayed in a CUDA graph they no longer cost launches
from Python but still ~2-4 us each on the GPU, ~4 ms a step at B=128. `compiled_layers` compiles each decoder layer
(regional compilation: the layers share one compiled code, so the compile cost is one layer's), with Inductor
fusing those into a few Triton kernels, while squeezekit's cache update and attention function stay opaque
(``torch.compiler.disable``: their host-side bookkeeping and plugin calls run as written). Inductor's own CUDA
graphs stay off (mode ``default`` or ``max-autotune-no-cudagraphs``): `squeezekit.decoding.GreedyDecoder`
captures the whole step itself, compiled kernels included, after its eager warm-up steps have compiled everything.

Numerics: the fused kernels round differently from the eager ones (fp32 reductions in another order), so bf16
logits differ in the last bit and greedy tokens of near-tied logits can differ; in fp32 the tokens are the same
(tests/test_compiled.py). On CUDA it is on by default (``compile`` in ``SQUEEZEKIT_KERNELS``' ``auto``,
squeezekit.kernels; ``GreedyDecoder(..., compile=False)`` or a kernel list without it turns it off).

A layer that cannot be compiled (no working compiler for Inductor, an operation Dynamo cannot trace) runs eagerly,
with a warning from torch: the compilation runs with Dynamo's ``suppress_errors``, which falls back to the eager
frame before any of its work ran, so the step's results are those of the eager path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .architectures import resolve

#: torch.compile modes of the layers (no Inductor CUDA graphs: squeezekit captures its own);
#: ``SQUEEZEKIT_COMPILE_MODE=max-autotune-no-cudagraphs`` also tunes the decode GEMMs (minutes of compilation)
MODES = ("default", "max-autotune-no-cudagraphs")
ENV = "SQUEEZEKIT_COMPILE_MODE"


def chosen_mode() -> str:
    """``SQUEEZEKIT_COMPILE_MODE`` (unset or empty: ``default``); another value is a one-line `ConfigError`."""
    from .errors import ConfigError

    value = os.environ.get(ENV, "").strip() or "default"
    if value not in MODES:
        raise ConfigError(ENV, os.environ.get(ENV), f"expected one of {', '.join(MODES)} (Inductor's CUDA graphs "
                          "must stay off: squeezekit captures its own)", "environment")  # fmt: skip
    return value


#: torch.compile's backend (tests replace it with one that fails)
BACKEND: str | object = "inductor"

#: torch.compile's ``dynamic``: True compiles the batch dimension symbolically, so one compilation serves every
#: batch size of 2 or more (the other sizes specialise against the weights' static shapes)
DYNAMIC: bool | None = True


def wanted(compile: bool | None, tensor: torch.Tensor) -> bool:
    """``compile`` if given, else whether ``compile`` is among the chosen kernels (on CUDA)."""
    from . import kernels

    if compile is not None:
        return bool(compile)
    return kernels.use("compile", tensor)


@contextlib.contextmanager
def compiled_layers(
    model: torch.nn.Module, enabled: bool = True, mode: str | None = None
) -> Iterator[list[torch.nn.Module] | None]:
    """Within the block, ``model``'s decoder layers run compiled (see the module docstring); restored on exit."""
    if not enabled:
        yield None
        return
    mode = mode or chosen_mode()
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: one of {', '.join(MODES)} (Inductor's CUDA graphs must stay off)")
    from . import attention
    from .cache import SqueezeCache
    from .transformers_api import register_attention

    layers = resolve(model).layers
    update = SqueezeCache.__dict__["update"]
    # patching the method for the block (restored below) is the point here: no annotation expresses it to mypy
    SqueezeCache.update = torch.compiler.disable(update, recursive=True)  # type: ignore[method-assign]
    register_attention(attention.NAME, torch.compiler.disable(attention.squeezekit_attention, recursive=True))
    # The decoder layers differ only in their weights and their ``layer_idx`` (an int attribute it reads to index the
    # cache): Dynamo would specialise on it, compiling one code per layer until its recompile limit (8), the layers
    # after that running uncompiled. As an unspecialised int, one compilation serves every layer. (A torch._dynamo
    # setting: torch 2.11 to 2.15, squeezekit's tested range, have it; tests/test_compiled.py checks the effect.)
    # (suppress_errors: a frame that fails to compile runs eagerly; see the module docstring)
    unspecialised = torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, suppress_errors=True)
    tuned = None if mode == "default" or BACKEND != "inductor" else mode  # (modes are Inductor's)
    try:
        with unspecialised:
            for layer in layers:
                layer.compile(backend=BACKEND, mode=tuned, fullgraph=False, dynamic=DYNAMIC)
            yield layers
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer calls its own forward again
        SqueezeCache.update = update  # type: ignore[method-assign]  # restores the method patched above
        register_attention(attention.NAME, attention.squeezekit_attention)

"""The device and dtype a command runs on: one rule for ``generate``, ``eval``, ``calibrate``, ``bench`` and the
lm-eval adapter.

Default: the first CUDA device when there is one, else the CPU; bfloat16 on CUDA, float32 on the CPU. A device
squeezekit does not run on (``bogus``, ``CPU``, ``meta``), a CUDA device where there is none or whose index does not
exist, and an unknown dtype are one-line errors before any model loads.
"""

from __future__ import annotations

import re

from .errors import ConfigError, InputError

DTYPES = ("bfloat16", "float16", "float32")
_CUDA = re.compile(r"cuda(:(\d+))?\Z")


def resolve(
    device: str | None = None, dtype: str | None = None, key: str = "--device", source: str | None = "command line"
) -> tuple[str, str]:
    """``(device, dtype)`` checked, with the defaults filled in (see the module docstring)."""
    import torch

    if device is None or device == "":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        raise ConfigError(key, device, "expected cpu, cuda or cuda:N", source)
    match = _CUDA.match(device)
    if device != "cpu" and match is None:
        raise ConfigError(key, device, "expected cpu, cuda or cuda:N", source)
    if match is not None:
        if not torch.cuda.is_available():
            raise InputError(f"{key} {device}: no CUDA device is available here; use {key} cpu")
        index = int(match.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise InputError(
                f"{key} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if dtype is None or dtype == "":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError("--dtype" if key == "--device" else "dtype", dtype, f"expected one of {', '.join(DTYPES)}",
                          source)  # fmt: skip
    return device, dtype

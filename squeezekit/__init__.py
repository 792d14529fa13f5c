"""squeezekit: compress the KV cache of Hugging Face transformers models along three axes at once: which layers get
how much cache (a `LayerBudgetAllocator`), which tokens each layer keeps (a `TokenEvictor`) and how a layer's budget
splits over its KV heads (a `HeadBudgetSplitter`).

    import squeezekit
    with squeezekit.compress(model, allocator="squeeze", evictor="h2o", heads="adaptive", budget=0.2):
        model.generate(**inputs)
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .errors import (
    BudgetError,
    CommandLineError,
    ConfigError,
    InputError,
    PluginError,
    PluginFallbackWarning,
    SqueezekitError,
    UnknownPluginError,
    UnsupportedModelError,
    UntestedVersionWarning,
)
from .hookspecs import hookimpl
from .policies import (
    AllocationRequest,
    HeadBudgetSplitter,
    HeadSplitRequest,
    LayerBudgetAllocator,
    LayerView,
    Stat,
    TokenEvictor,
    check,
)
from .registry import registry
from .statistics import Observation, Statistic

__version__ = "0.1.0"

__all__ = [
    "AllocationRequest",
    "BudgetError",
    "CommandLineError",
    "Config",
    "ConfigError",
    "HeadBudgetSplitter",
    "HeadSplitRequest",
    "InputError",
    "LayerBudgetAllocator",
    "LayerView",
    "Observation",
    "PluginError",
    "PluginFallbackWarning",
    "SqueezekitError",
    "Stat",
    "Statistic",
    "TokenEvictor",
    "UnknownPluginError",
    "UnsupportedModelError",
    "UntestedVersionWarning",
    "attention_modules",
    "check",
    "compress",
    "hookimpl",
    "load_default_model",
    "registry",
]

_LAZY = {
    "attention_modules": ".architectures",
    "compress": ".compressor",
    "Compressor": ".compressor",
    "load_default_model": ".models",
    "load_model": ".models",
}


def __getattr__(name: str) -> Any:
    # The data path imports transformers (seconds); plugins and config tools do not need it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'squeezekit' has no attribute {name!r}")

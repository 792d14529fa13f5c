"""squeezekit's own commands, registered through the ``register_commands`` hook exactly as a plugin's would be.

Each command's options and code live in their own module, imported only when that command runs.
"""

from __future__ import annotations

from collections.abc import Callable

from .hookspecs import hookimpl


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    register(
        "generate",
        "generate text with a compressed KV cache and report the memory it kept",
        "squeezekit.cli_generate:add",
    )
    register(
        "plugins",
        "list the installed allocators and evictors, with the package each comes from",
        "squeezekit.cli_tools:add_plugins",
    )
    register("config", "check a YAML / TOML / JSON config file", "squeezekit.cli_tools:add_config")
    register(
        "eval",
        "offline quality evaluation through lm-eval: one config, or a resumable sweep",
        "squeezekit.evaluators.eval_cli:add",
    )
    register(
        "calibrate",
        "measure what eviction costs each layer of a model: a profile for allocator=calibrated",
        "squeezekit.evaluators.calibrate:add",
    )
    register(
        "bench",
        "throughput and memory: transformers' full cache vs squeezekit configs, side by side",
        "squeezekit.evaluators.bench_cli:add",
    )

"""pluggy hook specifications of the ``squeezekit`` project: how a plugin adds policies (allocators, evictors, head
splits) and commands.

A plugin is any module reachable through the ``squeezekit`` entry-point group (the bundled policies are declared
in that same group) that implements one or more hooks with ``@squeezekit.hookimpl``. Every implementation is
called once, when the registry first loads; results are not returned but passed to ``register``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("squeezekit")
hookimpl = pluggy.HookimplMarker("squeezekit")


@hookspec
def register_allocators(register: Callable[[type], None]) -> None:
    """Register layer-budget allocators.

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses
        `squeezekit.LayerBudgetAllocator`, is a dataclass whose fields are its parameters, and sets ``name``
        (a lowercase identifier users select it by, e.g. ``allocator=squeeze``).

    Called once per process when the registry loads. Names must be unique across installed plugins.
    """


@hookspec
def register_evictors(register: Callable[[type], None]) -> None:
    """Register token evictors.

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses `squeezekit.TokenEvictor`, is a
        dataclass whose fields are its parameters, sets ``name`` (e.g. ``evictor=h2o``) and ``needs`` (the
        statistics the engine must collect for it).

    Called once per process when the registry loads. Names must be unique across installed plugins.
    """


@hookspec
def register_head_splits(register: Callable[[type], None]) -> None:
    """Register head splits: how a layer's budget is split over its KV heads.

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses `squeezekit.HeadBudgetSplitter`, is
        a dataclass whose fields are its parameters, and sets ``name`` (e.g. ``heads=adaptive``).

    Called once per process when the registry loads. Names must be unique among installed head splits (an
    allocator or evictor may share one: the config key tells them apart).
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Register ``squeezekit`` subcommands.

    :param register: call ``register(name, help, add)`` once per command: ``name`` (lowercase, e.g. ``"calibrate"``)
        is what users type after ``squeezekit``, ``help`` its one-line description in ``squeezekit --help``, and
        ``add(parser)`` (a callable, or a ``"module:function"`` string imported only when the command runs) adds
        the command's options to its `argparse.ArgumentParser` and sets ``func`` with ``parser.set_defaults``:
        ``func(args)`` runs the command and returns its exit status.

    Called once per process when the registry loads. squeezekit's own commands are registered the same way
    (squeezekit/commands.py). Names must be unique across installed plugins.
    """

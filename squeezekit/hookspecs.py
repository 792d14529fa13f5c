"""pluggy hook specifications of the ``squeezekit`` project: how a plugin adds policies.

A plugin is any module reachable through the ``squeezekit`` entry-point group (the bundled policies are declared
in that same group) that implements one or both hooks with ``@squeezekit.hookimpl``. Every implementation is
called once, when the registry first loads; results are not returned but passed to ``register``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("squeezekit")
hookimpl = pluggy.HookimplMarker("squeezekit")


@hookspec
def register_allocators(register):
    """Register layer-budget allocators.

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses
        `squeezekit.LayerBudgetAllocator`, is a dataclass whose fields are its parameters, and sets ``name``
        (a lowercase identifier users select it by, e.g. ``allocator=squeeze``).

    Called once per process when the registry loads. Names must be unique across installed plugins.
    """


@hookspec
def register_evictors(register):
    """Register token evictors.

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses `squeezekit.TokenEvictor`, is a
        dataclass whose fields are its parameters, sets ``name`` (e.g. ``evictor=h2o``) and ``needs`` (the
        statistics the engine must collect for it).

    Called once per process when the registry loads. Names must be unique across installed plugins.
    """

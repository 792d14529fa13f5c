"""The plugin registry: one pluggy PluginManager over the ``squeezekit`` entry-point group.

Bundled and third-party plugins load the same way. A plugin that fails to import, or registers something that
breaks the contract, is recorded (by name and package) in `Registry.failures` and skipped; the others keep working.
Set ``SQUEEZEKIT_PLUGINS=name1,name2`` to load only those entry points (reproducible runs, isolating a bad plugin).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownPluginError
from .policies import LayerBudgetAllocator, Stat, TokenEvictor

GROUP = "squeezekit"
BUNDLED_PACKAGE = "squeezekit"  # its entry points load first
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PluginInfo:
    """One registered policy and where it came from."""

    name: str
    kind: str  # "allocator" or "evictor"
    cls: type
    entry_point: str
    package: str
    version: str

    @property
    def origin(self) -> str:
        return f"{self.package} {self.version}"

    @property
    def doc(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""

    def params(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.cls) if f.init}


@dataclass
class Registry:
    """Installed allocators and evictors by name, plus the plugins that failed to load."""

    allocators: dict[str, PluginInfo] = field(default_factory=dict)
    evictors: dict[str, PluginInfo] = field(default_factory=dict)
    failures: list[PluginError] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def get(self, kind: str, name: object, source: str | None = None, key: str | None = None) -> PluginInfo:
        """The ``kind`` policy called ``name``; ``key`` is the config key that named it (default: ``kind``)."""
        table = self.allocators if kind == "allocator" else self.evictors
        if name in table:
            return table[name]
        for failure in self.failures:  # a broken plugin of that name: say why, not just "unknown"
            if failure.plugin == name:
                raise failure
        raise UnknownPluginError(kind, name, list(table), source, key)

    def all(self) -> list[PluginInfo]:
        return sorted([*self.allocators.values(), *self.evictors.values()], key=lambda p: (p.kind, p.name))


def _contract_problem(kind: str, cls: object) -> str | None:
    base = LayerBudgetAllocator if kind == "allocator" else TokenEvictor
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"registered {cls!r}, which is not a subclass of squeezekit.{base.__name__}"
    if not dataclasses.is_dataclass(cls):
        return f"{cls.__name__} must be a dataclass (its fields are its parameters)"
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        return f"{cls.__name__}.name must be a lowercase identifier, got {cls.name!r}"
    if getattr(cls, "__abstractmethods__", None):
        return f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))}"
    if kind == "evictor" and not isinstance(cls.needs, Stat):
        return f"{cls.__name__}.needs must be a squeezekit.Stat, got {cls.needs!r}"
    if kind == "evictor" and cls.needs is Stat.WINDOW_QUERIES and not hasattr(cls, "window"):
        # the engine collects the queries of the last ``evictor.window`` prompt tokens
        return f"{cls.__name__} needs Stat.WINDOW_QUERIES, so it must have a 'window' field (how many queries)"
    for f in dataclasses.fields(cls):
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return f"{cls.__name__}.{f.name} needs a default value"
    return None


def load() -> Registry:
    """Discover and load every plugin of the entry-point group (cached: see `registry`)."""
    reg = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg.manager = pm
    only = {n.strip() for n in os.environ.get("SQUEEZEKIT_PLUGINS", "").split(",") if n.strip()}
    used: dict[str, tuple[str, str]] = {}  # entry-point name -> (package, origin) that took it

    def package_of(ep) -> tuple[str, str]:
        dist = getattr(ep, "dist", None)
        return (dist.metadata["Name"], dist.version) if dist is not None else (ep.value.split(":")[0], "?")

    # Bundled policies first, so that no third-party plugin can take one of their names; then by entry-point name.
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: (package_of(e)[0] != BUNDLED_PACKAGE, e.name)):
        if only and ep.name not in only:
            continue
        package, version = package_of(ep)
        origin = f"{package} {version}"
        if ep.name in used:
            if used[ep.name][0] != package:  # (the same package found twice on sys.path is no clash)
                reg.failures.append(PluginError(ep.name, origin, f"entry point name {ep.name!r} is already used by {used[ep.name][1]}"))
            continue
        used[ep.name] = (package, origin)
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the others down
            reg.failures.append(PluginError(ep.name, origin, f"failed to import: {type(exc).__name__}: {exc}"))
            continue
        found: list[tuple[str, type]] = []
        try:
            pm.register(module, name=ep.name)  # validates hookimpl names and arguments against the specs
        except Exception as exc:
            reg.failures.append(PluginError(ep.name, origin, f"is not a valid pluggy plugin: {exc}"))
            continue
        callers = pm.get_hookcallers(module) or []
        unknown = sorted(c.name for c in callers if c.spec is None)  # pluggy accepts these silently: a typo
        if unknown:
            reg.failures.append(
                PluginError(ep.name, origin, f"implements unknown hook {', '.join(unknown)}; hooks are register_allocators, register_evictors")
            )
        elif not callers:
            reg.failures.append(PluginError(ep.name, origin, "registers no allocator or evictor (it implements neither hook)"))
        for kind in ("allocator", "evictor"):
            # Call this plugin's implementation alone, so that one plugin raising cannot hide the others.
            hook = getattr(pm.hook, f"register_{kind}s")
            for impl in [i for i in hook.get_hookimpls() if i.plugin is module]:
                try:
                    impl.function(register=lambda c, k=kind, out=found: out.append((k, c)))
                except Exception as exc:
                    reg.failures.append(PluginError(ep.name, origin, f"register_{kind}s raised {type(exc).__name__}: {exc}"))
        for kind, cls in found:
            problem = _contract_problem(kind, cls)
            name = getattr(cls, "name", ep.name)
            if problem is None:
                table = reg.allocators if kind == "allocator" else reg.evictors
                if name in table:
                    problem = f"{kind} name {name!r} is already registered by {table[name].origin}"
            if problem is not None:
                reg.failures.append(PluginError(name if isinstance(name, str) else ep.name, origin, problem))
                continue
            info = PluginInfo(name, kind, cls, ep.name, package, version)
            (reg.allocators if kind == "allocator" else reg.evictors)[name] = info
    return reg


_CACHED: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _CACHED
    if _CACHED is None or reload:
        _CACHED = load()
    return _CACHED

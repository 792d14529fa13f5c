"""The plugin registry: one pluggy PluginManager over the ``squeezekit`` entry-point group.

Bundled and third-party plugins load the same way. A plugin that fails to import, or registers something that
breaks the contract, is recorded (by name and package) in `Registry.failures` and skipped; the others keep working.
Set ``SQUEEZEKIT_PLUGINS=name1,name2`` to load only those entry points (reproducible runs, isolating a bad plugin);
a name that matches no entry point is an error. squeezekit's own commands come from `squeezekit.commands`, and the
default head split (``uniform``, what a config without ``heads`` uses) from `squeezekit.plugins.uniform_heads`: both
are default plugins registered in code through the same hooks (like simonw/llm's default plugins), so the variable
never hides them.

Nothing here imports torch: listing plugins and building ``--help`` stay fast.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError, UnknownPluginError
from .policies import HeadBudgetSplitter, LayerBudgetAllocator, TokenEvictor
from .statistics import needed

GROUP = "squeezekit"
BUNDLED_PACKAGE = "squeezekit"  # its entry points load first
ENV = "SQUEEZEKIT_PLUGINS"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_COMMAND = re.compile(r"^[a-z][a-z0-9-]*$")
#: the policy kinds (each the config key that names one), their contracts, and how messages call them
KINDS = ("allocator", "evictor", "heads")
BASES: dict[str, type] = {"allocator": LayerBudgetAllocator, "evictor": TokenEvictor, "heads": HeadBudgetSplitter}
WORDS = {"allocator": "allocator", "evictor": "evictor", "heads": "head split"}


@dataclass(frozen=True)
class Param:
    """One parameter of a plugin: a dataclass field, reachable as a config key of the same name."""

    name: str
    type: type  #: int, float, bool or str (the field's annotation; anything else is treated as str)
    default: Any
    help: str  #: the field's ``metadata["help"]``, else its ``#:`` comment, else ""
    plugin: str  #: the plugin's name
    #: the values it may take, when its annotation is a ``typing.Literal`` (``pooling: Literal["max", "avg"]``)
    choices: tuple[Any, ...] | None = None
    #: how ``--help`` shows its value, from the field's ``metadata["metavar"]`` (e.g. ``FILE``); None: from its type
    metavar: str | None = None


@dataclass(frozen=True)
class PluginInfo:
    """One registered policy and where it came from."""

    name: str
    kind: str  #: "allocator", "evictor" or "heads" (a head split): `KINDS`
    cls: Any  #: the plugin's class (a LayerBudgetAllocator, TokenEvictor or HeadBudgetSplitter dataclass)
    entry_point: str
    package: str
    version: str

    @property
    def origin(self) -> str:
        return f"{self.package} {self.version}"

    @property
    def doc(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""

    def params(self) -> dict[str, Param]:
        """Its parameters by name, in field order."""
        return _params(self.cls, self.name)


@dataclass(frozen=True)
class Command:
    """A ``squeezekit`` subcommand: ``add(parser)`` adds its options and sets ``func`` (only when it is used)."""

    name: str
    help: str
    add: Callable[[Any], None] | str  #: a callable, or ``"module:function"`` imported when the command runs
    origin: str

    def add_to(self, parser: Any) -> None:
        add = self.add
        if isinstance(add, str):
            import importlib

            module, _, attr = add.partition(":")
            add = getattr(importlib.import_module(module), attr)
        add(parser)


@dataclass
class Registry:
    """Installed allocators, evictors, head splits and commands by name, plus the plugins that failed to load."""

    allocators: dict[str, PluginInfo] = field(default_factory=dict)
    evictors: dict[str, PluginInfo] = field(default_factory=dict)
    head_splits: dict[str, PluginInfo] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    failures: list[PluginError] = field(default_factory=list)
    #: ``SQUEEZEKIT_PLUGINS`` named entry points that do not exist: raised by every policy lookup
    env_error: ConfigError | None = None
    manager: pluggy.PluginManager | None = None

    def get(self, kind: str, name: object, source: str | None = None, key: str | None = None) -> PluginInfo:
        """The ``kind`` policy called ``name``; ``key`` is the config key that named it (default: ``kind``)."""
        if self.env_error is not None:
            raise self.env_error
        table = self.table(kind)
        if isinstance(name, str) and name in table:
            return table[name]
        for failure in self.failures:  # a broken plugin of that name: say why, not just "unknown"
            if failure.plugin == name and getattr(failure, "kind", kind) == kind:
                raise failure
        raise UnknownPluginError(WORDS[kind], name, list(table), source, key or kind)

    def table(self, kind: str) -> dict[str, PluginInfo]:
        """The installed policies of one kind (`KINDS`), by name."""
        return {"allocator": self.allocators, "evictor": self.evictors, "heads": self.head_splits}[kind]

    def all(self) -> list[PluginInfo]:
        every = [info for kind in KINDS for info in self.table(kind).values()]
        return sorted(every, key=lambda p: (KINDS.index(p.kind), p.name))


# ---- plugin parameters ---------------------------------------------------------------------------------------------
def _doc_comments(cls: type) -> dict[str, str]:
    """``#:`` comments of a class's fields (on the lines above a field, or after it on the same line)."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
        tree = ast.parse("\n".join(lines))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = lines[node.lineno - 1]
        inline = line.split("#:", 1)[1].strip() if "#:" in line else ""
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            above.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        text = " ".join(above) or inline
        if text:
            out[node.target.id] = text
    return out


def _params(cls: type, plugin: str) -> dict[str, Param]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: treat its fields as text
        hints = {}
    comments = _doc_comments(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name, str)
        args = [a for a in typing.get_args(hint) if a is not type(None)]  # Optional[int] -> int
        typ = args[0] if args else hint
        choices = None
        if typing.get_origin(hint) is typing.Literal:  # Literal["max", "avg"]: text (or numbers) from a list
            choices = tuple(typing.get_args(hint))
            typ = type(choices[0]) if choices and all(type(c) is type(choices[0]) for c in choices) else str
        if typ not in (int, float, bool, str):
            typ = str
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f.metadata.get("help") or comments.get(f.name, "")
        out[f.name] = Param(f.name, typ, default, help_text, plugin, choices, f.metadata.get("metavar"))
    return out


# ---- loading ---------------------------------------------------------------------------------------------------------
def _contract_problem(kind: str, cls: object) -> str | None:
    base = BASES[kind]
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"registered {cls!r}, which is not a subclass of squeezekit.{base.__name__}"
    if not dataclasses.is_dataclass(cls):
        return f"{cls.__name__} must be a dataclass (its fields are its parameters)"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        return f"{cls.__name__}.name must be a lowercase identifier, got {name!r}"
    if getattr(cls, "__abstractmethods__", None):
        return f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))}"
    needs: Any = getattr(cls, "needs", ())  # (a head split collects no statistic of its own)
    if kind == "heads" and not isinstance(getattr(cls, "equal", None), bool):
        return f"{cls.__name__}.equal must be True or False, got {getattr(cls, 'equal', None)!r}"
    try:
        stats = needed(needs)
    except TypeError:
        what = "a squeezekit.Stat, a Statistic class or a tuple of them"
        return f"{cls.__name__}.needs must be {what}, got {needs!r}"
    if kind == "allocator" and any(s.per_slot for s in stats):
        return (
            f"{cls.__name__}.needs must be Stat.NONE or statistics of one step (Stat.WINDOW_QUERIES) for an "
            f"allocator, got {needs!r}"
        )
    for stat in stats:
        try:
            problem = stat.problem(cls)
        except Exception as exc:  # a statistic's own check must not take the registry down
            return f"statistic {stat.name!r}: problem() raised {type(exc).__name__}: {exc}"
        if problem:
            return str(problem)
    for f in dataclasses.fields(cls):
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return f"{cls.__name__}.{f.name} needs a default value"
    return None


def _command_problem(name: object, help_text: object, add: object) -> str | None:
    if not isinstance(name, str) or not _COMMAND.match(name):
        return f"command name must be a lowercase word (letters, digits, '-'), got {name!r}"
    if not isinstance(help_text, str):
        return f"command {name!r}: help must be a string"
    if not (callable(add) or (isinstance(add, str) and ":" in add)):
        return f"command {name!r}: add must be a callable or 'module:function'"
    return None


def _package_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"], dist.version) if dist is not None else (ep.value.split(":")[0], "?")


def _requested() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}


def load() -> Registry:
    """Discover and load every plugin of the entry-point group (cached: see `registry`)."""
    reg = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg.manager = pm
    only = _requested()
    used: dict[str, tuple[str, str]] = {}  # entry-point name -> (package, origin) that took it
    eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: (_package_of(e)[0] != BUNDLED_PACKAGE, e.name))
    missing = sorted(only - {ep.name for ep in eps})
    if missing:
        names = ", ".join(sorted({ep.name for ep in eps}))
        reg.env_error = ConfigError(
            ENV,
            ",".join(missing),
            f"no installed plugin has this entry-point name; entry points: {names}",
            "environment",
        )

    import importlib

    from . import commands  # squeezekit's own commands and the default head split: default plugins, always loaded

    _register_module(reg, pm, commands, "squeezekit-commands", BUNDLED_PACKAGE, _own_version())
    default_heads = importlib.import_module("squeezekit.plugins.uniform_heads")
    _register_module(reg, pm, default_heads, "uniform_heads", BUNDLED_PACKAGE, _own_version())
    # Bundled policies first, so that no third-party plugin can take one of their names; then by entry-point name.
    for ep in eps:
        if only and ep.name not in only:
            continue
        package, version = _package_of(ep)
        origin = f"{package} {version}"
        if ep.name in used:
            if used[ep.name][0] != package:  # (the same package found twice on sys.path is no clash)
                problem = f"entry point name {ep.name!r} is already used by {used[ep.name][1]}"
                reg.failures.append(PluginError(ep.name, origin, problem))
            continue
        used[ep.name] = (package, origin)
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the others down
            reg.failures.append(PluginError(ep.name, origin, f"failed to import: {type(exc).__name__}: {exc}"))
            continue
        _register_module(reg, pm, module, ep.name, package, version)
    return reg


def _own_version() -> str:
    try:
        return metadata.version(BUNDLED_PACKAGE)
    except metadata.PackageNotFoundError:
        return "?"


def _register_module(
    reg: Registry, pm: pluggy.PluginManager, module: Any, ep_name: str, package: str, version: str
) -> None:
    origin = f"{package} {version}"
    try:
        pm.register(module, name=ep_name)  # validates hookimpl names and arguments against the specs
    except Exception as exc:
        reg.failures.append(PluginError(ep_name, origin, f"is not a valid pluggy plugin: {exc}"))
        return
    callers = pm.get_hookcallers(module) or []
    unknown = sorted(c.name for c in callers if c.spec is None)  # pluggy accepts these silently: a typo
    if unknown:
        hooks = ", ".join(sorted(name for name in dir(hookspecs) if name.startswith("register_")))
        reg.failures.append(
            PluginError(ep_name, origin, f"implements unknown hook {', '.join(unknown)}; hooks are {hooks}")
        )
    elif not callers:
        reg.failures.append(PluginError(ep_name, origin, "registers nothing (it implements none of the hooks)"))
    found: list[tuple[str, Any]] = []
    for kind in (*KINDS, "command"):
        # Call this plugin's implementation alone, so that one plugin raising cannot hide the others.
        hook = getattr(pm.hook, _HOOKS[kind])
        for impl in [i for i in hook.get_hookimpls() if i.plugin is module]:
            try:
                impl.function(register=lambda *a, k=kind, out=found: out.append((k, a)))
            except Exception as exc:
                reg.failures.append(PluginError(ep_name, origin, f"{_HOOKS[kind]} raised {type(exc).__name__}: {exc}"))
    for kind, args in found:
        if kind == "command":
            _add_command(reg, args, ep_name, origin)
            continue
        cls = args[0] if len(args) == 1 else args
        problem = _contract_problem(kind, cls)
        name = getattr(cls, "name", ep_name)
        if problem is None:
            table = reg.table(kind)
            if name in table:
                problem = f"{WORDS[kind]} name {name!r} is already registered by {table[name].origin}"
        if problem is not None:
            failure = PluginError(name if isinstance(name, str) else ep_name, origin, problem)
            failure.kind = kind  # type: ignore[attr-defined]  # (a lookup of that kind names it: `Registry.get`)
            reg.failures.append(failure)
            continue
        reg.table(kind)[name] = PluginInfo(name, kind, cls, ep_name, package, version)


_HOOKS = {
    "allocator": "register_allocators",
    "evictor": "register_evictors",
    "heads": "register_head_splits",
    "command": "register_commands",
}


def _add_command(reg: Registry, args: tuple, ep_name: str, origin: str) -> None:
    name, help_text, add = (*args, None, None, None)[:3]
    problem = _command_problem(name, help_text, add)
    if problem is None and name in reg.commands:
        problem = f"command {name!r} is already registered by {reg.commands[name].origin}"
    if problem is not None:
        reg.failures.append(PluginError(ep_name, origin, problem))
        return
    reg.commands[name] = Command(name, help_text, add, origin)


_CACHED: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _CACHED
    if _CACHED is None or reload:
        _CACHED = load()
    return _CACHED

"""One configuration schema for every entry point: Python kwargs, ``k=v,k=v`` strings (lm-eval ``--model_args``),
CLI flags and YAML / TOML / JSON files all produce the same frozen `Config`.

Core keys: ``allocator``, ``evictor``, ``budget``, ``p``, ``sinks``, ``window``, ``heavy_ratio``,
``fallback_allocator``, ``fallback_evictor``. Any other key must be a parameter (a dataclass field) of the chosen
allocator or evictor (or of a fallback), which validates it. ``p``, ``sinks``, ``window`` and ``heavy_ratio`` left
unset take the chosen plugin's own default.

``fallback_allocator`` / ``fallback_evictor`` (default unset): when the chosen plugin fails during a run (raises,
returns something that breaks the contract, or NaN scores), squeezekit warns (`PluginFallbackWarning`, naming the
failing plugin) and uses this policy for the rest of the ``compress`` block instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, PluginError, SqueezekitError
from .policies import Stat
from .registry import PluginInfo, registry

BUDGET_RANGE = "a fraction of the prompt in (0, 1] (1 = full cache, nothing evicted) or a whole number of tokens > 1"


def _number(key: str, value: Any, source: str | None, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, value, f"expected {kind}, got {type(value).__name__}", source)
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(key, value, "expected an integer", source)
        value = int(value)
    return value


# key -> (type, validator(value) -> bool, accepted-range text)
_CORE: dict[str, tuple[type, Any, str]] = {
    "allocator": (str, lambda v: True, "an installed allocator name"),
    "evictor": (str, lambda v: True, "an installed evictor name"),
    "budget": (
        float,
        lambda v: math.isfinite(v) and (0 < v <= 1 or (v > 1 and float(v).is_integer())),
        f"must be {BUDGET_RANGE}",
    ),
    "p": (float, lambda v: math.isfinite(v) and 0 < v <= 1, "must be in (0, 1]: the least important layers get p x the mean budget"),
    "sinks": (int, lambda v: 0 <= v <= 1_000_000, "must be an integer >= 0"),
    "window": (int, lambda v: 1 <= v <= 1_000_000, "must be an integer >= 1"),
    "heavy_ratio": (float, lambda v: math.isfinite(v) and 0 <= v <= 1, "must be in [0, 1]: the share of the budget for heavy hitters"),
    "fallback_allocator": (str, lambda v: True, "an installed allocator name"),
    "fallback_evictor": (str, lambda v: True, "an installed evictor name"),
}
CORE_KEYS = tuple(_CORE)
#: core keys that reach any plugin field of the same name
PLUGIN_KEYS = ("p", "sinks", "window", "heavy_ratio")
#: evictor fields that set the usual floors (named in budget errors as what to lower)
FLOOR_KEYS = ("sinks", "window")


def checked_floor(evictor, origin: str) -> int:
    """``evictor.floor()``, checked (an integer >= 0); at least 1, since a layer always keeps its newest token."""
    try:
        floor = evictor.floor()
    except Exception as exc:
        raise PluginError(evictor.name, origin, f"floor() raised {type(exc).__name__}: {exc}") from exc
    try:
        value = operator.index(floor)
    except TypeError:
        value = -1
    if isinstance(floor, bool) or value < 0:
        raise PluginError(evictor.name, origin, f"floor() must return an integer >= 0, got {floor!r}")
    return max(1, value)


def floor_hint(evictor) -> str:
    """`` or lower sinks/window``: the evictor's parameters that set its floor, for budget error messages."""
    keys = [k for k in FLOOR_KEYS if k in {f.name for f in dataclasses.fields(evictor)}]
    return f" or lower {'/'.join(keys)}" if keys else ""


def _coerce_string(key: str, value: str, typ: type, source: str | None) -> Any:
    """Type a value that arrived as text (``k=v`` strings, CLI flags)."""
    text = value.strip()
    if typ is str:
        return text
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(key, value, "expected true or false", source)
    try:
        return int(text) if typ is int else float(text)
    except ValueError:
        raise ConfigError(key, value, f"expected {'an integer' if typ is int else 'a number'}", source) from None


def _check_typed(key: str, value: Any, typ: type, source: str | None) -> Any:
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, f"expected a name (string), got {type(value).__name__}", source)
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, f"expected true or false, got {type(value).__name__}", source)
        return value
    num = _number(key, value, source, integer=typ is int)
    return float(num) if typ is float else num


def _plugin_types(info: PluginInfo) -> dict[str, type]:
    hints = typing.get_type_hints(info.cls)
    out = {}
    for name in info.params():
        t = hints.get(name, str)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = args[0] if args else t
    return out


@dataclass(frozen=True)
class Config:
    """A validated squeezekit configuration (immutable, comparable)."""

    allocator: str = "squeeze"
    evictor: str = "streaming"
    budget: float = 0.2
    p: float | None = None
    sinks: int | None = None
    window: int | None = None
    heavy_ratio: float | None = None
    #: used instead of the allocator / evictor if it fails during a run (None: the run stops with a PluginError)
    fallback_allocator: str | None = None
    fallback_evictor: str | None = None
    #: plugin-specific parameters, as sorted (key, value) pairs
    extra: tuple[tuple[str, Any], ...] = ()

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str | None = None, text: bool = False) -> Config:
        """Validate a flat mapping. ``text=True`` types string values (they came from ``k=v`` or CLI flags)."""
        if not isinstance(values, dict):
            raise ConfigError("(top level)", values, "expected a mapping of keys to values", source)
        reg = registry()
        core: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(str(key), value, "keys must be strings", source)
            if key in _CORE:
                typ, ok, accepted = _CORE[key]
                if text and isinstance(value, str):
                    value = _coerce_string(key, value, typ, source)
                value = _check_typed(key, value, typ, source)
                if not ok(value):
                    raise ConfigError(key, value, accepted, source)
                core[key] = value
            else:
                rest[key] = value
        allocator = reg.get("allocator", core.get("allocator", cls.allocator), source)
        evictor = reg.get("evictor", core.get("evictor", cls.evictor), source)
        plugins = [allocator, evictor]
        for kind, primary in (("allocator", allocator), ("evictor", evictor)):
            name = core.get(f"fallback_{kind}")
            if name is None:
                continue
            fallback = reg.get(kind, name, source, key=f"fallback_{kind}")
            if fallback.name == primary.name:
                raise ConfigError(f"fallback_{kind}", name, f"must differ from the {kind} it stands in for", source)
            if kind == "evictor" and fallback.cls.needs not in (Stat.NONE, evictor.cls.needs):
                raise ConfigError(
                    "fallback_evictor",
                    name,
                    f"needs {fallback.cls.needs.value} statistics, which evictor {evictor.name!r} does not collect; "
                    f"choose one that needs none (e.g. streaming, sliding_window)",
                    source,
                )
            plugins.append(fallback)
        extra: dict[str, Any] = {}
        for key, value in rest.items():
            owner = next((i for i in plugins if key in i.params()), None)
            if owner is None:
                known = [*CORE_KEYS, *(k for i in plugins for k in i.params())]
                near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(
                    key,
                    value,
                    f"unknown key (not a squeezekit key, nor a parameter of allocator {allocator.name!r} or evictor "
                    f"{evictor.name!r}); keys: {', '.join(sorted(set(known)))}{hint}",
                    source,
                )
            typ = _plugin_types(owner)[key]
            if text and isinstance(value, str):
                value = _coerce_string(key, value, typ, source)
            extra[key] = _check_typed(key, value, typ, source)
        config = cls(**core, extra=tuple(sorted(extra.items())))
        # plugin-side validation of their parameters, now rather than mid-run
        config.build_allocator(source)
        evictors = [(config.build_evictor(source), evictor.origin)]
        if config.fallback_allocator is not None:
            config.build_allocator(source, fallback=True)
        if config.fallback_evictor is not None:
            evictors.append((config.build_evictor(source, fallback=True), config.info("evictor", True).origin))
        if config.absolute:
            floor, setter = max(((checked_floor(e, o), e) for e, o in evictors), key=lambda t: t[0])
            if config.budget < floor:
                raise ConfigError(
                    "budget",
                    config.budget,
                    f"below the floor of evictor {setter.name!r} ({floor} tokens per layer); use at least {floor}"
                    f"{floor_hint(setter)}",
                    source,
                )
        return config

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Config:
        return cls.from_mapping(kwargs, source="kwargs")

    @classmethod
    def from_string(cls, text: str, source: str = "model_args") -> Config:
        """Parse ``k=v,k=v`` (the lm-eval ``--model_args`` form)."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(item, item, "expected key=value pairs separated by commas", source)
            values[key.strip()] = value
        return cls.from_mapping(values, source=source, text=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file holding a flat mapping."""
        path = Path(path)
        source = str(path)
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ConfigError("(file)", str(path), f"cannot be read: {exc.strerror or exc}", None) from None
        suffix = path.suffix.lower()
        try:
            if suffix in (".yaml", ".yml"):
                import yaml

                try:
                    data = yaml.safe_load(raw)
                except yaml.MarkedYAMLError as exc:  # its str() spans several lines: keep the problem and where
                    mark = exc.problem_mark
                    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
                    raise ConfigError("(file)", str(path), f"is not valid YAML: {where}{exc.problem or exc.context}", None) from None
                data = {} if data is None else data
            elif suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(raw)
            elif suffix == ".json":
                data = json.loads(raw)
            else:
                raise ConfigError("(file)", str(path), "unsupported config file type: use .yaml, .yml, .toml or .json", None)
        except SqueezekitError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError("(file)", str(path), f"is not valid {suffix[1:].upper()}: {first}", None) from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def coerce(cls, config: Config | dict | str | Path | None = None, **kwargs: Any) -> Config:
        """Accept any of the supported forms (plus keyword overrides) and return a `Config`."""
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, Config):
            base = config.as_dict()
        elif isinstance(config, dict):
            base = dict(config)
        elif isinstance(config, Path) or (isinstance(config, str) and "=" not in config):
            base = Config.from_file(config).as_dict()
        elif isinstance(config, str):
            return cls.from_string(config) if not kwargs else cls.from_mapping({**cls.from_string(config).as_dict(), **kwargs}, "kwargs")
        else:
            raise ConfigError("config", config, "expected a Config, a dict, a k=v string or a config file path")
        return cls.from_mapping({**base, **kwargs}, source="kwargs")

    # ---- use ---------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """The explicitly set keys, flat (round-trips through `from_mapping`)."""
        out = {k: getattr(self, k) for k in CORE_KEYS if getattr(self, k) is not None}
        out.update(dict(self.extra))
        return out

    @property
    def full(self) -> bool:
        """True for ``budget=1``: the full cache, nothing is ever evicted."""
        return self.budget == 1

    @property
    def absolute(self) -> bool:
        return self.budget > 1

    def _params(self, info: PluginInfo) -> dict[str, Any]:
        given = {k: getattr(self, k) for k in PLUGIN_KEYS if getattr(self, k) is not None}
        given.update(dict(self.extra))
        return {k: v for k, v in given.items() if k in info.params()}

    def info(self, kind: str, fallback: bool = False, source: str | None = None) -> PluginInfo | None:
        """The registry entry of the allocator / evictor (or of its fallback: None when unset)."""
        name = getattr(self, f"fallback_{kind}" if fallback else kind)
        return None if name is None else registry().get(kind, name, source)

    def _build(self, kind: str, source: str | None, fallback: bool = False):
        info = self.info(kind, fallback, source)
        if info is None:
            return None
        try:
            return info.cls(**self._params(info))
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.value, exc.accepted, exc.source or source) from None
        except Exception as exc:
            from .errors import PluginError

            raise PluginError(info.name, info.origin, f"constructor raised {type(exc).__name__}: {exc}") from None

    def build_allocator(self, source: str | None = None, fallback: bool = False):
        """A new instance of the allocator (``fallback=True``: of the fallback allocator, None when unset)."""
        return self._build("allocator", source, fallback)

    def build_evictor(self, source: str | None = None, fallback: bool = False):
        """A new instance of the evictor (``fallback=True``: of the fallback evictor, None when unset)."""
        return self._build("evictor", source, fallback)

    def describe(self) -> str:
        """A one-line human summary, e.g. ``squeeze(p=0.4) + streaming(sinks=4, window=8) @ budget 0.2``."""

        def fmt(obj) -> str:
            fields = ", ".join(f"{f.name}={getattr(obj, f.name)}" for f in dataclasses.fields(obj) if f.init)
            return f"{obj.name}({fields})"

        budget = "full cache" if self.full else (f"{int(self.budget)} tokens" if self.absolute else f"budget {self.budget:g}")
        text = f"{fmt(self.build_allocator())} + {fmt(self.build_evictor())} @ {budget}"
        fallbacks = [f"{kind} {fmt(self._build(kind, None, True))}" for kind in ("allocator", "evictor") if getattr(self, f"fallback_{kind}")]
        return text + (f"; fallback: {', '.join(fallbacks)}" if fallbacks else "")

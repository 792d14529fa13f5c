"""One configuration schema for every entry point: Python kwargs, ``k=v,k=v`` strings (lm-eval ``--model_args``),
CLI flags, labels (``squeeze+h2o@0.2/window=4``: bench methods, sweep cells) and YAML / TOML / JSON files all
produce the same frozen `Config`.

Core keys (`CORE`): ``allocator``, ``evictor``, ``heads`` (the head split, default ``uniform``), ``budget``,
``kv_bits`` (the kept slots' precision, default 16: squeezekit.quantized), ``fallback_allocator``,
``fallback_evictor``. Every other key is a parameter of a plugin: a dataclass field of the
chosen allocator, evictor or head split (or of a fallback), which validates it; a key no chosen plugin has is an
error naming the nearest valid one (or the installed plugin that takes it). `keys` lists every key of every
installed plugin, with its type, help and default: the CLI's flags, lm-eval's model_args and the sweep's cells are
all derived from it, so a third-party plugin's parameters are as first-class as the bundled ones.

``fallback_allocator`` / ``fallback_evictor`` (default unset): when the chosen plugin fails during a run (raises,
returns something that breaks the contract, or NaN scores), squeezekit warns (`PluginFallbackWarning`, naming the
failing plugin) and uses this policy for the rest of the ``compress`` block instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NO_VALUE, ConfigError, PluginError, SqueezekitError
from .policies import evictor_floor
from .registry import WORDS, Param, PluginInfo, registry
from .statistics import needed

BUDGET_RANGE = "a fraction of the prompt in (0, 1] (1 = full cache, nothing evicted) or a whole number of tokens > 1"
#: the largest absolute budget (tokens per layer): larger values are no budget at all
MAX_TOKENS = 2**31 - 1
#: config files larger than this are refused (a config is a handful of keys)
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Key:
    """One configuration key as every front end shows it (CLI flag, lm-eval model_arg, config file key)."""

    name: str
    type: type
    help: str
    default: str  #: as text, e.g. ``0.2``, or ``streaming: 8, h2o: 8`` for a parameter of several plugins
    plugins: tuple[str, ...] = ()  #: the plugins that take it; () for a core key
    #: the values it may take (a ``typing.Literal`` parameter; None: any value of its type)
    choices: tuple[Any, ...] | None = None
    given_metavar: str | None = None  #: a plugin's own (``metadata["metavar"]`` of its field)

    @property
    def metavar(self) -> str:
        """How ``--help`` shows its value: ``{max,avg}``, ``FILE``, ``N``, ``X``, ``BOOL``, ``NAME`` or ``VALUE``."""
        if self.choices:
            return "{" + ",".join(str(c) for c in self.choices) + "}"
        if self.given_metavar:
            return self.given_metavar
        return {int: "N", float: "X", bool: "BOOL"}.get(self.type, "VALUE" if self.plugins else "NAME")


def _budget_ok(v: float) -> bool:
    return math.isfinite(v) and (0 < v <= 1 or (1 < v <= MAX_TOKENS and float(v).is_integer()))


# key -> (type, validator(value) -> bool, accepted-range text, help)
CORE: dict[str, tuple[type, Any, str, str]] = {
    "allocator": (str, lambda v: True, "an installed allocator name", "layer-budget allocator (`squeezekit plugins`)"),
    "evictor": (str, lambda v: True, "an installed evictor name", "token evictor (`squeezekit plugins`)"),
    "heads": (
        str, lambda v: True, "an installed head split name",
        "how each layer's budget splits over its KV heads (`squeezekit plugins`): uniform (every head keeps the "
        "layer's budget) or e.g. adaptive (Ada-KV: the heads' best tokens, the memory held following them)",
    ),
    "budget": (
        float,
        _budget_ok,
        f"must be {BUDGET_RANGE} (at most {MAX_TOKENS})",
        "mean tokens kept per layer: a fraction of the prompt in (0, 1], or a whole number of tokens > 1; "
        "1 = full cache",
    ),
    "kv_bits": (
        int, lambda v: v in (16, 8, 4), "must be 16 (the model's dtype), 8 or 4",
        "bits a kept key or value channel is stored in: 16 (the model's dtype), 8 (about half the memory) or 4 "
        "(about a quarter); scales per token and KV head (squeezekit.quantized)",
    ),
    "fallback_allocator": (
        str, lambda v: True, "an installed allocator name", "allocator used, with a warning, if the allocator fails"
    ),
    "fallback_evictor": (
        str, lambda v: True, "an installed evictor name", "evictor used, with a warning, if the evictor fails"
    ),
}  # fmt: skip
CORE_KEYS = tuple(CORE)
#: the core keys a label's head spells, ``ALLOCATOR+EVICTOR@BUDGET`` (`Config.label`); any other key set follows as
#: ``/KEY=VALUE`` (a cell's parameters, in the sweep and its reports)
LABEL_KEYS = ("allocator", "evictor", "budget")


def _number(key: str, value: Any, source: str | None, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, value, f"expected {kind}, got {type(value).__name__}", source)
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(key, value, "expected an integer", source)
        value = int(value)
    if integer and not -(2**63) <= value < 2**63:
        raise ConfigError(key, value, "expected an integer within 64 bits", source)
    if not integer:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range (1e309 and up)
            raise ConfigError(key, value, "expected a number within float range", source) from None
    return value


def _coerce_string(key: str, value: str, typ: type, source: str | None) -> Any:
    """Type a value that arrived as text (``k=v`` strings, CLI flags, labels)."""
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
    return _number(key, value, source, integer=typ is int)


def _typed(key: str, value: Any, typ: type, text: bool, source: str | None) -> Any:
    if text and isinstance(value, str):
        value = _coerce_string(key, value, typ, source)
    return _check_typed(key, value, typ, source)


def keys(kind: str | None = None) -> dict[str, Key]:
    """Every configuration key: the core keys, then every installed plugin's parameters (merged by name).
    ``kind="evictor"`` (or ``"allocator"``): that core key and the parameters of the plugins of that kind alone."""
    out = {}
    for name, (typ, _, _, help_text) in CORE.items():
        if kind is not None and name != kind:
            continue
        default = getattr(Config, name)
        shown = "unset" if default is None else f"{default:g}" if isinstance(default, float) else str(default)
        out[name] = Key(name, typ, help_text, shown)
    params: dict[str, list[Param]] = {}
    for info in registry().all():
        if kind is not None and info.kind != kind:
            continue
        for param in info.params().values():
            params.setdefault(param.name, []).append(param)
    for name, group in params.items():
        if name in out:  # a plugin field named like a core key is shadowed by it
            continue
        defaults = {str(p.default) for p in group}
        default = defaults.pop() if len(defaults) == 1 else ", ".join(f"{p.plugin}: {p.default}" for p in group)
        helps = dict.fromkeys(p.help for p in group if p.help)
        help_text = "; ".join(helps) if len(helps) <= 1 else "; ".join(f"{p.plugin}: {p.help}" for p in group if p.help)
        choices = {p.choices for p in group}
        out[name] = Key(
            name, group[0].type, help_text, default, tuple(p.plugin for p in group),
            choices.pop() if len(choices) == 1 else None, next((p.metavar for p in group if p.metavar), None),
        )  # fmt: skip
    return out


def unknown_key(
    key: str, value: Any, known: list[str], what: str, source: str | None, extra: tuple[str, ...] = ()
) -> ConfigError:
    """The one-line `ConfigError` for an unknown key: the keys it could have been, and the nearest one."""
    near = difflib.get_close_matches(key, sorted(set(known) | set(extra)), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(key, value, f"unknown key ({what}); keys: {', '.join(sorted(set(known)))}{hint}", source)


_LABEL_KEY = re.compile(r"[a-z_][a-z0-9_]*\Z")


@dataclass(frozen=True)
class Config:
    """A validated squeezekit configuration (immutable, comparable)."""

    allocator: str = "squeeze"
    evictor: str = "streaming"
    #: the head split (`squeezekit.HeadBudgetSplitter`); the default gives every KV head its layer's budget
    heads: str = "uniform"
    budget: float = 0.2
    #: the bits each kept key / value channel is stored in (16: the model's dtype; 8 or 4: squeezekit.quantized)
    kv_bits: int = 16
    #: used instead of the allocator / evictor if it fails during a run (None: the run stops with a PluginError)
    fallback_allocator: str | None = None
    fallback_evictor: str | None = None
    #: the plugins' parameters, as sorted (key, value) pairs
    params: tuple[tuple[str, Any], ...] = ()

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls,
        values: dict[str, Any],
        source: str | None = None,
        text: bool = False,
        others: tuple[str, frozenset[str]] | None = None,
    ) -> Config:
        """Validate a flat mapping. ``text=True`` types string values (they came from ``k=v``, CLI flags, labels).

        ``others``: ``(what, keys)`` a front end accepts besides the config's (lm-eval's own model_args), named in
        the unknown-key error and searched for the nearest key.
        """
        if not isinstance(values, dict):
            raise ConfigError("(top level)", values, "expected a mapping of keys to values", source)
        reg = registry()
        core: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(str(key), value, "keys must be strings", source)
            if key in CORE:
                typ, ok, accepted, _ = CORE[key]
                value = _typed(key, value, typ, text, source)
                if not ok(value):
                    raise ConfigError(key, value, accepted, source)
                core[key] = value
            else:
                rest[key] = value
        allocator = reg.get("allocator", core.get("allocator", cls.allocator), source)
        evictor = reg.get("evictor", core.get("evictor", cls.evictor), source)
        heads = reg.get("heads", core.get("heads", cls.heads), source)
        plugins = [allocator, evictor, heads]
        for kind, primary in (("allocator", allocator), ("evictor", evictor)):
            name = core.get(f"fallback_{kind}")
            if name is None:
                continue
            fallback = reg.get(kind, name, source, key=f"fallback_{kind}")
            if fallback.name == primary.name:
                raise ConfigError(f"fallback_{kind}", name, f"must differ from the {kind} it stands in for", source)
            collected = needed(evictor.cls.needs)
            missing = [s.name for s in needed(fallback.cls.needs) if s not in collected] if kind == "evictor" else []
            if missing:
                raise ConfigError(
                    "fallback_evictor",
                    name,
                    f"needs {', '.join(missing)} statistics, which evictor {evictor.name!r} does not collect; "
                    f"choose one that needs none (e.g. streaming, sliding_window)",
                    source,
                )
            plugins.append(fallback)
        params: dict[str, Any] = {}
        for key, value in rest.items():
            owner = next((i for i in plugins if key in i.params()), None)
            if owner is None:
                known = [*CORE_KEYS, *(k for i in plugins for k in i.params())]
                what = (
                    f"not a squeezekit key, nor a parameter of allocator {allocator.name!r} or evictor {evictor.name!r}"
                )
                if not heads.cls.equal:
                    what += f" or head split {heads.name!r}"
                other_what, other_keys = others or ("", frozenset())
                if other_what:
                    what += f", nor {other_what}"
                # (the default of its kind first, then an evictor: window-like keys are evictors' before an
                # allocator that borrows them)
                order = {"evictor": 0, "allocator": 1}
                defaults = {"allocator": cls.allocator, "evictor": cls.evictor, "heads": cls.heads}
                unused = sorted(
                    (i for i in reg.all() if key in i.params()),
                    key=lambda i: (defaults.get(i.kind) != i.name, order.get(i.kind, 2)),
                )
                if unused:  # a parameter of an installed plugin this config does not choose: say which to choose
                    info = unused[0]
                    raise ConfigError(
                        key, value, f"is a parameter of {WORDS[info.kind]} {info.name!r}, which this config does not "
                        f"use; add {info.kind}={info.name}", source,
                    )  # fmt: skip
                raise unknown_key(key, value, known, what, source, tuple(sorted(other_keys)))
            params[key] = _typed(key, value, owner.params()[key].type, text, source)
        config = cls(**core, params=tuple(sorted(params.items())))
        config._validate_plugins(source)
        return config

    def _validate_plugins(self, source: str | None) -> None:
        """Build every plugin now (they validate their parameters), rather than mid-run; check the floor."""
        self.build_allocator(source)
        evictors = [(self.build_evictor(source), self.origin("evictor"))]
        self._check_heads(source)
        if self.kv_bits != Config.kv_bits and self.full:
            raise ConfigError(
                "kv_bits", self.kv_bits, "quantizes the slots a compressed cache keeps, and budget 1 keeps the full "
                "cache in the model's dtype; use a budget below 1 with it, or kv_bits=16", source,
            )  # fmt: skip
        if self.fallback_allocator is not None:
            self.build_allocator(source, fallback=True)
        if self.fallback_evictor is not None:
            evictors.append((self.build_evictor(source, fallback=True), self.origin("evictor", fallback=True)))
        if self.absolute:
            floor, setter = evictor_floor(evictors)
            if self.budget < floor:
                raise ConfigError(
                    "budget",
                    self.budget,
                    f"below the floor of evictor {setter.name!r} ({floor} tokens per layer); use at least {floor}"
                    f"{floor_hint(setter)}",
                    source,
                )

    def _check_heads(self, source: str | None) -> None:
        """Build the head split; one that is not equal needs evictors that only score (it splits by their ranking,
        and the engine keeps the top of each head's scores)."""
        from .policies import TokenEvictor

        split = self._build("heads", source)
        if split.equal:
            return
        for fallback in (False, True):
            info = self.info("evictor", fallback, source)
            if info is not None and info.cls.select is not TokenEvictor.select:
                key = "fallback_evictor" if fallback else "evictor"
                raise ConfigError(
                    key,
                    info.name,
                    f"chooses its own tokens (it overrides select()), so head split {split.name!r} cannot rank them; "
                    "use heads=uniform with it, or an evictor that scores tokens",
                    source,
                )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Config:
        return cls.from_mapping(kwargs, source="kwargs")

    @classmethod
    def from_string(cls, text: str, source: str = "model_args") -> Config:
        """Parse ``k=v,k=v`` (the lm-eval ``--model_args`` form)."""
        return cls.from_mapping(parse_pairs(text, source), source=source, text=True)

    @classmethod
    def from_label(cls, label: str, source: str = "label") -> Config:
        """Parse a label, ``ALLOCATOR+EVICTOR@BUDGET`` followed by any ``/KEY=VALUE`` (see `label`)."""
        head, *pairs = label.strip().split("/")
        combo, at, budget = head.partition("@")
        allocator, plus, evictor = combo.partition("+")
        if not (plus and at and allocator and evictor and budget):
            raise ConfigError(
                "label",
                label,
                "expected ALLOCATOR+EVICTOR@BUDGET[/KEY=VALUE...], e.g. squeeze+h2o@0.2/window=4",
                source,
            )
        values: dict[str, Any] = dict(zip(LABEL_KEYS, (allocator, evictor, budget), strict=True))
        key = None
        for pair in pairs:
            name, eq, value = pair.partition("=")
            if eq and _LABEL_KEY.match(name):
                key, values[name] = name, value
            elif key is not None:  # a value with '/' in it (a file path): this piece continues it
                values[key] += "/" + pair
            else:
                raise ConfigError("label", label, f"expected KEY=VALUE after '/', got {pair!r}", source)
        return cls.from_mapping(values, source=source, text=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file holding a flat mapping."""
        return cls.from_mapping(read_config_file(path), source=str(path))

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
            if not kwargs:
                return cls.from_string(config)
            base = cls.from_string(config).as_dict()
        else:
            raise ConfigError("config", config, "expected a Config, a dict, a k=v string or a config file path")
        return cls.from_mapping({**base, **kwargs}, source="kwargs")

    # ---- use ---------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """The explicitly set keys, flat (round-trips through `from_mapping`); ``heads`` and ``kv_bits`` only when
        they are not the defaults (``uniform``, 16), so labels and results of older configs read as they always have."""
        out = {k: getattr(self, k) for k in CORE_KEYS if getattr(self, k) is not None}
        for key in ("heads", "kv_bits"):  # (defaults left out: labels and results read as they always have)
            if out[key] == getattr(Config, key):
                del out[key]
        out.update(dict(self.params))
        return out

    @property
    def label(self) -> str:
        """``ALLOCATOR+EVICTOR@BUDGET`` plus ``/KEY=VALUE`` for every other key set (round-trips `from_label`)."""
        rest = {k: v for k, v in self.as_dict().items() if k not in LABEL_KEYS}
        pairs = "".join(f"/{k}={v:g}" if isinstance(v, float) else f"/{k}={v}" for k, v in sorted(rest.items()))
        return f"{self.allocator}+{self.evictor}@{self.budget:g}{pairs}"

    @property
    def full(self) -> bool:
        """True for ``budget=1``: the full cache, nothing is ever evicted."""
        return self.budget == 1

    @property
    def absolute(self) -> bool:
        return self.budget > 1

    def info(self, kind: str, fallback: bool = False, source: str | None = None) -> PluginInfo | None:
        """The registry entry of the allocator / evictor / head split (or of a fallback: None when unset)."""
        name = getattr(self, f"fallback_{kind}" if fallback else kind, None)
        return None if name is None else registry().get(kind, name, source)

    def origin(self, kind: str, fallback: bool = False) -> str:
        """``PACKAGE VERSION`` of the allocator / evictor (or of its fallback, which must be set)."""
        info = self.info(kind, fallback)
        if info is None:
            raise ValueError(f"no fallback_{kind} is set")
        return info.origin

    def _build(self, kind: str, source: str | None, fallback: bool = False) -> Any:
        info = self.info(kind, fallback, source)
        if info is None:
            return None
        mine = info.params()
        try:
            return info.cls(**{k: v for k, v in self.params if k in mine})
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.value, exc.accepted, exc.source or source) from None
        except Exception as exc:
            raise PluginError(info.name, info.origin, f"constructor raised {type(exc).__name__}: {exc}") from None

    def build_allocator(self, source: str | None = None, fallback: bool = False) -> Any:
        """A new instance of the allocator (``fallback=True``: of the fallback allocator, None when unset)."""
        return self._build("allocator", source, fallback)

    def build_evictor(self, source: str | None = None, fallback: bool = False) -> Any:
        """A new instance of the evictor (``fallback=True``: of the fallback evictor, None when unset)."""
        return self._build("evictor", source, fallback)

    def build_heads(self, source: str | None = None) -> Any:
        """A new instance of the head split."""
        return self._build("heads", source)

    def describe(self) -> str:
        """A one-line human summary, e.g. ``squeeze(p=0.4) + streaming(sinks=4, window=8) @ budget 0.2``."""

        def fmt(obj: Any) -> str:
            fields = ", ".join(f"{f.name}={getattr(obj, f.name)}" for f in dataclasses.fields(obj) if f.init)
            return f"{obj.name}({fields})"

        if self.full:
            budget = "full cache"
        else:
            budget = f"{int(self.budget)} tokens" if self.absolute else f"budget {self.budget:g}"
        text = f"{fmt(self.build_allocator())} + {fmt(self.build_evictor())}"
        if self.heads != Config.heads:
            text += f" / heads {fmt(self.build_heads())}"
        text += f" @ {budget}"
        if self.kv_bits != Config.kv_bits:
            text += f" in {self.kv_bits}-bit slots"
        fallbacks = [
            f"{kind} {fmt(self._build(kind, None, True))}"
            for kind in ("allocator", "evictor")
            if getattr(self, f"fallback_{kind}")
        ]
        return text + (f"; fallback: {', '.join(fallbacks)}" if fallbacks else "")


#: evictor fields that set the usual floors (named in budget errors as what to lower)
FLOOR_KEYS = ("sinks", "window")


def floor_hint(evictor: Any) -> str:
    """`` or lower sinks/window``: the evictor's parameters that set its floor, for budget error messages."""
    names = [k for k in FLOOR_KEYS if k in {f.name for f in dataclasses.fields(evictor)}]
    return f" or lower {'/'.join(names)}" if names else ""


def parse_pairs(text: str, source: str) -> dict[str, str]:
    """``k=v,k=v`` into a dict of strings (empty items are skipped)."""
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, item, "expected key=value pairs separated by commas", source)
        values[key.strip()] = value
    return values


# ---- config files ----------------------------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict:
    """The mapping a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file holds. Only regular files of at most
    `MAX_FILE_BYTES`, in UTF-8; YAML aliases and duplicate keys (YAML, JSON) are refused."""
    path = Path(path)
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError("(file)", source, "unsupported config file type: use .yaml, .yml, .toml or .json", None)
    try:
        # Never open a FIFO or a device (that would block or read forever): look first, then read a bounded amount.
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ConfigError("(file)", source, f"is {kind}; give a config file", None)
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("(file)", source, f"cannot be read: {exc.strerror or exc}", None) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            "(file)", source, f"is larger than {MAX_FILE_BYTES // 1024} KiB; a config is a few keys", None
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("(file)", source, f"is not UTF-8 text (byte {exc.start})", None) from None
    try:
        if suffix in (".yaml", ".yml"):
            data = _load_yaml(text, source)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import json

            data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, source))
    except SqueezekitError:
        raise
    except RecursionError:
        raise ConfigError("(file)", source, f"is not valid {suffix[1:].upper()}: nested too deeply", None) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("(file)", source, f"is not valid {suffix[1:].upper()}: {first}", None) from None
    return data


def _no_duplicates(pairs: list[tuple[Any, Any]], source: str) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(str(key), NO_VALUE, "is given twice; give each key once", source)
        out[key] = value
    return out


def _load_yaml(text: str, source: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load, refusing aliases (a few bytes of nested aliases expand to gigabytes) and duplicate keys."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(
                    "(file)", source, f"uses a YAML alias (line {event.start_mark.line + 1}); write values out", None
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            mapping = super().construct_mapping(node, deep=deep)
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(str(key), NO_VALUE, f"is given twice (line {line}); give each key once", source)
                seen.add(key)
            return mapping

    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:  # its str() spans several lines: keep the problem and where
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError("(file)", source, f"is not valid YAML: {where}{exc.problem or exc.context}", None) from None
    return {} if data is None else data

"""Every error squeezekit raises on purpose. Each renders as one line a user can act on.

docs/errors.md lists each case with its exact message and the test that guards it.
"""

from __future__ import annotations


class SqueezekitError(Exception):
    """Base class: a documented, one-line error (never an unexplained traceback)."""

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


#: `ConfigError`'s value when there is none to show (a command-line flag given without a value)
NO_VALUE = object()
#: the most characters of a value or key an error message shows
SHOW_LIMIT = 80


def shown(value: object, limit: int = SHOW_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 50 MB value must not make a 50 MB message)."""
    text = repr(value[: limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, limit: int = SHOW_LIMIT) -> str:
    """``text`` as is when printable and short, else its escaped, cut ``repr`` (no control characters reach a
    terminal)."""
    return text if text.isprintable() and len(text) <= limit else shown(text, limit)


class ConfigError(SqueezekitError, ValueError):
    """A configuration key is unknown, mistyped or out of range.

    The message names the key path (with its source, e.g. ``run.yaml: budget``), the value and the accepted range.
    """

    def __init__(self, key: str, value: object, accepted: str, source: str | None = None):
        self.key, self.value, self.accepted, self.source = key, value, accepted, source
        where = f"{printable(source, 200)}: {printable(key)}" if source else printable(key)
        value_text = "" if value is NO_VALUE else f" = {shown(value)}"
        super().__init__(f"config error: {where}{value_text}: {accepted}")


class UnknownPluginError(ConfigError):
    """An allocator or evictor name that no installed plugin provides."""

    def __init__(
        self, kind: str, name: object, installed: list[str], source: str | None = None, key: str | None = None
    ):
        import difflib

        near = difflib.get_close_matches(str(name), installed, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        accepted = f"unknown {kind}; installed: {', '.join(sorted(installed)) or '(none)'}{hint}"
        super().__init__(key or kind, name, accepted, source)


class CommandLineError(SqueezekitError):
    """A command-line argument argparse itself rejects (missing, not a choice, wrong type)."""


class BudgetError(SqueezekitError, ValueError):
    """A budget that cannot be honoured for a prompt. No longer raised: a prompt too short for its budget is kept
    whole (docs/errors.md, "Not errors"); the class stays for code that catches it."""


class PluginError(SqueezekitError, RuntimeError):
    """A plugin failed to load, raised, or broke the hook contract. Names the plugin and its package."""

    def __init__(self, plugin: str, origin: str, problem: str):
        self.plugin, self.origin, self.problem = plugin, origin, problem
        super().__init__(f"plugin {plugin!r} from {origin}: {problem}")


class UntestedVersionWarning(UserWarning):
    """transformers is outside the range squeezekit was tested with (see squeezekit/transformers_api.py)."""


class PluginFallbackWarning(UserWarning):
    """A plugin failed during a run and the config's ``fallback_allocator`` / ``fallback_evictor`` took over."""


class UnsupportedModelError(SqueezekitError, TypeError):
    """The model's architecture, dtype or device cannot be served."""


class InputError(SqueezekitError, ValueError):
    """Bad inputs to a compressed forward / generate call (an all-padding row, too long), or a
    ``compress`` block misused (nested on one model)."""

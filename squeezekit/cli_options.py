"""What every ``squeezekit`` command line shares: the config flags (derived from `squeezekit.config.keys`, so a
plugin's parameters get real flags), one-line argument errors, and checked argument types.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .config import Config

from .errors import NO_VALUE, CommandLineError, ConfigError, shown

SOURCE = "command line"


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default (unless its help already does) and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        # (by identity: 0 and 0.0 equal False, and are defaults worth showing)
        if "%(default)" in text or "default" in text or any(default is v for v in (None, argparse.SUPPRESS, False)):
            return text
        if default in ([], ""):
            return text
        if action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(argparse.HelpFormatter._fill_text(self, part, width, indent) for part in text.split("\n\n"))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line `CommandLineError`s (printed by `squeezekit.cli.main`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{message} (see {self.prog} --help)")


# ---- checked argument types (argparse reports their ValueError/TypeError as one line) --------------------------------
def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (argparse reports a bad value as ``invalid integer >= low value``)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_between(low: int, high: int, unit: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (a huge value would hang or crash what it sizes: documents to
    allocate, threads); ``unit``: what it counts, for the message above ``high``."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"at most {high} {unit}, got {shown(text)}")
        return value

    parse.__name__ = at_least.__name__  # (argparse names it in "invalid integer >= 1 value")
    return parse


def threads_option() -> Callable[[str], int]:
    """``--threads``: torch's CPU threads, at most this machine's cores (torch crashes on a huge count)."""
    return int_between(1, os.cpu_count() or 1, "threads (this machine's cores)")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    import math

    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


non_negative_float.__name__ = "number >= 0"


def text_file(text: str) -> Path:
    """An existing, readable regular file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{shown(text)} is {'a directory' if path.is_dir() else 'not a file'}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{shown(text)} cannot be read")
    return path


def model_dir(text: str) -> Path:
    """A local Hugging Face model directory (with a config.json)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a directory (squeezekit loads local models only)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{shown(text)} has no config.json: not a Hugging Face model directory")
    return path


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model DIR``, the local model a command runs (the embedded default when it is not given)."""
    parser.add_argument(
        "--model",
        metavar="DIR",
        type=model_dir,
        help="a local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)",
    )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where a command runs its model (checked by `squeezekit.devices.resolve`)."""
    parser.add_argument(
        "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="the model's weights and activations (default: bfloat16 on CUDA, float32 on the CPU)",
    )


def plot_path(text: str) -> Path:
    """Where to write a plot: a file ending in .png, .pdf or .svg (a name without a suffix gets .png)."""
    path = Path(text)
    if text.endswith(os.sep) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(text)} is a directory; give a file name such as layers.png")
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise argparse.ArgumentTypeError(f"{shown(text)}: plots are written as .png, .pdf or .svg")
    return path


# ---- the config flags ------------------------------------------------------------------------------------------------
def add_config_flags(parser: argparse.ArgumentParser, only: str | None = None) -> None:
    """The config schema as flags: ``--config FILE``, one flag per config key of squeezekit and of every installed
    plugin (``--window 4``; a parameter named like one of the command's own options is reachable through --set), and
    ``--set KEY=VALUE`` for any key. ``only="evictor"``: the evictor and its parameters alone (``calibrate``)."""
    from .config import keys

    what = "the evictor and its parameters" if only else "the keys of config files and lm-eval model_args"
    group = parser.add_argument_group("compression config", f"{what}; a plugin's parameters are flags too")
    taken = {o for action in parser._actions for o in action.option_strings}
    group.add_argument("--config", metavar="FILE", type=text_file, help="YAML, TOML or JSON file with config keys")
    for key in keys(only).values():
        flag = f"--{key.name.replace('_', '-')}"
        if flag in taken:
            continue
        owners = f"[{', '.join(key.plugins)}] " if key.plugins else ""
        help_text = f"{owners}{key.help}".strip() or f"parameter of {', '.join(key.plugins)}"
        metavar = key.metavar
        if key.choices:
            help_text += f"; one of: {', '.join(str(c) for c in key.choices)}"
        group.add_argument(
            flag, dest=f"config:{key.name}", metavar=metavar, help=f"{help_text} (default: {key.default or 'unset'})"
        )
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. --set p=0.5"
    )


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given on the command line: ``--config FILE`` first, then flags and ``--set`` (text)."""
    from .config import Config

    values: dict[str, Any] = Config.from_file(args.config).as_dict() if getattr(args, "config", None) else {}
    for dest, value in vars(args).items():
        if dest.startswith("config:") and value is not None:
            values[dest[len("config:") :]] = value
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. --set kernel_size=5", SOURCE)
        values[key.strip()] = value
    return values


def config_from_args(args: argparse.Namespace) -> Config:
    """Merge ``--config FILE``, then flags, into one validated Config (flags win)."""
    from .config import Config

    # Values from flags are text; those from the file are typed already.
    return Config.from_mapping(config_values(args), source=SOURCE, text=True)


def unknown_option(parser: argparse.ArgumentParser, extra: list[str]) -> ConfigError:
    """The one-line `ConfigError` for a mistyped option (``--budgte 0.2``), naming the nearest valid one."""
    i = next(i for i, item in enumerate(extra) if item.startswith("-"))
    flag, sep, text = extra[i].partition("=")
    value: object = text
    if not sep:
        value = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else NO_VALUE
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    near = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f"; see {parser.prog} --help"
    return ConfigError(flag, value, f"unknown option of {parser.prog!r}{hint}", SOURCE)

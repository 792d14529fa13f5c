"""The ``squeezekit`` command line: ``generate``, ``eval``, ``bench``, ``plugins``, ``config check``."""

from __future__ import annotations

import argparse
import sys

from .errors import SqueezekitError

#: config keys that have a CLI flag of their own (all others: --set KEY=VALUE)
FLAG_KEYS = ("allocator", "evictor", "budget", "p", "sinks", "window", "heavy_ratio", "fallback_allocator", "fallback_evictor")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The config schema as CLI flags: --config FILE, one flag per core key, --set KEY=VALUE for plugin keys."""
    group = parser.add_argument_group("compression config (same keys as config files and lm-eval model_args)")
    group.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with config keys")
    for key in FLAG_KEYS:
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="VALUE", help=f"config key {key!r}")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other key (plugin parameters)")


def config_from_args(args: argparse.Namespace):
    """Merge --config FILE, then flags, into one validated Config (flags win)."""
    from .config import Config
    from .errors import ConfigError

    values = Config.from_file(args.config).as_dict() if args.config else {}
    text: dict[str, str] = {}
    for key in FLAG_KEYS:
        if getattr(args, key, None) is not None:
            text[key] = getattr(args, key)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. --set kernel_size=5", "command line")
        text[key.strip()] = value
    merged = {**values, **text}
    # Values from flags are text; those from the file are typed already.
    return Config.from_mapping(merged, source="command line", text=True)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import registry

    reg = registry()
    rows = [(p.name, p.kind, p.origin, p.doc) for p in reg.all()]
    widths = [max(len(r[i]) for r in rows + [("name", "kind", "from", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'kind':<{widths[1]}}  {'from':<{widths[2]}}  description")
    for name, kind, origin, doc in rows:
        print(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {origin:<{widths[2]}}  {doc}")
    for failure in reg.failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if reg.failures and args.strict else 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .config import Config

    config = Config.from_file(args.file)
    print(f"{args.file}: ok: {config.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeezekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed allocators and evictors, with their origin")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=_cmd_plugins)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a YAML/TOML/JSON config file")
    check.add_argument("file")
    check.set_defaults(func=_cmd_config_check)

    for register in _SUBCOMMANDS:
        register(sub)
    return parser


#: subcommands living in their own modules: each is a function(subparsers) that adds one parser
_SUBCOMMANDS: list = []


def _lazy_subcommands() -> None:
    try:
        from . import cli_generate

        _SUBCOMMANDS.append(cli_generate.register)
    except ImportError:
        pass
    from .evaluators import bench
    from .evaluators import cli as eval_cli

    _SUBCOMMANDS.append(bench.add_parser)
    _SUBCOMMANDS.extend(eval_cli.SUBCOMMANDS)


def unknown_option(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]):
    """The one-line `ConfigError` for a mistyped option (``--budgte 0.2``), naming the nearest valid one."""
    import difflib

    from .errors import NO_VALUE, ConfigError

    i = next(i for i, item in enumerate(extra) if item.startswith("-"))
    flag, sep, value = extra[i].partition("=")
    if not sep:
        value = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else NO_VALUE
    command = parser.prog
    options = [o for a in parser._actions for o in a.option_strings]
    for action in parser._actions:  # the subcommand's own options
        if isinstance(action, argparse._SubParsersAction) and getattr(args, "command", None) in action.choices:
            sub = action.choices[args.command]
            command = sub.prog
            options = [o for a in sub._actions for o in a.option_strings]
    near = difflib.get_close_matches(flag, [o for o in options if o.startswith("--")], n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f"; see {command} --help"
    return ConfigError(flag, value, f"unknown option of {command!r}{hint}", "command line")


def main(argv: list[str] | None = None) -> int:
    if not _SUBCOMMANDS:
        _lazy_subcommands()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra:
            if not any(item.startswith("-") for item in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            raise unknown_option(parser, args, extra)
        return int(args.func(args) or 0)
    except SqueezekitError as exc:
        print(f"squeezekit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("squeezekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

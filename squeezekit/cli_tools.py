"""``squeezekit plugins`` and ``squeezekit config check``: the registry and the config schema, without torch."""

from __future__ import annotations

import argparse
import sys


def add_plugins(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the installed allocators, evictors and head splits (bundled and third-party, loaded from the "
        "'squeezekit' entry-point group), with the package each comes from; kind is the config key that selects "
        "one. Plugins that failed to load are printed on stderr. SQUEEZEKIT_PLUGINS=name1,name2 loads only those "
        "entry points (never hiding the default head split)."
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load or is missing")
    parser.set_defaults(func=run_plugins)


def run_plugins(args: argparse.Namespace) -> int:
    from .registry import registry

    reg = registry()
    rows = [(p.name, p.kind, p.origin, p.doc) for p in reg.all()]  # (kind: the config key that selects it)
    widths = [max(len(r[i]) for r in [*rows, ("name", "kind", "from", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'kind':<{widths[1]}}  {'from':<{widths[2]}}  description")
    for name, kind, origin, doc in rows:
        print(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {origin:<{widths[2]}}  {doc}")
    problems = [*([reg.env_error] if reg.env_error else []), *reg.failures]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems and args.strict else 0


def add_config(parser: argparse.ArgumentParser) -> None:
    from .cli_options import Parser

    parser.description = "Configuration tools."
    sub = parser.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    check = sub.add_parser("check", help="validate a YAML, TOML or JSON config file and print what it configures")
    check.add_argument("file", help="the config file (.yaml, .yml, .toml or .json)")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from .config import Config

    config = Config.from_file(args.file)
    print(f"{args.file}: ok: {config.describe()}")
    return 0

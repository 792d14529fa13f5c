"""CLI subcommands backed by the evaluators (``squeezekit eval``); ``bench`` registers itself from squeezekit.cli."""

from . import eval_cli

#: functions(subparsers) that each add one subcommand
SUBCOMMANDS: list = [eval_cli.register]

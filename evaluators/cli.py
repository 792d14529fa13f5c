"""CLI subcommands backed by the evaluators (``squeezekit eval``, ``squeezekit bench``)."""

from . import eval_cli

#: functions(subparsers) that each add one subcommand; filled by the evaluator modules below
SUBCOMMANDS: list = [eval_cli.register]

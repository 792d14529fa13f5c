"""CLI subcommands backed by the evaluators (``squeezekit eval``, ``squeezekit bench``)."""

#: functions(subparsers) that each add one subcommand; filled by the evaluator modules below
SUBCOMMANDS: list = []

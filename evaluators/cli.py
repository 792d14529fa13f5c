"""CLI subcommands backed by the evaluators (``squeezekit eval``, ``squeezekit bench``)."""

#: functions(subparsers) that each add one subcommand; filled by the evaluator modules below
SUBCOMMANDS: list = []


def _bench(sub) -> None:
    from .bench import add_parser

    add_parser(sub)


SUBCOMMANDS.append(_bench)

"""The ``squeezekit`` command line. Its commands come from the ``register_commands`` hook (squeezekit's own from
squeezekit/commands.py, others from plugins); a command's options and code are imported only when it runs, so
``squeezekit --help`` and ``squeezekit plugins`` answer without importing torch.
"""

from __future__ import annotations

import sys
from typing import cast

from .cli_options import Parser, unknown_option
from .errors import PluginError, SqueezekitError

DESCRIPTION = (
    "Compress the KV cache of Hugging Face transformers models along two axes at once: how many tokens each layer "
    "keeps (a layer-budget allocator) and which tokens (a token evictor).\n\n"
    "Run `squeezekit COMMAND --help` for a command's options."
)


def build_parser(argv: list[str]) -> Parser:
    """The parser, with the options of the command ``argv`` names (only that command's module is imported)."""
    from .registry import registry

    commands = registry().commands
    parser = Parser(prog="squeezekit", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name in sorted(commands):
        command = commands[name]
        p = sub.add_parser(name, help=command.help, description=command.help[:1].upper() + command.help[1:] + ".")
        if name == chosen:
            try:
                command.add_to(p)
            except SqueezekitError:
                raise
            except Exception as exc:  # a plugin's command that cannot build its options
                problem = f"adding the command's options raised {type(exc).__name__}: {exc}"
                raise PluginError(name, command.origin, problem) from None
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            subparsers = next(a for a in parser._actions if a.dest == "command")
            command = cast("dict[str, Parser]", subparsers.choices)[args.command]
            if not any(item.startswith("-") for item in extra):
                command.error(f"unrecognized arguments: {' '.join(extra)}")
            raise unknown_option(command, extra)
        return int(args.func(args) or 0)
    except SqueezekitError as exc:
        print(f"squeezekit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("squeezekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `squeezekit plugins | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())

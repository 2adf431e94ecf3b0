"""The ``deepserve`` command. Each subcommand lives in its stage's ``cli`` module, which imports only
argparse at module level, so that ``deepserve serve`` never loads training code."""

from __future__ import annotations

import argparse
import importlib
import sys

# Kept in its own module so that `python -m deepserve.cli` (where this file is __main__) and the stages
# raise and catch the same class.
from deepserve.errors import CLIError

# command -> the stage module that adds it; each module exposes add_parser(subparsers).
COMMANDS = {
    "train": "deepserve.train.cli",
    "export": "deepserve.export.cli",
    "sign": "deepserve.export.sign_cli",
    "serve": "deepserve.serve.cli",
    "predict": "deepserve.clients.cli",
    "generate": "deepserve.clients.cli",
    "models": "deepserve.clients.cli",
    "defaults": "deepserve.defaults",  # used by `make serve`
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``command`` only the module that owns it: `deepserve serve` must not
    import training code, not even the train CLI."""
    parser = argparse.ArgumentParser(
        prog="deepserve",
        description="Train, export and serve classifiers, char-level LMs and seq2seq Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"deepserve {__import__('deepserve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"deepserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

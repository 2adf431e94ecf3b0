"""The ``deepserve`` command. Each subcommand lives in its stage's ``cli`` module, which imports only
argparse at module level, so that ``deepserve serve`` never loads training code."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> what it contributes; each module exposes add_parser(subparsers).
SUBCOMMAND_MODULES = (
    "deepserve.train.cli",  # train
    "deepserve.export.cli",  # export
    "deepserve.serve.cli",  # serve
    "deepserve.clients.cli",  # predict, generate, models
    "deepserve.defaults",  # defaults (used by `make serve`)
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepserve",
        description="Train, export and serve classifiers, char-level LMs and seq2seq Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"deepserve {__import__('deepserve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("deepserve"):
                continue  # stage not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

"""The `revnets` command: one subcommand per module (train, eval, predict, models, plot, analyze, ...).

Each command module defines `add_parser(subparsers)`, which registers its subcommand and sets
`func(args) -> int` as the parser default. Bad arguments end with one clear line and exit code 2.
"""
import argparse
import os
import sys

from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the subcommands' parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    value = int(text) if text.lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="revnets", description="Stable reversible residual networks.")
    parser.add_argument("--version", action="version", version=f"revnets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def _command_modules() -> list:
    from . import evaluate, generate, plot, predict, report, reproduce, train, zoo
    return [zoo, plot, evaluate, predict, reproduce, train, report, generate]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"revnets {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

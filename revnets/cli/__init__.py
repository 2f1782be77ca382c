"""The `revnets` command: one subcommand per module of this package (train, eval, predict, generate,
models, plot, analyze, reproduce).

Each command module defines `add_parser(subparsers)`, which registers its subcommand and sets
`func(args) -> int` as the parser default. Exit codes, for every command:

    0    done
    1    output into a closed pipe (e.g. `revnets models | head -1`)
    2    bad input: one line naming it, before anything is written
    3    a run stopped on a non-finite loss, gradient or weight (its files keep the last finite epoch)
    4    the disk is full: one line naming the file and the space it needs; the run's files stay in
         step and it resumes once there is room
    130  interrupted (Ctrl-C); a run says how to continue

`revnets --import MODULE COMMAND ...` imports MODULE (from the current directory or the Python
path; the current directory is on the path only while it is imported) before the command is
built, so the schemes and models it registers (`register_scheme`, `register_model`) are valid
names for every command. A module that raises or exits while being imported is exit code 2.
"""
import argparse
import importlib
import os
import sys
import textwrap

import torch

from .. import __version__
from ..files import DiskFull
from ..training import NonFiniteError

COMMANDS = ("models", "plot", "eval", "predict", "reproduce", "train", "analyze", "generate")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the subcommands' parsers inherit this class), and
    help text never wraps inside a hyphenated name (hamiltonian-74, a registered user-model-6)."""

    def __init__(self, *args, formatter_class: type = argparse.HelpFormatter, **kw):
        class Formatter(formatter_class):
            def _split_lines(self, text: str, width: int) -> list[str]:
                return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)
        super().__init__(*args, formatter_class=Formatter, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    value = int(text) if text.lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="revnets", description="Stable reversible residual networks.")
    parser.add_argument("--version", action="version", version=f"revnets {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: the schemes and models it registers become valid names "
                             "(repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def import_modules(argv: list[str]) -> None:
    """Import every `--import MODULE` of `argv`, with the current directory first on the path while
    they are imported and only then (a stray sklearn.py there is not imported for scikit-learn
    later); exit 2 if one fails or exits."""
    pre = Parser(prog="revnets", add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    names = pre.parse_known_args(argv)[0].imports
    if not names:
        return
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except SystemExit as e:  # sys.exit() in the user's module: it did not register anything
                pre.exit(2, f"revnets: error: --import {name}: the module exited (sys.exit({e.code!r})) while "
                            "being imported\n")
            except Exception as e:  # the user's module: any error it raises is the reason
                pre.exit(2, f"revnets: error: --import {name}: {type(e).__name__}: {e}\n")
    finally:
        sys.path.remove(cwd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import_modules(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    del args.imports  # imported above; not a setting of the command
    command = f"revnets {args.command}"
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"{command}: stopped: {e}", file=sys.stderr)
        return 3
    except DiskFull as e:
        print(f"{command}: stopped: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:
        print(f"{command}: {e or 'interrupted before anything was written'}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        reason = str(e).split("DefaultCPUAllocator: ")[-1].strip().splitlines()
        print(f"{command}: stopped: out of memory ({reason[0] if reason else type(e).__name__})", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: Python's, a device's or the CPU allocator's (a
    RuntimeError saying so)."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e)

"""The ``layerwise`` command: parses the subcommand and hands over to its module.

Only the chosen subcommand's module is imported, so ``layerwise simulate`` never pays for (or
needs) the torch that ``demo`` imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from layerwise import __version__
from layerwise.commands import UsageError

# (name, module, one-line help). To add a command, write layerwise/commands/<name>.py with
# add_arguments(parser) and run(args) -> int, and add its line here.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "layerwise.commands.demo", "train a small GPT in a local 4-process pipeline, check it"),
    ("partition", "layerwise.commands.partition", "balance a model's layers over pipeline stages and devices"),
    ("plan", "layerwise.commands.plan", "choose dp x tp x pp, schedule, ZeRO and recomputation for a model on a cluster"),
    ("simulate", "layerwise.commands.simulate", "simulate a pipeline schedule: time, bubble, memory"),
    ("train", "layerwise.commands.train", "train a model on local text in a pipeline, with checkpoints and resume"),
    ("swarm", "layerwise.commands.swarm", "train across peers that fail, join and leave (zenoh)"),
]


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits; we want one ``error:`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser(argv: Sequence[str]) -> _Parser:
    parser = _Parser(prog="layerwise", description="Pipeline-parallel training tools.")
    parser.add_argument("--version", action="version", version=f"layerwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # No top-level option takes a value, so the first bare word is the command.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, after one ``error:`` line)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = _parser(args_list).parse_args(args_list)
        except SystemExit as done:  # --help, --version
            return done.code if isinstance(done.code, int) else 0
        return int(args.run(args))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `layerwise simulate ... | head` closed stdout early: not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

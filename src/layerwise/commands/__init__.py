"""Subcommands of the ``layerwise`` CLI, one module each.

A command module provides ``add_arguments(parser)`` and ``run(args) -> int``, keeps heavy imports
(torch, matplotlib) inside ``run`` so that ``--help`` and the other commands stay fast and
torch-free, and is registered with one line in ``layerwise.cli.COMMANDS``.
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad input from the command line: printed as one ``error:`` line, exit status 2."""


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a message that says so."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0, with a message that says so."""
    return _whole_number(text, 0)

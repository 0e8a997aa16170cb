"""Subcommands of the ``layerwise`` CLI, one module each.

A command module provides ``add_arguments(parser)`` and ``run(args) -> int``, keeps heavy imports
(torch, matplotlib) inside ``run`` so that ``--help`` and the other commands stay fast and
torch-free, and is registered with one line in ``layerwise.cli.COMMANDS``.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the command line: printed as one ``error:`` line, exit status 2."""

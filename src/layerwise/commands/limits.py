"""Checks every command runs on its options before any real work (and before importing torch).

A bad combination must stop within a second with one ``error:`` line, not after minutes of
profiling or training, nor with a traceback from deep inside: each check here names the option
and what to do instead.
"""

from __future__ import annotations

import os

from layerwise.commands import UsageError
from layerwise.schedule.generators import chunks_per_rank, compute_actions

# Building, validating and simulating a schedule costs about 0.1-0.2 ms per action on a busy 2-core
# machine, and each pass of the simulator visits every rank, so many ranks cost more than many
# microbatches. Within these limits a schedule simulates in seconds; beyond them a command would
# run for minutes without output.
MAX_ACTIONS = 30_000
MAX_RANKS = 64


def model_stages(schedule: str, stages: int, chunks: int | None) -> int:
    """The model stages ``stages`` ranks hold under ``schedule`` (ranks x chunks per rank)."""
    return stages * chunks_per_rank(schedule, chunks)


def check_chunks(schedule: str, chunks: int | None) -> None:
    """``--chunks`` only means something for the interleaved schedule (ZB-V always has 2)."""
    if chunks is not None and schedule != "interleaved":
        fixed = " (zbv always holds 2 chunks per rank)" if schedule == "zbv" else ""
        raise UsageError(f"--chunks applies only to --schedule interleaved, not {schedule}{fixed}")


def check_depth(schedule: str, stages: int, chunks: int | None, layers: int, model: str) -> None:
    """Every model stage needs at least one layer."""
    n = model_stages(schedule, stages, chunks)
    if n <= layers:
        return
    per = chunks_per_rank(schedule, chunks)
    what = f"{stages} ranks x {per} chunks = {n} model stages" if per > 1 else f"{n} stages"
    most = layers // per
    hint = f"use --stages {most} or fewer" if most >= 1 else "use a model with more layers"
    if per > 1 and schedule == "interleaved" and layers >= stages:
        hint += f", or fewer --chunks (at most {layers // stages} with --stages {stages})"
    raise UsageError(
        f"cannot split {layers} layers into {what} (--stages {stages}, --schedule {schedule}, {model}): "
        f"every stage needs at least one layer; {hint}"
    )


def check_size(schedule: str, stages: int, microbatches: int, chunks: int | None) -> None:
    """Refuse schedules so large that building and simulating them would take minutes."""
    if stages > MAX_RANKS:
        raise UsageError(
            f"--stages {stages} is more than the {MAX_RANKS} pipeline ranks layerwise simulates in "
            "seconds: use fewer (the bubble depends on the ratio of stages to microbatches)"
        )
    n = compute_actions(schedule, stages, microbatches, chunks_per_rank(schedule, chunks))
    most = MAX_ACTIONS
    if schedule == "interleaved" and microbatches % stages:
        # the generator then searches for the shortest valid warm-up, validating each candidate
        most = MAX_ACTIONS // 6
    if n > most:
        raise UsageError(
            f"--stages {stages} x --microbatches {microbatches} with {schedule} is {n:,} actions to "
            f"schedule, more than the {most:,} that simulate in seconds: use fewer stages or "
            "microbatches (the bubble fraction depends on their ratio, so a smaller pair with the same "
            "ratio predicts the same bubble)"
        )


def check_output(path: str | None, option: str) -> None:
    """A file the command writes at the end must be writable now, not after minutes of work."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable")

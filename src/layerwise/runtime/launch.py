"""Start N CPU processes on 127.0.0.1, run a function in each, and never hang.

torchrun is the launcher for clusters; this one is for a laptop and for tests, where one call
should start the ranks, return their results, and on any failure stop every rank and say which
one failed first and why. (torch.multiprocessing.spawn would fit, but it only reports the first
exception it sees and can wait forever on a rank that hangs; we need the root cause and a bound.)

Results travel back as JSON files, never pickles.
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from .errors import PipelineError


class LaunchError(PipelineError):
    """A rank failed; ``rank`` is the one that failed first (the root cause)."""

    def __init__(self, message: str, rank: int | None) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, nprocs: int, port: int, folder: str, threads: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAYERWISE_STATE_DIR=folder,
    )  # fmt: skip
    from .malloc import keep_heap

    keep_heap()  # large buffers stay on the heap: no page faults on every microbatch (see malloc.py)
    import torch

    torch.set_num_threads(threads)
    code = 0
    try:
        result = fn(*args)
        with open(os.path.join(folder, f"result{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException as e:  # report any failure to the launcher, then exit non-zero
        record = {
            "rank": rank,
            "type": type(e).__name__,
            "message": str(e),
            "lost_peer": type(e).__name__ == "PeerLostError",
            "time": time.time(),
            "traceback": traceback.format_exc(),
        }
        with open(os.path.join(folder, f"error{rank}.json"), "w") as f:
            json.dump(record, f)
        code = 1
    if code == 0:  # os._exit skips exit hooks: let every rank finish its last collectives first
        from .distributed import shutdown

        shutdown()
    os._exit(code)  # skip interpreter teardown, which can block on a dead peer's socket


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    threads: int | None = None,
    timeout: float | None = None,
    grace: float = 10.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` processes and return each rank's (JSON) result.

    ``fn`` must be importable (defined at module level). On failure every rank is stopped within
    ``grace`` seconds of the first failure and :class:`LaunchError` names the failed rank and its
    stages. ``timeout`` bounds the whole run.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    folder = tempfile.mkdtemp(prefix="layerwise-")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, nprocs, port, folder, threads, args), daemon=True) for r in range(nprocs)]
    for p in procs:
        p.start()
    start = time.monotonic()
    first_fail: float | None = None
    try:
        while True:
            codes = [p.exitcode for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if first_fail is None and any(c not in (None, 0) for c in codes):
                first_fail = now
            if first_fail is not None and now - first_fail > grace:
                break
            if timeout is not None and now - start > timeout:
                first_fail = first_fail or now
                break
            time.sleep(0.02)
        timed_out = timeout is not None and time.monotonic() - start > timeout
        hung = [r for r, p in enumerate(procs) if p.exitcode is None]
        _stop(procs)
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return [_read_json(os.path.join(folder, f"result{r}.json")) for r in range(nprocs)]
        raise _failure(folder, codes, hung, timed_out, timeout)
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)
        # Shared-memory slots a failed rank left (see runtime/shm.py: they carry this run's name).
        from .shm import ROOT as shm_root

        for path in glob.glob(os.path.join(shm_root, os.path.basename(folder) + "-*")):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 3
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join(1)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _where(folder: str, rank: int) -> str:
    state = _read_json(os.path.join(folder, f"rank{rank}.json"))
    return state["where"] if isinstance(state, dict) and "where" in state else f"rank {rank}"


def _first_line(message: str, folder: str, rank: int) -> str:
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", message.splitlines()[0] if message else "")
    where = _where(folder, rank)
    return text if text.startswith(where) else f"{where}: {text}"


def _failure(folder: str, codes: list[int | None], hung: list[int], timed_out: bool, timeout: float | None) -> LaunchError:
    errors = [e for r in range(len(codes)) if (e := _read_json(os.path.join(folder, f"error{r}.json")))]
    killed = [r for r, c in enumerate(codes) if c is not None and c < 0 and r not in hung]
    lines: list[str] = []
    root: int | None = None
    # The root cause: a rank killed by a signal, else the earliest error that is not "lost a peer".
    primary = sorted((e for e in errors if not e["lost_peer"]), key=lambda e: e["time"])
    if killed:
        root = killed[0]
        sig = -int(codes[root] or 0)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        lines.append(f"{_where(folder, root)} died: killed by signal {sig} ({name})")
    elif primary:
        root = primary[0]["rank"]
        lines.append(f"{_where(folder, root)} failed: {primary[0]['type']}: {primary[0]['message']}")
    elif hung and errors:  # everyone else lost a peer: the rank that never answered is the cause
        root = hung[0]
        lines.append(
            f"{_where(folder, root)} hung: it stopped answering and the others gave up after the "
            "Pipeline(timeout=...) bound"
        )
    elif errors:
        first = min(errors, key=lambda e: e["time"])
        root = first["rank"]
        lines.append(f"{_where(folder, root)} failed: {first['type']}: {first['message']}")
    elif timed_out:
        lines.append(f"the run did not finish within timeout={timeout} s")
    else:
        bad = [r for r, c in enumerate(codes) if c not in (0, None)]
        root = bad[0] if bad else None
        if root is not None:
            lines.append(f"{_where(folder, root)} exited with code {codes[root]}")
    others = sorted((e for e in errors if e["rank"] != root), key=lambda e: e["rank"])
    if others:
        lines.append("then the other ranks stopped:")
        lines += [f"  {_first_line(e['message'], folder, e['rank'])}" for e in others]
    if hung:
        lines.append("stopped by the launcher (still running): " + ", ".join(_where(folder, r) for r in hung))
    return LaunchError("\n".join(lines), root)


def run(fn: Callable[..., Any], nprocs: int, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` as one pipeline rank per process, however the script was started.

    Under ``torchrun`` (or inside a rank we launched) this process already is a rank: call ``fn``
    and return its result. Started plainly (``python script.py``), start ``nprocs`` local CPU
    processes with :func:`launch` and return the list of their results.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return fn(*args)
    return launch(fn, nprocs, *args, **kwargs)

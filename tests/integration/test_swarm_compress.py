"""Compressed swarm runs (``--compress``) on local peers: they train, send fewer bytes, survive a kill.

Peers are real processes on 127.0.0.1, started once for the module. ``none`` stays bit-identical
to one process; the lossy modes are checked against it loosely (they are not meant to be equal).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from layerwise.swarm.compress import Compression
from layerwise.swarm.lossy_reference import compressed_reference
from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec

from .test_swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
STEPS = 4


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    local = LocalSwarm()
    local.name = f"compress-{os.getpid()}"
    try:
        for i in range(3):
            local.start(f"c{i}")
        yield local
    finally:
        local.close()


@pytest.fixture(scope="module")
def runs(swarm: LocalSwarm) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("none", "bf16", "int8", "int6", "int4", "lowrank"):
        with swarm.trainer(SPEC, 3, compress=Compression(mode=mode, rank=8)) as tr:
            tr.train(STEPS)
            out[mode] = {"losses": list(tr.losses), "params": tr.final_params(), "failures": list(tr.failures),
                         "bytes": sum(tr.node.bytes_by_kind.get(k, 0) for k in ("forward", "backward")),
                         "counts": tr.assignment.counts()}  # fmt: skip
    out["want"] = reference(SPEC, STEPS)
    return out


def test_none_stays_equal_to_one_process(runs: dict[str, Any]) -> None:
    want, losses = runs["want"]
    assert runs["none"]["losses"] == losses and max_diff(runs["none"]["params"], want) == 0.0


@pytest.mark.parametrize("mode, fewer, tol", [("bf16", 0.6, 0.01), ("int8", 0.4, 0.01), ("int6", 0.35, 0.02),
                                             ("int4", 0.3, 0.05), ("lowrank", 0.4, None)])  # fmt: skip
def test_compressed_runs_train_with_fewer_bytes(runs: dict[str, Any], mode: str, fewer: float,
                                                tol: float | None) -> None:  # fmt: skip
    want, losses = runs["want"]
    got = runs[mode]
    assert not got["failures"] and len(got["losses"]) == STEPS and all(math.isfinite(x) for x in got["losses"])
    assert got["bytes"] < fewer * runs["none"]["bytes"]  # whole messages: headers, meta, token ids included
    assert max_diff(got["params"], want) > 0.0  # it was compressed: not equal to one process
    if tol is not None:  # lowrank: a fixed projection loses most of each activation here (8 of 32 directions)
        assert all(abs(a - b) <= tol * b for a, b in zip(got["losses"], losses))


@pytest.mark.parametrize("mode", ["bf16", "int8", "int6", "int4", "lowrank"])
def test_compressed_runs_equal_the_same_codecs_in_one_process(runs: dict[str, Any], mode: str) -> None:
    """Bit for bit: the trainer forwards what peers encoded untouched, and error feedback advances once per step."""
    got = runs[mode]
    params, losses = compressed_reference(SPEC, STEPS, Compression(mode=mode, rank=8), got["counts"])
    assert got["losses"] == losses and max_diff(got["params"], params) == 0.0


def test_a_peer_killed_mid_step_of_a_compressed_run_loses_no_step(swarm: LocalSwarm, runs: dict[str, Any]) -> None:
    swarm.start("victim", "kill:forward:2:1")
    with swarm.trainer(SPEC, 4, compress=Compression(mode="int8")) as tr:
        tr.train(STEPS)
        committed = tr.committed_steps()
        failures = [(f.peer, f.phase, f.step, f.recovered_at is not None) for f in tr.failures]
    assert failures == [("victim", "forward", 2, True)]
    assert committed == [STEPS] * len(committed)
    _, losses = runs["want"]
    assert all(abs(a - b) <= 0.01 * b for a, b in zip(tr.losses, losses))


def test_bad_compress_and_relay_options_get_one_error_line() -> None:
    here = ["--listen", "tcp/127.0.0.1:1"]  # refused before any session opens on it
    bad = (["train", *here, "--compress", "int2"], ["train", *here, "--compress-rank", "0"],
           ["demo", "--compress", "fp8"],
           ["train", "--relay", "tcp/127.0.0.1:1", "--join", "tcp/127.0.0.1:2"], ["serve", "--relay", "localhost"],
           ["status", "--relay", "tcp/127.0.0.1:1", "--join", "tcp/127.0.0.1:2"], ["relay", "--listen", "nonsense"],
           ["relay"])  # fmt: skip
    for args in bad:
        proc = subprocess.run([sys.executable, "-m", "layerwise", "swarm", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, args

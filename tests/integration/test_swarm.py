"""A swarm of local peers over zenoh, trained against one process, with peers killed, hung and added.

Peers are real processes (``layerwise swarm serve``) on 127.0.0.1; the trainer runs in the test
process. Peers are started once and reused by the runs below, each run with its own trainer.
Every comparison is bit-for-bit (``max_diff == 0.0``) against one process that sums microbatch
gradients in the same order: no failure here changes which peer sums what for any parameter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from layerwise.swarm.errors import StageLost
from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.status import query_status
from layerwise.swarm.trainer import Trainer, TrainerOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
CHURN = SwarmSpec(width=32, heads=2, blocks=6, seq=16, batch_size=8, microbatches=4, schedule="1f1b")


def _free_port() -> int:
    for port in range(17400 + os.getpid() % 500, 18000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 17400-17999")


class LocalSwarm:
    """Peer processes of one swarm; every one of them is killed at the end."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"tcp/127.0.0.1:{self.port}"
        self.name = f"test-{os.getpid()}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, fault: str = "") -> None:
        env = dict(os.environ, LAYERWISE_SWARM_FAULT=fault)
        where = ["--join", self.endpoint] if self.procs else ["--listen", self.endpoint]
        cmd = [sys.executable, "-m", "layerwise", "swarm", "serve", "--swarm", self.name, "--name", name, *where]
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()  # SIGKILL also ends a SIGSTOPped process
        proc.wait(10)

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def trainer(self, spec: SwarmSpec, peers: int, **kw: Any) -> Trainer:
        opts = TrainerOptions(swarm=self.name, join=(self.endpoint,), min_peers=peers, wait_s=90, **kw)
        return Trainer(spec, opts)

    def close(self) -> None:
        for name in self.procs:
            self.kill(name)


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    local = LocalSwarm()
    try:
        for i in range(4):
            local.start(f"p{i}")
        yield local
    finally:
        local.close()


def _run(tr: Trainer, steps: int, hook: Any = None) -> tuple[list[Any], list[int]]:
    tr.train(steps, hook)
    return tr.final_params(), tr.committed_steps()


def test_four_peers_train_equal_to_one_process(swarm: LocalSwarm) -> None:
    with swarm.trainer(SPEC, 4) as tr:
        params, committed = _run(tr, 10)
        assert len(tr.assignment.stages) == 4 and not tr.failures
    want, losses = reference(SPEC, 10)
    assert committed == [10] * 4
    assert max_diff(params, want) == 0.0  # bit-identical: each stage sums microbatches in order
    assert tr.losses == losses
    full, _ = reference(SPEC, 10, microbatched=False)
    assert max_diff(params, full) < 1e-4  # full-batch sums in another order; Adam magnifies it


def test_a_copy_killed_while_it_applies_a_relayed_step_loses_nothing(swarm: LocalSwarm) -> None:
    """The copy's update runs in the background (trainer/copies.py): a peer that dies while applying
    one is noticed when the copy is next needed, replaced, and the run stays bit-identical."""
    swarm.start("c1", "kill:backup_apply:3:*")  # 5 peers, 5 stages: c1 holds one and copies another
    with swarm.trainer(SPEC, 5) as tr:
        params, committed = _run(tr, 6)
        failures = {f.peer: f for f in tr.failures}
    assert "c1" not in swarm.alive()
    assert failures["c1"].recovered_at is not None
    assert committed == [6] * len(committed)
    want, _ = reference(SPEC, 6)
    assert max_diff(params, want) == 0.0


@pytest.fixture(scope="module")
def churn(swarm: LocalSwarm) -> dict[str, Any]:
    """One 10-step run over 8 peers (8 layers, a stage each) in which four peers fail in turn."""
    faults = {"f1": "kill:forward:2:1", "f2": "kill:backward:4:2", "f3": "kill:commit:6:*", "f4": "stop:forward:8:0"}
    for name, fault in faults.items():
        swarm.start(name, fault)
    try:
        with swarm.trainer(CHURN, 8) as tr:
            started = time.monotonic()
            params, committed = _run(tr, 10)
            took = time.monotonic() - started
            failures = {f.peer: f for f in tr.failures}
    finally:
        swarm.kill("f4")  # stopped, not dead
    want, _ = reference(CHURN, 10)
    return {"params": params, "want": want, "committed": committed, "failures": failures, "took": took,
            "dead": [n for n in faults if n not in swarm.alive()]}  # fmt: skip


@pytest.mark.parametrize("peer,phase,step", [("f1", "forward", 2), ("f2", "backward", 4), ("f3", "commit", 6)])
def test_a_killed_peer_loses_no_step(churn: dict[str, Any], peer: str, phase: str, step: int) -> None:
    f = churn["failures"][peer]
    assert f.step == step and f.recovered_at is not None and f.phases[:1] == [f.phase]
    if peer == "f3":
        # f3 dies at step 6's commit. Each stage commits as soon as its own backwards are done, so
        # another stage f3 serves may still be in its backward then and notice the loss first.
        assert f.phases and set(f.phases) <= {"backward", "commit"}
    else:
        assert f.phase == phase
    # Detected by whichever came first: its liveliness token vanishing (left_at) or a request to it
    # failing (noticed_at); a peer that dies mid-commit is often noticed by the request first.
    detected = min(x for x in (f.left_at, f.noticed_at) if x is not None)
    assert f.recovered_at >= detected
    assert churn["committed"] == [10] * len(churn["committed"])  # every stage committed every step
    assert max_diff(churn["params"], churn["want"]) == 0.0


def test_a_hung_peer_is_dropped_after_the_lease(churn: dict[str, Any]) -> None:
    f = churn["failures"]["f4"]
    assert (f.phase, f.step) == ("forward", 8) and f.recovered_at is not None
    assert set(churn["dead"]) == {"f1", "f2", "f3", "f4"}
    assert max_diff(churn["params"], churn["want"]) == 0.0


def test_joining_peers_get_layers_or_a_copy_at_a_step_boundary(swarm: LocalSwarm, churn: dict[str, Any]) -> None:
    def hook(tr: Trainer, step: int) -> None:
        if step in (2, 4):  # j1 makes a fifth stage worth it (a 23% shorter step), j2 no sixth (2%)
            swarm.start(f"j{step // 2}")
            assert tr.membership.wait_for(4 + step // 2, 90), "the new peer did not join"
        if step == 3:  # `layerwise swarm status` sees the trainer and every peer
            got = query_status(swarm.name, [swarm.endpoint])
            assert got["trainer"]["step"] == 3 and len(got["trainer"]["stages"]) == len(tr.assignment.stages)
            assert "j1" in got["peers"] and all("spans" in p for p in got["peers"].values())

    # Declared (equal) speeds: a peer's block benchmark, taken while the others train, can measure a
    # newcomer slow enough on a loaded machine that the fifth stage is not worth it; this test is about
    # when and how a newcomer gets work, not about the measurement.
    with swarm.trainer(SPEC, 4, capacity="declared") as tr:
        params, committed = _run(tr, 6, hook)
        holders = [s.holder for s in tr.assignment.stages]
        copies = [s.copy for s in tr.assignment.stages]
    assert "j1" in holders and tr.rebalances == 1
    assert "j2" in copies and "j2" not in holders  # an idle peer takes a copy off a busy one
    assert committed == [6] * len(committed)
    assert max_diff(params, reference(SPEC, 6)[0]) == 0.0


def test_a_stage_lost_for_good_stops_with_a_clear_error_and_the_run_resumes(
    swarm: LocalSwarm, churn: dict[str, Any], tmp_path: Any
) -> None:
    span: Any = None

    def hook(tr: Trainer, step: int) -> None:
        nonlocal span
        if step == 3:  # a stage whose holder and copy are not the seed (the resumed run joins through it)
            span = next(s for s in tr.assignment.stages if "p0" not in (s.holder, s.copy))
            for name in (span.holder, span.copy):
                os.kill(swarm.procs[str(name)].pid, signal.SIGKILL)

    started = time.monotonic()
    opts = dict(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with swarm.trainer(SPEC, 4, **opts) as tr, pytest.raises(StageLost) as err:
        tr.train(6, hook)
    assert time.monotonic() - started < 60
    text = str(err.value)
    assert f"stage {span.stage} (layers {span.first}-" in text and "are both gone" in text
    assert f"checkpoint of step 2, run the trainer again with --resume {tmp_path}" in text
    with swarm.trainer(SPEC, 2, resume=str(tmp_path)) as tr:  # the peers left, from step 2 on
        params, committed = _run(tr, 6)
    assert committed == [6] * len(committed)
    assert max_diff(params, reference(SPEC, 6)[0]) == 0.0


def test_demo_prints_the_summary_as_json() -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "layerwise", "swarm", "demo", "--peers", "2", "--kill", "1", "--steps", "6",
           "--port", str(port), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["steps"] == 6 and s["lost_steps"] == 0 and s["max_param_diff"] == 0.0
    assert s["final_loss"] == s["reference_loss"]
    assert len(s["failures"]) == 1 and s["failures"][0]["detected_s"] <= s["failures"][0]["recovered_s"]


def test_bad_command_lines_get_one_error_line() -> None:
    here = ["--listen", "tcp/127.0.0.1:1"]  # refused before any session opens on it
    bad = (["train"], ["serve", "--join", "localhost"], ["demo", "--peers", "2", "--kill", "2"],
           ["serve", *here, "--speed", "0"], ["serve", *here, "--memory", "-1"], ["serve", *here, "--latency-ms", "-5"],
           ["serve", *here, "--bandwidth-mbit", "0"], ["serve", *here, "--lease-ms", "0"],
           ["train", *here, "--checkpoint-every", "2"], ["train", *here, "--resume", "/nonexistent"],
           ["train", *here, "--wait", "-1"], ["train", *here, "--schedule", "zbv"], ["train", *here, "--steps", "0"],
           ["demo", "--port", "99999"], ["demo", "--join", "-1"])  # fmt: skip
    for args in bad:
        proc = subprocess.run([sys.executable, "-m", "layerwise", "swarm", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr

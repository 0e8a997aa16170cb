"""Replicas of a stage, tied embeddings across stages and global gradient-norm clipping, in a swarm.

Peers are real processes (``layerwise swarm serve``) on 127.0.0.1, started once for the module.
``capacity="declared"`` gives every peer speed 1, so the assignment is known: peers sorted by
name, the first ``max_stages`` hold stages, the others are replicas of the slowest stage (the last
one here: two blocks and the head). Comparisons:

- against one process that sums each replica's microbatches apart and adds the sums in slot order
  (``reference(groups=...)``): bit-identical (``== 0.0``), failures included;
- against plain one-process training: within 1e-5 (replicas change the order of the sum);
- clipping and ties without replicas: bit-identical to plain one-process training with
  ``clip_grad_norm_`` and the tied GPT.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.trainer import Trainer
from layerwise.swarm.wire import Message

from .test_swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
TIED = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4, tie_embeddings=True,
                 max_grad_norm=0.5, schedule="1f1b")  # fmt: skip
STEPS = 6


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    local = LocalSwarm()
    try:
        for name in ("a0", "a1", "a2"):
            local.start(name)
        yield local
    finally:
        local.close()


def _groups(tr: Trainer) -> list[list[list[int]]]:
    """Per layer, the microbatch groups its stage's replicas summed, in slot order."""
    out = []
    for span in tr.assignment.stages:
        n = len(span.slots)
        out += [[[mb for mb in range(tr.spec.microbatches) if mb % n == r] for r in range(n)]] * span.count
    return out


def _states(tr: Trainer, peer: str, stage: int) -> list[torch.Tensor]:
    return tr.node.request(peer, Message("get_state", stage=stage, epoch=tr.epoch)).tensors


def _train(swarm: LocalSwarm, spec: SwarmSpec, peers: int, stages: int, **kw: Any) -> dict[str, Any]:
    with swarm.trainer(spec, peers, max_stages=stages, capacity="declared", **kw) as tr:
        tr.train(STEPS)
        spans = tr.assignment.stages
        replicas = {s.stage: [_states(tr, p, s.stage) for p in dict.fromkeys(s.slots)] for s in spans}
        return {"params": tr.final_params(), "committed": tr.committed_steps(), "groups": _groups(tr),
                "spans": spans, "replicas": replicas, "failures": list(tr.failures), "replayed": tr.replayed,
                "losses": tr.losses}  # fmt: skip


def test_a_spare_peer_becomes_a_replica_of_the_slowest_stage_and_the_run_equals_one_process(swarm: LocalSwarm) -> None:
    got = _train(swarm, SPEC, 3, 2)
    spans = got["spans"]
    assert [(s.holder, s.replicas, s.copy) for s in spans] == [("a0", (), "a1"), ("a1", ("a2",), None)]
    assert got["committed"] == [STEPS] * 3  # the holder of stage 0, and both replicas of stage 1
    for states in got["replicas"].values():  # every replica applied the same update
        assert all(torch.equal(a, b) for other in states[1:] for a, b in zip(states[0], other))
    want, losses = reference(SPEC, STEPS, groups=got["groups"])
    assert max_diff(got["params"], want) == 0.0  # bit-identical: the replicas' sums added in slot order
    assert got["losses"] == losses
    plain, _ = reference(SPEC, STEPS)
    assert 0.0 < max_diff(got["params"], plain) < 1e-5  # another order of the sum than one process's


def test_clipping_and_tied_embeddings_across_stages_equal_one_process(swarm: LocalSwarm) -> None:
    got = _train(swarm, TIED, 3, 3)
    assert len(got["spans"]) == 3 and all(not s.replicas for s in got["spans"])
    want, losses = reference(TIED, STEPS)  # the tied GPT with clip_grad_norm_, in one process
    assert max_diff(got["params"], want) == 0.0 and got["losses"] == losses
    first, last = got["params"][0], got["params"][-1]  # the tie's two copies: embedding and head
    assert first.shape == last.shape and torch.equal(first, last)
    unclipped, _ = reference(replace(TIED, max_grad_norm=0.0), STEPS)
    assert max_diff(got["params"], unclipped) > 1e-4  # the clipping did bite


def test_clipping_and_ties_with_a_replica(swarm: LocalSwarm) -> None:
    got = _train(swarm, TIED, 3, 2)
    assert got["spans"][1].replicas == ("a2",)
    want, _ = reference(TIED, STEPS, groups=got["groups"])
    assert max_diff(got["params"], want) == 0.0
    assert max_diff(got["params"], reference(TIED, STEPS)[0]) < 1e-5


def test_replicas_killed_mid_backward_and_mid_commit_lose_nothing(swarm: LocalSwarm) -> None:
    # spares in name order: a2 and z2 replicate stage 1 (slots a1, a2, z2: z2 runs microbatch 2),
    # z1 replicates stage 0 (slots a0, z1: z1 runs microbatches 1 and 3). No re-balance for speed
    # (it would deal the microbatches anew after z1's death: another order of the sum, within 1e-5)
    swarm.start("z1", "kill:backward:2:1")
    swarm.start("z2", "kill:commit:4:*")
    try:
        got = _train(swarm, SPEC, 5, 2, rebalance_threshold=1.0)
    finally:
        swarm.kill("z1")
        swarm.kill("z2")
    failures = {f.peer: f for f in got["failures"]}
    assert sorted(failures) == ["z1", "z2"] and all(f.recovered_at is not None for f in failures.values())
    assert (failures["z1"].phase, failures["z1"].step, failures["z1"].stages) == ("backward", 2, [0])
    assert (failures["z2"].phase, failures["z2"].step, failures["z2"].stages) == ("commit", 4, [1])
    assert got["replayed"] > 0  # z1's forwards of the step ran again on a0
    # a0 serves both slots of stage 0 and a1 two of stage 1, their sums kept apart
    assert [s.slots for s in got["spans"]] == [("a0", "a0"), ("a1", "a2", "a1")]
    assert got["committed"] == [STEPS] * 3  # a0; a1 and a2
    want, _ = reference(SPEC, STEPS, groups=got["groups"])
    assert max_diff(got["params"], want) == 0.0  # the same groups in the same order: bit-identical
    assert max_diff(got["params"], reference(SPEC, STEPS)[0]) < 1e-5


def test_bad_replica_clipping_and_tie_options_get_one_error_line() -> None:
    here = ["--listen", "tcp/127.0.0.1:1"]  # refused before any session opens on it
    for args in (["train", *here, "--max-grad-norm", "-1"], ["train", *here, "--max-grad-norm", "nan"],
                 ["train", *here, "--max-stages", "0"], ["demo", "--max-grad-norm", "inf"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "layerwise", "swarm", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, args

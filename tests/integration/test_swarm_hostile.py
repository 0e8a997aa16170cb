"""A swarm under hostile input: lying peers, a hostile sender, and a flood of idle TCP connections.

One swarm of local peer processes serves the module: three honest peers and six that lie in their
replies (NaN, wrong shapes, a stale step, random bytes, 4 MiB too many, and ``--fault corrupt:0.05``,
found only by spot checks). One run trains through all of them with every output spot-checked while a test
session sends hostile requests to an honest peer; it must end equal to one process, with every
liar banned and every hostile message refused and counted by its reason. A second run trains
while 150 idle TCP connections sit on the seed's port (they blocked new zenoh sessions for about
11 s with zenoh's defaults; the swarm's config frees their slots, see swarm/net.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zenoh

from layerwise.swarm.guard import Reason
from layerwise.swarm.net import config, peer_key
from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.wire import Message, decode_message, encode_message

from .test_swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
STEPS = 6
# liar39's seeded choice corrupts its 4th, 8th, 10th and 16th outputs (5% in the long run), so the
# test sees its ban within the first steps instead of after a random wait
LIARS = {"nan1": "nan:0.3", "shape1": "shape:0.3", "stale1": "stale:0.3", "junk1": "garbage:0.3",
         "big1": "oversized:0.3", "liar39": "corrupt:0.05"}  # fmt: skip
WANT_REASON = {"nan1": "nonfinite", "shape1": "bad_shape", "stale1": "replayed", "junk1": "garbage",
               "big1": "oversized", "liar39": "mismatch"}  # fmt: skip


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    local = LocalSwarm()
    try:
        for i, name in enumerate(["p0", "p1", "p2", *LIARS]):
            where = ["--join", local.endpoint] if i else ["--listen", local.endpoint]
            fault = ["--fault", LIARS[name]] if name in LIARS else []
            cmd = [sys.executable, "-m", "layerwise", "swarm", "serve", "--swarm", local.name, "--name", name,
                   "--max-message-mib", "2", *where, *fault]  # fmt: skip
            local.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield local
    finally:
        local.close()


def _hostile(endpoint: str, swarm: str, peer: str, stage: int, step: int, epoch: int) -> dict[str, str]:
    """Send one hostile request of each kind to ``peer`` (holder of ``stage``); the error each got back."""
    rows = SPEC.batch_size // SPEC.microbatches
    x = torch.randn(rows, SPEC.seq, SPEC.width)
    nan = x.clone()
    nan[0, 1, 2] = float("nan")
    fwd = encode_message(Message("forward", step, stage, 0, epoch, {"weight": 0.25}, [x]))
    sent = {
        "garbage": b"\x00\x01 not a layerwise message at all" * 4,
        "truncated": fwd[: len(fwd) // 2],
        "oversized": fwd + bytes(3 << 20),  # the peers refuse messages over 2 MiB
        "replayed": encode_message(Message("forward", step - 1, stage, 0, epoch, {"weight": 0.25}, [x])),
        "out_of_order": encode_message(Message("forward", step + 3, stage, 0, epoch, {"weight": 0.25}, [x])),
        "wrong_stage": encode_message(Message("forward", step, 99, 0, epoch, {"weight": 0.25}, [x])),
        "nonfinite": encode_message(Message("forward", step, stage, 0, epoch, {"weight": 0.25}, [nan])),
        "bad_shape": encode_message(Message("forward", step, stage, 0, epoch, {"weight": 0.25}, [x[:, :3]])),
    }
    got: dict[str, str] = {}
    with zenoh.open(config(connect=[endpoint])) as session:
        time.sleep(0.5)
        for name, data in sent.items():
            replies = list(session.get(peer_key(swarm, peer), payload=data, timeout=20.0,
                                       congestion_control=zenoh.CongestionControl.BLOCK))  # fmt: skip
            assert replies and replies[0].ok is not None, f"{peer} did not answer the {name} message"
            reply = decode_message(replies[0].ok.payload.to_bytes(), peer)
            got[name] = reply.kind + ": " + str(reply.meta.get("error", ""))
    return got


@pytest.fixture(scope="module")
def hostile_run(swarm: LocalSwarm) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def hook(tr: Any, step: int) -> None:
        if step == 2:  # an honest holder gets one hostile request of each kind, mid-run
            span = next(s for s in tr.assignment.stages if s.holder.startswith("p") and s.stage > 0)
            out["target"] = span.holder
            out["answers"] = _hostile(swarm.endpoint, swarm.name, span.holder, span.stage, step, tr.epoch)

    with swarm.trainer(SPEC, 3 + len(LIARS), spot_check=1.0) as tr:
        tr.train(STEPS, hook)
        out["params"], out["committed"] = tr.final_params(), tr.committed_steps()
        out["status"] = tr.status()
        out["target_status"] = tr.node.request(out["target"], Message("status")).meta
        out["holders"] = [(s.holder, s.copy) for s in tr.assignment.stages]
    out["want"], _ = reference(SPEC, STEPS)
    return out


def test_every_lying_peer_is_banned_and_the_run_equals_one_process(hostile_run: dict[str, Any]) -> None:
    st = hostile_run["status"]
    bans = {b["peer"]: b for b in st["bans"]}
    assert set(bans) == set(LIARS)
    for peer, reason in WANT_REASON.items():
        # a mismatch the trainer confirmed itself bans at once; the other reasons after two strikes
        assert bans[peer]["reason"] == reason and st["rejected"].get(reason, 0) >= (1 if reason == "mismatch" else 2)
        assert bans[peer]["confirmed"] == (reason == "mismatch")
        assert st["peers"][peer]["banned"] and not st["peers"][peer]["probation"]
    assert all(p in ("p0", "p1", "p2") for pair in hostile_run["holders"] for p in pair if p is not None)
    assert hostile_run["committed"] == [STEPS] * len(hostile_run["committed"])  # no step lost
    diff = max_diff(hostile_run["params"], hostile_run["want"])
    print(f"max parameter difference against one process: {diff}; rejected: {st['rejected']}")
    assert diff <= 1e-5
    assert st["spot_checks"]["checks"] > 0 and st["spot_checks"]["mismatches"] >= 1
    assert st["spot_checks"]["confirmed"] >= 1


def test_hostile_requests_are_refused_with_named_reasons_and_change_nothing(hostile_run: dict[str, Any]) -> None:
    answers = hostile_run["answers"]
    assert all(a.startswith("error: ") for a in answers.values()), answers
    counted = hostile_run["target_status"]["rejected"]
    for reason in answers:
        assert counted.get(reason, 0) >= 1, (reason, counted)
    assert set(answers) <= {r.value for r in Reason}
    assert max_diff(hostile_run["params"], hostile_run["want"]) <= 1e-5  # the run did not notice


def test_a_flood_of_idle_connections_does_not_block_a_new_trainer(swarm: LocalSwarm, hostile_run: Any) -> None:
    for name in LIARS:  # the next trainer would have to find them out again
        swarm.kill(name)
    host, port = swarm.endpoint.split("/")[1].rsplit(":", 1)
    socks = [socket.create_connection((host, int(port))) for _ in range(150)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        with swarm.trainer(SPEC, 3) as tr:
            tr.train(2)
            params = tr.final_params()
        took = time.monotonic() - started
    finally:
        for s in socks:
            s.close()
    print(f"a trainer joined and trained 2 steps in {took:.1f} s with 150 idle connections on the seed")
    assert max_diff(params, reference(SPEC, 2)[0]) == 0.0


def test_bad_trust_options_get_one_error_line() -> None:
    here = ["--listen", "tcp/127.0.0.1:1"]  # refused before any session opens on it
    bad = (["serve", *here, "--fault", "flip:0.1"], ["serve", *here, "--fault", "corrupt:0"],
           ["serve", *here, "--max-message-mib", "0.01"], ["train", *here, "--spot-check", "1.5"],
           ["train", *here, "--ban-after", "0"])  # fmt: skip
    for args in bad:
        proc = subprocess.run([sys.executable, "-m", "layerwise", "swarm", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, args

"""Spot checks against a peer that corrupts 5% of its outputs, and what 5% checking costs.

(a) Detection: a seed, three honest peers and one with ``--fault corrupt:0.05``; the trainer
    checks 5% of outputs (``spot_check=0.05``, probation after one mismatch, ban after two). Each
    trial runs a fresh trainer until the liar is banned (or ``max_steps``): ``steps_to_ban`` and
    ``detection_rate`` (corrupted outputs caught / corrupted outputs sent until the ban, the peer's
    own count: at most ``ban_after`` are caught, the rest went into training unseen).
(b) Overhead: four honest peers, runs without checks and with 5% checks alternated; median step
    time (first step of each run left out): ``overhead`` = with / without - 1.

Expected at 5% checking: a liar holding one middle stage sends 2 x microbatches outputs a step, so
before probation a corruption is caught with probability 0.05 per corrupted output and the first
catch comes after about 1 / (2 m * 0.05 * 0.05) steps (50 for m = 4), then every output is checked.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from layerwise.swarm.local import LocalPeers
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.trainer import Trainer, TrainerOptions
from layerwise.swarm.wire import Message

SPEC = SwarmSpec(width=64, heads=4, blocks=4, seq=32, batch_size=8, microbatches=4)
LIAR = "liar"


class _Stop(Exception):
    pass


def _trainer(peers: LocalPeers, count: int, **kw: Any) -> Trainer:
    return Trainer(SPEC, TrainerOptions(swarm=peers.swarm, join=(peers.endpoint,), min_peers=count, wait_s=180,
                                        capacity="declared", **kw))  # fmt: skip


def _tampered(tr: Trainer) -> int:
    return int(tr.node.request(LIAR, Message("status"), 20.0).meta["tampered"])


def detection(port: int, trials: int, max_steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": [], "max_steps": max_steps}
    with LocalPeers(f"spot-{os.getpid()}", f"tcp/127.0.0.1:{port}") as peers:
        peers.start_seed()
        for i in range(3):
            peers.start(f"h{i}")
        peers.start(LIAR, ["--fault", "corrupt:0.05"])
        for _ in range(trials):
            with _trainer(peers, 4, spot_check=0.05) as tr:
                before = None
                role: list[str] = []

                def hook(t: Trainer, step: int) -> None:
                    nonlocal before
                    if before is None:
                        before = _tampered(t)
                        role.extend(f"{'holder' if s.holder == LIAR else 'copy'} of stage {s.stage}"
                                    for s in t.assignment.stages if LIAR in (s.holder, s.copy))  # fmt: skip
                    if t.trust.banned(LIAR):
                        raise _Stop

                try:
                    tr.train(max_steps, hook)
                except _Stop:
                    pass
                sent = _tampered(tr) - (before or 0)
                caught = tr.trust.ledger.strikes.get(LIAR, 0)
                ban = next((b for b in tr.trust.ledger.bans if b["peer"] == LIAR), None)
                out["trials"].append({"steps_to_ban": None if ban is None else ban["step"] + 1,
                                      "steps_run": len(tr.losses), "corrupted": sent, "caught": caught,
                                      "probation_step": tr.trust.ledger.probation.get(LIAR),
                                      "checks": dict(tr.trust.stats),
                                      "liar_role": role})  # fmt: skip
    trials_ = out["trials"]
    banned = [t["steps_to_ban"] for t in trials_ if t["steps_to_ban"] is not None]
    out["banned"] = f"{len(banned)}/{len(trials_)}"
    out["steps_to_ban"] = statistics.median(banned) if banned else None
    corrupted = sum(t["corrupted"] for t in trials_)
    out["detection_rate"] = sum(t["caught"] for t in trials_) / corrupted if corrupted else None
    out["banned_within_20"] = sum(1 for s in banned if s <= 20)
    out["steps_to_ban_all"] = [t["steps_to_ban"] for t in trials_]
    return out


def overhead(port: int, pairs: int, steps: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"off": [], "on": []}
    with LocalPeers(f"spot-oh-{os.getpid()}", f"tcp/127.0.0.1:{port}") as peers:
        peers.start_seed()
        for i in range(4):
            peers.start(f"h{i}")
        for _ in range(pairs):
            for mode, p in (("off", 0.0), ("on", 0.05)):
                with _trainer(peers, 4, spot_check=p) as tr:
                    tr.train(steps)
                    times[mode].append(statistics.median(t for _, _, t in tr.step_times[1:]))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"step_s_without": off, "step_s_with_5pct": on, "overhead": on / off - 1.0, "runs": times}


def run(quick: bool) -> dict[str, Any]:
    port = 18500 + os.getpid() % 300
    started = time.monotonic()
    det = detection(port, trials=1 if quick else 12, max_steps=6 if quick else 150)
    oh = overhead(port + 1, pairs=1 if quick else 4, steps=3 if quick else 30)
    return {"detection_rate": det["detection_rate"], "steps_to_ban": det["steps_to_ban"], "banned": det["banned"],
            "banned_within_20_steps": det["banned_within_20"], "steps_to_ban_each": det["steps_to_ban_all"],
            "overhead": oh["overhead"], "step_s_without": oh["step_s_without"],
            "step_s_with_5pct": oh["step_s_with_5pct"], "spot_check": 0.05, "fault": "corrupt:0.05",
            "microbatches": SPEC.microbatches, "detection": det, "overhead_runs": oh["runs"],
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip

"""Spot checks against a peer that corrupts 5% of its outputs, and what 5% checking costs.

(a) A liar from the start: a seed, three honest peers and one with ``--fault corrupt:0.05``; the
    trainer checks 5% of outputs (``spot_check=0.05``), every output of a peer that has not yet
    passed ``probation_checks`` (90) checks, bans at once on a mismatch it confirmed by recomputing
    the output itself, and after two plain strikes. Each trial runs a fresh trainer (every peer is
    new to it) until the liar is banned (or ``max_steps``): ``steps_to_ban`` and ``detection_rate``
    (corrupted outputs caught / corrupted outputs sent until the ban, the peer's own count).
(b) A liar that earns trust first: the same with ``--fault corrupt:0.05@AFTER``, honest until step
    AFTER (after its probation), then lying; steps to ban counted from AFTER. Only the 5% sample
    finds it now: expected first catch after 1 / (checked outputs a step x 0.05) steps (below).
(c) Overhead: four honest peers, runs without checks and with 5% checks alternated; ``overhead``:
    median step time once every peer has earned trust (first step left out) over the median
    without checks, minus 1; ``probation_overhead`` the same for the steps with peers on
    probation, and ``whole_run_overhead`` the total time of the ``steps``-step runs.

Expected for (b): a liar holding a middle stage sends 2 x microbatches outputs a step (8 for m = 4),
each checked with probability 0.05, and as a copy it answers the checks of one stage's outputs
(8 x 0.05 a step), all compared: 0.8 checked outputs a step, each corrupted with probability
0.05, so a first catch (and with it the ban) comes after about 1 / 0.04 = 25 steps (the median of
that geometric wait is 17 steps; 20 steps are reached by 1 - 0.96^20 = 56% of runs).
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
AFTER = 15  # the step the trusted liar turns bad at (its probation ends by about step 7)


class _Stop(Exception):
    pass


def _trainer(peers: LocalPeers, count: int, **kw: Any) -> Trainer:
    return Trainer(SPEC, TrainerOptions(swarm=peers.swarm, join=(peers.endpoint,), min_peers=count, wait_s=180,
                                        capacity="declared", **kw))  # fmt: skip


def _tampered(tr: Trainer) -> int:
    return int(tr.node.request(LIAR, Message("status"), 20.0).meta["tampered"])


def detection(port: int, trials: int, max_steps: int, after: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": [], "max_steps": max_steps, "lies_from_step": after}
    fault = f"corrupt:0.05@{after}" if after else "corrupt:0.05"
    with LocalPeers(f"spot-{os.getpid()}-{after}", f"tcp/127.0.0.1:{port}") as peers:
        peers.start_seed()
        for i in range(3):
            peers.start(f"h{i}")
        peers.start(LIAR, ["--fault", fault])
        for _ in range(trials):
            with _trainer(peers, 4, spot_check=0.05) as tr:
                before = None
                role: list[str] = []
                trusted_at: list[int] = []

                def hook(t: Trainer, step: int) -> None:
                    nonlocal before
                    if before is None:
                        before = _tampered(t)
                        role.extend(f"{'holder' if s.holder == LIAR else 'copy'} of stage {s.stage}"
                                    for s in t.assignment.stages if LIAR in (s.holder, s.copy))  # fmt: skip
                    if not trusted_at and not t.trust.on_probation(LIAR) and not t.trust.banned(LIAR):
                        trusted_at.append(step)
                    if t.trust.banned(LIAR):
                        raise _Stop

                try:
                    tr.train(max_steps, hook)
                except _Stop:
                    pass
                sent = _tampered(tr) - (before or 0)
                caught = tr.trust.ledger.strikes.get(LIAR, 0)
                ban = next((b for b in tr.trust.ledger.bans if b["peer"] == LIAR), None)
                out["trials"].append({"steps_to_ban": None if ban is None else ban["step"] + 1 - after,
                                      "confirmed": None if ban is None else ban["confirmed"],
                                      "steps_run": len(tr.losses), "corrupted": sent, "caught": caught,
                                      "trusted_at_step": trusted_at[0] if trusted_at else None,
                                      "checks": dict(tr.trust.stats), "liar_role": role})  # fmt: skip
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
    times: dict[str, list[float]] = {"off": [], "on": [], "probation": []}
    totals: dict[str, list[float]] = {"off": [], "on": []}
    probation_steps: list[int] = []
    with LocalPeers(f"spot-oh-{os.getpid()}", f"tcp/127.0.0.1:{port}") as peers:
        peers.start_seed()
        for i in range(4):
            peers.start(f"h{i}")
        for _ in range(pairs):
            for mode, p in (("off", 0.0), ("on", 0.05)):
                unproven: list[bool] = []

                def hook(t: Trainer, step: int) -> None:
                    unproven.append(any(t.trust.on_probation(peer) for peer in t.membership.snapshot()))

                with _trainer(peers, 4, spot_check=p) as tr:
                    tr.train(steps, hook)
                    per_step = [t for _, _, t in tr.step_times]
                totals[mode].append(sum(per_step))
                if mode == "off":
                    times["off"].append(statistics.median(per_step[1:]))
                    continue
                probation_steps.append(sum(unproven))
                trusted = [t for t, u in zip(per_step[1:], unproven[1:]) if not u]
                on_probation = [t for t, u in zip(per_step[1:], unproven[1:]) if u]
                if trusted:
                    times["on"].append(statistics.median(trusted))
                if on_probation:
                    times["probation"].append(statistics.median(on_probation))
    off = statistics.median(times["off"])
    on = statistics.median(times["on"]) if times["on"] else None
    prob = statistics.median(times["probation"]) if times["probation"] else None
    return {"step_s_without": off, "step_s_with_5pct": on, "overhead": None if on is None else on / off - 1.0,
            "step_s_on_probation": prob, "probation_overhead": None if prob is None else prob / off - 1.0,
            "probation_steps": probation_steps, "steps_per_run": steps,
            "whole_run_overhead": statistics.median(totals["on"]) / statistics.median(totals["off"]) - 1.0,
            "runs": times, "run_totals_s": totals}  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    port = 18500 + os.getpid() % 300
    started = time.monotonic()
    det = detection(port, trials=1 if quick else 16, max_steps=6 if quick else 60)
    late = detection(port + 2, trials=1 if quick else 16, max_steps=6 if quick else AFTER + 100,
                     after=2 if quick else AFTER)  # fmt: skip
    oh = overhead(port + 1, pairs=1 if quick else 4, steps=4 if quick else 60)
    return {"detection_rate": det["detection_rate"], "steps_to_ban": det["steps_to_ban"], "banned": det["banned"],
            "banned_within_20_steps": det["banned_within_20"], "steps_to_ban_each": det["steps_to_ban_all"],
            "trusted_liar_steps_to_ban": late["steps_to_ban"], "trusted_liar_banned": late["banned"],
            "trusted_liar_banned_within_20_steps": late["banned_within_20"],
            "trusted_liar_steps_to_ban_each": late["steps_to_ban_all"],
            "trusted_liar_detection_rate": late["detection_rate"], "trusted_liar_expected_steps": 25.0,
            "overhead": oh["overhead"], "step_s_without": oh["step_s_without"],
            "step_s_with_5pct": oh["step_s_with_5pct"], "probation_overhead": oh["probation_overhead"],
            "whole_run_overhead": oh["whole_run_overhead"], "overhead_steps_per_run": oh["steps_per_run"],
            "spot_check": 0.05, "fault": "corrupt:0.05", "probation_checks": 90,
            "microbatches": SPEC.microbatches, "detection": det, "trusted_liar": late, "overhead_runs": oh,
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip

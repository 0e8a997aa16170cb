"""Swarm mode under failures, churn, unequal peers and slow links, on this machine.

    python bench/swarm.py [--runs 20] [--quick]

(a) ``--runs`` runs of 4 peers, one random SIGKILL each at a random moment: completed runs, lost
    steps, the largest parameter difference against the failure-free result, detection and
    recovery times (from the kill).
(b) 4 equal peers, one killed: throughput in the 30 s after the failure as a fraction of a
    failure-free run on the 3 peers left (the capacity-ideal for them).
(c) two peers of emulated speed 1.0 and 0.5: spans from their capacity (as declared, and as
    measured) against blind (speed-1) spans.
(d) 4 peers behind 50 ms of one-way latency and 100 Mbit/s each (emulated in the peers), with the
    schedule simulator's prediction from request times measured without emulation.
(e) 2 stages, the second held by a peer of emulated speed 0.5 (spans as for equal peers): step
    time without a spare, with a spare of speed 0.5 as the slow stage's replica (the microbatches
    split between the two), and with the same 3 peers as a 3-stage pipeline instead.

Writes ``bench/results/swarm.json``. Peers are real processes on 127.0.0.1; a zenoh-only seed
process listens on the endpoint, so any peer may be killed. Timings on a shared 2-core machine
are noisy: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from layerwise.schedule.generators import build  # noqa: E402
from layerwise.schedule.simulate import Costs, simulate  # noqa: E402
from layerwise.swarm.local import LocalPeers  # noqa: E402
from layerwise.swarm.reference import max_diff, reference  # noqa: E402
from layerwise.swarm.spec import SwarmSpec  # noqa: E402
from layerwise.swarm.trainer import Trainer, TrainerOptions  # noqa: E402

SPEC = SwarmSpec(width=64, heads=4, blocks=4, seq=32, batch_size=8, microbatches=4)
BIG = SwarmSpec(width=256, heads=4, blocks=6, seq=64, batch_size=16, microbatches=4)  # compute over overheads


class Bench:
    def __init__(self, port: int) -> None:
        self.port = port
        self.n = 0

    def swarm(self) -> LocalPeers:
        self.n += 1
        peers = LocalPeers(f"bench-{os.getpid()}-{self.n}", f"tcp/127.0.0.1:{self.port + self.n}")
        peers.start_seed()
        return peers

    def trainer(self, peers: LocalPeers, spec: SwarmSpec, count: int, **kw: Any) -> Trainer:
        opts = TrainerOptions(swarm=peers.swarm, join=(peers.endpoint,), min_peers=count, wait_s=180, **kw)
        return Trainer(spec, opts)


def _median_step(tr: Trainer, skip: int = 1) -> float:
    return statistics.median(t for _, _, t in tr.step_times[skip:])


def failures(b: Bench, runs: int, steps: int = 8) -> dict[str, Any]:
    rng = random.Random(0)
    want, _ = reference(SPEC, steps)
    out: dict[str, Any] = {"runs": runs, "completed": 0, "lost_steps": 0, "max_param_diff": 0.0,
                           "detected_s": [], "recovered_s": []}  # fmt: skip
    with b.swarm() as peers:
        for i in range(4):
            peers.start(f"p{i}")
        spare = 4
        for run in range(runs):
            kill_step = rng.randrange(1, steps - 1)

            def hook(tr: Trainer, step: int) -> None:
                if step == kill_step:
                    victim = rng.choice(sorted(set(peers.alive()) & tr.assignment.peers()))
                    delay = rng.uniform(0, tr.step_times[-1][2])
                    holds = [(s.stage, "holder" if s.holder == victim else "copy") for s in tr.assignment.stages
                             if victim in (s.holder, s.copy)]
                    print(f"  (a) run {run + 1}: kill {victim} {holds} at step {step} + {delay * 1000:.0f} ms", flush=True)
                    threading.Timer(delay, peers.kill, (victim,)).start()

            try:
                with b.trainer(peers, SPEC, 4) as tr:
                    tr.train(steps, hook)
                    committed = tr.committed_steps()
                    diff = max_diff(tr.final_params(), want)
                    out["completed"] += 1
                    out["lost_steps"] += steps - min(committed)
                    out["max_param_diff"] = max(out["max_param_diff"], diff)
                    print(f"  (a) run {run + 1}: diff {diff:.3g}, failures {[(f.peer, f.phase, f.step, f.stages) for f in tr.failures]}, "
                          f"spans {[(s.holder, s.copy) for s in tr.assignment.stages]}", flush=True)
                    for f in tr.failures:
                        t0 = peers.killed_at[f.peer]
                        out["detected_s"].append(min(x for x in (f.left_at, f.noticed_at) if x) - t0)
                        out["recovered_s"].append((f.recovered_at or float("nan")) - t0)
            except Exception as e:  # a failed run is counted, not hidden
                out.setdefault("errors", []).append(f"run {run}: {type(e).__name__}: {e}")
            print(f"  (a) run {run + 1}/{runs}: {len(out['detected_s'])} failures so far", flush=True)
            while len(set(peers.alive()) - {"seed"}) < 4:
                peers.start(f"p{spare}")
                spare += 1
    for key in ("detected_s", "recovered_s"):
        vals = out.pop(key)
        out[key] = {"median": statistics.median(vals), "max": max(vals), "n": len(vals)} if vals else None
    return out


def after_failure(b: Bench, steps: int = 40) -> dict[str, Any]:
    with b.swarm() as peers:
        for i in range(4):
            peers.start(f"p{i}")
        with b.trainer(peers, SPEC, 4) as tr:
            def hook(tr: Trainer, step: int) -> None:
                if step == 8:
                    peers.kill(sorted(tr.assignment.peers())[1])
            tr.train(steps, hook)
            killed = min(peers.killed_at.values())
            before = statistics.median(t for _, end, t in tr.step_times[2:] if end < killed)
            window = [t for _, end, t in tr.step_times if killed < end <= killed + 30]
            after = statistics.median(window[len(window) // 3 :])  # after the re-balance settles
            rebalances = tr.rebalances
        # the ideal for the 3 left: a failure-free run on 3 equal peers
        with b.trainer(peers, SPEC, 3) as tr3:
            tr3.train(steps // 2)
            three = _median_step(tr3, 2)
    return {"step_s_4_peers": before, "step_s_after_failure": after, "step_s_3_peers_failure_free": three,
            "fraction_of_ideal": three / after, "rebalances": rebalances}  # fmt: skip


def unequal(b: Bench, steps: int = 12) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with b.swarm() as peers:
        peers.start("fast")
        peers.start("slow", ["--speed", "0.5"])
        # declared: the emulated speeds as given; measured: what the peers' benchmarks saw
        for capacity in ("declared", "blind", "measured"):
            with b.trainer(peers, BIG, 2, capacity=capacity) as tr:
                tr.train(steps)
                order = [s.holder for s in tr.assignment.stages]
                res[capacity] = {"spans": tr.assignment.counts(), "holders": order, "step_s": _median_step(tr, 2),
                                 "measured_block_s": {p: tr.block_s[p] for p in order}}  # fmt: skip
    res["speedup"] = res["blind"]["step_s"] / res["declared"]["step_s"]
    res["speedup_measured"] = res["blind"]["step_s"] / res["measured"]["step_s"]
    return res


def slow_links(b: Bench, steps: int = 6, latency_ms: float = 50.0, mbit: float = 100.0) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with b.swarm() as fast:
        for i in range(4):
            fast.start(f"p{i}")
        with b.trainer(fast, SPEC, 4) as tr:
            tr.train(steps)
            plain = _median_step(tr, 2)
            times = tr.request_times[len(tr.request_times) // 3 :]
            stages = len(tr.assignment.stages)
    with b.swarm() as slow:
        for i in range(4):
            slow.start(f"p{i}", ["--latency-ms", str(latency_ms), "--bandwidth-mbit", str(mbit)])
        with b.trainer(slow, SPEC, 4) as tr:
            tr.train(steps)
            emulated = _median_step(tr, 2)
            counts = tr.assignment.counts()
    # The prediction: each request's measured time plus what the emulation adds to it inside the
    # peer (one-way latency on the way in and out, and both messages' bytes at the link rate),
    # run through the schedule simulator; then the commit (gradients out of the holder, into the copy).
    mb = SPEC.batch_size // SPEC.microbatches
    act = mb * SPEC.seq * SPEC.width * 4  # fp32 activation crossing a boundary
    bw = mbit * 1e6 / 8
    lat = 2 * latency_ms / 1000
    def med(s: int, kind: str) -> float:
        return statistics.median(t for st, k, t in times if st == s and k == kind)
    fwd = tuple(med(s, "forward") + lat + (2 * act if 0 < s < stages - 1 else act) / bw for s in range(stages))
    bwd = tuple(med(s, "backward") + lat + (2 * act if 0 < s < stages - 1 else act) / bw for s in range(stages))
    sim = simulate(build(SPEC.schedule, stages=stages, microbatches=SPEC.microbatches),
                   Costs(forward=fwd, input_grad=bwd, weight_grad=(0.0,) * stages))  # fmt: skip
    from layerwise.swarm.assignment import layer_costs

    _, static = layer_costs(SPEC)
    first, grad_bytes = 0, []
    for c in counts:
        grad_bytes.append(sum(static[first : first + c]) / 4)  # 4 of the 16 bytes per parameter
        first += c
    commit = max(med(s, "commit") for s in range(stages)) + 2 * lat + 2 * max(grad_bytes) / bw
    predicted = float(sim.makespan) + commit
    res.update(step_s_plain=plain, step_s_emulated=emulated, predicted_step_s=predicted,
               measured_over_predicted=emulated / predicted, latency_ms=latency_ms, bandwidth_mbit=mbit)
    return res


def replicas(b: Bench, steps: int = 10) -> dict[str, Any]:
    res: dict[str, Any] = {}
    runs = (("without_replica", 2, 2), ("with_replica", 3, 2), ("three_stages", 3, 3))
    for name, count, stages in runs:
        with b.swarm() as peers:
            peers.start("a")
            for extra in "bc"[: count - 1]:
                peers.start(extra, ["--speed", "0.5"])
            # blind: spans as for equal peers, so the slow peer's stage stays the slowest
            with b.trainer(peers, BIG, count, max_stages=stages, capacity="blind") as tr:
                tr.train(steps)
                res[name] = {"step_s": _median_step(tr, 2), "spans": tr.assignment.counts(),
                             "slots": [list(s.slots) for s in tr.assignment.stages]}  # fmt: skip
        print(f"  (e) {name}: {res[name]}", flush=True)
    res["speedup"] = res["without_replica"]["step_s"] / res["with_replica"]["step_s"]
    res["speedup_three_stages"] = res["without_replica"]["step_s"] / res["three_stages"]["step_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 runs in (a), shorter runs elsewhere")
    ap.add_argument("--port", type=int, default=17900)
    ap.add_argument("--only", default="a,b,c,d,e", help="parts to run; the others are kept from the last JSON")
    args = ap.parse_args()
    b = Bench(args.port)
    started = time.time()
    path = ROOT / "bench" / "results" / "swarm.json"
    parts = set(args.only.split(","))
    out: dict[str, Any] = json.loads(path.read_text()) if parts != set("abcde") and path.exists() else {}
    out.update(machine=f"{os.cpu_count()} CPUs, shared", spec=SPEC.to_json(), spec_c=BIG.to_json())
    if "a" in parts:
        out["a_random_kills"] = failures(b, 3 if args.quick else args.runs)
        print("(a)", out["a_random_kills"], flush=True)
    if "b" in parts:
        out["b_after_failure"] = after_failure(b, 24 if args.quick else 40)
        print("(b)", out["b_after_failure"], flush=True)
    if "c" in parts:
        out["c_unequal_peers"] = unequal(b, 8 if args.quick else 12)
        print("(c)", out["c_unequal_peers"], flush=True)
    if "d" in parts:
        out["d_slow_links"] = slow_links(b)
        print("(d)", out["d_slow_links"], flush=True)
    if "e" in parts:
        out["e_replicas"] = replicas(b, 6 if args.quick else 10)
        print("(e)", out["e_replicas"], flush=True)
    out[f"seconds_{''.join(sorted(parts))}"] = round(time.time() - started, 1)
    path.write_text(json.dumps(out, indent=2) + "\n")
    a, b_, c, d = (out[k] for k in ("a_random_kills", "b_after_failure", "c_unequal_peers", "d_slow_links"))
    print(f"\n{'check':<44} {'measured':>14} {'target':>10}")
    print(f"{'(a) runs completed':<44} {a['completed']:>10}/{a['runs']:<3} {'all':>10}")
    print(f"{'(a) lost steps':<44} {a['lost_steps']:>14} {'0':>10}")
    print(f"{'(a) max param diff vs failure-free':<44} {a['max_param_diff']:>14.3g} {'<=1e-5':>10}")
    if a["detected_s"]:
        print(f"{'(a) detection s (median / max)':<44} {a['detected_s']['median']:>6.3f} / {a['detected_s']['max']:.3f}")
        print(f"{'(a) recovery s (median / max)':<44} {a['recovered_s']['median']:>6.3f} / {a['recovered_s']['max']:.3f}")
    print(f"{'(b) after 1 of 4 died / ideal for 3':<44} {b_['fraction_of_ideal']:>14.2f} {'>=0.9':>10}")
    print(f"{'(c) capacity-aware / blind spans':<44} {c['speedup']:>13.2f}x {'>=1.25x':>10}")
    print(f"{'(c) the same with measured speeds':<44} {c['speedup_measured']:>13.2f}x")
    print(f"{'(d) 50 ms + 100 Mbit/s: measured / simulated':<44} {d['measured_over_predicted']:>14.2f} {'~1':>10}")
    if "e_replicas" in out:
        e = out["e_replicas"]
        print(f"{'(e) slow stage + a replica / without':<44} {e['speedup']:>13.2f}x")
        print(f"{'(e) the 3 peers as 3 stages / without':<44} {e['speedup_three_stages']:>13.2f}x")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``layerwise swarm demo``: a swarm on this machine, with peers killed and added, checked against one process.

The trainer runs here and listens on 127.0.0.1 (so any peer may die, the seed included); N peer
processes join it. K random peers are SIGKILLed at random moments of random steps, J new peers
are started mid-run. Afterwards the same training runs in this process, and the summary compares
the final parameters (``max_param_diff``: against one process summing microbatches in the
swarm's order, which is what a failure-free swarm run computes bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from .compress import Compression
from .errors import SwarmError
from .identity import throwaway
from .local import LocalPeers
from .reference import max_diff, reference
from .spec import SwarmSpec
from .trainer import Trainer, TrainerOptions


def run_demo(args: argparse.Namespace, spec: SwarmSpec, compress: Compression | None = None) -> int:
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    rng = random.Random(args.seed)
    steps = args.steps
    kill_steps = sorted(rng.sample(range(1, max(2, steps - 1)), min(args.kill, max(1, steps - 2)))) if args.kill else []
    # joiners start in the first half: a new process needs seconds to import torch and connect
    join_steps = sorted(rng.choice(range(1, max(2, steps // 2))) for _ in range(args.join))
    mtls = bool(getattr(args, "mtls", False))
    endpoint = f"{'tls' if mtls else 'tcp'}/127.0.0.1:{args.port}"
    name = f"demo-{os.getpid()}"
    say(f"layerwise swarm demo: {args.peers} peers + a trainer on {endpoint}, {steps} steps; "
        f"SIGKILL at steps {kill_steps or 'none'}, joins at steps {join_steps or 'none'}")  # fmt: skip
    # --mtls: a throwaway CA, a trainer certificate and one per peer; every link is mutual TLS
    tmp = tempfile.mkdtemp(prefix="layerwise-demo-ca-") if mtls else None
    ids = throwaway(tmp, name, {"trainer": "trainer"} | {f"peer{i}": "peer" for i in range(args.peers)}
                    | {f"joiner{j + 1}": "peer" for j in range(args.join)}) if tmp else {}  # fmt: skip
    compress = compress or Compression()
    opts = TrainerOptions(swarm=name, listen=(endpoint,), min_peers=args.peers, wait_s=180,
                          identity=str(ids["trainer"]) if ids else None, compress=compress)  # fmt: skip
    if not compress.exact:
        say(f"--compress {compress.mode}: lossy, so the run is not expected to equal one process")
    started = time.perf_counter()
    try:
        return _run(args, spec, say, rng, steps, kill_steps, join_steps, endpoint, name, opts, ids, started)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, spec: SwarmSpec, say: Any, rng: random.Random, steps: int, kill_steps: list[int],
         join_steps: list[int], endpoint: str, name: str, opts: TrainerOptions, ids: dict[str, Any],
         started: float) -> int:  # fmt: skip
    def extra(peer: str) -> list[str]:
        return ["--identity", str(ids[peer])] if ids else []

    summary: dict[str, Any] = {}
    with LocalPeers(name, endpoint) as peers, Trainer(spec, opts) as tr:
        for i in range(args.peers):
            peers.start(f"peer{i}", extra(f"peer{i}"))
        joined = [0]

        def hook(tr: Trainer, step: int) -> None:
            if step == 0:
                say("spans: " + "; ".join(f"stage {s.stage} layers {s.first}-{s.first + s.count - 1} on {s.holder}"
                                          for s in tr.assignment.stages))  # fmt: skip
            for _ in range(kill_steps.count(step)):
                victims = sorted(set(peers.alive()) & tr.assignment.peers())
                if victims:
                    victim = rng.choice(victims)
                    delay = rng.uniform(0, tr.step_times[-1][2] if tr.step_times else 0.1)
                    threading.Timer(delay, peers.kill, (victim,)).start()
                    say(f"step {step}: killing {victim} in {delay * 1000:.0f} ms")
            for _ in range(join_steps.count(step)):
                joined[0] += 1
                peers.start(f"joiner{joined[0]}", extra(f"joiner{joined[0]}"))
                say(f"step {step}: starting joiner{joined[0]}")
            if tr.losses:
                say(f"step {step}/{steps}  loss {tr.losses[-1]:.4f}  {tr.step_times[-1][2] * 1000:.0f} ms")

        try:
            tr.train(steps, hook)
        except SwarmError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        params = tr.final_params()
        committed = tr.committed_steps()
        summary = _summary(tr, spec, steps, committed, peers.killed_at)
    want, ref_losses = reference(spec, steps)
    full, _ = reference(spec, steps, microbatched=False)
    summary.update(reference_loss=ref_losses[-1], max_param_diff=max_diff(params, want),
                   max_param_diff_full_batch=max_diff(params, full), seconds=round(time.perf_counter() - started, 1))
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
    return 0 if summary["lost_steps"] == 0 else 1


def _summary(tr: Trainer, spec: SwarmSpec, steps: int, committed: list[int], killed_at: dict[str, float]) -> dict[str, Any]:
    failures = []
    for f in tr.failures:
        t0 = killed_at.get(f.peer)
        detected = min(x for x in (f.left_at, f.noticed_at) if x is not None)
        failures.append({"peer": f.peer, "step": f.step, "phase": f.phase, "phases": f.phases, "stages": f.stages,
                         "detected_s": None if t0 is None else round(detected - t0, 4),
                         "recovered_s": None if t0 is None or f.recovered_at is None else round(f.recovered_at - t0, 4)})
    tokens = spec.batch_size * spec.seq
    first_kill = min(killed_at.values(), default=None)
    before = [t for _, end, t in tr.step_times[1:] if first_kill is None or end < first_kill]
    last = max((f.recovered_at or 0 for f in tr.failures), default=0)
    after = [t for _, end, t in tr.step_times if first_kill is not None and end > last + 0.001]
    return {
        "steps": len(tr.losses), "lost_steps": steps - min(committed), "final_loss": tr.losses[-1],
        "failures": failures, "rebalances": tr.rebalances, "replayed_actions": tr.replayed,
        "stages": [s.count for s in tr.assignment.stages],
        "tokens_per_s_before": tokens / statistics.median(before) if before else None,
        "tokens_per_s_after": tokens / statistics.median(after[1:] or after) if after else None,
    }  # fmt: skip


def _print(s: dict[str, Any]) -> None:
    print(f"steps {s['steps']}, lost steps {s['lost_steps']}, final loss {s['final_loss']:.4f} "
          f"(one process: {s['reference_loss']:.4f})")  # fmt: skip
    for f in s["failures"]:
        print(f"  {f['peer']} lost at step {f['step']} ({', '.join(f['phases'] or [f['phase']])}): detected in {f['detected_s']} s, "
              f"recovered in {f['recovered_s']} s")  # fmt: skip
    tb, ta = s["tokens_per_s_before"], s["tokens_per_s_after"]
    if tb:
        print(f"  throughput {tb:,.0f} tokens/s before" + (f", {ta:,.0f} after" if ta else ""))
    print(f"  max |param - failure-free run| = {s['max_param_diff']:.3g}; against full-batch one process "
          f"{s['max_param_diff_full_batch']:.3g}; {s['rebalances']} rebalance(s), {s['replayed_actions']} replayed actions")

"""mTLS overhead: step time of the demo model with identities (mutual TLS + signed hello + MAC) over without.

Two local swarms of the same size run side by side: plain TCP peers and peers with certificates
of a throwaway CA. One trainer per swarm stays open and they train in alternating blocks of steps
(plain, mTLS, plain, ...), so both see the same machine load over time. The first steps of each
trainer (hellos, warm-up) are left out; ``mtls_overhead`` is the median mTLS step time over the
median plain one (1.0 = no cost).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from typing import Any

from layerwise.swarm.identity import throwaway
from layerwise.swarm.local import LocalPeers
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.trainer import Trainer, TrainerOptions

SPEC = SwarmSpec(width=64, blocks=4, batch_size=8, microbatches=4)  # `layerwise swarm demo --model tiny`
PEERS = 4  # the demo's default swarm size
WARMUP = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _by_kind(tr: Trainer) -> dict[str, Any]:
    """Median round trip (ms) and count per step of each request kind the stages sent (medians: the
    warm-up's few slow ones do not move them)."""
    kinds: dict[str, list[float]] = {}
    for _, kind, secs in tr.request_times:
        kinds.setdefault(kind, []).append(secs)
    steps = max(len(tr.losses), 1)
    return {k: {"ms": round(statistics.median(v) * 1e3, 3), "per_step": round(len(v) / steps, 1)}
            for k, v in sorted(kinds.items())}  # fmt: skip


def _cpu_s(peers: LocalPeers) -> float:
    """CPU seconds (user + system, every thread) the swarm's peer processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in peers.procs.values():
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            pass  # a peer that is gone (or no /proc): its time no longer counts
    return total


def _links(tr: Trainer) -> dict[str, int]:
    """Whom the trainer's session is linked to directly: a peer not among them is reached through another."""
    info = tr.session.info
    return {"peers": len(list(info.peers_zid())), "routers": len(list(info.routers_zid()))}


def run(quick: bool = False) -> dict[str, Any]:
    block, rounds = (2, 2) if quick else (10, 10)
    name = f"bench-mtls-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="layerwise-bench-ca-") as tmp:
        ids = throwaway(tmp, name, {"trainer": "trainer"} | {f"peer{i}": "peer" for i in range(PEERS)})
        plain_ep, tls_ep = f"tcp/127.0.0.1:{_port()}", f"tls/127.0.0.1:{_port()}"
        plain_opts = TrainerOptions(swarm=name + "-plain", listen=(plain_ep,), min_peers=PEERS, wait_s=180)
        tls_opts = TrainerOptions(swarm=name, listen=(tls_ep,), min_peers=PEERS, wait_s=180,
                                  identity=str(ids["trainer"]))  # fmt: skip
        with LocalPeers(name + "-plain", plain_ep) as plain_peers, LocalPeers(name, tls_ep) as tls_peers, \
                Trainer(SPEC, plain_opts) as plain, Trainer(SPEC, tls_opts) as mtls:  # fmt: skip
            for i in range(PEERS):
                plain_peers.start(f"peer{i}")
                tls_peers.start(f"peer{i}", ["--identity", str(ids[f"peer{i}"])])
            started = time.perf_counter()
            swarms = {"plain": (plain, plain_peers), "mtls": (mtls, tls_peers)}
            cpu: dict[str, dict[str, float]] = {k: {"trainer": 0.0, "peers": 0.0, "steps": 0} for k in swarms}
            for r in range(rounds):
                for which in ("plain", "mtls") if r % 2 == 0 else ("mtls", "plain"):  # alternate who goes first too
                    tr, peers = swarms[which]
                    c0, p0 = time.process_time(), _cpu_s(peers)
                    tr.train(WARMUP + (r + 1) * block)
                    if r > 0:  # round 0 holds the start (hellos, installs) and the warm-up
                        cpu[which]["trainer"] += time.process_time() - c0
                        cpu[which]["peers"] += _cpu_s(peers) - p0
                        cpu[which]["steps"] += block
            seconds = time.perf_counter() - started
            plain_s = [t for step, _, t in plain.step_times if step >= WARMUP]
            mtls_s = [t for step, _, t in mtls.step_times if step >= WARMUP]
            same = plain.losses == mtls.losses
            bytes_per_step = {"plain": plain.node.bytes_sent / len(plain.losses),
                              "mtls": mtls.node.bytes_sent / len(mtls.losses)}  # fmt: skip
            by_kind = {"plain": _by_kind(plain), "mtls": _by_kind(mtls)}
            links = {"plain": _links(plain), "mtls": _links(mtls)}
    p, m = statistics.median(plain_s), statistics.median(mtls_s)
    return {
        "mtls_overhead": round(m / p, 4),
        "plain_step_s_median": round(p, 5), "mtls_step_s_median": round(m, 5),
        "plain_step_s_mean": round(statistics.fmean(plain_s), 5), "mtls_step_s_mean": round(statistics.fmean(mtls_s), 5),
        "steps_each": len(plain_s), "peers": PEERS, "block": block, "rounds": rounds,
        "model": {"width": SPEC.width, "blocks": SPEC.blocks, "batch_size": SPEC.batch_size,
                  "microbatches": SPEC.microbatches, "seq": SPEC.seq},
        "cpu_ms_per_step": {k: {"trainer": round(v["trainer"] / max(v["steps"], 1) * 1e3, 2),
                                "peers": round(v["peers"] / max(v["steps"], 1) * 1e3, 2)} for k, v in cpu.items()},
        "request_ms_median": by_kind, "trainer_links": links,
        "losses_equal": same, "request_bytes_per_step": bytes_per_step, "seconds": round(seconds, 1),
        "plain_step_s": [round(t, 5) for t in plain_s], "mtls_step_s": [round(t, 5) for t in mtls_s],
    }  # fmt: skip

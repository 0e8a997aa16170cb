"""Peer processes on this machine, for the demo and the benchmark: start, kill, and always clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


# the children import this very copy of layerwise, whatever their working directory or install
_SRC = str(Path(__file__).resolve().parents[2])


class LocalPeers:
    def __init__(self, swarm: str, endpoint: str, log_dir: str | None = None) -> None:
        self.swarm, self.endpoint, self.log_dir = swarm, endpoint, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed_at: dict[str, float] = {}

    def start(self, name: str, extra: Sequence[str] = (), fault: str = "") -> None:
        env = dict(os.environ, LAYERWISE_SWARM_FAULT=fault, PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "layerwise", "swarm", "serve", "--swarm", self.swarm, "--name", name,
               "--join", self.endpoint, *extra]  # fmt: skip
        out = open(os.path.join(self.log_dir, f"{name}.log"), "wb") if self.log_dir else subprocess.DEVNULL
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def start_seed(self, name: str = "seed") -> None:
        """A zenoh-only process listening on the endpoint, so any peer may die (no torch: starts fast)."""
        code = ("import json, sys, time, zenoh\nc = zenoh.Config()\n"
                "for k, v in (('mode', '\"peer\"'), ('listen/endpoints', json.dumps([sys.argv[1]])),\n"
                "             ('scouting/multicast/enabled', 'false'), ('scouting/gossip/enabled', 'true'),\n"
                "             ('connect/endpoints', '[]'), ('transport/link/tx/lease', '1000'),\n"
                "             ('transport/unicast/accept_pending', '4096'), ('transport/unicast/accept_timeout', '2000')):\n"
                "    c.insert_json5(k, v)\n"
                "with zenoh.open(c):\n    time.sleep(1e9)")  # fmt: skip
        self.procs[name] = subprocess.Popen([sys.executable, "-c", code, self.endpoint], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)  # fmt: skip

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            self.killed_at.setdefault(name, time.time())
            proc.send_signal(sig)

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def __enter__(self) -> LocalPeers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

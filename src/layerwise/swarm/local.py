"""Peer processes on this machine, for the demo and the benchmark: start, kill, and always clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence


class LocalPeers:
    def __init__(self, swarm: str, endpoint: str, log_dir: str | None = None) -> None:
        self.swarm, self.endpoint, self.log_dir = swarm, endpoint, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed_at: dict[str, float] = {}

    def start(self, name: str, extra: Sequence[str] = (), fault: str = "") -> None:
        env = dict(os.environ, LAYERWISE_SWARM_FAULT=fault)
        cmd = [sys.executable, "-m", "layerwise", "swarm", "serve", "--swarm", self.swarm, "--name", name,
               "--join", self.endpoint, *extra]  # fmt: skip
        out = open(os.path.join(self.log_dir, f"{name}.log"), "wb") if self.log_dir else subprocess.DEVNULL
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

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

"""Peers behind NAT: two groups of peers that cannot reach each other train together through a relay.

Three network namespaces: ``r`` holds the relay (``layerwise swarm relay``, a zenoh router);
``a`` (the trainer and one peer) and ``b`` (two peers) each reach only ``r`` over a veth pair, on
two subnets, and ``r`` does not forward IP: there is no route between ``a`` and ``b`` (checked).
Every process connects *out* to the relay with ``--relay``. The run must equal one process.
A second run does the same with mutual TLS: the relay has a ``relay`` certificate of the swarm's
CA, every process an identity; a peer with another swarm's certificate connects to the relay too
and must get nothing (the run goes on without it), while the signed hello and the MAC of every
request work end to end through the router. Needs root and iproute2 (``ip netns``); skipped with
the reason otherwise. Namespaces and processes are removed in every case.
"""

from __future__ import annotations

import json
import os
import shutil
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerwise.swarm.identity import throwaway
from layerwise.swarm.reference import reference
from layerwise.swarm.spec import SwarmSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SRC = str(Path(__file__).resolve().parents[2] / "src")
TAG = f"lw{os.getpid() % 100000}"
NET = 100 + os.getpid() % 100  # 10.NET.1.0/24 (a <-> r) and 10.NET.2.0/24 (b <-> r)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Namespaces:
    def __init__(self) -> None:
        self.names = {k: f"{TAG}{k}" for k in "rab"}
        self.procs: list[subprocess.Popen[str]] = []

    def up(self) -> None:
        r, a, b = self.names["r"], self.names["a"], self.names["b"]
        for n in (r, a, b):
            _ip("netns", "add", n)
            _ip("-n", n, "link", "set", "lo", "up")
        for side, subnet in (("a", 1), ("b", 2)):
            near, far = f"{TAG}r{side}", f"{TAG}{side}r"  # <= 15 characters
            _ip("link", "add", near, "type", "veth", "peer", "name", far)
            _ip("link", "set", near, "netns", r)
            _ip("link", "set", far, "netns", self.names[side])
            _ip("-n", r, "addr", "add", f"10.{NET}.{subnet}.1/24", "dev", near)
            _ip("-n", self.names[side], "addr", "add", f"10.{NET}.{subnet}.2/24", "dev", far)
            _ip("-n", r, "link", "set", near, "up")
            _ip("-n", self.names[side], "link", "set", far, "up")

    def run(self, ns: str, args: list[str]) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=SRC)
        cmd = ["ip", "netns", "exec", self.names[ns], sys.executable, *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for n in self.names.values():
            pids = _ip("netns", "pids", n, check=False).stdout.split()
            for pid in pids:  # anything still in our namespaces was started by this test
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", n, check=False)


def _can_use_netns() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root ('ip netns add')"
    probe = f"{TAG}probe"
    got = _ip("netns", "add", probe, check=False)
    if got.returncode != 0:
        return f"'ip netns add' is not allowed here: {got.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    why = _can_use_netns()
    if why:
        pytest.skip(why)
    ns = Namespaces()
    try:
        ns.up()
        yield ns
    finally:
        ns.close()
    leftover = [n for n in ns.names.values() if n in _ip("netns", "list", check=False).stdout]
    assert not leftover, f"namespaces left behind: {leftover}"


def _train_through_relay(netns: Namespaces, proto: str, ids: dict[str, Path] | None = None,
                         intruder: Path | None = None) -> None:  # fmt: skip
    ra, rb = f"{proto}/10.{NET}.1.1:7447", f"{proto}/10.{NET}.2.1:7447"

    def ident(name: str) -> list[str]:
        return ["--identity", str(ids[name])] if ids else []

    # no route between the groups: a TCP connect from a to b's address fails at once
    connect = f"import socket; s = socket.socket(); s.settimeout(2); s.connect(('10.{NET}.2.2', 9))"
    probe = netns.run("a", ["-c", connect])
    _, err = probe.communicate(timeout=30)
    assert probe.returncode != 0 and ("unreachable" in err or "timed out" in err), err

    relay = netns.run("r", ["-m", "layerwise", "swarm", "relay", "--listen", ra, "--listen", rb, *ident("relay")])
    assert relay.stdout is not None
    ready, _, _ = select.select([relay.stdout], [], [], 60.0)  # "relay listening on ..." once it listens
    assert ready and relay.stdout.readline().startswith("relay listening"), relay.communicate(timeout=10)[1]
    swarm = f"relay-{os.getpid()}"
    for ns, name, ep in (("a", "a1", ra), ("b", "b1", rb), ("b", "b2", rb)):
        netns.run(ns, ["-m", "layerwise", "swarm", "serve", "--swarm", swarm, "--name", name, "--relay", ep,
                       *ident(name)])  # fmt: skip
    if intruder is not None:  # another swarm's certificate: the relay's TLS refuses it
        netns.run("b", ["-m", "layerwise", "swarm", "serve", "--swarm", swarm, "--relay", rb, "--identity",
                        str(intruder)])  # fmt: skip
    steps = 3
    trainer = netns.run("a", ["-m", "layerwise", "swarm", "train", "--swarm", swarm, "--relay", ra, "--peers", "3",
                              "--wait", "120", "--steps", str(steps), "--model", "tiny", "--json", *ident("t")])  # fmt: skip
    out, err = trainer.communicate(timeout=240)
    assert trainer.returncode == 0, err[-2000:]
    # status reaches every peer through the relay too (with an identity: a signed hello to each)
    status = netns.run("b", ["-m", "layerwise", "swarm", "status", "--swarm", swarm, "--relay", rb, "--json",
                             *ident("t")])  # fmt: skip
    st_out, st_err = status.communicate(timeout=60)
    assert status.returncode == 0, st_err[-2000:]
    peers = json.loads(st_out.strip().splitlines()[-1])["peers"]
    assert sorted(peers) == ["a1", "b1", "b2"] and all("error" not in p for p in peers.values()), peers
    summary = json.loads(out.strip().splitlines()[-1])
    spans = next(line for line in err.splitlines() if line.startswith("spans:"))
    assert all(f"on {p} " in spans for p in ("a1", "b1", "b2")), spans  # both groups hold layers
    assert "eve" not in spans and "eve" not in out, spans
    spec = SwarmSpec(width=64, blocks=4, batch_size=8, microbatches=4, schedule="gpipe", seed=0)
    _, want = reference(spec, steps)
    assert summary["lost_steps"] == 0
    assert summary["losses"] == want  # equal to one process, bit for bit


def test_two_groups_behind_nat_train_through_a_relay(netns: Namespaces) -> None:
    _train_through_relay(netns, "tcp")


def test_the_same_through_a_relay_with_mutual_tls(netns: Namespaces, tmp_path: Path) -> None:
    ids = throwaway(tmp_path / "lab", f"relay-{os.getpid()}", {"relay": "relay", "t": "trainer", "a1": "peer",
                                                                "b1": "peer", "b2": "peer"})  # fmt: skip
    eve = throwaway(tmp_path / "other", f"relay-{os.getpid()}", {"eve": "peer"})["eve"]
    for d in (*ids.values(), eve):  # the processes run as root in the namespaces; keys stay owner-only
        assert (d / "key.pem").stat().st_mode & 0o077 == 0
    _train_through_relay(netns, "tls", ids, intruder=eve)

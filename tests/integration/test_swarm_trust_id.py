"""Identity and access on a local swarm: mutual TLS, the signed hello, the trainer-only policy, revocation.

One swarm CA for the module; peer processes are started once. The mTLS run (p0, p1, p2, plus a
revoked ``rev`` that is refused at its hello) revokes p2 mid-run and must still train bit for bit
equal to the same run over plain TCP peers, and to one process. Processes zenoh refuses at the
TLS handshake (another swarm's certificate, no certificate, an expired one) never reach the
trainer: they get nothing, and name themselves in their own log ("linked to no process").
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zenoh

from layerwise.swarm.access_client import Client
from layerwise.swarm.errors import PeerRefused
from layerwise.swarm.identity import Identity, Refused, issue, revoke, throwaway
from layerwise.swarm.net import Node, config, peer_key, tls_config
from layerwise.swarm.reference import max_diff, reference
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.status import query_status
from layerwise.swarm.trainer import Trainer, TrainerOptions
from layerwise.swarm.wire import Message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
STEPS = 6
REVOKE_AT = 2  # revoked in the hook of this step: the trainer drops p2 at this step's boundary


def _free_ports(n: int) -> list[int]:
    got: list[int] = []
    for port in range(18000 + os.getpid() % 700, 19000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        got.append(port)
        if len(got) == n:
            return got
    raise RuntimeError("no free ports in 18000-18999")


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def serve(self, name: str, swarm: str, where: list[str], identity: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "layerwise", "swarm", "serve", "--swarm", swarm, *where]
        cmd += ["--identity", str(identity)] if identity else ["--name", name]
        out = open(self.log_dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swarm-pki")
    swarm = f"tid-{os.getpid()}"
    ids = throwaway(root, swarm, {"tr": "trainer", "tr2": "trainer", "p0": "peer", "p1": "peer", "p2": "peer",
                                  "rev": "peer", "intruder": "peer"})  # fmt: skip
    t = dt.datetime.now(dt.timezone.utc)
    ids["old"] = issue(root / "ca", "old", "peer", root / "old", not_before=t - dt.timedelta(days=2),
                       not_after=t - dt.timedelta(days=1))  # fmt: skip
    ids["eve"] = throwaway(root / "other", swarm, {"eve": "peer"})["eve"]  # same swarm name, another CA
    revoke(root / "ca", "rev")
    revoke(root / "ca", "tr2")
    ids["ca"] = root / "ca"
    ids["root"] = root
    return ids


@pytest.fixture(scope="module")
def swarm(pki: dict[str, Path]) -> Iterator[dict[str, Any]]:
    tls_port, tcp_port = _free_ports(2)
    name = f"tid-{os.getpid()}"
    tls, tcp = f"tls/127.0.0.1:{tls_port}", f"tcp/127.0.0.1:{tcp_port}"
    procs = Procs(pki["root"])
    try:
        procs.serve("p0", name, ["--listen", tls], pki["p0"])  # the seed of the mTLS swarm
        for peer in ("p1", "p2", "rev", "eve"):
            procs.serve(peer, name, ["--join", tls], pki[peer])
        procs.serve("noid", name, ["--join", tls.replace("tls/", "tcp/")])  # no certificate at all
        procs.serve("plain0", name + "-plain", ["--listen", tcp])
        for peer in ("plain1", "plain2"):
            procs.serve(peer, name + "-plain", ["--join", tcp])
        yield {"name": name, "tls": tls, "tcp": tcp, "procs": procs}
    finally:
        procs.close()


@pytest.fixture(scope="module")
def runs(swarm: dict[str, Any], pki: dict[str, Path]) -> dict[str, Any]:
    """The same training over plain TCP and over mTLS; the latter revokes p2 before step 2."""
    plain = TrainerOptions(swarm=swarm["name"] + "-plain", join=(swarm["tcp"],), min_peers=3, wait_s=90)
    with Trainer(SPEC, plain) as tr:
        tr.train(STEPS)
        plain_params = tr.final_params()
        plain_losses = list(tr.losses)
    seen: dict[str, Any] = {}

    def hook(tr: Trainer, step: int) -> None:
        if step == 0:
            seen["stages0"] = {s.holder for s in tr.assignment.stages} | {s.copy for s in tr.assignment.stages}
        if step == 1:  # a peer certificate tries the trainer's work on p0
            seen["intruder"] = _intrude(swarm, pki)
        if step == REVOKE_AT:  # `layerwise swarm status` with a peer certificate, then `revoke p2`
            seen["status_cli"] = query_status(swarm["name"], [swarm["tls"]], identity=str(pki["p1"]))
            revoke(pki["ca"], "p2")  # reaches the trainer at the boundary that follows (it re-reads --crl)

    opts = TrainerOptions(swarm=swarm["name"], join=(swarm["tls"],), min_peers=4, wait_s=90,
                          identity=str(pki["tr"]), crl=str(pki["ca"] / "crl.pem"))  # fmt: skip
    with Trainer(SPEC, opts) as tr:
        tr.train(STEPS, hook)
        params = tr.final_params()
        committed = tr.committed_steps()
        time.sleep(5.5)  # past the refusal collection period: the last boundary's view is complete
        tr.ident.at_boundary(tr)
        status = tr.status()
        holders = {s.holder for s in tr.assignment.stages} | {s.copy for s in tr.assignment.stages}
        failures = {f.peer: f for f in tr.failures}
        losses = list(tr.losses)
    return {"params": params, "losses": losses, "plain_params": plain_params, "plain_losses": plain_losses,
            "status": status, "holders": holders, "committed": committed, "failures": failures, **seen}  # fmt: skip


def _intrude(swarm: dict[str, Any], pki: dict[str, Path]) -> dict[str, str]:
    """A process with a peer certificate sends trainer-only messages to p0; one more sends with no session."""
    ident = Identity(pki["intruder"])
    out: dict[str, str] = {}
    with zenoh.open(config(connect=[swarm["tls"]], identity=ident)) as session:
        time.sleep(1.0)
        node = Node(session, swarm["name"], auth=Client(ident))
        for kind in ("install", "forward", "commit", "reset"):
            try:
                node.request("p0", Message(kind, step=0, stage=0, mb=0), 10.0)
                out[kind] = "served"
            except (PeerRefused, Refused) as e:
                out[kind] = str(e)
        bare = Node(session, swarm["name"])  # inside the TLS mesh, but no hello
        try:
            bare.request("p0", Message("forward", step=0, stage=0, mb=0), 10.0)
            out["bare"] = "served"
        except PeerRefused as e:
            out["bare"] = str(e)
    return out


def test_an_mtls_run_trains_equal_to_the_same_run_without(runs: dict[str, Any]) -> None:
    assert runs["losses"] == runs["plain_losses"]
    assert max_diff(runs["params"], runs["plain_params"]) == 0.0
    want, losses = reference(SPEC, STEPS)
    assert max_diff(runs["params"], want) == 0.0 and runs["losses"] == losses
    assert runs["committed"] == [STEPS] * len(runs["committed"])
    peers = runs["status"]["peers"]
    assert {p: peers[p]["identity"] for p in ("p0", "p1")} == {"p0": "p0", "p1": "p1"}
    assert runs["status"]["identity"] == "tr"


def test_a_revoked_certificate_is_refused_and_named(runs: dict[str, Any]) -> None:
    refused = {(r["name"], r["by"]): r["why"] for r in runs["status"]["refused"]}
    assert "certificate revoked" in refused[("rev", "trainer")]
    assert "rev" not in runs["stages0"] | runs["holders"]  # never given a stage or a copy
    # p2, revoked during the run, held layers: it was dropped at the next boundary, like a dead peer
    assert "p2" in runs["stages0"] and "p2" not in runs["holders"]
    assert "revoked" in refused[("p2", "trainer")] and runs["failures"]["p2"].step == REVOKE_AT
    assert all(isinstance(r["at"], float) for r in runs["status"]["refused"])


def test_a_trainer_only_action_from_a_peer_certificate_is_refused(runs: dict[str, Any]) -> None:
    for kind in ("install", "forward", "commit", "reset"):
        assert f"refused intruder: holds a peer certificate: only a trainer may send '{kind}'" in runs["intruder"][kind]
    assert "without the signed hello" in runs["intruder"]["bare"]
    by_p0 = [r for r in runs["status"]["refused"] if r["by"] == "p0"]
    assert {"intruder", "(no session)"} <= {r["name"] for r in by_p0}  # the trainer shows what p0 refused


def test_status_with_a_peer_certificate_names_identities(runs: dict[str, Any]) -> None:
    s = runs["status_cli"]  # `layerwise swarm status --identity` (a peer certificate may read, not drive)
    assert s["trainer"] is not None and s["trainer"]["step"] == 2 and s["trainer"]["identity"] == "tr"
    assert {p: s["trainer"]["peers"][p]["identity"] for p in ("p0", "p1", "p2")} == {"p0": "p0", "p1": "p1", "p2": "p2"}
    assert s["peers"]["p0"]["identity"] == "p0" and "refused" in s["peers"]["p0"]
    assert "error" in s["peers"]["rev"] or "rev" not in s["trainer"]["peers"] or not s["trainer"]["peers"]["rev"]["identity"]


def test_a_revoked_trainer_is_refused_by_peers_that_saw_the_list(swarm: dict[str, Any], pki: dict[str, Path],
                                                                runs: dict[str, Any]) -> None:  # fmt: skip
    ident = Identity(pki["tr2"])  # revoked before the run; p0 learned it from tr's hello
    with zenoh.open(config(connect=[swarm["tls"]], identity=ident)) as session:
        time.sleep(1.0)
        node = Node(session, swarm["name"], auth=Client(ident))
        with pytest.raises(Refused, match="tr2: certificate revoked"):
            node.request("p0", Message("reset", epoch=99), 10.0)


def test_another_swarm_no_certificate_or_an_expired_one_get_nothing(swarm: dict[str, Any], pki: dict[str, Path],
                                                                    runs: dict[str, Any]) -> None:  # fmt: skip
    peers = runs["status"]["peers"]
    for name in ("eve", "noid", "old"):
        assert name not in peers and name not in runs["stages0"]
    for name in ("eve", "noid"):  # refused at the TLS handshake: the process says so, by its name
        assert f"peer {name}: linked to no process of swarm" in swarm["procs"].log(name)
    # an expired certificate: the process refuses to start, naming it; forced through zenoh, TLS refuses it
    got = subprocess.run([sys.executable, "-m", "layerwise", "swarm", "serve", "--join", swarm["tls"], "--identity",
                          str(pki["old"])], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert got.returncode == 2 and "(old, peer): certificate expired" in got.stderr
    for who in ("old", "eve"):
        c = config(connect=[swarm["tls"]], listen=["tls/127.0.0.1:0"])
        tls_config(c, str(pki[who]))
        with zenoh.open(c) as session:
            time.sleep(1.5)
            assert list(session.info.peers_zid()) == []
            assert list(session.get(peer_key(swarm["name"], "p0"), timeout=1.0)) == []


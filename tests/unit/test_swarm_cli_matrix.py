"""Every swarm option, alone and combined with the others of its command: runs or is refused at once.

The command line is parsed and validated for real, in this process; only the step that would open
a zenoh session (the trainer, the peer's serve loop, the demo's processes) is replaced by a stub
that records the options it was given. A combination is either refused with exit 2 and one
``error:`` line, or reaches that step with the options as asked. Real runs of these options are in
tests/integration/test_swarm_*.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

import layerwise.swarm.demo as swarm_demo
import layerwise.swarm.peer as swarm_peer
import layerwise.swarm.trainer as swarm_trainer
from layerwise.cli import main

SWARM = "matrix"
MODES = ("none", "bf16", "int8", "int6", "int4", "lowrank")


class _Reached(Exception):
    def __init__(self, opts: Any) -> None:
        self.opts = opts


class _NoPeers:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __enter__(self) -> _NoPeers:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _stop(*args: Any, **kw: Any) -> None:
    raise _Reached(args[-1] if args else kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A swarm CA with a trainer, a peer and a relay identity, made through the CLI (init, invite, revoke)."""
    d = tmp_path_factory.mktemp("pki")
    ca = str(d / "ca")
    assert main(["swarm", "init", ca, "--swarm", SWARM]) == 0
    assert main(["swarm", "invite", "t", "--role", "trainer", "--out", str(d / "t"), "--ca", ca, "--days", "2"]) == 0
    assert main(["swarm", "invite", "p", "--role", "peer", "--out", str(d / "p"), "--ca", ca]) == 0
    assert main(["swarm", "invite", "r", "--role", "relay", "--out", str(d / "r"), "--ca", ca]) == 0
    assert main(["swarm", "invite", "gone", "--role", "peer", "--out", str(d / "gone"), "--ca", ca]) == 0
    assert main(["swarm", "revoke", "gone", "--ca", ca]) == 0
    return d


@pytest.fixture(autouse=True)
def _no_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm_trainer, "Trainer", lambda spec, opts: _stop(opts))
    monkeypatch.setattr(swarm_peer, "serve", lambda opts, **kw: _stop(opts))
    monkeypatch.setattr(swarm_demo, "LocalPeers", _NoPeers)
    monkeypatch.setattr(swarm_demo, "Trainer", lambda spec, opts: _stop(opts))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, Any]:
    capsys.readouterr()
    try:
        rc = main(["swarm", *argv])
    except _Reached as r:
        return "ran", r.opts
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    return "refused", err


def _where(identity: bool, relay: bool, pki: Path, role: str) -> list[str]:
    ident = ["--identity", str(pki / role), "--crl", str(pki / "ca" / "crl.pem")] if identity else []
    if relay:  # with an identity, the relay is mutual TLS too
        return [*ident, "--relay", f"{'tls' if identity else 'tcp'}/127.0.0.1:7448"]
    return [*ident, "--listen", f"{'tls' if identity else 'tcp'}/127.0.0.1:7447"]


TRAIN = list(itertools.product(MODES, (0.0, 0.05), (False, True), (False, True), ("gpipe", "1f1b")))


@pytest.mark.parametrize("compress,spot,identity,relay,schedule", TRAIN)
def test_train_option_matrix(compress: str, spot: float, identity: bool, relay: bool, schedule: str, pki: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = ["train", "--swarm", SWARM, *_where(identity, relay, pki, "t"), "--compress", compress,
            "--compress-rank", "4", "--spot-check", str(spot), "--ban-after", "3", "--lease-ms", "800",
            "--schedule", schedule, "--steps", "2", "--wait", "1", "--probation-checks", "40"]  # fmt: skip
    got, opts = _run(argv, capsys)
    lossy_checked = spot > 0 and compress != "none"
    assert got == ("refused" if lossy_checked else "ran"), (argv, opts)
    if got == "refused":
        assert "--spot-check" in opts, opts
        return
    assert (opts.compress.mode, opts.spot_check, opts.ban_after, opts.lease_ms) == (compress, spot, 3, 800)
    assert opts.probation_checks == 40
    assert (opts.identity is not None, bool(opts.relay)) == (identity, relay)


SERVE = list(itertools.product(("", "corrupt:0.05", "nan:0.1"), (None, "1", "0.01"), (False, True), (False, True)))


@pytest.mark.parametrize("fault,mib,identity,relay", SERVE)
def test_serve_option_matrix(fault: str, mib: str | None, identity: bool, relay: bool, pki: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = ["serve", "--swarm", SWARM, *_where(identity, relay, pki, "p"), "--lease-ms", "900"]
    argv += (["--fault", fault] if fault else []) + (["--max-message-mib", mib] if mib else [])
    got, opts = _run(argv, capsys)
    too_small = mib == "0.01"  # 10 KiB: below the 64 KiB every reply header needs
    assert got == ("refused" if too_small else "ran"), (argv, opts)
    if got == "ran":
        assert (opts.fault, opts.lease_ms, opts.identity is not None, bool(opts.relay)) == (fault, 900, identity, relay)
        assert opts.max_message == (1 << 20 if mib == "1" else opts.max_message)


@pytest.mark.parametrize("mtls,compress,schedule", list(itertools.product((False, True), MODES, ("gpipe", "1f1b"))))
def test_demo_option_matrix(mtls: bool, compress: str, schedule: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--peers", "2", "--kill", "1", "--steps", "3", "--compress", compress, "--schedule", schedule]
    got, opts = _run(argv + (["--mtls"] if mtls else []), capsys)
    assert got == "ran"
    assert (opts.compress.mode, opts.identity is not None) == (compress, mtls)


@pytest.mark.parametrize("argv,why", [
    (["train", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--checkpoint-every", "5"], "--checkpoint"),
    (["serve", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--crl", "x.pem"], "--crl needs --identity"),
    (["serve", "--swarm", SWARM, "--listen", "tls/127.0.0.1:7447"], "mutual TLS"),
    (["serve", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--fault", "corrupt:2"], "fault"),
    (["serve", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--fault", "corrupt:0.1@-3"], "fault"),
    (["serve", "--swarm", SWARM, "--relay", "tls/127.0.0.1:7448"], "mutual TLS"),
    (["train", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--probation-checks", "-1"], "--probation-checks"),
    (["status", "--join", "tcp/127.0.0.1:7447", "--web", "0", "--json"], "--json"),
    (["status", "--join", "tcp/127.0.0.1:7447", "--web", "70000"], "--web"),
])  # fmt: skip
def test_options_that_need_another_are_refused(argv: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    got, err = _run(argv, capsys)
    assert got == "refused" and why in err, err


def test_identities_of_the_wrong_role_or_revoked_are_refused(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--listen", "tls/127.0.0.1:7447", "--swarm", SWARM]
    for argv, why in ((["train", *where, "--identity", str(pki / "p")], "peer certificate"),
                      (["serve", *where, "--identity", str(pki / "t")], "trainer certificate"),
                      (["serve", *where, "--identity", str(pki / "r")], "relay certificate"),
                      (["status", "--join", "tls/127.0.0.1:7447", "--identity", str(pki / "r")], "relay certificate"),
                      (["train", "--swarm", SWARM, "--identity", str(pki / "t"), "--relay", "tcp/127.0.0.1:7448"],
                       "use tls/"),
                      (["serve", *where, "--identity", str(pki / "gone"), "--crl", str(pki / "ca" / "crl.pem")],
                       "revoked")):  # fmt: skip
        got, err = _run(argv, capsys)
        assert got == "refused" and why in err, (argv, err)
    got, opts = _run(["train", "--listen", "tcp/127.0.0.1:7447", "--swarm", SWARM, "--checkpoint", str(pki / "ck"),
                      "--checkpoint-every", "5"], capsys)  # fmt: skip
    assert got == "ran" and opts.checkpoint_every == 5  # with the directory it needs, it gets through


@pytest.mark.parametrize("listen,lease,ident", list(itertools.product(
    (["tcp/127.0.0.1:7449"], ["tcp/127.0.0.1:7449", "tcp/127.0.0.1:7450"], ["nonsense"]), (None, "800", "0"),
    (None, "r", "p", "r-on-tcp"))))
def test_relay_option_matrix(listen: list[str], lease: str | None, ident: str | None, pki: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import layerwise.swarm.relay as relay

    seen: list[Any] = []
    monkeypatch.setattr(relay, "run_relay", lambda listen, lease_ms, **kw: seen.append((listen, lease_ms,
                                                                                        kw["identity"])))
    if ident in ("r", "p"):  # mutual TLS listens on tls/ endpoints
        listen = [e.replace("tcp/", "tls/") for e in listen]
    argv = ["relay", *[a for e in listen for a in ("--listen", e)]] + (["--lease-ms", lease] if lease else [])
    argv += ["--identity", str(pki / ident.split("-")[0])] if ident else []
    capsys.readouterr()
    rc = main(["swarm", *argv])
    err = capsys.readouterr().err
    if listen == ["nonsense"] or lease == "0" or ident in ("p", "r-on-tcp"):
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and not seen, (argv, err)
        if ident == "p" and listen != ["nonsense"] and lease != "0":
            assert "this needs a relay one" in err, err
    else:
        assert rc == 0 and len(seen) == 1 and seen[0][:2] == (listen, int(lease or 1000)), (argv, seen, err)
        assert (seen[0][2] is not None and seen[0][2].name == "r") if ident else seen[0][2] is None


SHAPE = list(itertools.product((None, "1", "3", "0"), (None, "0.5", "0", "-1", "nan"), (False, True), ("gpipe", "1f1b")))


@pytest.mark.parametrize("stages,norm,tie,schedule", SHAPE)
def test_replica_clipping_and_tie_options_with_train_and_demo(stages: str | None, norm: str | None, tie: bool,
                                                              schedule: str, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--max-stages (train), --max-grad-norm and --tie-embeddings (train and demo) reach the trainer
    as asked, with either schedule, or are refused in one line (a stage count or a norm out of range)."""
    specs: list[Any] = []
    monkeypatch.setattr(swarm_trainer, "Trainer", lambda spec, opts: (specs.append(spec), _stop(opts)))
    monkeypatch.setattr(swarm_demo, "Trainer", lambda spec, opts: (specs.append(spec), _stop(opts)))
    shape = (["--max-grad-norm", norm] if norm else []) + (["--tie-embeddings"] if tie else [])
    shape += ["--schedule", schedule]
    bad_norm = norm in ("-1", "nan")
    for argv, takes_stages in ((["train", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--steps", "2"], True),
                               (["demo", "--peers", "2", "--steps", "2"], False)):  # fmt: skip
        argv = argv + shape + (["--max-stages", stages] if stages and takes_stages else [])
        got, opts = _run(argv, capsys)
        if bad_norm or (takes_stages and stages == "0"):
            assert got == "refused", (argv, opts)
            assert ("--max-stages" if takes_stages and stages == "0" else "max_grad_norm") in opts, opts
            continue
        assert got == "ran", (argv, opts)
        spec = specs[-1]
        assert (spec.max_grad_norm, spec.tie_embeddings, spec.schedule) == (float(norm or 0), tie, schedule)
        if takes_stages:
            assert opts.max_stages == (int(stages) if stages else None)


@pytest.mark.parametrize("compress,no_ef", list(itertools.product(MODES, (False, True))))
def test_compress_no_ef_runs_with_the_int_codecs_and_is_refused_with_the_others(
        compress: str, no_ef: bool, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for argv in (["train", "--swarm", SWARM, "--listen", "tcp/127.0.0.1:7447", "--compress", compress],
                 ["demo", "--peers", "2", "--steps", "2", "--compress", compress]):  # fmt: skip
        got, opts = _run(argv + (["--compress-no-ef"] if no_ef else []), capsys)
        if no_ef and compress not in ("int8", "int6", "int4"):
            assert got == "refused" and "--compress-no-ef" in opts, opts
            continue
        assert got == "ran" and (opts.compress.mode, opts.compress.error_feedback) == (compress, not no_ef)

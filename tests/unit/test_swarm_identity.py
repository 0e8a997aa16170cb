"""The swarm CA (init / invite / revoke), the certificate checks, the signed hello and the request MAC.

No zenoh here: the hello runs between a :class:`Client` and a :class:`Guard` in one process, the
bytes they would put in zenoh attachments passed by hand. The CLI's bad input is at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerwise.swarm.access import Guard
from layerwise.swarm.access_client import Client
from layerwise.swarm.identity import Identity, IdentityError, Refused, init_ca, issue, revoke, throwaway
from layerwise.swarm.wire import Message, encode_message

KEY = "lw/s/peer/p0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ids = throwaway(root, "s", {"tr": "trainer", "p0": "peer", "p1": "peer", "bad": "trainer", "hub": "relay"})
    t = dt.datetime.now(dt.timezone.utc)
    ids["old"] = issue(root / "ca", "old", "peer", root / "old", not_before=t - dt.timedelta(days=2),
                       not_after=t - dt.timedelta(days=1))  # fmt: skip
    other = throwaway(root / "other", "s", {"eve": "peer"})  # same swarm name, another CA
    ids["eve"] = other["eve"]
    ids["ca"] = root / "ca"
    return ids


def test_init_and_invite_write_a_ca_and_identities_with_private_keys(pki: dict[str, Path]) -> None:
    ca = pki["ca"]
    assert {p.name for p in ca.iterdir()} == {"ca.pem", "ca-key.pem", "issued.json", "crl.pem"}
    assert (ca / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert (pki["p0"] / "key.pem").stat().st_mode & 0o077 == 0
    issued = {e["name"]: e for e in json.loads((ca / "issued.json").read_text())}
    assert issued["tr"]["role"] == "trainer" and issued["p0"]["role"] == "peer" and not issued["p0"]["revoked"]
    me = Identity(pki["p0"])
    assert (me.name, me.role, me.swarm) == ("p0", "peer", "s")
    with pytest.raises(IdentityError, match="already holds a swarm CA"):
        init_ca(ca, "s")
    with pytest.raises(IdentityError, match="already holds an identity"):
        issue(ca, "p0", "peer", pki["p0"])
    with pytest.raises(IdentityError, match="role must be"):
        issue(ca, "x", "admin", ca.parent / "x")
    with pytest.raises(IdentityError, match="zenoh keys"):
        issue(ca, "a/b", "peer", ca.parent / "x")


def test_each_bad_certificate_is_refused_by_name_with_its_reason(pki: dict[str, Path]) -> None:
    me = Identity(pki["tr"])
    cert = lambda n: (pki[n] / "cert.pem").read_text()  # noqa: E731
    assert me.check(cert("p0"), roles=("peer",), name="p0").serial_number > 0
    cases = [
        (cert("eve"), {}, "eve", "another swarm|not signed by this swarm"),
        (cert("old"), {}, "old", "expired at"),
        (cert("tr"), {"roles": ("peer",)}, "tr", "holds a trainer certificate; this needs peer"),
        (cert("p1"), {"name": "p0"}, "p0", "presents the certificate of 'p1'"),
        ("not a certificate", {"name": "x"}, "x", "no readable certificate"),
    ]
    for pem, kw, who, why in cases:
        with pytest.raises(Refused, match=why) as got:
            me.check(pem, **kw)  # type: ignore[arg-type]
        assert got.value.name == who
    future = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    with pytest.raises(Refused, match="not valid before"):
        me.check(cert("p0"), at=future)
    with pytest.raises(IdentityError, match=r"\(old, peer\): certificate expired"):
        Identity(pki["old"])  # a process refuses to start with its own expired certificate


def test_revoke_resigns_the_list_and_a_process_adopts_only_newer_lists_of_its_ca(tmp_path: Path) -> None:
    ids = throwaway(tmp_path, "s", {"tr": "trainer", "p0": "peer"})
    ca = tmp_path / "ca"
    me = Identity(ids["tr"], crl_path=ca / "crl.pem")
    old_crl = (ca / "crl.pem").read_bytes()
    p0 = (ids["p0"] / "cert.pem").read_text()
    me.check(p0)
    assert revoke(ca, "p0") and json.loads((ca / "issued.json").read_text())[1]["revoked"]
    assert me.refresh()  # the file changed: the newer list is adopted
    with pytest.raises(Refused, match="revoked"):
        me.check(p0)
    assert not me.adopt_crl(old_crl)  # an older list never undoes a revocation
    with pytest.raises(Refused, match="revoked"):
        me.check(p0)
    foreign = throwaway(tmp_path / "x", "s", {"a": "peer"})
    with pytest.raises(Refused, match="not signed by this swarm's CA"):
        me.adopt_crl((foreign["a"] / "crl.pem").read_bytes())
    with pytest.raises(IdentityError, match="no certificate was issued to 'zed'"):
        revoke(ca, "zed")


def _hello(client: Client, guard: Guard, name: str = "p0") -> None:
    h1, st = client.hello_start()
    a = guard.admit(h1, KEY, b"")
    assert a.refused is None and a.hello is not None, a.refused
    h3 = client.hello_finish(KEY, a.hello, st, name, ("peer",))
    b = guard.admit(h3, KEY, b"")
    assert b.refused is None and b.hello == b"H4", b.refused


def _send(client: Client, guard: Guard, msg: Message) -> tuple[bytes, int, object]:
    data = encode_message(msg)
    sess = client.session_for(KEY)
    assert sess is not None
    att, counter = client._seal(sess, KEY, data)
    return att, counter, guard.admit(att, KEY, data)


def test_signed_hello_then_mac_policy_replay_and_tampering(pki: dict[str, Path]) -> None:
    guard = Guard(Identity(pki["p0"]))
    trainer = Client(Identity(pki["tr"]))
    _hello(trainer, guard)
    assert guard.names() == {"tr": "trainer"}
    fwd = Message("forward", step=0, stage=0, mb=0)
    att, counter, adm = _send(trainer, guard, fwd)
    assert adm.session is not None and adm.session.name == "tr"  # type: ignore[attr-defined]
    reply = b"reply bytes"
    sess = trainer.session_for(KEY)
    assert trainer._opened(sess, counter, adm.attachment(reply), reply)  # type: ignore[arg-type, attr-defined]
    assert not trainer._opened(sess, counter, adm.attachment(reply), b"other")  # type: ignore[arg-type, attr-defined]
    again = guard.admit(att, KEY, encode_message(fwd))  # the same request sent twice
    assert again.session is None and "replayed" in str(again.refused)
    data = bytearray(encode_message(fwd))
    data[-1] ^= 1
    att2, _, _ = _send(trainer, guard, Message("status"))
    assert "wrong MAC" in str(guard.admit(att2, KEY, bytes(data)).refused)
    assert "without the signed hello" in str(guard.admit(None, KEY, bytes(data)).refused)
    # a peer's certificate gets a session, but only for status
    intruder = Client(Identity(pki["p1"]))
    _hello(intruder, guard)
    for kind in ("install", "forward", "backward", "commit", "reset", "get_state", "hello"):
        _, _, adm = _send(intruder, guard, Message(kind))
        assert adm.session is None and "only a trainer may send" in str(adm.refused)  # type: ignore[attr-defined]
    _, _, adm = _send(intruder, guard, Message("status"))
    assert adm.session is not None  # type: ignore[attr-defined]
    names = {r["name"] for r in guard.refusals.list()}
    assert {"p1", "tr", "(no session)"} <= names


def test_requests_sealed_from_many_threads_get_distinct_counters_and_all_pass(pki: dict[str, Path]) -> None:
    """The trainer's stage threads seal at once (no lock around the counter): no counter is drawn
    twice, so the server's replay window takes every request once."""
    guard = Guard(Identity(pki["p1"]))
    trainer = Client(Identity(pki["tr"]))
    _hello(trainer, guard, "p1")
    sess = trainer.session_for(KEY)
    assert sess is not None
    data = encode_message(Message("forward", step=0, stage=0, mb=0))
    sealed: list[tuple[bytes, int]] = []

    def seal_many() -> None:
        for _ in range(500):
            sealed.append(trainer._seal(sess, KEY, data))  # list.append is atomic

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({c for _, c in sealed}) == len(sealed) == 2000
    sealed.sort(key=lambda x: -x[1])  # the newest first: every one is still inside the window
    assert all(guard.admit(att, KEY, data).session is not None for att, _ in sealed)
    assert guard.admit(sealed[0][0], KEY, data).session is None  # and none twice


def test_hello_refuses_wrong_server_and_revoked_or_foreign_clients(pki: dict[str, Path], tmp_path: Path) -> None:
    trainer = Client(Identity(pki["tr"]))
    h1, st = trainer.hello_start()
    server = Guard(Identity(pki["p1"]))
    a = server.admit(h1, KEY, b"")
    with pytest.raises(Refused, match="presents the certificate of 'p1'"):
        trainer.hello_finish(KEY, a.hello, st, "p0", ("peer",))  # p1 answering on p0's key
    with pytest.raises(Refused, match="without an identity"):
        trainer.hello_finish(KEY, None, st, "p0", ("peer",))
    eve = Client(Identity(pki["eve"]))
    h1, _ = eve.hello_start()
    assert "eve" in str(Guard(Identity(pki["p0"])).admit(h1, KEY, b"").refused)
    # a relay's certificate opens TLS links to the relay and nothing else: no process gives it a session
    hub = Client(Identity(pki["hub"]))
    h1, _ = hub.hello_start()
    assert "hub: holds a relay certificate" in str(Guard(Identity(pki["p0"])).admit(h1, KEY, b"").refused)
    # a revocation list carried in a hello reaches the server, which then refuses the revoked
    ids = throwaway(tmp_path, "s", {"tr": "trainer", "t2": "trainer", "p0": "peer"})
    revoke(tmp_path / "ca", "t2")
    honest = Client(Identity(ids["tr"], crl_path=tmp_path / "ca" / "crl.pem"))
    guard = Guard(Identity(ids["p0"]))
    bad = Client(Identity(ids["t2"]))
    h1, st = bad.hello_start()
    a = guard.admit(h1, KEY, b"")
    assert a.refused is None  # p0 has not heard of the revocation yet
    _hello(honest, guard)
    h1, st = bad.hello_start()
    assert "t2: certificate revoked" in str(guard.admit(h1, KEY, b"").refused)


def test_the_replay_window_takes_each_counter_once_in_any_order_within_it() -> None:
    from layerwise.swarm.access import WINDOW, Session

    s = Session(aead=None, name="x", role="peer", serial=1, expires=0.0)  # type: ignore[arg-type]
    assert [s.fresh(c) for c in (1, 3, 2, 2, 3, 1)] == [True, True, True, False, False, False]
    top = 10 * WINDOW
    assert s.fresh(top) and s.fresh(top - WINDOW + 1) and not s.fresh(top - WINDOW + 1)
    assert not s.fresh(top - WINDOW) and not s.fresh(5)  # too old to tell: refused as a replay
    assert s.fresh(top + 1) and not s.fresh(top)


CLI_BAD = [
    ["init"],
    ["invite", "p0", "--out", "X"],
    ["invite", "p0", "--role", "boss", "--out", "X"],
    ["invite", "p0", "--role", "peer", "--out", "X", "--ca", "/nonexistent"],
    ["invite", "p0", "--role", "peer", "--out", "X", "--ca", "CA", "--days", "0"],
    ["invite", "a*b", "--role", "peer", "--out", "X", "--ca", "CA"],
    ["revoke", "nobody", "--ca", "CA"],
    ["init", "CA"],
    ["serve", "--listen", "tcp/127.0.0.1:1", "--identity", "/nonexistent"],
    ["serve", "--listen", "tcp/127.0.0.1:1", "--identity", "P"],
    ["serve", "--listen", "tls/127.0.0.1:1", "--identity", "T"],
    ["serve", "--listen", "tls/127.0.0.1:1", "--identity", "P", "--name", "other"],
    ["serve", "--listen", "tls/127.0.0.1:1"],
    ["serve", "--listen", "tcp/127.0.0.1:1", "--crl", "CA/crl.pem"],
    ["train", "--listen", "tls/127.0.0.1:1", "--identity", "P"],
    ["train", "--listen", "tls/127.0.0.1:1", "--identity", "T", "--crl", "/nonexistent"],
    ["status", "--join", "tcp/127.0.0.1:1", "--identity", "P"],
]


def test_cli_bad_input_is_one_error_line_with_exit_2(tmp_path: Path) -> None:
    ids = throwaway(tmp_path, "s", {"t": "trainer", "p": "peer"})
    subst = {"CA": str(tmp_path / "ca"), "P": str(ids["p"]), "T": str(ids["t"]), "X": str(tmp_path / "x")}
    code = ("import sys\nfrom layerwise.cli import main\nfor line in sys.stdin:\n"
            "    args = line.split('\\t')\n"
            "    try:\n        rc = main(['swarm', *[a.strip() for a in args]])\n"
            "    except SystemExit as e:\n        rc = e.code\n"
            "    print('RC', rc, file=sys.stderr, flush=True)\n")  # fmt: skip
    lines = ["\t".join(subst.get(a, a.replace("CA", subst["CA"])) for a in case) for case in CLI_BAD]
    got = subprocess.run([sys.executable, "-c", code], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    out = got.stderr.splitlines()
    assert "Traceback" not in got.stderr, got.stderr[-2000:]
    rcs = [line for line in out if line.startswith("RC ")]
    assert len(rcs) == len(CLI_BAD), got.stderr[-2000:]
    errors = [line for line in out if not line.startswith("RC ") and not line.startswith("usage:")]
    for case, rc, err in zip(CLI_BAD, rcs, errors):
        assert rc == "RC 2" and err.startswith(("error:", "layerwise swarm")), (case, rc, err)
    assert len(errors) == len(CLI_BAD), errors


def test_status_text_lists_refusals_by_name() -> None:
    from layerwise.commands.swarm import format_status

    tr = {"step": 3, "loss": 1.0, "steps_per_s": 2.0, "stages": [], "failures": [],
          "refused": [{"name": "eve", "why": "certificate revoked", "at": 1.0, "by": "p0"}]}  # fmt: skip
    text = format_status({"swarm": "s", "peers": {}, "trainer": tr})
    assert "refused eve (by p0): certificate revoked" in text

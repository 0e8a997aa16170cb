"""The client side of the access protocol (:mod:`.access`): the trainer and ``swarm status``.

One session per server key, made by the signed hello on first use; every request sealed with the
session's GMAC tag and counter, every reply checked against it.
"""

from __future__ import annotations

import hmac
import itertools
import json
import os
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .access import _CTR, Refusals, _ClientSession, _derive, _kx_pub, _mac, _transcript, _verify_sig
from .errors import PeerRefused
from .identity import Identity, Refused, cert_name, fingerprint


class Client:
    """The client side (the trainer, ``swarm status``): one session per server key, made on first use."""

    def __init__(self, identity: Identity) -> None:
        self.id = identity
        self._sessions: dict[str, _ClientSession] = {}  # server key -> (session id, GMAC, its name, serial)
        self._counter = itertools.count(1)  # next() is atomic under the GIL: stage threads never draw one counter twice
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.refusals = Refusals()

    def session_for(self, key: str) -> _ClientSession | None:
        return self._sessions.get(key)  # one dict read: atomic; only changes take the lock

    def forget(self, key: str | None = None) -> None:
        """Drop one session (or all): the next request says hello again, with our newest CRL."""
        with self._lock:
            if key is None:
                self._sessions.clear()
            else:
                self._sessions.pop(key, None)

    def hello_start(self) -> tuple[bytes, dict[str, Any]]:
        kx = X25519PrivateKey.generate()
        st = {"nonce": os.urandom(16).hex(), "kx": kx, "kxp": _kx_pub(kx)}
        msg = {"cert": self.id.cert_pem, "nonce": st["nonce"], "kx": st["kxp"], "crl": self.id.crl_pem}
        return b"H1" + json.dumps(msg).encode(), st

    def hello_finish(self, key: str, att: bytes | None, st: dict[str, Any], name: str | None,
                     roles: tuple[str, ...]) -> bytes:  # fmt: skip
        """Check the server's ``H2``; returns the ``H3`` attachment and keeps the (pending) session."""
        who = name or key
        if not att or att[:2] != b"H2":
            raise Refused(who, "answered the hello without an identity (it does not run with --identity)")
        h = json.loads(att[2:])
        cert = self.id.check(str(h["cert"]), roles=roles, name=name)
        if h.get("crl"):
            try:
                if self.id.adopt_crl(h["crl"]):
                    cert = self.id.check(str(h["cert"]), roles=roles, name=name)
            except Refused:
                pass  # a list not signed by our CA: ignore it, the certificate itself passed
        t = _transcript(self.id.swarm, fingerprint(self.id.cert), fingerprint(cert), st["nonce"], str(h["nonce"]),
                        st["kxp"], str(h["kx"]))  # fmt: skip
        _verify_sig(cert, str(h["sig"]), t + b"server", who)
        skey = _derive(st["kx"].exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(str(h["kx"])))), t)
        sid = bytes.fromhex(str(h["session"]))
        with self._lock:
            self._sessions[key] = (sid, AESGCM(skey), cert_name(cert), cert.serial_number)
        return b"H3" + json.dumps({"session": sid.hex(), "sig": self.id.sign(t + b"client").hex()}).encode()

    def serials(self) -> dict[str, int]:
        with self._lock:
            return {k: v[3] for k, v in self._sessions.items()}

    # -- one request through the session (Node.request calls this) ---------------------------
    def request(self, node: Any, peer: str, key: str, is_peer: bool, msg: Any, data: bytes, timeout: float,
                limit: int | None = None) -> Any:  # fmt: skip
        """Say hello first if needed (the server must hold a ``peer`` certificate named ``peer``, or,
        for the trainer's key, a ``trainer`` one), then send ``data`` with its MAC."""
        for attempt in (0, 1):
            if self.session_for(key) is None:
                self._hello(node, peer, key, is_peer, timeout)
            sess = self.session_for(key)
            assert sess is not None
            att, counter = self._seal(sess, key, data)
            try:
                return node.exchange(peer, key, msg, data, timeout, att,
                                     lambda a, raw: self._opened(sess, counter, a, raw),
                                     **({} if limit is None else {"limit": limit}))  # fmt: skip
            except PeerRefused as e:
                if attempt == 0 and "say hello again" in str(e):  # the server restarted or dropped us
                    self.forget(key)
                    continue
                raise
        raise AssertionError("unreachable")

    def _hello(self, node: Any, peer: str, key: str, is_peer: bool, timeout: float) -> None:
        from .wire import Message, encode_message

        with self._hello_lock(key):
            if self.session_for(key) is not None:
                return  # another thread of this trainer said hello meanwhile
            status = Message("status")
            data = encode_message(status)
            h1, st = self.hello_start()
            got: dict[str, bytes | None] = {}

            def keep(att: bytes | None, raw: bytes) -> bool:
                if att and att[:2] in (b"H2", b"H4"):
                    got["att"] = att
                    return True
                return False

            name, roles = (peer, ("peer",)) if is_peer else (None, ("trainer",))
            try:
                node.exchange(peer, key, status, data, min(timeout, 30.0), h1, keep)
                h3 = self.hello_finish(key, got.get("att"), st, name, roles)
                got.clear()
                node.exchange(peer, key, status, data, min(timeout, 30.0), h3, keep)
            except Refused as r:
                self.forget(key)
                self.refusals.add(r.name, r.why)
                raise
            except PeerRefused as e:
                self.forget(key)
                raise Refused(peer, f"refused our hello: {e}") from None
            except BaseException:
                self.forget(key)
                raise

    def _hello_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    def _seal(self, sess: _ClientSession, key: str, payload: bytes) -> tuple[bytes, int]:
        counter = next(self._counter)
        return b"M" + sess[0] + _CTR.pack(counter) + _mac(sess[1], b"q", counter, payload), counter

    @staticmethod
    def _opened(sess: _ClientSession, counter: int, att: bytes | None, payload: bytes) -> bool:
        if not att or att[:1] != b"R":
            return False
        return hmac.compare_digest(att[1:], _mac(sess[1], b"r", counter, payload))

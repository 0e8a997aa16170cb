"""A swarm's certificate authority, the certificates it issues, and the checks every process makes.

Files on disk (PEM everywhere, keys readable by their owner only):

- a CA directory (``layerwise swarm init DIR``): ``ca.pem`` and ``ca-key.pem``, ``issued.json``
  (every certificate issued: name, role, serial, expiry, revoked) and ``crl.pem``, an X.509
  revocation list signed by the CA, whose CRL number grows with every ``revoke``;
- an identity directory (``layerwise swarm invite NAME --role ROLE --out DIR``): ``cert.pem`` and
  ``key.pem`` of NAME, plus ``ca.pem`` and a copy of ``crl.pem`` as of the invitation.

A certificate names its holder (subject CN), its role (OU: ``peer``, ``trainer`` or ``relay``) and its swarm
(O: the CA's name). Keys are ECDSA P-256, which rustls (zenoh's TLS) and ``cryptography`` both
speak; the certificates carry both TLS usages (server and client), since every swarm process
both listens and connects. The same files configure zenoh's mutual TLS (:mod:`.net`) and the
signed hello of :mod:`.access`, whose :meth:`Identity.check` is the one place a certificate is
judged: chain to this swarm's CA, validity period, role, revocation.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import SwarmError

MEMBER_ROLES = ("peer", "trainer")  # who may take part in a run (the signed hello of access.py)
# a relay (relay.py) only forwards: its certificate opens TLS links to it and to nothing else
ROLES = (*MEMBER_ROLES, "relay")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a zenoh key chunk: no / * $ ? #
_UTC = dt.timezone.utc
T = TypeVar("T")


class IdentityError(SwarmError):
    """A CA or identity directory that is missing, incomplete, or used the wrong way."""


class Refused(SwarmError):
    """A certificate (or a request) that this swarm does not accept; ``name`` says whose."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name, self.why = name, why


def now() -> dt.datetime:
    return dt.datetime.now(_UTC)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise IdentityError(f"name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it is used in zenoh keys)")
    return name


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers (a running trainer re-reading crl.pem) never see half a file


def _pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    got = cert.subject.get_attributes_for_oid(oid)
    return str(got[0].value) if got else ""


def cert_name(cert: x509.Certificate) -> str:
    return _attr(cert, NameOID.COMMON_NAME)


def cert_role(cert: x509.Certificate) -> str:
    return _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


# -- the certificate authority ----------------------------------------------------------------
def init_ca(directory: str | os.PathLike[str], swarm: str, days: int = 3650) -> Path:
    """Create a CA for swarm ``swarm`` in ``directory`` (which must not hold one already)."""
    d = Path(directory)
    check_name(swarm)
    if (d / "ca-key.pem").exists():
        raise IdentityError(f"{d} already holds a swarm CA (ca-key.pem); choose another directory")
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{swarm} CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, swarm)])  # fmt: skip
    t = now()
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(minutes=5)).not_valid_after(t + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write(d / "ca-key.pem", _key_pem(key), private=True)
    _write(d / "ca.pem", _pem(cert))
    _write(d / "issued.json", b"[]\n")
    _write(d / "crl.pem", _pem(_sign_crl(key, cert, [], 1)))
    return d


@dataclass(frozen=True)
class _CA:
    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    issued: list[dict[str, object]]

    @property
    def swarm(self) -> str:
        return _attr(self.cert, NameOID.ORGANIZATION_NAME)


def _load_ca(directory: str | os.PathLike[str]) -> _CA:
    d = Path(directory)
    key, cert, issued = _read(
        d, "a swarm CA", "CA", f"create one with 'layerwise swarm init {d}'",
        lambda: (serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None),
                 x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()),
                 json.loads((d / "issued.json").read_text())),
    )  # fmt: skip
    return _CA(d, _ec_key(key, d / "ca-key.pem"), cert, issued)


def _read(d: Path, what: str, kind: str, hint: str, load: Callable[[], T]) -> T:
    """``load()`` the files of directory ``d``, a missing or unreadable one named in one line."""
    try:
        return load()
    except FileNotFoundError as e:
        raise IdentityError(f"{d} is not {what} directory (missing {Path(e.filename).name}); {hint}") from None
    except ValueError as e:
        raise IdentityError(f"{d}: unreadable {kind} file: {e}") from None


def _ec_key(key: Any, path: Path) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{path} is not an ECDSA key")
    return key


def _sign_crl(key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, serials: list[tuple[int, dt.datetime]],
              number: int) -> x509.CertificateRevocationList:  # fmt: skip
    t = now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(t)
         .next_update(t + dt.timedelta(days=3650)).add_extension(x509.CRLNumber(number), critical=False))  # fmt: skip
    for serial, when in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return b.sign(key, hashes.SHA256())


def issue(ca_dir: str | os.PathLike[str], name: str, role: str, out: str | os.PathLike[str], days: float = 365,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Path:  # fmt: skip
    """Issue NAME's certificate and key into ``out``; ``not_before``/``not_after`` override ``days`` (tests)."""
    check_name(name)
    if role not in ROLES:
        raise IdentityError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not days > 0:
        raise IdentityError(f"--days must be > 0, got {days}")
    ca = _load_ca(ca_dir)
    o = Path(out)
    if (o / "key.pem").exists():
        raise IdentityError(f"{o} already holds an identity (key.pem); choose another --out directory")
    t = now()
    start = not_before or t - dt.timedelta(minutes=5)  # clocks of a swarm's hosts differ a little
    end = not_after or t + dt.timedelta(days=days)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=True,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.swarm)])  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip
    o.mkdir(parents=True, exist_ok=True)
    _write(o / "key.pem", _key_pem(key), private=True)
    _write(o / "cert.pem", _pem(cert))
    _write(o / "ca.pem", _pem(ca.cert))
    _write(o / "crl.pem", (Path(ca_dir) / "crl.pem").read_bytes())
    ca.issued.append({"name": name, "role": role, "serial": format(cert.serial_number, "x"),
                      "not_after": end.isoformat(), "revoked": False})  # fmt: skip
    _write(ca.dir / "issued.json", (json.dumps(ca.issued, indent=1) + "\n").encode())
    return o


def revoke(ca_dir: str | os.PathLike[str], name: str) -> list[str]:
    """Revoke every certificate issued to ``name``; returns their serials. Re-signs ``crl.pem``."""
    ca = _load_ca(ca_dir)
    hits = [e for e in ca.issued if e["name"] == name]
    if not hits:
        known = sorted({str(e["name"]) for e in ca.issued})
        raise IdentityError(f"no certificate was issued to {name!r} by {ca.dir} (issued: {', '.join(known) or 'none'})")
    for e in hits:
        e["revoked"] = True
    old = x509.load_pem_x509_crl((ca.dir / "crl.pem").read_bytes())
    kept = [(r.serial_number, r.revocation_date_utc) for r in old]
    have = {s for s, _ in kept}
    kept += [(int(str(e["serial"]), 16), now()) for e in hits if int(str(e["serial"]), 16) not in have]
    _write(ca.dir / "crl.pem", _pem(_sign_crl(ca.key, ca.cert, kept, crl_number(old) + 1)))
    _write(ca.dir / "issued.json", (json.dumps(ca.issued, indent=1) + "\n").encode())
    return [str(e["serial"]) for e in hits]


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


# -- a process's own identity -----------------------------------------------------------------
class Identity:
    """This process's certificate and key, its swarm's CA, and the newest revocation list it has seen.

    The revocation list is re-read from ``crl_path`` when the file changes (:meth:`refresh`), and a
    newer one signed by the same CA may also arrive from another process (:meth:`adopt_crl`):
    that is how a ``revoke`` reaches running processes (zenoh itself has no revocation list).
    """

    def __init__(self, directory: str | os.PathLike[str], crl_path: str | os.PathLike[str] | None = None) -> None:
        d = Path(directory)
        self.dir = d
        self.cert, self.ca, key = _read(
            d, "an identity", "identity", f"issue one with 'layerwise swarm invite NAME --role ROLE --out {d}'",
            lambda: (x509.load_pem_x509_certificate((d / "cert.pem").read_bytes()),
                     x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()),
                     serialization.load_pem_private_key((d / "key.pem").read_bytes(), None)),
        )  # fmt: skip
        self.key = _ec_key(key, d / "key.pem")
        self.name, self.role = cert_name(self.cert), cert_role(self.cert)
        self.swarm = _attr(self.ca, NameOID.ORGANIZATION_NAME)
        self.cert_pem = _pem(self.cert).decode()
        self.crl_path = Path(crl_path) if crl_path else d / "crl.pem"
        self.crl: x509.CertificateRevocationList | None = None
        self._crl_stamp: tuple[float, int] | None = None
        self.revoked: set[int] = set()
        self.refresh()  # first: a certificate its own (or the given) list revokes must not start either
        try:  # its own certificate must pass the checks every other process makes
            self.check(self.cert, roles=ROLES)
        except Refused as r:
            raise IdentityError(f"identity {d} ({self.name}, {self.role}): {r.why}") from None

    @property
    def crl_pem(self) -> str | None:
        return _pem(self.crl).decode() if self.crl is not None else None

    def refresh(self) -> bool:
        """Re-read the revocation list file if it changed; True if a newer list was adopted."""
        try:
            st = os.stat(self.crl_path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._crl_stamp:
            return False
        self._crl_stamp = stamp
        try:
            return self.adopt_crl(self.crl_path.read_bytes())
        except Refused as r:
            raise IdentityError(f"{self.crl_path}: {r.why}") from None

    def adopt_crl(self, pem: bytes | str) -> bool:
        """Take a revocation list if the CA signed it and it is newer than ours; True if taken."""
        try:
            crl = x509.load_pem_x509_crl(pem.encode() if isinstance(pem, str) else pem)
        except ValueError:
            raise Refused("revocation list", "not a PEM X.509 CRL") from None
        if crl.issuer != self.ca.subject or not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
            raise Refused("revocation list", "not signed by this swarm's CA")
        if self.crl is not None and crl_number(crl) <= crl_number(self.crl):
            return False
        self.crl = crl
        self.revoked = {r.serial_number for r in crl}
        return True

    def check(self, cert: x509.Certificate | str, roles: tuple[str, ...] = MEMBER_ROLES, name: str | None = None,
              at: dt.datetime | None = None) -> x509.Certificate:  # fmt: skip
        """Judge another process's certificate; raises :class:`Refused` naming it and saying why."""
        if isinstance(cert, str):
            try:
                cert = x509.load_pem_x509_certificate(cert.encode())
            except ValueError:
                raise Refused(name or "(unknown)", "sent no readable certificate") from None
        who = cert_name(cert) or "(no name)"
        if cert.issuer != self.ca.subject:
            raise Refused(who, f"certificate of another swarm (issued by {cert.issuer.rfc4514_string()})")
        try:
            cert.verify_directly_issued_by(self.ca)
        except (InvalidSignature, ValueError, TypeError):
            raise Refused(who, "certificate not signed by this swarm's CA (forged, or another swarm's CA)") from None
        t = at or now()
        if t > cert.not_valid_after_utc:
            raise Refused(who, f"certificate expired at {cert.not_valid_after_utc.isoformat(timespec='seconds')}")
        if t < cert.not_valid_before_utc:
            raise Refused(who, f"certificate not valid before {cert.not_valid_before_utc.isoformat(timespec='seconds')}")
        if cert.serial_number in self.revoked:
            raise Refused(who, f"certificate revoked (serial {cert.serial_number:x})")
        role = cert_role(cert)
        if role not in roles:
            raise Refused(who, f"holds a {role or 'role-less'} certificate; this needs {' or '.join(roles)}")
        if name is not None and who != name:
            raise Refused(name, f"presents the certificate of {who!r}, not its own")
        return cert

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def throwaway(root: str | os.PathLike[str], swarm: str, names: dict[str, str]) -> dict[str, Path]:
    """A CA in ``root/ca`` and an identity per ``{name: role}`` in ``root/<name>`` (demo, tests, bench)."""
    ca = init_ca(Path(root) / "ca", swarm)
    return {name: issue(ca, name, role, Path(root) / name) for name, role in names.items()}

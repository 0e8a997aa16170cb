"""``layerwise swarm init|invite|revoke`` and the ``--identity`` options of serve, train, status, demo.

Kept out of :mod:`.swarm` so that the swarm command only gains one block of hooks. Everything
here is torch-free: bad input costs a fraction of a second and exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from layerwise.commands import UsageError


def add_commands(sub: Any) -> None:
    init = sub.add_parser("init", help="create a swarm certificate authority in DIR")
    init.add_argument("dir", metavar="DIR", help="a new directory for the CA (its key stays there)")
    init.add_argument("--swarm", default="layerwise", help="the swarm's name, written into every certificate")
    invite = sub.add_parser("invite", help="issue NAME a certificate and key (an identity directory)")
    invite.add_argument("name", metavar="NAME", help="the process's name: a peer's id, or the trainer's")
    invite.add_argument("--role", required=True, choices=("peer", "trainer", "relay"),
                        help="what NAME may do: serve layers, train, or relay ('layerwise swarm relay') only")
    invite.add_argument("--out", required=True, metavar="DIR", help="the identity directory to create")
    invite.add_argument("--ca", default=".", metavar="DIR", help="the CA directory (default .)")
    invite.add_argument("--days", type=float, default=365.0, help="validity in days (default 365)")
    revoke = sub.add_parser("revoke", help="revoke every certificate issued to NAME (re-signs DIR/crl.pem)")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--ca", default=".", metavar="DIR", help="the CA directory (default .)")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", default=None, metavar="DIR",
                   help="this process's identity (layerwise swarm invite): mutual TLS on tls/ endpoints, and "
                        "only certificates of the same swarm CA are served")  # fmt: skip
    p.add_argument("--crl", default=None, metavar="FILE",
                   help="the revocation list to re-read while running, e.g. the CA's crl.pem (default: DIR/crl.pem "
                        "of --identity)")  # fmt: skip


def add_relay_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", default=None, metavar="DIR",
                   help="the relay's identity (layerwise swarm invite NAME --role relay): mutual TLS on tls/ "
                        "endpoints, only certificates of the same swarm CA may connect")  # fmt: skip
    p.set_defaults(crl=None)  # zenoh has no revocation list: the relay checks only its own certificate, at start


def load(ident: str | None) -> Any:
    """The :class:`~layerwise.swarm.identity.Identity` of a directory that :func:`check` accepted."""
    if ident is None:
        return None
    from layerwise.swarm.identity import Identity

    return Identity(ident)


def add_demo_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mtls", action="store_true",
                   help="run every process with a certificate of a throwaway swarm CA (mutual TLS, signed hello)")


def run(args: argparse.Namespace) -> int:
    from layerwise.swarm.identity import IdentityError, init_ca, issue, revoke

    try:
        if args.swarm_command == "init":
            d = init_ca(args.dir, args.swarm)
            print(f"swarm {args.swarm!r}: CA in {d} (keep {d}/ca-key.pem secret); next: layerwise swarm invite "
                  f"NAME --role peer --out DIR --ca {d}")  # fmt: skip
        elif args.swarm_command == "invite":
            out = issue(args.ca, args.name, args.role, args.out, days=args.days)
            print(f"{args.name} ({args.role}): certificate and key in {out}; give it to that process as --identity {out}")
        else:
            serials = revoke(args.ca, args.name)
            print(f"revoked {args.name} (serial {', '.join(serials)}); {args.ca}/crl.pem is re-signed: trainers "
                  f"started with --crl {args.ca}/crl.pem drop {args.name} at the next step")  # fmt: skip
    except IdentityError as e:
        raise UsageError(str(e)) from None
    return 0


def check(args: argparse.Namespace, role: str | None, endpoints: tuple[str, ...]) -> str | None:
    """Validate ``--identity``/``--crl`` before anything starts; returns the identity directory.

    ``endpoints``: where it listens and joins; its ``--relay`` endpoints are checked with them."""
    endpoints = (*endpoints, *getattr(args, "relay", ()))
    ident = getattr(args, "identity", None)
    if ident is None:
        if getattr(args, "crl", None):
            raise UsageError("--crl needs --identity DIR")
        plain = [e for e in endpoints if e.startswith("tls/")]
        if plain:
            raise UsageError(f"endpoint {plain[0]} is mutual TLS: give --identity DIR (layerwise swarm invite)")
        return None
    from layerwise.swarm.identity import Identity, IdentityError

    if args.crl is not None and not os.path.isfile(args.crl):
        raise UsageError(f"--crl {args.crl}: no such file")
    try:
        got = Identity(ident, args.crl)
    except IdentityError as e:
        raise UsageError(str(e)) from None
    if role is None and got.role == "relay":
        raise UsageError(f"--identity {ident} holds a relay certificate ({got.name}): it is good only for "
                         f"'layerwise swarm relay'")  # fmt: skip
    if role is not None and got.role != role:
        raise UsageError(f"--identity {ident} holds a {got.role} certificate ({got.name}); this needs a {role} one")
    if getattr(args, "name", None) not in (None, got.name):
        raise UsageError(f"--name {args.name} differs from the certificate's name {got.name!r}: leave --name out")
    bad = [e for e in endpoints if not e.startswith("tls/")]
    if bad:
        raise UsageError(f"with --identity, endpoints are mutual TLS: use tls/HOST:PORT, not {bad[0]}")
    return ident

"""Idle TCP connections against a zenoh listener: how long a new session waits for its first reply.

    python bench/trust_flood.py [--quick]

A listener (one process, zenoh peer mode, one queryable) gets N idle TCP connections that never
start a zenoh handshake; then a new session connects and queries it until the first reply. With
zenoh's defaults (``transport/unicast/accept_pending`` 100, ``accept_timeout`` 10 s) the idle
connections hold every pending slot; with the swarm's settings (``layerwise.swarm.net``: 4096
slots, 2 s) they do not, up to about 4096 of them. Writes ``bench/results/trust_flood.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import zenoh  # noqa: E402

from layerwise.swarm.net import ACCEPT_PENDING, ACCEPT_TIMEOUT_MS  # noqa: E402


def _config(listen: list[str], connect: list[str], swarm_settings: bool) -> zenoh.Config:
    c = zenoh.Config()
    c.insert_json5("mode", '"peer"')
    c.insert_json5("listen/endpoints", json.dumps(listen or ["tcp/127.0.0.1:0"]))
    c.insert_json5("connect/endpoints", json.dumps(connect))
    c.insert_json5("scouting/multicast/enabled", "false")
    if swarm_settings:
        c.insert_json5("transport/unicast/accept_pending", str(ACCEPT_PENDING))
        c.insert_json5("transport/unicast/accept_timeout", str(ACCEPT_TIMEOUT_MS))
    return c


def first_reply_s(port: int, idle: int, swarm_settings: bool) -> float:
    ep = f"tcp/127.0.0.1:{port}"
    with zenoh.open(_config([ep], [], swarm_settings)) as listener:
        q = listener.declare_queryable("flood/x", lambda q: (q.reply(q.key_expr, b"x"), q.drop()))
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            with zenoh.open(_config([], [ep], False)) as client:
                while not list(client.get("flood/x", timeout=1.0)):
                    if time.monotonic() - t0 > 120:
                        return float("inf")
                return time.monotonic() - t0
        finally:
            for s in socks:
                s.close()
            q.undeclare()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trust_flood.json"))
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))  # both ends live in this process
    port = 19000 + os.getpid() % 500
    idles = (0, 150) if args.quick else (0, 150, 1000, 5000)
    rows: list[dict[str, Any]] = []
    for idle in idles:
        for settings in (False, True):
            port += 1
            s = first_reply_s(port, idle, settings)
            rows.append({"idle": idle, "config": "swarm" if settings else "zenoh default", "first_reply_s": s})
            print(f"{idle:>5} idle  {rows[-1]['config']:<14} first reply after {s:6.2f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"accept_pending": ACCEPT_PENDING, "accept_timeout_ms": ACCEPT_TIMEOUT_MS,
                               "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

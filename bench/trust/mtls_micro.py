"""Where mTLS costs time: one request and its reply, by size, over plain TCP and mutual TLS.

A server process answers each request with a reply of the same size (one zenoh queryable per
link, served by one Python thread, as a swarm peer serves). The client sends requests one at a
time, as a pipeline stage's thread does, in four ways:

- ``tcp``: a plain zenoh link, no access layer;
- ``tcp_access``: plain link, the signed hello and GMAC of :mod:`layerwise.swarm.access`;
- ``tls``: zenoh's mutual TLS link against a throwaway CA, no access layer;
- ``tls_access``: both (what a swarm with ``--identity`` does).

Modes and sizes are interleaved round by round so that every mode sees the same machine load.
By default zenoh moves payloads of 3 KiB or more between processes of one host through shared
memory, so on one host TLS only carries the headers; the ``no_shm`` half turns that off, as
between hosts, where every byte goes through the link. The per-size medians tell per-message
cost (the same extra at every size) from per-byte cost (an extra that grows with the size).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import statistics
import tempfile
import threading
import time
from typing import Any

import torch
import zenoh

SIZES = (256, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
MODES = ("tcp", "tcp_access", "tls", "tls_access")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(listen: list[str], connect: list[str], identity: Any, shm: bool) -> zenoh.Config:
    from layerwise.swarm.net import base_config

    c = base_config("peer", listen=listen, connect=connect, lease_ms=1000, identity=identity)
    if not shm:  # as between two hosts: every byte goes through the link (and its TLS)
        c.insert_json5("transport/shared_memory/enabled", "false")
    return c


def _serve(tcp_ep: str, tls_ep: str, ident_dir: str, shm: bool, stop: Any, ready: Any) -> None:
    """The server: two sessions (tcp, tls), each with a raw and a guarded echo queryable."""
    from layerwise.swarm.access import Guard
    from layerwise.swarm.identity import Identity
    from layerwise.swarm.wire import Message, decode_message, encode_message

    ident = Identity(ident_dir)
    guard = Guard(ident)
    work: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cfgs = {"tcp": _config([tcp_ep], [], None, shm), "tls": _config([tls_ep], [], ident, shm)}
    sessions = {k: zenoh.open(c) for k, c in cfgs.items()}
    qbls = []
    for link, s in sessions.items():
        for guarded in (False, True):
            key = f"bench/{link}/{'peer/peer0' if guarded else 'raw'}"
            qbls.append(s.declare_queryable(key, zenoh.handlers.Callback(lambda q, g=guarded: work.put((q, g)))))
    # the server's CPU seconds so far (every thread: zenoh's and ours), asked around each block
    qbls.append(sessions["tcp"].declare_queryable("bench/cpu", zenoh.handlers.Callback(lambda q: work.put((q, None)))))
    ready.set()
    try:
        while not stop.is_set():
            try:
                q, guarded = work.get(timeout=0.25)
            except queue.Empty:
                continue
            if guarded is None:
                q.reply(q.key_expr, repr(time.process_time()).encode())
                q.drop()
                continue
            raw = q.payload.to_bytes() if q.payload is not None else b""
            adm = guard.admit_query(q, raw) if guarded else None
            if adm is not None and adm.session is None:
                data = encode_message(Message("ok") if adm.hello is not None else Message("error", meta={"error": adm.refused}))
            else:
                msg = decode_message(raw, "client")
                data = encode_message(Message("ok", tensors=msg.tensors))
            q.reply(q.key_expr, data, attachment=adm.attachment(data) if adm is not None else None)
            q.drop()
    finally:
        for qb in qbls:
            qb.undeclare()
        for s in sessions.values():
            s.close()


def run(quick: bool = False) -> dict[str, Any]:
    """Both ways: with zenoh's shared memory (its default: on one host, payloads of 3 KiB or more
    skip the link, TLS included) and without (as between hosts)."""
    return {"shm": _run(quick, shm=True), "no_shm": _run(quick, shm=False)}


def _run(quick: bool, shm: bool) -> dict[str, Any]:
    from layerwise.swarm.access_client import Client
    from layerwise.swarm.identity import Identity, throwaway
    from layerwise.swarm.net import Node
    from layerwise.swarm.wire import Message, encode_message

    rounds, per = (3, 5) if quick else (12, 20)
    times: dict[tuple[str, int], list[float]] = {(m, s): [] for m in MODES for s in SIZES}
    cpu: dict[tuple[str, int], float] = {(m, s): 0.0 for m in MODES for s in SIZES}
    with tempfile.TemporaryDirectory(prefix="layerwise-bench-micro-") as tmp:
        ids = throwaway(tmp, "bench", {"trainer": "trainer", "peer0": "peer"})
        tcp_ep, tls_ep = f"tcp/127.0.0.1:{_port()}", f"tls/127.0.0.1:{_port()}"
        ctx = mp.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Event()
        server = ctx.Process(target=_serve, args=(tcp_ep, tls_ep, str(ids["peer0"]), shm, stop, ready), daemon=True)
        server.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("micro-benchmark server did not start within 60 s")
            me = Identity(str(ids["trainer"]))
            sessions = {"tcp": zenoh.open(_config([], [tcp_ep], None, shm)), "tls": zenoh.open(_config([], [tls_ep], me, shm))}
            try:
                nodes = {m: Node(sessions[m.split("_")[0]], "", auth=Client(me) if m.endswith("access") else None)
                         for m in MODES}  # fmt: skip
                payloads = {s: Message("forward", 0, 0, 0, 0, {}, [torch.randn(max(s // 4, 1))]) for s in SIZES}

                def once(mode: str, size: int) -> float:
                    node, link = nodes[mode], mode.split("_")[0]
                    t0 = time.perf_counter()
                    data = encode_message(payloads[size])
                    if node.auth is not None:  # as Node.request does, on our key (the server holds peer0's certificate)
                        node.auth.request(node, "peer0", f"bench/{link}/peer/peer0", True, payloads[size], data, 30.0)
                    else:
                        node.exchange("peer0", f"bench/{link}/raw", payloads[size], data, 30.0)
                    return time.perf_counter() - t0

                deadline = time.monotonic() + 30
                while True:  # links up (the client connects out) and the hellos said
                    try:
                        for m in MODES:
                            once(m, SIZES[0])
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                def server_cpu() -> float:
                    replies = list(sessions["tcp"].get("bench/cpu", timeout=10.0))
                    return float(replies[0].ok.payload.to_string())

                for r in range(rounds):
                    for size in SIZES:
                        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                        for m in order:
                            once(m, size)  # one warm-up exchange after switching mode
                            c0, s0 = time.process_time(), server_cpu()
                            times[(m, size)] += [once(m, size) for _ in range(per)]
                            cpu[(m, size)] += time.process_time() - c0 + server_cpu() - s0
            finally:
                for s in sessions.values():
                    s.close()
        finally:
            stop.set()
            server.join(10)
            if server.is_alive():
                server.kill()
    med = {m: {str(s): round(statistics.median(times[(m, s)]) * 1e3, 4) for s in SIZES} for m in MODES}
    # CPU of both processes per round trip; the two cpu queries of a block are in it too (the same in every mode)
    cpu_us = {m: {str(s): round(cpu[(m, s)] / (rounds * per) * 1e6, 1) for s in SIZES} for m in MODES}
    out: dict[str, Any] = {"round_trip_ms_median": med, "cpu_us_per_round_trip": cpu_us, "sizes_bytes": list(SIZES),
                           "samples_each": rounds * per}  # fmt: skip
    for m in MODES[1:]:
        out[f"extra_ms_{m}"] = {str(s): round(med[m][str(s)] - med["tcp"][str(s)], 4) for s in SIZES}
        out[f"extra_cpu_us_{m}"] = {str(s): round(cpu_us[m][str(s)] - cpu_us["tcp"][str(s)], 1) for s in SIZES}
    out["cpus"] = os.cpu_count()
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=1))

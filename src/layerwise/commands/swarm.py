"""``layerwise swarm``: serve layers as a peer, train through peers, run a local demo, show status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from layerwise.commands import UsageError, positive_int
from layerwise.commands import swarm_identity


def _common(p: argparse.ArgumentParser, *, listen: bool = True) -> None:
    p.add_argument("--join", action="append", default=[], metavar="ENDPOINT",
                   help="a seed endpoint of the swarm, e.g. tcp/127.0.0.1:7447 (repeatable)")
    if listen:
        p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                       help="listen here (the first process of a swarm), e.g. tcp/127.0.0.1:7447")
    p.add_argument("--relay", action="append", default=[], metavar="ENDPOINT",
                   help="connect out to this relay ('layerwise swarm relay') instead of joining peers: "
                        "for processes behind NAT (repeatable)")
    p.add_argument("--swarm", default="layerwise", help="the swarm's name (default layerwise)")
    p.add_argument("--lease-ms", type=positive_int, default=1000,
                   help="zenoh link lease: a hung peer is dropped after about this long (default 1000)")


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", choices=("tiny", "small"),
                   help="the demo GPT: tiny (width 64, 4 blocks) or small (width 128, 6 blocks)")
    p.add_argument("--data", default="stdlib", help="'stdlib' (Python's own source) or a text file")
    p.add_argument("--steps", type=positive_int, default=20, help="training steps (default 20)")
    p.add_argument("--microbatches", type=positive_int, default=4, help="microbatches per step (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe", help="stage order (default gpipe)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed")
    p.add_argument("--max-grad-norm", type=float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm to NORM at every step, as clip_grad_norm_ (default 0: off)")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="the head's weight is the token embedding's, as in the demo GPT (default: untied)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object at the end")
    p.add_argument("--compress", choices=("none", "bf16", "int8", "int6", "int4", "lowrank"), default="none",
                   help="activations and their gradients between stages: none (default, exact), bf16, int8, int6 or int4 "
                        "(blockwise, error feedback) or lowrank (fixed projection); all but none change the results")
    p.add_argument("--compress-rank", type=positive_int, default=8, metavar="R",
                   help="directions kept of the hidden size with --compress lowrank (default 8)")
    p.add_argument("--compress-no-ef", action="store_true",
                   help="int8/int6/int4 without error feedback (on the demo model it helped no int codec)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="swarm_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="serve layers as a peer of a swarm")
    _common(serve)
    serve.add_argument("--memory", type=float, default=None, metavar="GiB", help="memory budget (default half the RAM)")
    serve.add_argument("--speed", type=float, default=1.0, help="emulated speed, 0.5 = twice as slow (default 1)")
    serve.add_argument("--latency-ms", type=float, default=0.0, help="emulated one-way latency per message")
    serve.add_argument("--bandwidth-mbit", type=float, default=None, help="emulated bandwidth cap, Mbit/s")
    serve.add_argument("--name", default=None, help="peer id (default host-pid-random)")
    serve.add_argument("--fault", default="", metavar="MODE:P[@STEP]",
                       help="fault injection: lie in a fraction P of outputs (from step STEP on, default 0); MODE "
                            "corrupt, nan, shape, stale, garbage or oversized")
    serve.add_argument("--max-message-mib", type=float, default=None, metavar="MiB",
                       help="refuse messages larger than this (default 4096)")
    train = sub.add_parser("train", help="train the model through the swarm's peers")
    _common(train)
    _spec_args(train)
    train.add_argument("--peers", type=positive_int, default=1, help="wait for this many peers (default 1)")
    train.add_argument("--wait", type=float, default=120.0, help="seconds to wait for them (default 120)")
    train.add_argument("--max-stages", type=positive_int, default=None, metavar="N",
                       help="at most N pipeline stages; further peers become replicas of the slowest stage "
                            "(default: a stage per peer, up to one layer each)")
    train.add_argument("--checkpoint", default=None, metavar="DIR", help="save every layer's state here")
    train.add_argument("--checkpoint-every", type=positive_int, default=None,
                       help="steps between checkpoints, with --checkpoint (default 10)")
    train.add_argument("--resume", default=None, metavar="DIR", help="start from the checkpoint in DIR")
    train.add_argument("--spot-check", type=float, default=0.0, metavar="P",
                       help="probability that a stage's output is recomputed by its copy and compared (default 0; "
                            "a peer on probation is always checked)")
    train.add_argument("--ban-after", type=positive_int, default=2, metavar="N",
                       help="rejected replies that ban a peer from the run (default 2; the first means probation; a "
                            "mismatch the trainer confirmed by recomputing the output itself bans at once)")
    train.add_argument("--probation-checks", type=int, default=None, metavar="N",
                       help="with --spot-check: checks a new (or returning) peer passes before only the sample P of "
                            "its outputs is checked (default 90: catches a peer lying in 5%% of its outputs with "
                            "probability 0.99)")
    demo = sub.add_parser("demo", help="a local swarm: N peers, K killed, J joining, checked against one process")
    demo.add_argument("--peers", type=positive_int, default=4, help="peer processes (default 4)")
    demo.add_argument("--kill", type=int, default=1, help="peers to SIGKILL at random moments (default 1)")
    demo.add_argument("--join", type=int, default=0, help="peers to start mid-run (default 0)")
    demo.add_argument("--port", type=int, default=17447, help="the seed's port on 127.0.0.1 (default 17447)")
    _spec_args(demo)
    relay = sub.add_parser("relay", help="a rendezvous and relay (zenoh router) for peers behind NAT")
    relay.add_argument("--listen", action="append", default=[], metavar="ENDPOINT", required=True,
                       help="where peers connect out to, e.g. tcp/0.0.0.0:7447 (repeatable)")
    relay.add_argument("--lease-ms", type=positive_int, default=1000, help="zenoh link lease (default 1000)")
    swarm_identity.add_relay_option(relay)
    status = sub.add_parser("status", help="peers, spans, step rate and recent failures of a running swarm")
    _common(status, listen=False)
    # the live status page (swarm/web.py)
    status.add_argument("--web", type=int, default=None, metavar="PORT",
                        help="serve a live status page on this port (0: any free one) until Ctrl-C")
    status.add_argument("--web-host", default=None, metavar="ADDRESS",
                        help="address the page listens on, with --web (default 127.0.0.1: this machine only)")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    # identity and access (swarm_identity.py): init / invite / revoke, --identity on each process
    swarm_identity.add_commands(sub)
    for p in (serve, train, status):
        swarm_identity.add_options(p)
    swarm_identity.add_demo_option(demo)


def run(args: argparse.Namespace) -> int:
    if args.swarm_command in ("init", "invite", "revoke"):
        return swarm_identity.run(args)
    commands = {"serve": _serve, "train": _train, "demo": _demo, "status": _status, "relay": _relay}
    return commands[args.swarm_command](args)


def check_endpoint(text: str) -> str:
    """``tcp/127.0.0.1:7447``-like, checked here so that bad input costs no torch import."""
    proto, sep, rest = text.partition("/")
    host, colon, port = rest.rpartition(":")
    if not sep or proto not in ("tcp", "udp", "tls", "quic") or not colon or not host or not port.isdigit():
        raise ValueError(f"endpoint {text!r} is not like tcp/127.0.0.1:7447")
    return text


def _endpoints(args: argparse.Namespace, listen: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        join = tuple(check_endpoint(e) for e in args.join)
        lst = tuple(check_endpoint(e) for e in getattr(args, "listen", []))
        relay = tuple(check_endpoint(e) for e in getattr(args, "relay", []))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if relay and (join or lst):
        raise UsageError("--relay connects out through a relay only: leave out --join and --listen")
    if not join and not lst and not relay:
        raise UsageError("give --join ENDPOINT (or --listen ENDPOINT for the first process of a swarm, "
                         "or --relay ENDPOINT behind NAT)")
    return join, lst


def compression_from_args(args: argparse.Namespace) -> Any:
    from layerwise.swarm.compress import Compression

    if getattr(args, "compress_no_ef", False) and args.compress not in ("int8", "int6", "int4"):
        raise UsageError(f"--compress-no-ef applies to --compress int8, int6 or int4, not {args.compress}")
    try:
        return Compression(mode=args.compress, rank=args.compress_rank, seed=args.seed,
                           error_feedback=not getattr(args, "compress_no_ef", False))
    except ValueError as e:
        raise UsageError(str(e)) from None


def spec_from_args(args: argparse.Namespace) -> Any:
    from layerwise.swarm.spec import SwarmSpec

    size = {"tiny": {"width": 64, "blocks": 4}, "small": {"width": 128, "blocks": 6}}[args.model]
    try:
        return SwarmSpec(**size, batch_size=args.batch_size, microbatches=args.microbatches,
                         schedule=args.schedule, seed=args.seed, data=args.data,
                         tie_embeddings=args.tie_embeddings, max_grad_norm=args.max_grad_norm)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None


def _serve(args: argparse.Namespace) -> int:
    from layerwise.swarm.peer import PeerOptions, serve

    join, lst = _endpoints(args)
    identity = swarm_identity.check(args, "peer", join + lst)
    try:
        limit = {} if args.max_message_mib is None else {"max_message": int(args.max_message_mib * (1 << 20))}
        opts = PeerOptions(swarm=args.swarm, join=join, listen=lst, name=args.name, memory_gib=args.memory,
                           speed=args.speed, latency_ms=args.latency_ms, bandwidth_mbit=args.bandwidth_mbit,
                           lease_ms=args.lease_ms, identity=identity, crl=args.crl, fault=args.fault,
                           relay=tuple(args.relay), **limit)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    from layerwise.swarm.errors import SwarmError

    try:
        serve(opts, on_ready=lambda p: print(f"peer {p.id} serving swarm {args.swarm!r}; Ctrl-C to leave", flush=True))
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from layerwise.swarm.errors import SwarmError
    from layerwise.swarm.trainer import Trainer, TrainerOptions

    if args.wait <= 0:
        raise UsageError(f"--wait must be > 0 seconds, got {args.wait}")
    if args.checkpoint_every is not None and not args.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint DIR (where to save)")
    if args.resume is not None and not os.path.isdir(args.resume):
        raise UsageError(f"--resume {args.resume}: not a checkpoint directory")
    join, lst = _endpoints(args)
    identity = swarm_identity.check(args, "trainer", join + lst)
    spec = spec_from_args(args)
    try:
        opts = TrainerOptions(swarm=args.swarm, join=join, listen=lst, min_peers=args.peers, wait_s=args.wait,
                              lease_ms=args.lease_ms, checkpoint_dir=args.checkpoint, max_stages=args.max_stages,
                              checkpoint_every=(args.checkpoint_every or 10) if args.checkpoint else 0,
                              resume=args.resume, identity=identity, crl=args.crl, spot_check=args.spot_check,
                              ban_after=args.ban_after, relay=tuple(args.relay),
                              compress=compression_from_args(args),
                              **({} if args.probation_checks is None else {"probation_checks": args.probation_checks}))  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    say(f"waiting for {args.peers} peer(s) of swarm {args.swarm!r} ...")

    seen: dict[str, Any] = {"failures": 0, "spans": None}

    def progress(tr: Any, step: int) -> None:
        for line in news(tr, seen):  # a lost peer or new spans are said when they happen, not only at the end
            say(line)
        if step and tr.losses:
            say(f"step {step}/{args.steps}  loss {tr.losses[-1]:.4f}  ({tr.step_times[-1][2]:.2f} s)")

    try:
        with Trainer(spec, opts) as tr:
            tr.train(args.steps, progress)
            steps = tr.committed_steps()
            summary = {"steps": len(tr.losses), "lost_steps": args.steps - min(steps), "final_loss": tr.losses[-1],
                       "failures": [_failure(f) for f in tr.failures], "rebalances": tr.rebalances,
                       "rejected": tr.trust.status()["rejected"], "bans": tr.trust.status()["bans"]}  # fmt: skip
            summary["losses"] = tr.losses
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    say(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, {len(summary['failures'])} failure(s)")
    if args.json:
        print(json.dumps(summary))
    return 0


def news(tr: Any, seen: dict[str, Any]) -> list[str]:
    """What changed in the swarm since ``seen`` (updated): each peer lost since, and the spans when
    they differ from the last ones said (at the start, after a recovery, a re-balance or a new copy)."""
    lines = []
    for f in tr.failures[seen["failures"]:]:
        done = (f"recovered in {f.recovered_at - (f.left_at or f.noticed_at):.2f} s, no step lost" if f.recovered_at
                else "recovering")  # fmt: skip
        lines.append(f"peer {f.peer} lost at step {f.step} ({', '.join(f.phases) or f.phase}); stages {f.stages or '-'}: {done}")
    seen["failures"] = len(tr.failures)
    spans = "spans: " + ", ".join(f"stage {s.stage} layers {s.first}-{s.first + s.count - 1} on {s.holder} "
                                  + (f"(replicas {', '.join(s.replicas)})" if s.replicas else f"(copy on {s.copy})" if s.copy else "(no copy)")
                                  for s in tr.assignment.stages)  # fmt: skip
    if spans != seen["spans"]:
        lines.append(spans)
        seen["spans"] = spans
    return lines


def _failure(f: Any) -> dict[str, Any]:
    start = f.left_at if f.left_at is not None else f.noticed_at
    return {"peer": f.peer, "step": f.step, "phase": f.phase, "phases": f.phases, "stages": f.stages,
            "recovered_s": None if f.recovered_at is None else round(f.recovered_at - start, 4)}  # fmt: skip


def _status(args: argparse.Namespace) -> int:
    if args.web is not None or args.web_host is not None:
        return _status_web(args)
    from layerwise.swarm.errors import SwarmError
    from layerwise.swarm.status import query_status

    join, _ = _endpoints(args, listen=False)
    identity = swarm_identity.check(args, None, join)
    try:
        got = query_status(args.swarm, join, args.lease_ms, identity=identity, crl=args.crl, relay=tuple(args.relay))
    except SwarmError as e:  # through a relay that refused (or is not there): one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(got))
    else:
        print(format_status(got))
    return 0


def _status_web(args: argparse.Namespace) -> int:
    join, _ = _endpoints(args, listen=False)
    if args.web is None:
        raise UsageError("--web-host needs --web PORT")
    if not 0 <= args.web < 65536:
        raise UsageError(f"--web must be a port in 0..65535 (0: any free one), got {args.web}")
    if args.json:
        raise UsageError("--json prints the status once; --web serves it live: give one of them")
    identity = swarm_identity.check(args, None, join)
    from layerwise.swarm.status import StatusProbe
    from layerwise.swarm.web import serve_status_page

    host = args.web_host or "127.0.0.1"
    try:
        probe = StatusProbe(args.swarm, join, args.lease_ms, identity=identity, crl=args.crl,
                            relay=tuple(args.relay))  # fmt: skip
        serve_status_page(probe, host, args.web, lambda m: print(m, flush=True))
    except OSError as e:
        print(f"error: cannot serve the status page on {host}:{args.web}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def format_status(got: dict[str, Any]) -> str:
    lines = [f"swarm {got['swarm']}: {len(got['peers'])} peer(s)"]
    for p, info in sorted(got["peers"].items()):
        lines.append(f"  {p}: speed {info.get('speed')}, spans {info.get('spans')}")
    tr = got.get("trainer")
    if not tr:
        lines.append("  no trainer is running")
        return "\n".join(lines)
    rate = tr.get("steps_per_s")
    lines.append(f"trainer: step {tr['step']}, loss {tr['loss']}, {rate and round(rate, 2)} steps/s")
    for s in tr["stages"]:
        more = f", replicas {', '.join(s['replicas'])}" if s.get("replicas") else ""
        lines.append(f"  stage {s['stage']} layers {s['layers'][0]}-{s['layers'][1]}: {s['holder']} (copy {s['copy']}{more})")
    for f in tr["failures"]:
        lines.append(f"  failure: {f['peer']} at step {f['step']} ({', '.join(f.get('phases') or [f['phase']])}), stages {f['stages']}")
    for r in tr.get("refused", [])[-10:]:  # --identity: who was refused, by name (swarm/access.py)
        lines.append(f"  refused {r['name']} (by {r.get('by', '?')}): {r['why']}")
    if tr.get("rejected"):
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(tr["rejected"].items())))
    for b in tr.get("bans", []):
        proof = ", confirmed by the trainer's recomputation" if b.get("confirmed") else ""
        lines.append(f"  banned: {b['peer']} at step {b['step']} ({b['reason']}{proof})")
    return "\n".join(lines)


def _relay(args: argparse.Namespace) -> int:
    from layerwise.swarm.relay import run_relay

    try:
        listen = [check_endpoint(e) for e in args.listen]
    except ValueError as e:
        raise UsageError(str(e)) from None
    identity = swarm_identity.load(swarm_identity.check(args, "relay", tuple(listen)))
    tls = f" with mutual TLS as {identity.name}" if identity is not None else ""
    try:
        run_relay(listen, args.lease_ms, identity=identity,
                  on_ready=lambda: print(f"relay listening on {', '.join(listen)}{tls}; Ctrl-C to stop", flush=True))
    except Exception as e:  # zenoh could not listen there (address in use, not this host's): one line, no traceback
        print(f"error: relay cannot listen on {', '.join(listen)}: {e}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from layerwise.swarm.demo import run_demo

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.kill < 0 or args.join < 0 or args.kill >= args.peers:
        raise UsageError(f"--kill must be in [0, --peers) and --join >= 0, got --kill {args.kill} --join {args.join}")
    return run_demo(args, spec_from_args(args), compression_from_args(args))

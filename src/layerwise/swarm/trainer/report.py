"""The trainer's status report: one dict for ``layerwise swarm status``, ``--json`` and the page."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..wire import Message

if TYPE_CHECKING:
    from .trainer import Trainer


def status(tr: Trainer) -> dict[str, Any]:
    """The trainer's state as plain data: peers, stages, rates, failures, and the trust keys."""
    recent = [t for _, _, t in tr.step_times[-10:]]
    tokens = tr.spec.batch_size * tr.spec.seq
    return {
        "swarm": tr.opts.swarm, "step": len(tr.losses), "epoch": tr.epoch, "phase": tr.phase,
        "loss": tr.losses[-1] if tr.losses else None,
        "steps_per_s": len(recent) / sum(recent) if recent else None,
        "tokens_per_s": tokens * len(recent) / sum(recent) if recent else None,
        "peers": {p: {"block_s": tr.block_s.get(p), "memory_bytes": tr.memory.get(p),
                      "identity": tr.ident.identity_of(p), "probation": tr.trust.on_probation(p),
                      "banned": tr.trust.banned(p)} for p in tr.membership.snapshot()},
        "stages": [{"stage": s.stage, "layers": [s.first, s.first + s.count - 1], "holder": s.holder,
                    "copy": s.copy, "replicas": list(s.replicas)} for s in tr.assignment.stages],
        "failures": [vars(f) for f in tr.failures[-10:]],
        "losses": tr.losses[-200:], "timeline": tr.timeline.last(),  # the status page's curve and Gantt
        "rebalances": tr.rebalances,
        "bytes_sent": tr.node.bytes_sent, "bytes_received": tr.node.bytes_received,
    } | tr.ident.status() | tr.trust.status()  # fmt: skip


def committed_steps(tr: Trainer) -> list[int]:
    """Each holder's (and every replica's) committed step count for its stage, as they report it."""
    out = []
    for span in tr.assignment.stages:
        for peer in dict.fromkeys(span.slots):  # every replica of a replicated stage
            r = tr.node.request(peer, Message("status"))
            out += [d["step"] for d in r.meta["spans"] if d["stage"] == span.stage and d["role"] == "holder"]
    return out

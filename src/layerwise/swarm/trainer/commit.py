"""The commit of a step whose gradients must meet before any stage applies them.

Three things need more than each holder applying its own sum (the plain commit in :mod:`.driver`):
replicas of a stage (their groups' sums are added in slot order), a weight tied across stages
(its two uses are added per microbatch, :mod:`..ties`), and global gradient-norm clipping (one
coefficient from every stage's gradients). So the commit has two phases:

1. *Report* (``grads``): every slot of a replicated stage sends its group's summed gradients, every
   stage holding a cross-tied weight sends that weight's per-microbatch gradients, and, with
   ``max_grad_norm``, every other stage sends only the norm of each of its gradients (a few bytes).
2. *Commit*: the trainer adds what must be added, computes the total norm as
   ``torch.nn.utils.clip_grad_norm_`` does (the 2-norm of the per-parameter 2-norms, in the model's
   parameter order, a tied weight once; ``coef = min(1, max_norm / (norm + 1e-6))``) and sends
   every slot one ``commit`` with the coefficient and the gradients that replace its own; each
   applies the same AdamW step and the stage's copy gets what was applied, as before.

A peer lost in either phase is replaced (:func:`.driver.call_stage`) and the request sent again:
the report is read-only and the commit idempotent. A replacement in the report phase, or one
that must apply its own sum, first replays the lost work; a replica's commit carries all its
gradients, so a replica replaced during the commit replays nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..replay import StepCache
from ..spec import SwarmSpec
from ..ties import Name, canonical, cross_ties, span_names
from ..wire import Message
from . import copies
from .replicas import group_mbs

if TYPE_CHECKING:
    from .trainer import Trainer


def needed(tr: Trainer) -> bool:
    """Does this step need the two-phase commit (else each holder applies its own sum)?"""
    spec = tr.spec
    return bool(spec.max_grad_norm) or any(len(x.slots) > 1 or cross_ties(spec, x.first, x.count)
                                           for x in tr.assignment.stages)  # fmt: skip


def commit_step(tr: Trainer, cache: StepCache, in_threads: Any, call_stage: Any) -> None:
    spec, m = tr.spec, cache.microbatches
    spans = tr.assignment.stages
    reports: dict[tuple[int, int], Message] = {}

    def report(s: int, slot: int) -> None:
        slots = cache.slots[s]
        meta = {"group": slot, "mbs": group_mbs(m, slots, slot), "full": slots > 1}
        msg = Message("grads", cache.step, s, -1, tr.epoch, meta)
        reports[(s, slot)] = call_stage(tr, cache, s, msg, slot)

    asked = [(s, slot) for s, x in enumerate(spans) for slot in range(cache.slots[s])
             if spec.max_grad_norm or cache.slots[s] > 1 or cross_ties(spec, x.first, x.count)]  # fmt: skip
    in_threads(cache, [lambda s=s, slot=slot: report(s, slot) for s, slot in asked])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in the same order as on the peers and in one process
    try:
        replace, coef = _combine(spec, spans, cache, reports)
    finally:
        torch.set_num_threads(threads)

    replies: dict[tuple[int, int], Message] = {}

    def commit(s: int, slot: int) -> None:  # every slot at once; a peer serving two acknowledges the second
        idx = sorted(replace[s])
        meta = {"lr": spec.lr_at(cache.step), "microbatches": m, "replace": idx, "clip": coef,
                "reply_grads": tr.assignment.stages[s].copy is not None}  # fmt: skip
        msg = Message("commit", cache.step, s, -1, tr.epoch, meta, [replace[s][i] for i in idx])
        replies[(s, slot)] = call_stage(tr, cache, s, msg, slot)

    def relay(s: int) -> None:
        copy = tr.assignment.stages[s].copy
        applied = [r for (t, _), r in sorted(replies.items()) if t == s and not r.meta.get("already")]
        if copy is None or not applied:
            return  # no copy, or the state came from a peer that had already applied this step
        copies.start(tr, s, cache.step, spec.lr_at(cache.step), applied[0].tensors)

    cache.committing = True
    pairs = [(s, slot) for s in range(len(spans)) for slot in range(cache.slots[s])]
    in_threads(cache, [lambda s=s, slot=slot: commit(s, slot) for s, slot in pairs])
    in_threads(cache, [lambda s=s: relay(s) for s in range(len(spans))])
    copies.settle_all(tr)  # unlike a plain commit, a two-phase one waits for its copies (copies.py)


def _combine(
    spec: SwarmSpec, spans: Any, cache: StepCache, reports: dict[tuple[int, int], Message]
) -> tuple[list[dict[int, torch.Tensor]], float | None]:
    """Per stage, the gradients that replace its own (by position); and the clip coefficient."""
    canon = canonical(spec)
    norms: dict[Name, torch.Tensor] = {}
    replace: list[dict[int, torch.Tensor]] = [{} for _ in spans]
    tied: dict[Name, dict[int, list[torch.Tensor]]] = {}  # tie -> microbatch -> its uses' gradients
    for s, x in enumerate(spans):
        names, cross, slots = span_names(spec, x.first, x.count), cross_ties(spec, x.first, x.count), cache.slots[s]
        if (s, 0) not in reports:
            continue  # neither replicated, tied nor clipped: it applies its own sum
        if slots > 1:  # the replicas' sums, added in slot order
            total = list(reports[(s, 0)].tensors[: len(names)])
            for slot in range(1, slots):
                total = [a + b for a, b in zip(total, reports[(s, slot)].tensors[: len(names)])]
            replace[s] = {k: g for k, g in enumerate(total) if k not in cross}
            own = [torch.linalg.vector_norm(g, 2.0) for g in total]
        else:
            own = [torch.tensor(v, dtype=torch.float32) for v in reports[(s, 0)].meta["norms"]]
        for k, name in enumerate(names):
            if k not in cross:
                norms[canon.get(name, name)] = own[k]
        for slot in range(slots):
            r = reports[(s, slot)]
            rest = r.tensors[len(names) if slots > 1 else 0 :]
            for (k, mb), g in zip(r.meta["tied"], rest):
                tied.setdefault(canon[names[k]], {}).setdefault(int(mb), []).append(g)
    sums: dict[Name, torch.Tensor] = {}
    for tie, by_mb in tied.items():  # per microbatch the uses, then the microbatches in order
        total_g: torch.Tensor | None = None
        for mb in range(cache.microbatches):
            uses = by_mb[mb]
            g = uses[0]
            for u in uses[1:]:
                g = g + u
            total_g = g.clone() if total_g is None else total_g + g
        assert total_g is not None
        sums[tie] = total_g
        norms[tie] = torch.linalg.vector_norm(total_g, 2.0)
    for s, x in enumerate(spans):
        names = span_names(spec, x.first, x.count)
        for k in cross_ties(spec, x.first, x.count):
            replace[s][k] = sums[canon[names[k]]]
    if not spec.max_grad_norm:
        return replace, None
    order = list(dict.fromkeys(canon.get(n, n) for x in spans for n in span_names(spec, x.first, x.count)))
    total_norm = torch.linalg.vector_norm(torch.stack([norms[n] for n in order]), 2.0)
    coef = torch.clamp(spec.max_grad_norm / (total_norm + 1e-6), max=1.0)  # clip_grad_norm_'s formula
    return replace, float(coef)

"""A compressed swarm run, in one process: what ``--compress`` must compute, bit for bit.

With compression the swarm no longer equals plain one-process training, but it is still
deterministic: each stage encodes its outputs (forward) and its input gradients (backward) with
the codec and error-feedback streams of :mod:`.compress`, and the next stage decodes them. This
runs the same stages (the peer's :class:`~.peer.state.Span`), the same codec calls and the same
per-stage order of forwards and backwards as the schedule, in one process, for a given split of
the layers. A failure-free compressed swarm run equals it exactly; tests and the benchmark use it
to tell the codec's effect on training from a transport bug.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..schedule.actions import Kind
from ..schedule.generators import build
from .compress import Compression, Streams, pack_reply, unpack
from .peer.state import Span
from .spec import SwarmSpec, load_corpus, step_batch


def compressed_reference(spec: SwarmSpec, steps: int, cfg: Compression, counts: list[int],
                         on_step: Callable[[int, list[torch.Tensor]], None] | None = None,
                         ) -> tuple[list[torch.Tensor], list[float]]:  # fmt: skip
    """Final parameters (in layer order) and per-step losses with stages of ``counts`` layers;
    ``on_step(step, params)`` sees the parameters after each step (live tensors: copy to keep)."""
    if sum(counts) != spec.layers or min(counts) < 1:
        raise ValueError(f"stage layer counts {counts} do not cover the model's {spec.layers} layers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the peers run
    try:
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        spans = [Span(spec, stage=i, first=f, count=c, role="holder", where=f"stage {i}")
                 for i, (f, c) in enumerate(zip(firsts, counts))]  # fmt: skip
        streams = [Streams() for _ in spans]
        meta = cfg.to_meta() if not cfg.exact else None
        order = build(spec.schedule, stages=len(spans), microbatches=spec.microbatches).ranks
        corpus = load_corpus(spec)
        losses = []
        m, last = spec.microbatches, len(spans) - 1
        for step in range(steps):
            x, y = step_batch(spec, corpus, step)
            inputs: list[dict[int, list[torch.Tensor]]] = [{} for _ in spans]  # stage -> mb -> its input
            inputs[0] = {mb: [t] for mb, t in enumerate(x.chunk(m))}
            grads: list[dict[int, list[torch.Tensor]]] = [{} for _ in spans]
            targets = list(y.chunk(m))
            total = 0.0
            # every stage's forwards in its schedule order, stage by stage (a stage's numbers do
            # not depend on how its actions interleave with other stages'), then the backwards
            for kind in (Kind.F, Kind.B):
                for s in range(len(spans)) if kind == Kind.F else reversed(range(len(spans))):
                    runner = spans[s].runner
                    assert runner is not None
                    for a in (a for a in order[s] if a.kind == kind):
                        mb = a.microbatch
                        if kind == Kind.F:
                            xin = inputs[s][mb][0]
                            out = runner.forward(mb, xin, targets[mb] if s == last else None, 1.0 / m)
                            if s == last:
                                total += float(out)
                                continue
                            wmeta, wire = pack_reply(meta, streams[s], step, "fwd", mb, [out.detach()])
                            inputs[s + 1][mb] = unpack(wmeta, wire)
                        else:
                            up = None if s == last else grads[s][mb]
                            g = spans[s].accumulate(0, mb, lambda: runner.backward(mb, up))  # as a holder sums
                            if s > 0:
                                wmeta, wire = pack_reply(meta, streams[s], step, "bwd", mb, list(g))
                                grads[s - 1][mb] = unpack(wmeta, wire)
            for s, span in enumerate(spans):
                span.apply(span.grads(), spec.lr_at(step))
                streams[s].commit(step)
            losses.append(total)
            if on_step is not None:
                on_step(step, [p.detach() for span in spans for p in span.params])
        return [p.detach().clone() for span in spans for p in span.params], losses
    finally:
        torch.set_num_threads(threads)

"""Microbenchmark: the zero-bubble backward split (I then W) against the fused backward, per layer kind.

For each layer kind (a linear layer, layer norm, the token + position embedding, the attention half
of a GPT block, a whole GPT block, the LM head) on one microbatch of the GPT of
``bench/pipeline_vs_torch.py`` (width 256, context 128, 2 rows), as a one-layer pipeline stage
(``runtime.stage.Stage``; the embedding as a first stage, whose input is tokens): run the forward,
then either the stage's fused backward (B) or its I then its W, exactly as a pipeline rank runs
them; time only the backward part. The split is the runtime's (``path``): ``deferred`` (the linear
layers' weight gradients wait for W, ``runtime/weight_store.py``), ``graph`` (the general graph
split of ``runtime/backward_split.py``, for matrix weights outside ``nn.Linear``) or ``whole``
(only vector weights and embeddings: I is the whole backward). The general graph split is also
measured on every kind for comparison (``graph_*``, a quarter of the repetitions, after the others). Fused and
split run in pairs, their order alternating (fused first, then split first), one thread; reported: the ratio of
the medians, the median of the paired ratios with its quartiles, and the ratio of medians in each quarter
of the repetitions (how much it moves during the run).
Times are this process's CPU time (``time.process_time``): on a shared machine, wall time mostly
measures the other processes. Checks that all give the same gradients. Writes
``bench/results/backward_split.json`` and prints a table; the target is ``split_over_fused <= 1.05``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from layerwise.models import GPTConfig  # noqa: E402
from layerwise.models.gpt import Block, Embedding, Head  # noqa: E402
from layerwise.runtime.backward_split import backward_input, backward_weight  # noqa: E402
from layerwise.runtime.malloc import keep_heap  # noqa: E402
from layerwise.runtime.stage import Stage  # noqa: E402


class Attention(nn.Module):
    """The attention half of a GPT block: norm, qkv, causal attention, projection, residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.block = Block(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.block
        b, t, c = x.shape
        q, k, v = blk.qkv(blk.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, blk.heads, c // blk.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + blk.proj(y.transpose(1, 2).reshape(b, t, c))


def _kinds(cfg: GPTConfig, rows: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, cfg.context, cfg.width, generator=g)
    tokens = torch.randint(0, cfg.vocab, (rows, cfg.context), generator=g)
    return {
        "linear": (nn.Linear(cfg.width, 4 * cfg.width), hidden),
        "layer_norm": (nn.LayerNorm(cfg.width), hidden),
        "embedding": (Embedding(cfg), tokens),
        "attention": (Attention(cfg), hidden),
        "gpt_block": (Block(cfg), hidden),
        "head": (Head(cfg), hidden),
    }


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(x.is_floating_point())


def _stage(layer: nn.Module, first: bool, split: bool) -> Stage:
    return Stage(index=0 if first else 1, layers=[layer], first_layer=0, is_first=first, is_last=False,
                 loss_fn=None, split_backward=split, where="bench")  # fmt: skip


def _once(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, how: str) -> tuple[float, float, float]:
    """(seconds of I or of the fused backward, seconds of W, seconds of both); ``how`` is
    ``fused``, ``split`` (the runtime's stage) or ``graph`` (the general graph split)."""
    for p in layer.parameters():
        p.grad = None
    first = not x.is_floating_point()
    clock = time.process_time  # CPU seconds of this process (one thread)
    if how == "graph":
        xs = _leaf(x)
        y = layer(xs)
        t0 = clock()
        _, pending = backward_input([y], [gy], [xs] if xs.requires_grad else [], list(layer.parameters()))
        t1 = clock()
        backward_weight(pending)
        t2 = clock()
        return t1 - t0, t2 - t1, t2 - t0
    stage = _stage(layer, first, how == "split")
    stage.forward(0, x)
    t0 = clock()
    if how == "fused":
        stage.backward(0, [gy])
        t1 = t2 = clock()
    else:
        stage.backward_input(0, [gy])
        t1 = clock()
        stage.backward_weight(0)
        t2 = clock()
    return t1 - t0, t2 - t1, t2 - t0


def measure(kind: str, layer: nn.Module, x: torch.Tensor, reps: int) -> dict[str, Any]:
    with torch.no_grad():
        gy = torch.randn_like(layer(x))
    grads: dict[str, list[torch.Tensor]] = {}
    for how in ("fused", "split", "graph"):
        _once(layer, x, gy, how)
        grads[how] = [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))

    for _ in range(3):  # warm-up
        for how in ("fused", "split", "graph"):
            _once(layer, x, gy, how)
    times: dict[str, list[tuple[float, float, float]]] = {"fused": [], "split": [], "graph": []}
    for rep in range(reps):  # paired: each repetition runs both, first one then the other, in turn
        for how in ("fused", "split") if rep % 2 == 0 else ("split", "fused"):
            times[how].append(_once(layer, x, gy, how))
    for _ in range(max(reps // 4, 1)):  # the general graph split, for comparison only
        times["graph"].append(_once(layer, x, gy, "graph"))

    def med(how: str, k: int) -> float:
        return statistics.median(t[k] for t in times[how])

    f, s, g = med("fused", 2), med("split", 2), med("graph", 2)
    paired = sorted(b[2] / a[2] for a, b in zip(times["fused"], times["split"]))
    # the ratio of medians within each quarter of the repetitions: how much it moves over the run
    q = max(reps // 4, 1)
    quarters = [statistics.median(t[2] for t in times["split"][i:i + q]) / statistics.median(t[2] for t in times["fused"][i:i + q])
                for i in range(0, q * 4 if reps >= 4 else 1, q)]  # fmt: skip
    return {
        "path": _stage(layer, not x.is_floating_point(), True)._split,  # deferred, graph or whole
        "fused_ms": 1e3 * f,
        "input_ms": 1e3 * med("split", 0),
        "weight_ms": 1e3 * med("split", 1),
        "split_ms": 1e3 * s,
        "split_over_fused": s / f,
        # median over repetitions of (this repetition's I + W) / (its fused backward, run next to it)
        "split_over_fused_paired": statistics.median(paired),
        "split_over_fused_paired_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
        "split_over_fused_quarters": quarters,
        "identical_gradients": same(grads["fused"], grads["split"]),
        "graph_split_ms": 1e3 * g,
        "graph_split_over_fused": g / f,
        "graph_identical_gradients": same(grads["fused"], grads["graph"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=600)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's mmap threshold adaptive (the ranks layerwise.launch starts set it: runtime/malloc.py)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "backward_split.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kept = False if args.default_malloc else keep_heap()  # as in every rank layerwise.launch starts
    cfg = GPTConfig(vocab=256, context=128, width=256, heads=4, blocks=1)
    reps = 5 if args.quick else args.reps
    results = {kind: measure(kind, layer, x, reps) for kind, (layer, x) in _kinds(cfg, rows=2).items()}
    out = {
        "model": "GPT width 256, context 128, microbatch of 2 rows, 1 thread",
        "reps": reps,
        "load_average": os.getloadavg()[0],
        "keep_heap": kept,
        "cpus": os.cpu_count(),
        "kinds": results,
        "met": [k for k, r in results.items() if r["split_over_fused"] <= 1.05 and r["identical_gradients"]],
        "met_paired": [k for k, r in results.items() if r["split_over_fused_paired"] <= 1.05 and r["identical_gradients"]],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{'layer':<12} {'fused ms':>9} {'I ms':>7} {'W ms':>7} {'I+W ms':>7} {'ratio':>6} {'paired':>6} {'p25-p75':>11} "
          f"{'quarters min-max':>16}  same grads | graph split ratio")
    for k, r in results.items():
        lo, hi = r["split_over_fused_paired_quartiles"]
        qs = r["split_over_fused_quarters"]
        print(f"{k:<12} {r['fused_ms']:9.3f} {r['input_ms']:7.3f} {r['weight_ms']:7.3f} {r['split_ms']:7.3f} "
              f"{r['split_over_fused']:6.3f} {r['split_over_fused_paired']:6.3f} {lo:5.3f}-{hi:5.3f} {min(qs):7.3f}-{max(qs):5.3f}"
              f"    {r['identical_gradients']!s:5} | {r['graph_split_over_fused']:6.3f} ({r['path']})")
    print(f"(load average {out['load_average']:.1f} on {out['cpus']} cores; target ratio <= 1.05)")
    return out


if __name__ == "__main__":
    main()

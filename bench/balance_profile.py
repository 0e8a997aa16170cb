"""The profiling half of ``bench/balance.py``: models, per-layer costs, optimizer steps, and the
paired prediction (each timed block against a profile taken in the same ranks just before it).

A profile taken minutes before the training, or in another process, misses by what the machine
does in between: on the shared 2-vCPU machine a slow spell made the stages compute at 1.25-1.66x
of the up-front profile in one run of six, and the balanced step was under-predicted by 21%. So the
ranks themselves profile the whole model, both at once (every core busy, as when they train),
before every repetition of timed blocks; each stage's layers take the costs that the rank running
that stage measured (:func:`rank_costs`), and each block is compared with the prediction made from
its own repetition's profile (:func:`paired_error`), so a slow spell moves both.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def model(cfg: dict[str, Any], blocks: int | None = None, vocab: int | None = None) -> Any:
    import torch

    from layerwise.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=vocab or cfg["vocab"], context=cfg["context"], width=cfg["width"],
                         heads=cfg["heads"], blocks=blocks or cfg["blocks"]))  # fmt: skip


def batch(cfg: dict[str, Any], rows: int, vocab: int | None = None) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab or cfg["vocab"], (rows, cfg["context"] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (rows, seq) each


def keep_heap(enabled: bool) -> bool:
    """Stop glibc malloc from handing large buffers back to the OS (``mallopt``: no mmap for big
    blocks, no heap trimming), in this process. Otherwise a 9 MB buffer (the logits of a 4608-word
    vocabulary) is sometimes mapped fresh and page-faulted on every use and sometimes reused, by
    the allocator's adaptive threshold: the loss then costs 6.5 ms in one profile and 14 ms in
    the next. Applied alike to the profile and to both training processes. True if it took effect."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold on 64-bit; setting one also ends its adaptation
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def profile_round(cfg: dict[str, Any], net: Any, vocab: int | None, repeats: int, warmup: int,
                  statistic: str = "median") -> list[list[float]]:  # fmt: skip
    """One ``profile_with_loss`` of ``net`` on one microbatch: per layer [forward_s, backward_s],
    the loss last (plain lists: they travel back from the ranks). The paired prediction takes the
    ``"mean"`` of the chain runs: a step pays every action's time, slow ones included."""
    from layerwise.models import lm_loss
    from layerwise.partition import profile_with_loss

    x, y = batch(cfg, cfg["rows"], vocab)  # one microbatch
    costs = profile_with_loss(net, x, lm_loss, y, repeats=repeats, warmup=warmup, statistic=statistic)
    return [[c.forward_s, c.backward_s] for c in costs]


def _profile(cfg: dict[str, Any], blocks: int, vocab: int | None = None) -> tuple[Any, list[Any]]:
    """Per-layer costs of one microbatch, the loss last: per layer, the median of a few rounds of
    ``profile_with_loss`` (each itself a median), so that a burst of load on a shared machine
    during one layer's timing does not move that layer."""
    from layerwise.models import lm_loss
    from layerwise.partition import profile_with_loss

    net = model(cfg, blocks, vocab)
    x, y = batch(cfg, cfg["rows"], vocab)  # one microbatch
    rounds = [profile_with_loss(net, x, lm_loss, y, repeats=cfg["profile_repeats"], warmup=3)
              for _ in range(cfg["profile_rounds"])]  # fmt: skip
    costs = [
        dataclasses.replace(
            layer[0],
            forward_s=statistics.median(c.forward_s for c in layer),
            backward_s=statistics.median(c.backward_s for c in layer),
        )
        for layer in zip(*rounds)
    ]
    return net, costs


profile_alone = _profile  # the deeper model of part (c) is profiled in the parent alone


def profile_rank(cfg: dict[str, Any], specs: list[tuple[int, int]]) -> dict[str, Any]:
    """In each of the two launched processes at once: the per-layer costs of each (blocks,
    vocabulary) model, and one AdamW step on every contiguous range of its layers (every stage a
    2-stage plan can have). Both processes compute throughout, as the two ranks do when they
    train: one thread each on the machine's two cores, sharing its caches and memory bandwidth.
    Profiled alone, a layer ran up to 1.2x faster than inside the running pipeline."""
    import torch

    torch.set_num_threads(1)
    keep_heap(cfg["keep_heap"])
    out: dict[str, Any] = {}
    for blocks, vocab in specs:
        net, costs = _profile(cfg, blocks, vocab)
        n = blocks + 2  # [embedding, blocks..., head]; the loss (last cost entry) has no parameters
        ranges = {f"{a},{b}": _optimizer_s(cfg, net, a, b) for a in range(n) for b in range(a + 1, n + 1)}
        out[f"{blocks},{vocab}"] = {"costs": [dataclasses.asdict(c) for c in costs], "optimizer": ranges}
    return out


def _optimizer_s(cfg: dict[str, Any], net: Any, first: int, end: int) -> float:
    """Seconds of one AdamW step on the parameters of layers [first, end) (one optimizer, as a
    stage has). A tied weight counts in every stage that holds a copy."""
    import torch

    from layerwise.partition.profile import profile_optimizer
    from layerwise.runtime.split import as_layers

    group = torch.nn.ModuleList(as_layers(net)[first:end])
    return profile_optimizer([group], lambda p: torch.optim.AdamW(p, lr=cfg["lr"]), repeats=10, warmup=3)[0]


def profiles(cfg: dict[str, Any], specs: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[list[Any], dict[str, float]]]:
    """:func:`profile_rank` in two processes at once; per layer and per range, the mean of the two."""
    from layerwise import launch
    from layerwise.partition import LayerCost

    ranks = launch(profile_rank, 2, cfg, specs, threads=1, timeout=900)
    out = {}
    for blocks, vocab in specs:
        key = f"{blocks},{vocab}"
        per = [r[key] for r in ranks]
        costs = [LayerCost(**{k: statistics.mean(c[k] for c in layer) for k in layer[0]})
                 for layer in zip(*(p["costs"] for p in per))]  # fmt: skip
        optimizer = {k: statistics.mean(p["optimizer"][k] for p in per) for k in per[0]["optimizer"]}
        out[(blocks, vocab)] = (costs, optimizer)
    return out


def stage_optimizer(ranges: dict[str, float], counts: Sequence[int]) -> list[float]:
    """Each stage's AdamW step, from the profiled step of every contiguous range of layers."""
    bounds = [sum(counts[:k]) for k in range(len(counts) + 1)]
    return [ranges[f"{a},{b}"] for a, b in zip(bounds, bounds[1:])]


# -- the paired prediction (pure: plain numbers in, plain numbers out) -----------------------------
def rank_costs(per_rank: Sequence[Sequence[Sequence[float]]], counts: Sequence[int]) -> list[list[float]]:
    """Per layer [forward_s, backward_s] for a plan of ``counts`` layers per stage, each stage's
    layers taken from the profile of the rank that runs that stage (stage k on rank k).

    ``per_rank[r]`` is rank r's whole-model profile, one entry per layer plus a trailing one for
    the loss, which runs on the last stage. The two ranks of the 2-vCPU machine do not compute at
    the same speed at the same moment (in one diagnosis run, 11.0 against 13.5 ms per block,
    profiled at once); a mean of the two would mis-cost both stages.
    """
    layers = sum(counts)
    if len(per_rank) != len(counts):
        raise ValueError(f"{len(per_rank)} rank profiles for a plan of {len(counts)} stages")
    for r, prof in enumerate(per_rank):
        if len(prof) not in (layers, layers + 1):
            raise ValueError(f"rank {r}'s profile has {len(prof)} entries, the plan {list(counts)} {layers} layers")
    out: list[list[float]] = []
    first = 0
    for stage, n in enumerate(counts):
        end = first + n if stage < len(counts) - 1 else len(per_rank[stage])  # the loss: last stage
        out.extend([float(f), float(b)] for f, b in per_rank[stage][first:end])
        first += n
    return out


def paired_error(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Prediction against measurement, per timed block, each block with its own prediction.

    ``ratios`` are predicted / measured per block; ``error`` is how far their median is from 1
    (the bias of the prediction: like the paired throughput ratios, a median of per-block ratios,
    so a slow spell that lands on a block and on its profile cancels); ``abs_error_median`` is the
    median of the per-block |predicted - measured| / measured, which also holds the noise of
    single blocks.
    """
    if len(predicted) != len(measured) or not predicted:
        raise ValueError(f"need as many predictions as blocks (>= 1), got {len(predicted)} and {len(measured)}")
    if min(measured) <= 0:
        raise ValueError("measured block times must be > 0")
    ratios = [p / m for p, m in zip(predicted, measured)]
    median = statistics.median(ratios)
    return {
        "ratios": ratios,
        "median_ratio": median,
        "error": abs(median - 1.0),
        "abs_error_median": statistics.median(abs(r - 1.0) for r in ratios),
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """A run-to-run summary: every value, the median, min, max and max - min."""
    if not values:
        raise ValueError("no values")
    return {"values": list(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "range": max(values) - min(values)}  # fmt: skip

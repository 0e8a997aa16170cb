"""The training half of ``bench/balance.py``: what each of the two ranks runs.

Every repetition first profiles the whole models in both ranks at once (the paired profile, see
``balance_profile``), then times a block of ``steps`` steps of every partition, in alternating
order. Per block it also records the machine's CPU use (other processes disturb the timings), the
optimizer step's share, and the block's last step action by action, which separates compute,
communication and the simulator's model (:func:`_timeline`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from balance_profile import batch, keep_heap, model, profile_round
from machine import machine_cpu

TIMEOUT = 120.0


def train(cfg: dict[str, Any], runs: list[tuple[str, list[int], float, int]]) -> dict[str, Any]:
    """In each rank: build one Pipeline per (name, partition, speed of rank 1, vocabulary); time
    them in turn, each repetition after a profile of every model taken here, both ranks at once."""
    import torch
    import torch.distributed as dist

    from layerwise import Pipeline
    from layerwise.models import lm_loss

    torch.set_num_threads(1)
    keep_heap(cfg["keep_heap"])
    rank = int(os.environ["RANK"])
    pipes, data = {}, {}
    for name, counts, slow, vocab in runs:
        pipes[name] = Pipeline(
            model(cfg, vocab=vocab), microbatches=cfg["microbatches"], partition=counts, loss_fn=lm_loss,
            optimizer=lambda p: torch.optim.AdamW(p, lr=cfg["lr"]), speed=slow if rank == 1 else 1.0,
            timeout=TIMEOUT,
        )  # fmt: skip
        data[name] = batch(cfg, cfg["rows"] * cfg["microbatches"], vocab)
    vocabs = sorted({vocab for *_, vocab in runs})
    whole = {v: model(cfg, vocab=v) for v in vocabs}  # the whole model, for the paired profiles
    losses: dict[str, list[float]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():
        for _ in range(cfg["warmup"]):
            losses[name].append(pipe.step(*data[name]))
    for v in vocabs:  # warm the profiles' buffers too
        profile_round(cfg, whole[v], v, repeats=1, warmup=1)
    step_s: dict[str, list[float]] = {name: [] for name in pipes}
    optim_s: dict[str, list[float]] = {name: [] for name in pipes}
    usage: dict[str, list[list[float]]] = {name: [] for name in pipes}  # [busy, total, own] CPU s
    paired: dict[str, list[list[list[float]]]] = {str(v): [] for v in vocabs}  # rep -> layer -> [f, b]
    # a step's collectives outside the schedule: the batch size, the tied gradient, the loss
    collectives: dict[str, list[float]] = {str(v): [] for v in vocabs}
    timeline: dict[str, list[dict[str, Any]]] = {name: [] for name in pipes}  # per block, its last step
    names = list(pipes)
    for rep in range(cfg["reps"]):
        dist.barrier()  # both ranks profile at once, every core busy, as when they train
        for v in vocabs:
            # the mean of the timed runs: a step pays its slow actions too (bench/README: the bias)
            paired[str(v)].append(profile_round(cfg, whole[v], v, cfg["pair_repeats"], cfg["pair_warmup"],
                                                statistic=cfg["paired_statistic"]))
            collectives[str(v)].append(_collectives_s(torch.zeros(v, cfg["width"])))
        for name in names if rep % 2 == 0 else names[::-1]:  # alternate, so drift hits all alike
            pipe, (x, y) = pipes[name], data[name]
            dist.barrier()
            machine, cpu = machine_cpu(), time.process_time()
            start = time.perf_counter()
            opt = call = 0.0
            for k in range(cfg["steps"]):
                pipe.record = k == cfg["steps"] - 1  # the block's last step is recorded (a list append per action)
                t = time.perf_counter()
                losses[name].append(pipe.forward_backward(x, y))
                call = time.perf_counter() - t
                t = time.perf_counter()
                assert pipe.optimizer is not None
                pipe.optimizer.step()
                opt += time.perf_counter() - t
            dist.barrier()
            step_s[name].append((time.perf_counter() - start) / cfg["steps"])
            optim_s[name].append(opt / cfg["steps"])
            end = machine_cpu()
            usage[name].append([end[0] - machine[0], end[1] - machine[1], time.process_time() - cpu])
            pipe.record = False
            timeline[name].append(_timeline(pipe, len(x), call))  # gathered after the clock stopped
    return {"rank": rank, "step_s": step_s, "optimizer_s": optim_s, "cpu": usage, "timeline": timeline,
            "paired_profiles": paired, "collectives_s": collectives,
            "first_loss": {k: v[0] for k, v in losses.items()},
            "last_loss": {k: v[-1] for k, v in losses.items()}}  # fmt: skip


def _collectives_s(grad: Any) -> float:
    """Seconds of the three collectives a Pipeline step runs outside its schedule (mean of three):
    the batch size broadcast from the first rank, the all-reduce of the tied gradient (a tensor of
    its size) between the embedding's and the head's ranks, and the loss broadcast from the last.
    The Pipeline posts the last rank's side of the loss broadcast without waiting (it completes at
    the next step's start); here both sides wait, so this may count a little high."""
    import statistics

    import torch
    import torch.distributed as dist

    runs = []
    for _ in range(4):
        n, loss = torch.ones(1, dtype=torch.int64), torch.ones(1, dtype=torch.float64)
        dist.barrier()
        start = time.perf_counter()
        dist.broadcast(n, 0)
        dist.all_reduce(grad)
        dist.broadcast(loss, dist.get_world_size() - 1)
        runs.append(time.perf_counter() - start)
    return statistics.fmean(runs[1:])


def foreign_share(rank0: list[list[float]], rank1: list[list[float]]) -> list[float]:
    """Per timed block, the share of the machine's CPU time used by processes other than the two
    ranks (other work on a shared machine slows the ranks down: the timings are then suspect)."""
    return [max(0.0, (a[0] - a[2] - b[2]) / a[1]) if a[1] > 0 else math.nan for a, b in zip(rank0, rank1)]


def _timeline(pipe: Any, batch_rows: int, call: float) -> dict[str, Any]:
    """Diagnosis of one recorded step (a timed block's last): per-stage compute and the simulator's
    makespan from those measured costs. It separates the ways a prediction can miss: costs that
    differ inside the running pipeline from the profile (compute, message latency), a simulator
    that mis-models the runtime (overheads between actions), and the work after the schedule's
    last action (the tied gradient's all-reduce, the loss shared between ranks: ``call_s`` less
    ``span_s``)."""
    from layerwise.runtime.measure import costs_from_events
    from layerwise.schedule.simulate import simulate

    events = pipe.timeline()
    schedule = pipe.schedule_for(batch_rows)
    costs = costs_from_events(events, schedule)
    return {
        "forward_s": list(costs.forward),
        "backward_s": [i + w for i, w in zip(costs.input_grad, costs.weight_grad)],
        "latency_s": costs.latency,
        "span_s": max(e.end for e in events) - min(e.start for e in events),
        "call_s": call,  # this rank's forward_backward call: the span and what follows it
        "simulated_from_timeline_s": float(simulate(schedule, costs).makespan),
    }

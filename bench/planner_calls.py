"""This machine's communication calls for bench/planner.py: measured inside 2 launched ranks, then
fitted to the alpha-beta model (latency + bytes / bandwidth) the planner prices every call with.

Point-to-point messages and the collectives FSDP2 and DDP make (``measure_links``), the runtime's
data-parallel units (``measure_dp_calls``) and its tensor-parallel blocks (``measure_tp_calls``),
each with its least-squares fit.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def measure_links(nbytes: list[int], reps: int) -> dict[str, Any]:
    """Per size (bytes of the whole tensor): median seconds of a one-way message (half a ping-pong),
    an all-reduce, an all-gather and a reduce-scatter between the 2 ranks, with the calls
    FSDP2 and DDP make (``all_gather_single``, ``reduce_scatter_single``, ``all_reduce``)."""
    import torch
    import torch.distributed as dist

    from layerwise.runtime.distributed import ensure_initialized

    ensure_initialized(60.0)
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {"p2p": {}, "all_reduce": {}, "all_gather": {}, "reduce_scatter": {}}
    for n in nbytes:
        buf = torch.ones(n // 4)
        shard = torch.ones(n // 4 // world)
        times: dict[str, list[float]] = {k: [] for k in out}
        for k in range(reps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            t1 = time.perf_counter()
            dist.all_reduce(buf)
            t2 = time.perf_counter()
            dist.all_gather_single(buf, shard)
            t3 = time.perf_counter()
            dist.reduce_scatter_single(shard, buf)
            t4 = time.perf_counter()
            if k >= 2:
                times["p2p"].append((t1 - t0) / 2)
                times["all_reduce"].append(t2 - t1)
                times["all_gather"].append(t3 - t2)
                times["reduce_scatter"].append(t4 - t3)
        for key, ts in times.items():
            out[key][str(n)] = statistics.median(ts)
    return out


def measure_dp_calls(widths: list[int], counts: list[int], reps: int) -> dict[str, Any]:
    """Seconds of the runtime's data-parallel calls, software included: ``count`` square
    ``width`` x ``width`` layers through ``layerwise.parallel.data`` (each layer one FSDP2 unit),
    one step of one microbatch of one row (compute next to nothing). ZeRO-3 (``fsdp``,
    reshard_after_forward) gathers each unit in the forward and the backward and reduce-scatters
    it; ``ddp`` all-reduces each unit once at the end. The growth per unit is one unit's calls."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from layerwise.parallel.data import DataParallel, apply_dp
    from layerwise.parallel.mesh import ParallelDims, build_mesh
    from layerwise.runtime.distributed import ensure_initialized

    torch.set_num_threads(1)
    ensure_initialized(60.0)
    mesh = build_mesh(ParallelDims(dp=2, pp=1, tp=1, world_size=2), "cpu")["dp"]
    out: dict[str, Any] = {"fsdp": {}, "ddp": {}}
    for mode in out:
        for w in widths:
            for n in counts:
                torch.manual_seed(0)
                layers = [nn.Linear(w, w, bias=False) for _ in range(n)]
                units, shared, root = apply_dp(layers, mesh, mode=mode, reshard_after_forward=mode == "fsdp")
                sync = DataParallel(units, shared, root, mesh.get_group(), per_microbatch=mode == "fsdp")
                x = torch.randn(1, w)
                times = []
                for k in range(reps + 2):
                    dist.barrier()
                    t0 = time.perf_counter()
                    sync.begin_step()
                    y = x
                    for layer in layers:
                        y = layer(y)
                    y.sum().backward()
                    sync.finish_step()
                    if k >= 2:
                        times.append(time.perf_counter() - t0)
                out[mode][f"{w}x{n}"] = statistics.median(times)
    return out


# Per unit of layerwise.parallel.data, per microbatch (ZeRO-3) or step (DDP), 2 ranks: ring steps
# and bytes through each rank's link per byte of the unit. ZeRO-3: 2 all-gathers + 1 reduce-scatter
# (3 steps, 1.5 x the bytes); DDP: 1 all-reduce (2 steps, 1 x).
DP_CALLS = {"fsdp": (3, 1.5), "ddp": (2, 1.0)}


def fit_dp_calls(raw: dict[str, Any], widths: list[int], counts: list[int],
                 calls: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """Latency and bandwidth per call of the runtime's data-parallel collectives, fitted like
    :func:`fit_links` to the per-unit growth: ZeRO-3 makes 2 all-gathers and 1 reduce-scatter
    per unit and microbatch (2 ranks: 3 latencies, 1.5 x the unit's bytes), DDP 1 all-reduce
    (2 latencies, 1 x its bytes)."""
    lo, hi = min(counts), max(counts)
    per_unit = {mode: {w: (raw[mode][f"{w}x{hi}"] - raw[mode][f"{w}x{lo}"]) / (hi - lo) for w in widths}
                for mode in raw}
    rows = []
    for mode, (steps, vol) in calls.items():
        for w, t in per_unit[mode].items():
            if t > 0:
                rows.append((steps / t, vol * w * w * 4 / t))
    return {**_least_squares(rows), "per_unit": {m: {str(w): t for w, t in v.items()} for m, v in per_unit.items()}}


def measure_tp_calls(model: dict[str, Any], nbytes: list[int], counts: list[int], reps: int) -> dict[str, Any]:
    """Seconds of the runtime's tensor-parallel calls over the 2 ranks, software included.

    ``all_reduce``: per size, a DTensor of that many bytes with a Partial placement redistributed
    to Replicate (what a row-parallel linear's output does). ``blocks``: per count, one forward
    and backward of that many of the benchmark GPT's blocks (``model``) through ``layerwise.parallel.tensor``
    on one row of 8 tokens (compute next to nothing): the growth per block is its 4 all-reduces
    (2 forward, 2 backward) with DTensor's work around them."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from layerwise.models.gpt import Block, GPTConfig
    from layerwise.parallel.mesh import ParallelDims, build_mesh
    from layerwise.parallel.tensor import apply_tp
    from layerwise.runtime.distributed import ensure_initialized

    torch.set_num_threads(1)
    ensure_initialized(60.0)
    mesh = build_mesh(ParallelDims(dp=1, pp=1, tp=2, world_size=2), "cpu")["tp"]
    out: dict[str, Any] = {"all_reduce": {}, "blocks": {}}

    def timed(fn: Any) -> float:
        times = []
        for k in range(reps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if k >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    for n in nbytes:
        part = DTensor.from_local(torch.ones(n // 4), mesh, [Partial()], run_check=False)
        out["all_reduce"][str(n)] = timed(lambda: part.redistribute(mesh, [Replicate()]).to_local().sum())
    cfg = GPTConfig(**{**model, "blocks": 1})
    for count in counts:
        torch.manual_seed(0)
        blocks = [Block(cfg) for _ in range(count)]
        apply_tp(blocks, mesh)
        x = torch.randn(1, 8, cfg.width, requires_grad=True)

        def step() -> None:
            y = x
            for blk in blocks:
                y = blk(y)
            y.sum().backward()

        out["blocks"][str(count)] = timed(step)
    return out


def fit_tp_calls(raw: dict[str, Any]) -> dict[str, float]:
    """Bandwidth from the all-reduces' sizes (2 ranks: 2 latencies + n / bandwidth); latency per
    call from the blocks' growth: 4 all-reduces of 2 ring steps each per block."""
    fit = _least_squares([(2 / t, int(n) / t) for n, t in raw["all_reduce"].items()])
    counts = sorted(int(c) for c in raw["blocks"])
    lo, hi = counts[0], counts[-1]
    per_block = (raw["blocks"][str(hi)] - raw["blocks"][str(lo)]) / (hi - lo)
    return {"latency": max(per_block / 8, 1e-7), "bandwidth": fit["bandwidth"], "per_block": per_block,
            "all_reduce_latency": fit["latency"]}


# Ring steps and bytes through each rank's link, per byte of the whole tensor, for 2 ranks
# (Thakur et al., 2005): t = steps * latency + volume * n / bandwidth.
RING2 = {"p2p": (1, 1.0), "all_reduce": (2, 1.0), "all_gather": (1, 0.5), "reduce_scatter": (1, 0.5)}


def fit_links(raw: dict[str, Any]) -> dict[str, float]:
    """Latency (alpha) and bandwidth (1 / beta) of the alpha-beta model that fits every measured
    message and collective best, in relative error (least squares on t_model / t_measured - 1):
    the planner prices each call the runtime makes with these two numbers."""
    rows = []
    for kind, (steps, vol) in RING2.items():
        for n, t in raw.get(kind, {}).items():
            rows.append((steps / t, vol * int(n) / t))  # model / measured = a * alpha + b * beta
    return _least_squares(rows)


def _least_squares(rows: list[tuple[float, float]]) -> dict[str, float]:
    """alpha, beta minimising sum (a alpha + b beta - 1)^2 over the rows (a, b): the 2 x 2
    normal equations. Returned as latency (alpha) and bandwidth (1 / beta)."""
    saa = sum(a * a for a, _ in rows)
    sab = sum(a * b for a, b in rows)
    sbb = sum(b * b for _, b in rows)
    sa, sb = sum(a for a, _ in rows), sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha = (sa * sbb - sb * sab) / det
    beta = (saa * sb - sab * sa) / det
    return {"latency": max(alpha, 1e-7), "bandwidth": 1 / max(beta, 1e-12)}

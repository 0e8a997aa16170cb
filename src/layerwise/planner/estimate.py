"""Memory and time of one strategy: per pipeline rank, then the step.

The model is cut into units ``[embedding, block 0, ..., block l-1, head]`` (the order
``layerwise.Pipeline`` splits a model in); ``pp x chunks`` contiguous stages hold them, stage ``s``
on pipeline rank ``s % pp``. Devices are numbered tensor-parallel fastest, then data-parallel, then
pipeline (Megatron-LM's order), so a tensor-parallel group sits in one node and pipeline rank ``r``
owns devices ``[r dp tp, (r + 1) dp tp)``.

Time per microbatch and stage: FLOPs (Narayanan et al., 2021, Eq. 3: backward = 2 x forward, full
recomputation adds a forward) at the device's achievable speed, plus the tensor-parallel
all-reduces (2 per block forward, 2 backward, 2 more to recompute; Korthikanti et al., 2022,
Sec. 4.2: sequence parallelism's all-gather + reduce-scatter move the same bytes) and, under
ZeRO-3, the runtime's per-microbatch gathers and reduce-scatters, one call per FSDP unit
(:mod:`.units`): hidden behind compute where the cluster overlaps communication (prefetching
one unit ahead), all exposed where it cannot. The pipeline is then replayed by :mod:`.pipesim`
with the point-to-point message time on each boundary. The runtime reduces data-parallel
gradients once per step after each rank's last backward, one call per layer, and (ZeRO-1/2)
gathers the parameters once before the first forward; offload's host round trip comes after
the optimizer. All are exposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from ..partition.solver import PartitionError, solve
from ..schedule.core import Schedule
from ..schedule.generators import build
from ..schedule.simulate import peak_inflight
from . import memory as mem
from .cluster import Cluster, DeviceGroup
from .model import ModelSpec
from .closed import chunk_bound, closed_makespan, inflight_closed
from .pipesim import PipeTiming, rank_peak_activations, simulate
from .strategy import Strategy, StrategyError
from .costs import unit_flops, unit_params
from .units import layer_units


@dataclass(frozen=True, kw_only=True)
class Estimate:
    strategy: Strategy
    microbatches: int
    partition: tuple[int, ...]  # units per stage over [embedding, blocks..., head]
    params: int  # the model's parameter count
    rank_params: tuple[float, ...]  # parameters per device, per pipeline rank
    memory: dict[str, float]  # params, grads, optimizer, activations, total: the worst rank's
    budget: float  # that rank's usable bytes
    inflight: tuple[int, ...]  # per stage, microbatches held at once (schedule)
    step_time: float
    makespan: float  # the pipeline part of the step
    bubble_fraction: float
    parts: dict[str, float]  # seconds: compute, tp_comm, zero3_comm, p2p, dp_exposed, optimizer_exposed
    flops_per_step: float  # with recomputation, Megatron's "achieved" numerator
    model_flops_per_step: float  # without recomputation, for MFU
    peak_flops: float  # sum of the devices' peak FLOP/s
    devices: int
    precision: str = "mixed"
    feasible: bool = True
    reasons: list[str] = field(default_factory=list)

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_step / self.step_time / self.devices / 1e12 if self.step_time else 0.0

    @property
    def mfu(self) -> float:
        return self.model_flops_per_step / self.step_time / self.peak_flops if self.step_time else 0.0


@lru_cache(maxsize=512)
def schedule_for(name: str, pp: int, m: int, chunks: int) -> Schedule:
    return build(name, stages=pp, microbatches=m, chunks=chunks)


@lru_cache(maxsize=2048)
def _partition(times: tuple[float, ...], stages: int, speeds: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(solve(list(times), stages=stages, speeds=list(speeds)))


@lru_cache(maxsize=1024)
def _simulate(name: str, pp: int, m: int, chunks: int, f: tuple[float, ...], i: tuple[float, ...],
              w: tuple[float, ...], hops: tuple[float, ...]) -> PipeTiming:
    # Strategies that differ only in what the pipeline does not see (ZeRO-0/1, offload) share it.
    return simulate(schedule_for(name, pp, m, chunks), f, i, w, hops)


@lru_cache(maxsize=512)
def _inflight(name: str, pp: int, m: int, chunks: int) -> tuple[int, ...]:
    return peak_inflight(schedule_for(name, pp, m, chunks))


@lru_cache(maxsize=4096)
def _rank_peaks(name: str, pp: int, m: int, chunks: int, stage_act: tuple[float, ...]) -> list[float]:
    return rank_peak_activations(schedule_for(name, pp, m, chunks), stage_act)


@dataclass(frozen=True)
class _Layout:
    """Everything about a strategy that its ZeRO stage and offload do not change (cached)."""

    m: int
    partition: tuple[int, ...]
    where: tuple[int, ...]  # pipeline rank of each stage
    groups: tuple[DeviceGroup, ...]  # per pipeline rank
    stage_params: tuple[float, ...]  # per stage, parameters on one tensor-parallel rank
    rank_params: tuple[float, ...]  # per pipeline rank, the same summed over its stages
    stage_layers: tuple[int, ...]  # per stage, units it holds
    # Per stage, FSDP/DDP units (one per layer) and ZeRO-3 units (each large matrix its own):
    # (count, parameters in all, first unit's, last unit's), whole, before tensor parallelism.
    stage_dp_units: tuple[tuple[int, float, float, float], ...]
    stage_z3_units: tuple[tuple[int, float, float, float], ...]
    peaks: tuple[float, ...]  # per pipeline rank, peak saved activations (bytes)
    transient: float  # bytes on top of them while recomputing a block
    compute: tuple[tuple[float, float, float], ...]  # per stage, F, I, W compute seconds
    tp_comm: tuple[tuple[float, float], ...]  # per stage, forward and backward all-reduce seconds
    hops: tuple[float, ...]  # per boundary, message seconds
    inflight: tuple[int, ...]
    rows: tuple[tuple[float, float, float], ...]  # distinct (params, peak activations, usable bytes) over ranks
    rows_low: tuple[tuple[float, float, float], ...]  # the same with a lower bound on the peaks
    approx: bool  # peaks are bounds (interleaved, first pass), not the schedule's walk


@lru_cache(maxsize=8192)
def _layout(model: ModelSpec, cluster: Cluster, s: Strategy, global_batch: int, precision: mem.Precision,
            partition: tuple[int, ...] | None, exact: bool) -> _Layout:
    m = s.microbatches(global_batch)
    check(model, cluster, s)
    units = model.layers + 2
    n_stages = s.stages
    if n_stages > units:
        raise StrategyError(f"{n_stages} stages (pp {s.pp} x chunks {s.chunks}) but the model has only {units} layers "
                            f"(embedding, {model.layers} blocks, head)")
    stride = s.dp * s.tp
    groups = tuple(cluster.group_of(r * stride) for r in range(s.pp))
    where = s.stage_ranks()
    mine = [[st for st in range(n_stages) if where[st] == r] for r in range(s.pp)]
    speeds = tuple(groups[where[st]].flops for st in range(n_stages))
    f, i, w = unit_flops(model, s)
    if partition is None:
        # Balance by forward + backward without recomputation (which adds the same to every
        # block), relative to a block: one partition per stage count and device speeds.
        f0, i0, w0 = unit_flops(model, replace(s, recompute="none"))
        rel = [x + y + z for x, y, z in zip(f0, i0, w0)]
        unit = rel[1] if model.layers else 1.0
        rel_t = tuple(round(x / unit, 9) for x in rel)
        top = max(speeds)
        try:
            partition = _partition(rel_t, n_stages, tuple(round(v / top, 9) for v in speeds))
        except PartitionError as err:
            raise StrategyError(str(err)) from None
    elif sum(partition) != units or len(partition) != n_stages or min(partition) < 1:
        raise StrategyError(f"partition {list(partition)} must give {n_stages} stages of >= 1 layer summing to "
                            f"{units} layers")
    bounds = [0]
    for c in partition:
        bounds.append(bounds[-1] + c)
    spans = list(zip(bounds, bounds[1:]))
    last = model.layers + 1
    # Per stage: does it hold the embedding, how many blocks, does it hold the head. Every unit
    # list is (embedding, block, ..., block, head), so a stage's sum is three terms.
    shape = [(a == 0, min(b, last) - max(a, 1), b == units) for a, b in spans]

    def per_stage(units_: list[float]) -> tuple[float, ...]:
        e, blk, h = units_[0], units_[1] if model.layers else 0.0, units_[-1]
        return tuple(e * he + blk * nb + h * hh for he, nb, hh in shape)

    params_u = unit_params(model, n_stages > 1)
    modules = [model.embedding_modules(), model.block_modules(), model.head_modules(own_copy=n_stages > 1)]

    def stage_units(zero3: bool) -> tuple[tuple[int, float, float, float], ...]:
        kinds = [layer_units(mods, zero3=zero3) for mods in modules]  # embedding, block, head
        out = []
        for he, nb, hh in shape:
            counts = (he, nb, hh)
            units = [u for k, c in zip(kinds, counts) if c for u in k]  # one of each kind present
            n = sum(len(k) * c for k, c in zip(kinds, counts))
            total = sum(sum(k) * c for k, c in zip(kinds, counts))
            out.append((n, total, units[0] if units else 0.0, units[-1] if units else 0.0))
        return tuple(out)

    dp_units, z3_units = stage_units(False), stage_units(True)
    act_kw: dict[str, Any] = dict(micro=s.micro, tp=s.tp, sp=s.sp, precision=precision)
    block_act = mem.layer_activation_bytes(model, recompute=s.recompute, **act_kw)
    act_u = [mem.embedding_activation_bytes(model, **act_kw), block_act, mem.head_activation_bytes(model, **act_kw)]
    stage_params = tuple(x / s.tp for x in per_stage(params_u))
    stage_act = per_stage(act_u)
    blocks = [nb for _, nb, _ in shape]
    # Recomputing one block during backward materialises its full activations once.
    transient = mem.layer_activation_bytes(model, recompute="none", **act_kw) if s.recompute != "none" else 0.0
    # Tensor parallelism: 2 all-reduces of the block's (b, s, h) activation forward, 2 backward,
    # 2 more when the forward is recomputed; one more for the vocab-parallel embedding.
    act_bytes = s.micro * model.seq * model.hidden * precision.activation
    ar = cluster.all_reduce(act_bytes, s.tp, cluster.intra_node_bw, cluster.tp_call)
    tp_comm = tuple((2 * ar * nb + (ar if a == 0 else 0), (4 if s.recompute == "full" else 2) * ar * nb)
                    for nb, (a, _) in zip(blocks, spans))
    compute = tuple((x / v, y / v, z / v) for x, y, z, v in zip(per_stage(f), per_stage(i), per_stage(w), speeds))
    # Point-to-point: the activation (or its gradient), split over t with sequence parallelism
    # (Narayanan et al., 2021, Sec. 4.1's scatter/gather), across nodes when the ranks are.
    msg = act_bytes / (s.tp if s.sp else 1)
    node = [(r * stride) // cluster.devices_per_node for r in range(s.pp)]
    hops = tuple(cluster.p2p(msg, cluster.intra_node_bw if node[where[st]] == node[where[st + 1]]
                             else cluster.inter_node_bw) for st in range(n_stages - 1))
    closed = inflight_closed(s.schedule, s.pp, m)
    bounded = closed is None and not exact and (s.schedule == "zbv" or m % s.pp == 0)
    if closed is not None:  # one stage per rank
        peaks = tuple(closed[r] * stage_act[r] for r in range(s.pp))
        inflight: tuple[int, ...] = closed
    elif not bounded:
        peaks = tuple(_rank_peaks(s.schedule, s.pp, m, s.chunks, stage_act))
        inflight = _inflight(s.schedule, s.pp, m, s.chunks)
    else:  # the search's first pass: bounds, every chunk as large as the rank's largest (smallest)
        peaks = tuple(chunk_bound(s.schedule, s.pp, m, s.chunks, r) * max(stage_act[st] for st in mine[r])
                      for r in range(s.pp))
        inflight = ()
    low = tuple(chunk_bound(s.schedule, s.pp, m, s.chunks, r) * min(stage_act[st] for st in mine[r])
                for r in range(s.pp)) if bounded else peaks
    rank_params = tuple(sum(stage_params[st] for st in mine[r]) for r in range(s.pp))
    usable = [g.memory_bytes * (1 - cluster.memory_reserve) for g in groups]
    rows = tuple(sorted(set(zip(rank_params, peaks, usable))))
    rows_low = tuple(sorted(set(zip(rank_params, low, usable))))
    return _Layout(
        m=m, partition=tuple(partition), where=where, groups=groups, stage_params=stage_params,
        rank_params=rank_params, rows=rows, rows_low=rows_low, approx=bounded,
        stage_layers=tuple(partition), stage_dp_units=dp_units, stage_z3_units=z3_units, peaks=peaks,
        transient=transient, compute=compute, tp_comm=tp_comm, hops=hops, inflight=inflight,
    )  # fmt: skip


def _memory(rows: tuple[tuple[float, float, float], ...], s: Strategy, precision: mem.Precision,
            transient: float) -> tuple[dict[str, float], float, float]:
    """The breakdown of the rank that overflows most (or has the least room), its overflow in
    bytes (<= 0 when it fits) and its usable bytes."""
    worst: dict[str, float] = {}
    worst_margin, budget = -float("inf"), 0.0
    for p_rank, peak, usable in rows:
        states = mem.model_states(p_rank, dp=s.dp, zero_stage=s.zero_stage, precision=precision, offload=s.offload)
        # Replicated data parallelism reduces gradients through buffers of their own: PyTorch
        # DDP's buckets (gradient_as_bucket_view=False, the default) and FSDP2's replicate,
        # which layerwise.Pipeline's DDP mode uses, both hold a second copy of the gradients.
        buckets = p_rank * precision.grad if s.zero_stage == 0 and s.dp > 1 else 0.0
        total = states.total + buckets + peak + transient
        if total - usable > worst_margin:
            worst_margin, budget = total - usable, usable
            worst = {"params": states.params, "grads": states.grads + buckets, "optimizer": states.optimizer,
                     "activations": peak + transient, "total": total}
    return worst, worst_margin, budget


def estimate(model: ModelSpec, cluster: Cluster, s: Strategy, global_batch: int, *,
             precision: mem.Precision = mem.PRECISIONS["mixed"],
             partition: tuple[int, ...] | None = None, timing: str = "sim") -> Estimate:
    """Memory and time of ``s``; raises :class:`StrategyError` if it cannot run at all.

    ``timing``: ``"sim"`` replays the schedule (:mod:`.pipesim`); ``"closed"`` uses the closed
    forms of :func:`closed_makespan` (exact for uniform stages, see the tests; the search ranks
    with it first); ``"none"`` computes the memory only.
    """
    if s.zero_stage == 3 and s.dp > 1 and s.split_backward:
        raise StrategyError(f"ZeRO-3 reduces gradients after each backward, which {s.schedule} splits in two: "
                            f"layerwise.Pipeline refuses reshard_after_forward with a zero-bubble schedule")
    base_s = s if s.zero_stage == 0 and not s.offload else replace(s, zero_stage=0, offload=False)
    part = None if partition is None else tuple(partition)
    lay = _layout(model, cluster, base_s, global_batch, precision, part, timing == "sim")
    transient = lay.transient
    if s.zero_stage == 3 and s.dp > 1:  # two gathered units: the one computing and the one prefetched
        biggest = max(max(layer_units(mods, zero3=True), default=0.0) for mods in
                      (model.embedding_modules(), model.block_modules(), model.head_modules(own_copy=s.stages > 1)))
        transient += 2 * biggest / s.tp * precision.param
    worst, worst_margin, budget = _memory(lay.rows, s, precision, transient)
    if lay.approx and worst_margin > 0 and _memory(lay.rows_low, s, precision, transient)[1] <= 0:
        # The bounds disagree on whether it fits: walk the schedule for the exact peaks.
        lay = _layout(model, cluster, base_s, global_batch, precision, part, True)
        worst, worst_margin, budget = _memory(lay.rows, s, precision, transient)
    m = lay.m
    reasons = []
    if worst_margin > 0:
        reasons.append(f"needs {_gib(worst['total'])} per device but {_gib(budget)} is usable "
                       f"({cluster.memory_reserve:.0%} of device memory kept in reserve)")
    base: dict[str, Any] = dict(
        strategy=s, microbatches=m, partition=lay.partition, params=model.params(), rank_params=lay.rank_params,
        memory=worst, budget=budget, inflight=lay.inflight,
        flops_per_step=model.step_flops(global_batch, recompute=s.recompute == "full"),
        model_flops_per_step=model.step_flops(global_batch, recompute=False),
        peak_flops=sum(g.tflops * 1e12 * g.count for g in cluster.groups) * s.devices / cluster.devices,
        devices=s.devices, precision=precision.name, feasible=not reasons, reasons=reasons,
    )  # fmt: skip
    if timing == "none":
        return Estimate(step_time=0.0, makespan=0.0, bubble_fraction=0.0, parts={}, **base)

    dp_bw = cluster.bandwidth(s.dp * s.tp)  # a data-parallel ring spans dp x tp consecutive devices
    fs, is_, ws, zcomm = [], [], [], []
    start, end = [0.0] * s.pp, [0.0] * s.pp  # per rank, once-per-step collectives before and after
    for st, (cf, ci, cw) in enumerate(lay.compute):
        extra_f = extra_b = 0.0
        r = lay.where[st]
        if s.dp > 1 and s.zero_stage == 3:
            # Every microbatch gathers each unit in its forward and again in its backward, and
            # reduce-scatters its gradients (layerwise.parallel.data, reshard_after_forward).
            n, total, first, last = lay.stage_z3_units[st]
            total /= s.tp
            call = cluster.fsdp_call
            gather = cluster.all_gather(total * precision.param, s.dp, dp_bw, call, n)
            scatter = cluster.all_gather(total * precision.grad, s.dp, dp_bw, call, n)
            extra_f, extra_b = gather, gather + scatter
            if cluster.overlap and n:  # FSDP2 prefetches the next unit while one computes
                extra_f = max(cluster.all_gather(first / s.tp * precision.param, s.dp, dp_bw, call), extra_f - cf)
                extra_b = max(cluster.all_gather(last / s.tp * precision.param, s.dp, dp_bw, call), extra_b - ci - cw)
        elif s.dp > 1:
            n, total, _, _ = lay.stage_dp_units[st]
            total /= s.tp
            if s.zero_stage == 0:  # DDP (FSDP2's replicate): an all-reduce per layer
                end[r] += cluster.all_reduce(total * precision.grad, s.dp, dp_bw, cluster.ddp_call, n)
            else:  # parameters gathered at the first forward, gradients reduce-scattered at the end
                start[r] += cluster.all_gather(total * precision.param, s.dp, dp_bw, cluster.fsdp_call, n)
                end[r] += cluster.all_gather(total * precision.grad, s.dp, dp_bw, cluster.fsdp_call, n)
        zcomm.append(extra_f + extra_b)
        fs.append(cf + lay.tp_comm[st][0] + extra_f)
        is_.append(ci + lay.tp_comm[st][1] + extra_b)
        ws.append(cw)
    hops = list(lay.hops)
    if timing == "closed":
        timing_ = closed_makespan(s.pp, m, lay.where, s.split_backward, fs, is_, ws, hops)
    elif s.split_backward:
        timing_ = _simulate(s.schedule, s.pp, m, s.chunks, tuple(fs), tuple(is_), tuple(ws), tuple(hops))
    else:
        full = tuple(x + y for x, y in zip(is_, ws))
        timing_ = _simulate(s.schedule, s.pp, m, s.chunks, tuple(fs), full, (0.0,) * len(fs), tuple(hops))
    step, parts = _step_time(cluster, s, precision, timing_, lay.rank_params, start, end)

    if timing == "closed":  # the search's first pass needs the step time only
        return Estimate(step_time=step, makespan=float(timing_.makespan), bubble_fraction=0.0, parts=parts, **base)

    def per_rank(values: list[float]) -> float:
        return max(sum(v for v, w in zip(values, lay.where) if w == r) * m for r in range(s.pp))

    parts.update({
        "compute": per_rank([sum(c) for c in lay.compute]),
        "tp_comm": per_rank([a + b for a, b in lay.tp_comm]),
        "zero_comm": per_rank(zcomm),
        "p2p": 2 * sum(hops[: s.pp - 1]),
    })  # fmt: skip
    return Estimate(step_time=step, makespan=float(timing_.makespan), bubble_fraction=timing_.bubble_fraction,
                    parts=parts, **base)


def _step_time(cluster: Cluster, s: Strategy, precision: mem.Precision, t: PipeTiming,
               rank_params: tuple[float, ...], start: list[float], end: list[float]) -> tuple[float, dict[str, float]]:
    """The pipeline's makespan plus the once-per-step collectives (``start`` before the first
    forward, ``end`` after each rank's last backward, seconds per rank) and the offload round trip."""
    shift = max(start)  # every rank gathers at once; the pipeline starts when the slowest has
    step = shift + float(t.makespan)
    dp_exposed = opt_exposed = 0.0
    for r, p_rank in enumerate(rank_params):
        shard = p_rank / (s.dp if s.zero_stage >= 1 else 1)
        if s.offload:
            # ZeRO-Offload: gradients down, updated parameters up, Adam on the host CPU.
            update = shard * (precision.grad + precision.param) / cluster.host_bw + shard / cluster.host_adam_params_per_s
        else:
            update = shard / cluster.optimizer_params_per_s
        done = shift + float(t.finish[r]) + end[r]  # finish_step runs after the rank's last backward
        step = max(step, done + update)
        dp_exposed = max(dp_exposed, done - float(t.makespan))
        opt_exposed = max(opt_exposed, update)
    return step, {"dp_exposed": max(dp_exposed, 0.0), "optimizer_exposed": opt_exposed}


def check(model: ModelSpec, cluster: Cluster, s: Strategy) -> None:
    """Divisibility and placement rules; raises :class:`StrategyError` naming the one broken."""
    if s.devices != cluster.devices:
        raise StrategyError(f"dp x tp x pp = {s.dp} x {s.tp} x {s.pp} = {s.devices}, but the cluster has "
                            f"{cluster.devices} devices")
    if s.tp > cluster.devices_per_node or cluster.devices_per_node % s.tp:
        raise StrategyError(f"tp {s.tp} must divide the {cluster.devices_per_node} devices of a node "
                            f"(tensor parallelism stays inside a node)")
    if model.heads % s.tp or (model.kv_heads_ % s.tp and s.tp % model.kv_heads_):
        raise StrategyError(f"tp {s.tp} must divide the {model.heads} attention heads "
                            f"(and divide or be a multiple of the {model.kv_heads_} kv heads)")
    if s.sp and model.seq % s.tp:
        raise StrategyError(f"sequence parallelism needs seq {model.seq} divisible by tp {s.tp}")
    if s.pp == 1 and s.schedule not in ("1f1b", "gpipe"):
        raise StrategyError(f"schedule {s.schedule} needs pp >= 2")
    stride = s.dp * s.tp
    start = 0
    for g in cluster.groups:
        if start % stride or g.count % stride:
            raise StrategyError(f"a pipeline rank ({s.dp} x {s.tp} = {stride} devices) would span device "
                                f"groups: group {g.name!r} has {g.count} devices")
        start += g.count


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


__all__ = ["Estimate", "check", "estimate", "schedule_for", "unit_flops", "unit_params"]

"""The user-facing pipeline: split a model into stages, run a schedule, step the optimizer."""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..schedule.actions import Action, Kind, TimedAction
from ..schedule.core import Schedule
from ..schedule.generators import ScheduleConfigError, build, chunks_per_rank
from ..schedule.validate import validate
from .distributed import default_device, ensure_initialized, to_global
from .errors import ConfigError
from .executor import KINDS, StepData, channel_of, run_step
from .microbatch import split_batch
from .shm import Channel, make_transport
from .split import ModelLike, Partition, TieSlots, as_layers, local_tensor, resolve_partition, stage_bounds, tie_slots
from .stage import Stage

_FORWARD_KINDS = frozenset({Kind.F, Kind.SEND_F, Kind.RECV_F})

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Pipeline:
    """A model split into contiguous stages, one pipeline rank per process.

    Every process builds the same model (same seed) and keeps only its own stages. ``stages`` is
    the number of pipeline ranks (the world size by default); with ``schedule="interleaved"``
    each rank holds ``chunks`` stages, with ``schedule="zbv"`` two, in a V (rank 0 holds the
    first and the last stage).

    ``transport="auto"`` carries stage-boundary messages through shared memory and pipes when
    every rank is on this host and tensors are on the CPU, and through the process group's
    point-to-point operations otherwise; ``"dist"`` forces the latter, ``"shm"`` the former. See
    :mod:`layerwise.runtime.shm` for why. Collectives (loss, tied weights) always use the group.

    Example (run under ``torchrun --nproc-per-node 4`` or ``layerwise.launch(fn, nprocs=4)``)::

        pipe = layerwise.Pipeline(model, microbatches=8, loss_fn=F.cross_entropy,
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        loss = pipe.step(inputs, targets)
    """

    def __init__(
        self,
        model: ModelLike,
        *,
        stages: int | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        optimizer: OptimizerFactory | None = None,
        schedule: str = "1f1b",
        microbatches: int = 4,
        chunks: int = 2,
        partition: Partition = "uniform",
        group: Any = None,
        timeout: float = 60.0,
        device: torch.device | None = None,
        loss_reduction: str = "mean",
        record: bool = False,
        speed: float = 1.0,
        max_grad_norm: float | None = None,
        transport: str = "auto",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        ensure_initialized(timeout)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if stages is not None and stages != self.world_size:
            raise ConfigError(
                f"Pipeline(stages={stages}) but the process group has {self.world_size} ranks (one "
                f"per pipeline stage): start {stages} processes (torchrun --nproc-per-node {stages}, "
                f"or layerwise.launch(fn, nprocs={stages})) or pass stages={self.world_size}"
            )
        self.schedule_name = schedule
        self.chunks = chunks_per_rank(schedule, chunks)
        self.microbatches = microbatches
        self.loss_reduction = loss_reduction
        self.record = record
        if not 0 < speed <= 1:
            raise ConfigError(f"speed must be in (0, 1], got {speed}: it emulates a slower device")
        # Emulated device speed: each compute action of this rank is stretched by 1 / speed with a
        # sleep, so a heterogeneous cluster can be measured on one machine, not only predicted.
        self.speed = speed
        self.max_grad_norm = max_grad_norm  # clip the global gradient norm (all stages) before the step
        self.device = device or default_device()
        # What one microbatch's loss is multiplied by, besides its share of the batch: 1 in a plain
        # pipeline; a data-parallel subclass sets it so that averaging over replicas gives the
        # global batch's loss even when replicas hold different numbers of rows.
        self._loss_scale = 1.0
        self._schedules: dict[int, Schedule] = {}
        base = self._schedule(microbatches)  # validates schedule arguments early, on every rank
        num_stages = base.num_stages
        layers = as_layers(model)
        try:
            counts = resolve_partition(partition, len(layers), num_stages)
        except ConfigError as e:
            if self.chunks > 1:
                raise ConfigError(f"{e} ({schedule}: {self.world_size} ranks x {self.chunks} chunks = {num_stages} stages)") from None
            raise
        self.partition = counts
        self.stage_to_rank = base.stage_to_rank
        bounds = stage_bounds(counts)
        ties = tie_slots(layers, bounds)  # found by identity, before layers are built or wrapped
        owned = [i for s, (a, b) in enumerate(bounds) if self.stage_to_rank[s] == self.rank for i in range(a, b)]
        self._prepare_layers(model, layers, owned)
        self.stages: dict[int, Stage] = {}
        for s, (a, b) in enumerate(bounds):
            if self.stage_to_rank[s] != self.rank:
                continue
            self.stages[s] = Stage(
                index=s,
                layers=layers[a:b],
                first_layer=a,
                is_first=s == 0,
                is_last=s == num_stages - 1,
                loss_fn=loss_fn,
                split_backward=base.split_backward,
                where=self.describe(self.rank),
            )
        self._layer_ranges = {s: bounds[s] for s in self.stages}
        self._ties = self._tie_groups(ties)
        try:
            self.transport = make_transport(transport, group, self.describe, self.device,
                                            _channels(self.stage_to_rank), timeout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        seen: dict[int, nn.Parameter] = {}
        for stage in self.stages.values():
            for p in stage.parameters():
                seen.setdefault(id(p), p)  # a weight shared by two local stages is one parameter
        self._params = list(seen.values())
        self.optimizer = optimizer(self.parameters()) if optimizer is not None and self._params else None
        self.last_events: list[tuple[int, int, int, float, float]] = []
        # The last rank's loss broadcast runs in the background; it is waited for at the next
        # step, by close(), or at interpreter exit (a rank that exits with it pending cuts the
        # other ranks' connections mid-receive). Registered after the process group's own exit
        # hook, so it runs before that one destroys the group (atexit runs hooks in reverse).
        self._pending: list[Any] = []
        self._forward_only = False  # set by evaluate() around forward_backward
        atexit.register(_wait_all, self._pending)
        self._announce()

    # -- setup helpers ---------------------------------------------------------------------
    def _schedule(self, m: int) -> Schedule:
        if m not in self._schedules:
            try:
                sch = build(self.schedule_name, stages=self.world_size, microbatches=m, chunks=self.chunks)
            except ScheduleConfigError as e:
                raise ConfigError(str(e)) from None
            self._schedules[m] = validate(sch)
        return self._schedules[m]

    def describe(self, rank: int) -> str:
        stages = [s for s, r in enumerate(self._schedule(self.microbatches).stage_to_rank) if r == rank]
        word = "stage" if len(stages) == 1 else "stages"
        return f"rank {rank} ({word} {', '.join(map(str, stages))})"

    def _prepare_layers(self, model: ModelLike, layers: list[nn.Module], owned: list[int]) -> None:
        """Make this rank's layers ready to run (here: move them to the device). Subclasses
        materialize meta-device layers and apply tensor / data parallelism here."""
        for i in owned:
            layers[i].to(self.device)

    def _new_group(self, ranks: list[int]) -> Any:
        """A process group over these ranks of the pipeline group. Every rank of the job calls it,
        for every tie in the same order, as torch.distributed requires."""
        return dist.new_group([to_global(self.group, r) for r in ranks])

    def _tie_groups(self, ties: list[TieSlots]) -> list[tuple[nn.Parameter | None, Any, list[int]]]:
        """Process groups over the ranks sharing each tied parameter (e.g. embedding and head)."""
        out = []
        for stages, slots in ties:
            ranks = sorted({self.stage_to_rank[s] for s in stages})
            if len(ranks) < 2:
                continue
            pg = self._new_group(ranks)
            mine = [s for s in stages if s in self.stages]
            p = None
            if mine:
                module, name = slots[mine[0]]
                p = module._parameters[name]  # after _prepare_layers: possibly materialized or sharded
                with torch.no_grad():  # start every copy from the lowest rank's, whatever the seeds
                    dist.broadcast(local_tensor(p.data), to_global(self.group, ranks[0]), group=pg)
            out.append((p, pg, ranks))
        return out

    def _announce(self) -> None:
        """Tell layerwise's launcher which stages this rank holds, for its failure report."""
        folder = os.environ.get("LAYERWISE_STATE_DIR")
        if folder:
            with open(os.path.join(folder, f"rank{dist.get_rank()}.json"), "w") as f:
                json.dump({"stages": sorted(self.stages), "where": self.describe(self.rank)}, f)

    # -- public API ------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once."""
        return list(self._params)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters named ``<global layer index>.<name>`` (e.g. ``3.weight``)."""
        out: dict[str, nn.Parameter] = {}
        for s, (a, _) in self._layer_ranges.items():
            for j, layer in enumerate(self.stages[s].layers):
                for name, p in layer.named_parameters():
                    out[f"{a + j}.{name}"] = p
        return out

    @property
    def is_last(self) -> bool:
        return len(self.stage_to_rank) - 1 in self.stages

    def step(self, inputs: Any = None, targets: Any = None) -> float:
        """One training step on a full batch: forward, backward, tied-gradient sync, optimizer.

        ``inputs`` is only read on the first stage's rank, ``targets`` on the last stage's.
        Returns the full-batch loss on every rank.
        """
        loss = self.forward_backward(inputs, targets)
        if self.max_grad_norm is not None:
            self.clip_grad_norm_(self.max_grad_norm)
        if self.optimizer is not None:
            self.optimizer.step()
        return loss

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so their global L2 norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does on the whole model. A tied parameter counts once
        (on the lowest rank holding it). Returns the norm before clipping, on every rank."""
        skip = {id(p) for p, _, ranks in self._ties if p is not None and self.rank != ranks[0]}
        grads = [(id(p), p.grad) for p in self._params if p.grad is not None]
        local = torch.zeros(1, dtype=torch.float64)
        for key, g in grads:
            if key not in skip:  # a shard's squares, counted once over the ranks holding copies
                local += local_tensor(g).detach().double().pow(2).sum().cpu() / self._copies(g)
        dist.all_reduce(local, group=self._norm_group())
        total = float(local.sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for _, g in grads:
                local_tensor(g).mul_(coef)
        return total

    def _copies(self, grad: torch.Tensor) -> int:
        """On how many of the ranks that sum the norm this gradient's values live (1 here: a
        pipeline rank's gradients are its own; replicas and tensor-parallel ranks raise it)."""
        return 1

    def _norm_group(self) -> Any:
        """The ranks whose squares make up the global norm."""
        return self.group

    def forward_backward(self, inputs: Any = None, targets: Any = None) -> float:
        """Compute the full-batch loss and gradients (no optimizer step)."""
        forward_only = self._forward_only
        if not forward_only:
            for p in self._params:
                p.grad = None
        batch = self._batch_size(inputs, targets)
        m = self._effective_microbatches(batch)
        sch = self._schedule(m)
        mb_in = split_batch(inputs, m, "inputs") if 0 in self.stages else [None] * m
        mb_tg = split_batch(targets, m, "targets") if self.is_last else [None] * m
        sizes = [_rows(t) for t in mb_tg] if self.is_last else [1] * m
        total = sum(sizes)
        unit = [n / total for n in sizes] if self.loss_reduction == "mean" else [1.0] * m
        weights = [w * self._loss_scale for w in unit]
        mb_in = [_to(x, self.device) for x in mb_in]
        mb_tg = [_to(x, self.device) for x in mb_tg]
        actions = sch.ranks[self.rank]
        if forward_only:  # the schedule's forwards and their messages, in the schedule's order
            actions = [a for a in actions if a.kind in _FORWARD_KINDS]
        else:
            self._begin_step()
        rec = run_step(actions, self.stages, sch.stage_to_rank, self.transport,
                       StepData(mb_in, mb_tg, weights), record=self.record,
                       stretch=1.0 / self.speed)
        self.last_events = rec.events
        if forward_only:
            return self._share_loss(rec.loss)
        self._end_backward()
        for tied, pg, _ in self._ties:
            if tied is None:
                continue
            if tied.grad is None:  # this rank's use of the tie got no gradient this step
                tied.grad = torch.zeros_like(tied)
            dist.all_reduce(local_tensor(tied.grad), group=pg)  # the tie's gradient is the sum of its uses
        return self._share_loss(rec.loss)

    def evaluate(self, inputs: Any = None, targets: Any = None) -> float:
        """The full-batch loss with no gradients: only the schedule's forwards run, under
        ``torch.no_grad`` (about a third of a training step's compute), and nothing is kept.

        Called on every rank like :meth:`step`; gradients and the optimizer are left untouched.
        Layers stay in the mode they are in (call ``.eval()`` on them for dropout-free numbers).
        """
        self._forward_only = True
        try:
            with torch.no_grad():
                self._begin_eval()
                return self.forward_backward(inputs, targets)
        finally:
            self._forward_only = False
            for stage in self.stages.values():
                stage.drop_saved()
            self._end_eval()

    def _begin_eval(self) -> None:
        """Before a forward-only step (a data-parallel subclass prepares its sharded layers)."""

    def _end_eval(self) -> None:
        """After a forward-only step, also after one that failed."""

    def _begin_step(self) -> None:
        """Before a step's first action (a data-parallel subclass defers its reduction here)."""

    def _end_backward(self) -> None:
        """After a step's last backward, before tied gradients are summed (reduce over replicas)."""

    def close(self) -> None:
        """Wait for communication still in flight (the last step's loss broadcast)."""
        _wait_all(self._pending)

    def _share_loss(self, loss: torch.Tensor | None) -> float:
        """Broadcast the loss from the last stage. The last rank usually finishes first, so it
        posts its broadcast without waiting (completed at the next step's start, in
        _batch_size); the others wait for it."""
        value = torch.zeros(1, dtype=torch.float64)
        last_rank = to_global(self.group, self.stage_to_rank[-1])
        if loss is not None:
            value[0] = float(loss)
            self._pending.append((dist.broadcast(value, last_rank, group=self.group, async_op=True), value))
            return float(value[0])
        dist.broadcast(value, last_rank, group=self.group)
        return float(value[0])

    def _effective_microbatches(self, batch: int) -> int:
        """``microbatches``, or fewer when the batch has fewer rows (each needs at least one)."""
        return min(self.microbatches, batch)

    def _batch_size(self, inputs: Any, targets: Any) -> int:
        """The batch size, agreed by all ranks (only the ends of the pipeline see the data)."""
        _wait_all(self._pending)
        n = torch.zeros(1, dtype=torch.int64)
        if 0 in self.stages:
            if inputs is None:
                raise ConfigError(f"{self.describe(self.rank)} holds the first stage: pass the inputs to step()")
            n[0] = _rows(inputs)
        elif self.is_last:
            if targets is None:
                raise ConfigError(f"{self.describe(self.rank)} holds the last stage: pass the targets to step()")
            n[0] = _rows(targets)
        first = to_global(self.group, self.stage_to_rank[0])
        dist.broadcast(n, first, group=self.group)
        if int(n[0]) < 1:
            raise ConfigError("the batch is empty")
        return int(n[0])

    def schedule_for(self, batch: int) -> Schedule:
        """The (lowered) schedule a step on a batch of ``batch`` rows runs."""
        return self._schedule(self._effective_microbatches(batch))

    def timeline(self) -> list[TimedAction]:
        """The last step's recorded actions of every rank (needs ``record=True``).

        Gathered as plain float tensors (never pickled); times are relative to the earliest start.
        """
        rows = torch.tensor(self.last_events, dtype=torch.float64).reshape(-1, 5)
        count = torch.tensor([rows.shape[0]], dtype=torch.int64)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self.group)
        width = max(int(c[0]) for c in counts)
        padded = torch.zeros(width, 5, dtype=torch.float64)
        padded[: rows.shape[0]] = rows
        gathered = [torch.zeros(width, 5, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        events = []
        for r, (g, c) in enumerate(zip(gathered, counts)):
            for s, k, mb, t0, t1 in g[: int(c[0])].tolist():
                events.append(TimedAction(r, Action(int(s), KINDS[int(k)], int(mb)), t0, t1))
        if not events:
            return []
        origin = min(e.start for e in events)
        return [TimedAction(e.rank, e.action, e.start - origin, e.end - origin) for e in events]


def _channels(stage_to_rank: Sequence[int]) -> list[Channel]:
    """Every channel between two ranks: each boundary's activations forward, gradients back."""
    out = []
    for s in range(len(stage_to_rank) - 1):
        a, b = stage_to_rank[s], stage_to_rank[s + 1]
        if a != b:
            out += [Channel(a, b, channel_of(s, True)), Channel(b, a, channel_of(s + 1, False))]
    return out


def _wait_all(pending: list[Any]) -> None:
    while pending:
        work, _ = pending.pop()
        work.wait()


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return _rows(x[0])
    if isinstance(x, dict) and x:
        return _rows(next(iter(x.values())))
    raise ConfigError(f"cannot tell the batch size of {type(x).__name__}: pass tensors (batch first)")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


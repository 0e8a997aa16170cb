"""The demo's two runs: the pipeline (one function per rank) and the single-process reference."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..models import GPT, GPTConfig, lm_loss
from .data import batch, stdlib_corpus


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    stages: int = 4
    schedule: str = "1f1b"
    microbatches: int = 8
    chunks: int = 2
    steps: int = 150
    batch_size: int = 32
    seq: int = 64
    width: int = 128
    blocks: int = 6
    heads: int = 4
    # 2e-3 ran into a loss spike near step 20 where the runs amplified fp32 rounding chaotically
    # (pipeline and one process 0.14 apart, 2.3e-2 at step 150); 1e-3 ends at the same loss and
    # stays within 2.1e-5 of one process over 150 steps (measured with the default 4-stage split)
    lr: float = 1e-3
    warmup: int = 10  # steps of linear learning-rate warm-up
    max_grad_norm: float = 1.0  # global gradient clipping, as in GPT training
    seed: int = 0
    partition: list[int] | str = "uniform"
    png: str | None = "layerwise-demo-timeline.png"
    trace: str | None = None
    record_steps: int = 5  # the last steps whose timelines measure the bubble
    progress: bool = True
    dp: int = 1  # data-parallel replicas
    tp: int = 1  # tensor-parallel ranks per stage
    data_parallel: str = "fsdp"
    precision: str = "fp32"
    activation_checkpointing: str = "none"

    @property
    def processes(self) -> int:
        return self.stages * self.dp * self.tp

    def model(self) -> GPT:
        torch.manual_seed(self.seed)
        return GPT(GPTConfig(vocab=256, context=self.seq, width=self.width, heads=self.heads, blocks=self.blocks))


def _optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _warmup(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / steps))


def pipeline_rank(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Runs in every pipeline process; rank 0 shows the progress bar and draws the timeline."""
    import layerwise
    from layerwise.runtime.measure import measured_bubble, predict

    cfg = DemoConfig(**cfg_dict)
    corpus = stdlib_corpus()
    pipe = layerwise.Pipeline(
        cfg.model(), stages=cfg.stages, schedule=cfg.schedule, microbatches=cfg.microbatches,
        chunks=cfg.chunks, partition=cfg.partition, loss_fn=lm_loss,
        optimizer=lambda p: _optimizer(p, cfg.lr), max_grad_norm=cfg.max_grad_norm, record=True,
        dp=cfg.dp, tp=cfg.tp, data_parallel=cfg.data_parallel, precision=cfg.precision,
        activation_checkpointing=cfg.activation_checkpointing,
    )  # fmt: skip
    sched = _warmup(pipe.optimizer, cfg.warmup)
    rank = int(os.environ.get("RANK", "0"))
    bar = _bar(cfg) if rank == 0 and cfg.progress else None
    losses, times, measured, predicted = [], [], [], []
    events: list[Any] = []
    for step in range(cfg.steps):
        x, y = batch(corpus, step, cfg.batch_size, cfg.seq, cfg.seed)
        t0 = time.perf_counter()
        loss = pipe.step(x, y)
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if step >= cfg.steps - cfg.record_steps:
            events = pipe.timeline()  # collective; every rank gets every rank's events
            sch = pipe.schedule_for(cfg.batch_size)
            measured.append(measured_bubble(events, pipe.world_size))
            predicted.append(predict(events, sch).bubble_fraction)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{cfg.batch_size * cfg.seq / times[-1]:,.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    out: dict[str, Any] = {"rank": rank, "partition": list(pipe.partition)}
    if rank == 0:
        steady = times[1:] or times
        out.update(
            losses=losses,
            step_time=statistics.median(steady),
            tokens_per_s=cfg.batch_size * cfg.seq / statistics.median(steady),
            measured_bubble=statistics.mean(measured),
            predicted_bubble=statistics.mean(predicted),
        )
        title = f"layerwise demo: {cfg.schedule}, {cfg.stages} ranks, {cfg.microbatches} microbatches (measured)"
        if cfg.png:
            from layerwise.schedule.timeline import render_png

            render_png(events, cfg.png, title=title, bubble_fraction=measured[-1], num_ranks=pipe.world_size)
        if cfg.trace:
            from layerwise.schedule.timeline import write_chrome_trace

            write_chrome_trace(events, cfg.trace, title=title, bubble_fraction=measured[-1])
    return out


def reference(cfg: DemoConfig) -> list[float]:
    """The same model, data, seed and optimizer, in this one process."""
    corpus = stdlib_corpus()
    model = cfg.model()
    # the same precision as the pipeline, layer by layer (checkpointing is exact: not needed here)
    from ..parallel.precision import apply_precision

    apply_precision(model.pipeline_layers(), cfg.precision)
    opt = _optimizer(model.parameters(), cfg.lr)
    sched = _warmup(opt, cfg.warmup)
    bar = _bar(cfg, "reference (1 process)") if cfg.progress else None
    losses = []
    for step in range(cfg.steps):
        x, y = batch(corpus, step, cfg.batch_size, cfg.seq, cfg.seed)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return losses


def _bar(cfg: DemoConfig, desc: str | None = None) -> Any:
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which leaks when a rank exits with
    # os._exit; one process draws one bar, so a thread lock is all it needs.
    tqdm.set_lock(threading.RLock())
    return tqdm(total=cfg.steps, desc=desc or f"pipeline ({cfg.stages} processes, {cfg.schedule})", unit="step",
                mininterval=0.5, dynamic_ncols=True)


def config_dict(cfg: DemoConfig) -> dict[str, Any]:
    return asdict(cfg)

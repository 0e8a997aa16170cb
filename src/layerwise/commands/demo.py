"""``layerwise demo``: train a small GPT on the standard library's source in a local pipeline.

Starts one process per pipeline rank on 127.0.0.1, trains, then trains the same model in one
process with the same data and seed, and prints both losses, the measured bubble next to the
simulator's prediction, and where the timeline picture went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from layerwise.commands import UsageError, limits, positive_int
from layerwise.schedule.generators import SCHEDULES

DEMO_LAYERS = 8  # DemoConfig's GPT: embedding, 6 blocks, head (a test checks it); known without torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", type=positive_int, default=4, help="pipeline ranks = processes (default 4)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b)")
    parser.add_argument("--microbatches", type=positive_int, default=8, help="microbatches per step (default 8)")
    parser.add_argument("--chunks", type=positive_int, default=None,
                        help="stages per rank with --schedule interleaved (default 2; zbv always has 2)")
    parser.add_argument("--steps", type=positive_int, default=150, help="training steps (default 150, about a minute)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--partition", choices=("balanced", "uniform"), default="balanced",
                        help="balanced: measured per-layer time (default); uniform: equal layer counts")
    parser.add_argument("--png", default="layerwise-demo-timeline.png", help="timeline picture to write")
    parser.add_argument("--trace", default=None, help="also write a Chrome trace (open in ui.perfetto.dev)")
    parser.add_argument("--dp", type=positive_int, default=1, help="data-parallel replicas (processes = stages x dp x tp)")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per stage (must divide the 4 heads)")
    parser.add_argument("--data-parallel", choices=("fsdp", "ddp"), default="fsdp", help="with --dp: FSDP2 sharding or DDP")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: bf16 compute with fp32 master weights and reductions")
    parser.add_argument("--activation-checkpointing", choices=("none", "full", "selective"), default="none",
                        help="recompute each block's activations in the backward")
    parser.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object at the end")


def _check(args: argparse.Namespace) -> None:
    """Refuse a bad combination of options at once, before torch is imported."""
    limits.check_chunks(args.schedule, args.chunks)
    limits.check_depth(args.schedule, args.stages, args.chunks, DEMO_LAYERS, "the demo's GPT (embedding, 6 blocks, head)")
    limits.check_output(args.png, "--png")
    limits.check_output(args.trace, "--trace")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    import layerwise
    from layerwise.demo.train import DemoConfig, config_dict, pipeline_rank, reference

    cfg = DemoConfig(
        stages=args.stages, schedule=args.schedule, microbatches=args.microbatches, chunks=args.chunks or 2,
        steps=args.steps, batch_size=args.batch_size, png=args.png or None, trace=args.trace,
        progress=True, dp=args.dp, tp=args.tp, data_parallel=args.data_parallel, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    _check_mesh(cfg)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    partition_table = ""
    if args.partition == "balanced":
        cfg, partition_table = _balanced(cfg)
    say(f"layerwise demo: GPT ({cfg.blocks} blocks, width {cfg.width}) on the Python standard library, "
        f"{cfg.stages} pipeline processes, {cfg.schedule}, {cfg.microbatches} microbatches, {cfg.steps} steps")
    if partition_table:
        say(partition_table)
        cores = os.cpu_count() or 1
        if cfg.stages > cores:
            say(f"  (the prediction assumes a device per stage; here {cfg.stages} processes share {cores} "
                f"cores, so each runs about {cfg.stages / cores:.0f}x slower)")
    start = time.perf_counter()
    try:
        results = layerwise.launch(pipeline_rank, cfg.processes, config_dict(cfg), timeout=1800)
    except layerwise.PipelineError as err:
        raise UsageError(f"the pipeline failed:\n{err}") from None
    pipe_seconds = time.perf_counter() - start
    main = results[0]
    summary: dict[str, Any] = {
        "final_loss": main["losses"][-1],
        "first_loss": main["losses"][0],
        "reference_loss": None,
        "measured_bubble": main["measured_bubble"],
        "predicted_bubble": main["predicted_bubble"],
        "tokens_per_s": main["tokens_per_s"],
        "step_time_s": main["step_time"],
        "partition": main["partition"],
        "stages": cfg.stages,
        "schedule": cfg.schedule,
        "microbatches": cfg.microbatches,
        "steps": cfg.steps,
        "seconds": pipe_seconds,
        "png": cfg.png,
    }
    if not args.no_reference:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        ref = reference(cfg)
        summary["reference_loss"] = ref[-1]
        summary["max_loss_difference"] = max(abs(a - b) for a, b in zip(main["losses"], ref))
        summary["first_step_difference"] = abs(main["losses"][0] - ref[0])
    _print_summary(summary, say)
    if args.json:
        print(json.dumps(summary))
    return 0


def _check_mesh(cfg: Any) -> None:
    """Refuse at once what the processes would only find out after starting."""
    if cfg.heads % cfg.tp:
        raise UsageError(f"--tp {cfg.tp} does not divide the model's {cfg.heads} attention heads: use --tp 1, 2 or 4")
    per_replica = cfg.batch_size // cfg.dp
    if per_replica < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} cannot be split over --dp {cfg.dp} replicas: "
                         f"use a batch of at least {cfg.dp}")
    if cfg.processes > 64:
        raise UsageError(f"--stages x --dp x --tp = {cfg.processes} processes is more than this demo starts on "
                         "one machine (64); use fewer")


def _balanced(cfg: Any) -> tuple[Any, str]:
    """Profile each layer on one microbatch and split by measured time (layerwise.partition)."""
    from dataclasses import replace

    from layerwise.demo.data import batch, stdlib_corpus
    from layerwise.partition import PartitionError
    from layerwise.partition.api import partition

    x, _ = batch(stdlib_corpus(), 0, max(1, cfg.batch_size // cfg.microbatches), cfg.seq, cfg.seed)
    model = cfg.model()
    try:  # ranks, as Pipeline(stages=...): the plan has chunks per rank for interleaved and zbv
        plan = partition(model, cfg.stages, balance="time", sample=x, schedule=cfg.schedule,
                         microbatches=cfg.microbatches, chunks=cfg.chunks)  # fmt: skip
    except PartitionError as err:
        raise UsageError(str(err)) from None
    from layerwise.partition.report import format_table

    return replace(cfg, partition=list(plan)), format_table(plan)


def _print_summary(s: dict[str, Any], say: Any) -> None:
    say("")
    say(f"  pipeline loss      {s['first_loss']:.4f} -> {s['final_loss']:.4f}   "
        f"({s['tokens_per_s']:,.0f} tokens/s, {s['step_time_s'] * 1000:.0f} ms/step)")
    if s["reference_loss"] is not None:
        # fp32 sums in another order differ by ~1e-7; AdamW divides by sqrt(v) and lets that
        # grow over many steps, so "the same" allows 1e-3 relative on the loss.
        same = abs(s["final_loss"] - s["reference_loss"]) <= 1e-3 * abs(s["reference_loss"])
        say(f"  one-process loss   {s['reference_loss']:.4f}   -> {'the same' if same else 'DIFFERENT'} "
            f"(step 1 differs by {s['first_step_difference']:.1e}, the final step by "
            f"{abs(s['final_loss'] - s['reference_loss']):.1e}: fp32 rounding, grown by AdamW)")
    say(f"  pipeline bubble    measured {s['measured_bubble']:.1%}, "
        f"simulator predicts {s['predicted_bubble']:.1%} from the measured stage costs")
    if s["png"]:
        say(f"  timeline           {s['png']}")

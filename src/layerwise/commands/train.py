"""``layerwise train``: train a model on local text in a pipeline, with checkpoints and resume.

Settings come from the defaults, then ``--config FILE.toml``, then the flags given. Started
plainly, it starts one local process per pipeline rank; under torchrun (RANK and WORLD_SIZE set)
this process is one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from layerwise.commands import UsageError, non_negative_int, positive_int
from layerwise.schedule.generators import SCHEDULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every default is None so that only the flags given override the config file.
    a = parser.add_argument
    a("--config", metavar="FILE.toml", help="settings file (flat TOML, same names as the flags); flags override it")
    a("--model", help="'gpt' (built-in, default), a local HuggingFace model directory, or a config JSON file")
    a("--data", help="a text or JSONL file ({\"text\": ...} per line), or a folder of them")
    a("--tokenizer", help="a local HuggingFace tokenizer directory (default: UTF-8 bytes)")
    a("--stages", type=positive_int, help="pipeline stages = processes (default 2)")
    a("--schedule", choices=SCHEDULES, help="pipeline schedule (default 1f1b)")
    a("--microbatches", type=positive_int, help="microbatches per step (default 4)")
    a("--chunks", type=positive_int, help="stages per rank with --schedule interleaved (default 2)")
    a("--dp", type=positive_int, help="data-parallel replicas; processes = stages x dp x tp (default 1)")
    a("--tp", type=positive_int, help="tensor-parallel ranks per stage (default 1)")
    a("--data-parallel", choices=("fsdp", "ddp"), help="with --dp: FSDP2 (sharded, default) or DDP (replicated)")
    a("--precision", choices=("fp32", "bf16"), help="bf16: bf16 compute, fp32 master weights (default fp32)")
    a("--activation-checkpointing", choices=("none", "full", "selective"),
      help="recompute activations in the backward to save memory (default none)")
    a("--batch-size", type=positive_int, help="sequences per step (default 8)")
    a("--seq-len", type=positive_int, help="tokens per sequence (default 128)")
    a("--steps", type=positive_int, help="optimizer steps in all (default 100)")
    a("--lr", type=float, help="peak learning rate of AdamW (default 3e-4)")
    a("--warmup", type=non_negative_int, help="steps of linear warm-up before the cosine decay (default 10)")
    a("--max-grad-norm", type=float, help="clip the global gradient norm (default 1.0; 0: off)")
    a("--seed", type=non_negative_int, help="seed of the weights, the data split and order (default 0)")
    a("--eval-every", type=non_negative_int, help="evaluate on the held-out split every N steps (default: at the end)")
    a("--out", metavar="DIR", help="DIR/checkpoints/, DIR/final/, DIR/metrics.jsonl (default ./layerwise-train)")
    a("--save-every", type=non_negative_int, help="checkpoint every N steps (default: at the end)")
    a("--resume", action="store_true", default=None, help="continue from the newest checkpoint under --out")
    a("--json", action="store_true", help="print one JSON summary object at the end")


def config_from_args(args: argparse.Namespace) -> Any:
    from layerwise.train.config import TrainConfigError, build_config

    names = ("model", "data", "tokenizer", "stages", "schedule", "microbatches", "chunks", "dp", "tp", "data_parallel",
             "precision", "activation_checkpointing", "batch_size", "seq_len", "steps", "lr", "warmup",
             "max_grad_norm", "seed", "eval_every", "out", "save_every", "resume")
    try:
        return build_config(args.config, **{n: getattr(args, n) for n in names})
    except TrainConfigError as e:
        raise UsageError(str(e)) from None


def _check_paths(cfg: Any) -> None:
    """Cheap checks before any process starts, so a typo is one line, not a failed launch."""
    from layerwise.train.checkpoint import latest
    from layerwise.train.data import DataError, data_files

    try:
        data_files(cfg.data)
    except DataError as e:
        raise UsageError(str(e)) from None
    if cfg.model != "gpt" and not os.path.exists(cfg.model):
        raise UsageError(f"--model {cfg.model}: no such file or directory (or use --model gpt)")
    if cfg.tokenizer is not None and not os.path.isdir(cfg.tokenizer):
        raise UsageError(f"--tokenizer {cfg.tokenizer}: not a directory")
    if cfg.tokenizer is None and any(os.path.isfile(os.path.join(cfg.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        print(f"note: {cfg.model} has its own tokenizer, but without --tokenizer the text is read as bytes; "
              f"pass --tokenizer {cfg.model} to use it", file=sys.stderr)
    _check_stages(cfg)
    root = os.path.join(cfg.out, "checkpoints")
    found = latest(root)
    if cfg.resume and found is None:
        raise UsageError(f"--resume: no complete checkpoint under {root}; run without --resume to start")
    if cfg.resume and found is not None:
        from layerwise.train.checkpoint import CheckpointError
        from layerwise.train.loop import check_resumable

        try:
            check_resumable(cfg, found[1])
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    if not cfg.resume and found is not None:
        raise UsageError(f"{cfg.out} already holds a checkpoint ({found[1]}): pass --resume to continue it, or choose another --out")


def _check_stages(cfg: Any) -> None:
    """More pipeline stages than the model has layers would fail in every rank after the launch:
    build the model on the meta device (no memory, no weights read) and count its layers first."""
    import torch

    from layerwise.runtime.split import as_layers
    from layerwise.schedule.generators import chunks_per_rank
    from layerwise.train.model import ModelError, build

    try:
        with torch.device("meta"):
            layers = len(as_layers(build(cfg.model, vocab_size=257, seq_len=cfg.seq_len, seed=cfg.seed).model))
    except ModelError as e:
        raise UsageError(str(e)) from None
    per_rank = chunks_per_rank(cfg.schedule, cfg.chunks)
    if cfg.stages * per_rank > layers:
        chunks = f" x {per_rank} stages per rank ({cfg.schedule})" if per_rank > 1 else ""
        raise UsageError(f"--stages {cfg.stages}{chunks} = {cfg.stages * per_rank} pipeline stages, but the model has "
                         f"{layers} layers: use at most {layers // per_rank} stages")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _check_paths(cfg)
    from layerwise.train.loop import train_rank

    if under_torchrun:
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # torchrun sets 1 thread
        if int(os.environ["WORLD_SIZE"]) != cfg.processes:
            raise UsageError(f"torchrun started {os.environ['WORLD_SIZE']} processes but --stages x --dp x --tp is "
                             f"{cfg.processes}: give --nproc-per-node {cfg.processes} or change --stages")
        summary = _in_rank(train_rank, cfg)
        if rank != 0:
            return 0
    else:
        import layerwise

        try:
            summary = layerwise.launch(train_rank, cfg.processes, cfg.to_dict())[0]
        except layerwise.LaunchError as e:
            print(f"error: layerwise train failed:\n{e}", file=sys.stderr)
            return 1
    _print_summary(summary, say)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    return 0


def _in_rank(fn: Any, cfg: Any) -> dict[str, Any]:
    from layerwise.train.checkpoint import CheckpointError
    from layerwise.train.data import DataError
    from layerwise.train.model import ModelError

    try:
        return dict(fn(cfg.to_dict()))
    except (CheckpointError, DataError, ModelError) as e:
        raise UsageError(str(e)) from None


def _print_summary(s: dict[str, Any], say: Any) -> None:
    say("")
    if s["first_loss"] is not None:
        say(f"  loss        {s['first_loss']:.4f} -> {s['final_loss']:.4f} over steps "
            f"{(s['resumed_from'] or 0) + 1}..{s['steps']}   ({s['tokens_per_s']:,.0f} tokens/s)")
    if s["eval_loss"] is not None:
        say(f"  eval loss   {s['eval_loss']:.4f} on {s['eval_sequences']} held-out sequences")
    say(f"  model       {s['final']}")
    say(f"  checkpoint  {s['checkpoint']}")

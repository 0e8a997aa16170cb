"""``layerwise partition``: profile a built-in model and balance it over (emulated) devices.

Prints a table per stage (layers, parameters, time per microbatch, peak memory) with the
simulated step time and bubble; ``--png`` draws it, ``--json`` prints it as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from layerwise.commands import UsageError, limits, positive_int
from layerwise.partition import BALANCE_MODES, Device, PartitionError
from layerwise.schedule.generators import SCHEDULES

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_GPT_DEFAULTS = {"blocks": 4, "width": 64, "context": 64, "vocab": 256, "heads": 4}
_MLP_DEFAULTS = {"depth": 8, "width": 32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (built in)")
    model.add_argument("--model", choices=("gpt", "mlp"), default="gpt",
                       help="layerwise.models.GPT (embedding, blocks, head) or mlp (default gpt)")
    model.add_argument("--blocks", type=positive_int, help=f"gpt: transformer blocks (default {_GPT_DEFAULTS['blocks']})")
    model.add_argument("--width", type=positive_int, help="gpt: embedding size (default 64); mlp: layer width (default 32)")
    model.add_argument("--context", type=positive_int, help=f"gpt: sequence length (default {_GPT_DEFAULTS['context']})")
    model.add_argument("--vocab", type=positive_int, help=f"gpt: vocabulary size (default {_GPT_DEFAULTS['vocab']})")
    model.add_argument("--heads", type=positive_int, help=f"gpt: attention heads (default {_GPT_DEFAULTS['heads']})")
    model.add_argument("--depth", type=positive_int, help=f"mlp: layers (default {_MLP_DEFAULTS['depth']})")
    parser.add_argument("--stages", type=positive_int, metavar="P",
                        help="pipeline ranks (default: one per --devices entry)")
    parser.add_argument("--balance", choices=BALANCE_MODES, default="time",
                        help="what to even out across stages (default time)")
    parser.add_argument("--devices", type=_devices, metavar="NAME:SPEED[:MEMORY],...",
                        help="one per rank, e.g. 'cpu:1.0:8GiB,cpu:0.5' (speed relative to this "
                        "machine; memory budget in B/KiB/MiB/GiB or KB/MB/GB, default unlimited)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b)")
    parser.add_argument("--microbatches", type=positive_int, default=4, metavar="M",
                        help="microbatches per step (default 4)")
    parser.add_argument("--batch", type=positive_int, default=16, metavar="ROWS",
                        help="rows per step; one microbatch of batch/M rows is profiled (default 16)")
    parser.add_argument("--comm", type=_seconds, default=0.0, metavar="SECONDS",
                        help="latency of each message between ranks, for the prediction (default 0)")
    parser.add_argument("--png", metavar="FILE", help="write a bar chart of time and memory per stage")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    devices = args.devices
    if args.stages is None and devices is None:
        raise UsageError("give --stages P or --devices (one entry per rank)")
    stages = args.stages if args.stages is not None else len(devices)
    if args.batch < args.microbatches:
        raise UsageError(f"--batch {args.batch} has fewer rows than --microbatches {args.microbatches}")
    # Checked before torch is imported and the model profiled, so a bad option fails at once.
    layers, model = _layer_count(args)
    limits.check_depth(args.schedule, stages, None, layers, model)
    limits.check_size(args.schedule, stages, args.microbatches, None)
    limits.check_output(args.png, "--png")
    import torch  # only now: --help and argument errors stay fast

    from layerwise.partition import api, profile_layers, report

    torch.manual_seed(0)
    model, sample, targets, loss_fn, describe = _build(args)
    try:
        if loss_fn is not None:
            costs = api.profile_with_loss(model, sample, loss_fn, targets)
        else:
            costs = profile_layers(model, sample)
        plan = api.partition(
            model, stages, balance=args.balance, devices=devices, schedule=args.schedule,
            microbatches=args.microbatches, costs=costs, comm_latency=args.comm,
        )  # fmt: skip
    except PartitionError as err:
        raise UsageError(str(err)) from None
    names = _layer_names(model)
    out: dict[str, Any] = {"model": describe, **plan.to_dict(), "layer_names": names}
    if args.png:
        try:
            report.render_png(plan, args.png)
        except OSError as err:
            raise UsageError(f"cannot write --png {args.png}: {err.strerror or err}") from None
        out["png"] = args.png
    if args.json:
        print(json.dumps(out))
    else:
        print(f"model: {describe}")
        print(report.format_table(plan, layer_names=names))
        if args.png:
            print(f"  wrote png            {args.png}")
    return 0


def _build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """The model, one microbatch of input and targets, the loss (or None), and a description."""
    import torch

    rows = args.batch // args.microbatches
    if args.model == "gpt":
        _reject(args, "mlp", ["depth"])
        from layerwise.models import GPT, GPTConfig, lm_loss

        opts: dict[str, Any] = {
            k: getattr(args, k) if getattr(args, k) is not None else v for k, v in _GPT_DEFAULTS.items()
        }
        try:
            cfg = GPTConfig(**opts)
        except ValueError as err:
            raise UsageError(str(err)) from None
        tokens = torch.randint(cfg.vocab, (rows, cfg.context))
        targets = torch.randint(cfg.vocab, (rows, cfg.context))
        text = ", ".join(f"{k}={v}" for k, v in opts.items())
        return GPT(cfg), tokens, targets, lm_loss, f"gpt({text}), microbatch {rows} x {cfg.context} tokens"
    _reject(args, "gpt", ["blocks", "context", "vocab", "heads"])
    from layerwise.models import mlp

    depth = args.depth or _MLP_DEFAULTS["depth"]
    width = args.width or _MLP_DEFAULTS["width"]
    return mlp(width=width, depth=depth), torch.randn(rows, width), None, None, \
        f"mlp(depth={depth}, width={width}), microbatch {rows} rows"


def _layer_count(args: argparse.Namespace) -> tuple[int, str]:
    """The built-in model's layers (as Pipeline splits it) and its name, without building it."""
    if args.model == "gpt":
        blocks = args.blocks or _GPT_DEFAULTS["blocks"]
        return blocks + 2, f"--model gpt with {blocks} blocks (embedding, blocks, head)"
    depth = args.depth or _MLP_DEFAULTS["depth"]
    return depth, f"--model mlp with --depth {depth}"


def _reject(args: argparse.Namespace, other: str, names: list[str]) -> None:
    given = [f"--{n}" for n in names if getattr(args, n) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} applies to --model {other}, not --model {args.model}")


def _layer_names(model: Any) -> list[str]:
    from layerwise.runtime.split import as_layers

    return [type(layer).__name__ for layer in as_layers(model)]


def _devices(text: str) -> list[Device]:
    out = []
    for k, item in enumerate(text.split(",")):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise argparse.ArgumentTypeError(
                f"device {k + 1} is {item!r}: expected NAME:SPEED or NAME:SPEED:MEMORY, "
                f"e.g. cpu:1.0:8GiB"
            )
        try:
            speed = float(parts[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"device {k + 1} ({item!r}): speed {parts[1]!r} is not a number") from None
        memory = _bytes(parts[2], item) if len(parts) == 3 else None
        try:
            out.append(Device(name=parts[0], speed=speed, memory_bytes=memory))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return out


def _bytes(text: str, item: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"device {item!r}: memory {text!r} should be a number with B, KiB, MiB, GiB (or KB, MB, "
            f"GB), e.g. 8GiB"
        )
    return float(match.group(1)) * _UNITS[unit]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value

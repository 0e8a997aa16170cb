"""``layerwise plan``: choose dp x tp x pp, the schedule, ZeRO stage and recomputation for a model
on a cluster, with memory and time predictions. Pure Python: never imports torch."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from layerwise.commands import UsageError, positive_int
from layerwise.schedule.generators import SCHEDULES  # pure: every schedule the runtime runs
# layerwise.models.GPTConfig's defaults, repeated here so that planning never imports torch.
_GPT = {"layers": 4, "hidden": 64, "heads": 4, "vocab": 256, "seq": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group(
        "model (one of --hf-config, --model, or the shape flags: a GPT-3 layer, with biases, LayerNorm, "
        "learned positions, tied head and dropout, as Narayanan et al. count it)")
    model.add_argument("--hf-config", metavar="FILE", help="a HuggingFace config.json (Llama, Mistral, GPT-2, ...)")
    model.add_argument("--model", metavar="gpt|FILE",
                       help="gpt: layerwise's built-in GPT (shape flags override its defaults); or the "
                       "JSON that `layerwise partition --json` printed (its model, and its measured speed "
                       "when --device-tflops is not given)")
    model.add_argument("--layers", type=positive_int, help="transformer blocks")
    model.add_argument("--hidden", type=positive_int, help="hidden size")
    model.add_argument("--heads", type=positive_int, help="attention heads")
    model.add_argument("--kv-heads", type=positive_int, help="key/value heads (grouped-query attention)")
    model.add_argument("--ffn", type=positive_int, help="MLP width (default 4 x hidden)")
    model.add_argument("--vocab", type=positive_int, help="vocabulary size")
    model.add_argument("--seq", type=positive_int, help="sequence length (default for --hf-config: "
                       "max_position_embeddings, at most 8192)")
    cl = parser.add_argument_group("cluster (or --device-groups FILE)")
    cl.add_argument("--devices", type=positive_int, help="number of devices")
    cl.add_argument("--devices-per-node", type=positive_int, default=8, help="devices per node (default 8)")
    cl.add_argument("--device-memory", type=float, metavar="GiB", help="memory per device in GiB")
    cl.add_argument("--device-tflops", type=float, metavar="T", help="peak dense TFLOP/s per device at "
                    "the training precision (A100 312, H100 SXM 989)")
    cl.add_argument("--efficiency", type=float, help="achievable fraction of --device-tflops for a "
                    "transformer block's matrix multiplies (default 0.48: Megatron-LM's smallest "
                    "published run, calibrated in bench/README.md)")
    cl.add_argument("--intra-node-gbps", type=float, default=300.0, help="GB/s per device inside a node (default 300)")
    cl.add_argument("--inter-node-gbps", type=float, default=25.0, help="GB/s per device between nodes (default 25)")
    cl.add_argument("--device-groups", metavar="FILE", help="JSON file of device groups that differ "
                    "(see layerwise.planner.cluster.load_groups)")
    parser.add_argument("--global-batch", type=positive_int, required=True, help="samples per step, all replicas")
    parser.add_argument("--precision", choices=("mixed", "fp32"), default="mixed",
                        help="mixed: bf16/fp16 with fp32 Adam states (default); fp32")
    pins = parser.add_argument_group("pins (fix a dimension; the rest is searched)")
    pins.add_argument("--dp", type=positive_int)
    pins.add_argument("--tp", type=positive_int)
    pins.add_argument("--pp", type=positive_int)
    pins.add_argument("--schedule", choices=SCHEDULES)
    pins.add_argument("--chunks", type=positive_int, help="stages per rank (interleaved; zbv always has 2)")
    pins.add_argument("--microbatch-size", type=positive_int)
    pins.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    pins.add_argument("--recompute", choices=("none", "selective", "full"))
    pins.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                      help="optimizer state in host memory (--no-offload: never)")
    parser.add_argument("--top", type=positive_int, default=5, help="candidates to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (best, candidates)")
    parser.add_argument("--write-config", metavar="FILE", help="write the best strategy as a TOML file "
                        "that `layerwise train --config` reads")


def run(args: argparse.Namespace) -> int:
    from layerwise import planner
    from layerwise.planner import report

    started = time.perf_counter()
    model, measured_flops = _model(args)
    cluster = _cluster(args, measured_flops)
    if args.schedule == "zbv" and args.chunks not in (None, 2):
        raise UsageError(f"--chunks {args.chunks}: zbv holds 2 chunks per rank, in a V")
    if args.chunks and args.chunks > 1 and args.schedule not in (None, "interleaved", "zbv"):
        raise UsageError(f"--chunks {args.chunks} needs --schedule interleaved, not {args.schedule}")
    pins = planner.Pins(dp=args.dp, tp=args.tp, pp=args.pp,
                        schedule="interleaved" if args.chunks and args.chunks > 1 and not args.schedule else args.schedule,
                        chunks=args.chunks, micro=args.microbatch_size, zero_stage=args.zero_stage,
                        recompute=args.recompute, offload=args.offload)  # fmt: skip
    result = planner.plan(model, cluster, args.global_batch, pins=pins, top=args.top,
                          precision=planner.PRECISIONS[args.precision])
    elapsed = time.perf_counter() - started
    out = report.to_json(result)
    if args.write_config:
        if result.best is None:
            raise UsageError("no strategy to write: nothing could be built for these pins")
        try:
            Path(args.write_config).write_text(report.train_config(result.best, seq=model.seq))
        except OSError as err:
            raise UsageError(f"cannot write --write-config {args.write_config}: {err.strerror or err}") from None
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console

    console = Console(width=max(140, Console().width))
    console.print(model.describe())
    console.print(_describe_cluster(cluster))
    console.print(f"searched {result.considered} strategies, simulated {result.simulated}, in {elapsed:.2f} s")
    if not result.candidates:
        for r in result.rejected:
            console.print(f"[red]not feasible[/red]: {r.reason}")
        return 0
    console.print(report.format_table(result))
    best = out["best"]
    verdict = "[green]recommended[/green]" if best["feasible"] else "[red]nothing fits[/red]; closest"
    console.print(f"{verdict}: {result.candidates[0].strategy.label()}")
    console.print(best["why"], soft_wrap=False)
    if args.write_config:
        console.print(f"wrote {args.write_config}")
    return 0


def _model(args: argparse.Namespace) -> tuple[Any, float | None]:
    """The model spec, and the device FLOP/s a partition profile measured (or None)."""
    from layerwise.planner import ModelSpec, ModelSpecError, load_hf_config

    shape = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq")}
    given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None and k != "seq"]
    try:
        if args.hf_config:
            if args.model or given:
                raise UsageError(f"--hf-config describes the model: drop {', '.join(given) or '--model'}")
            return load_hf_config(args.hf_config, seq=args.seq), None
        if args.model == "gpt":
            merged = {k: (v if v is not None else _GPT.get(k)) for k, v in shape.items()}
            return ModelSpec(name="gpt", dropout=False, fused_qkv=True, **merged), None  # layerwise.models.GPT: no dropout, one qkv matrix
        if args.model:
            return _profile(args.model, shape)
        missing = [f"--{k}" for k in ("layers", "hidden", "heads", "vocab", "seq") if shape[k] is None]
        if missing:
            raise UsageError(f"describe the model: give --hf-config FILE, --model gpt, or {', '.join(missing)}")
        return ModelSpec(name="model", **shape), None
    except ModelSpecError as err:
        raise UsageError(str(err)) from None


def _profile(path: str, shape: dict[str, Any]) -> tuple[Any, float]:
    """A `layerwise partition --json` result: the built-in GPT it profiled, and the FLOP/s its
    blocks reached (FLOPs of the profiled microbatch over the measured stage times)."""
    from layerwise.planner import ModelSpec

    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"cannot read --model {path}: {err.strerror or err} (or use --model gpt)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--model {path} is not JSON from `layerwise partition --json`: {err}") from None
    desc = data.get("model") if isinstance(data, dict) else None
    match = re.match(r"gpt\((.*?)\), microbatch (\d+) x (\d+) tokens", desc or "")
    if match is None:
        raise UsageError(f"--model {path}: expected the output of `layerwise partition --model gpt --json`")
    opts = dict(kv.split("=") for kv in match.group(1).split(", "))
    rows = int(match.group(2))
    spec = ModelSpec(name="gpt (profiled)", layers=int(opts["blocks"]), hidden=int(opts["width"]),
                     heads=int(opts["heads"]), vocab=int(opts["vocab"]), seq=int(opts["context"]), dropout=False,
                     fused_qkv=True)
    if any(v is not None for v in shape.values()):
        raise UsageError("--model FILE describes the model: drop the shape flags")
    times = [st.get("time_s") for st in data.get("stages", [])]
    if not times or any(t is None or t <= 0 for t in times):
        raise UsageError(f"--model {path} has no measured stage times")
    flops = spec.step_flops(rows, recompute=False)  # one microbatch through every stage
    return spec, flops / sum(times)


def _cluster(args: argparse.Namespace, measured_flops: float | None) -> Any:
    from layerwise.planner import DEFAULT_EFFICIENCY, Cluster, ClusterError, load_groups

    for name in ("device_memory", "device_tflops", "efficiency", "intra_node_gbps", "inter_node_gbps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.efficiency is not None and args.efficiency > 1:
        raise UsageError(f"--efficiency is a fraction of peak in (0, 1], got {args.efficiency}")
    try:
        if args.device_groups:
            if args.devices or args.device_memory or args.device_tflops:
                raise UsageError("--device-groups describes the devices: drop --devices, --device-memory, --device-tflops")
            return load_groups(args.device_groups, efficiency=args.efficiency or DEFAULT_EFFICIENCY,
                               devices_per_node=args.devices_per_node, intra_node_gbps=args.intra_node_gbps,
                               inter_node_gbps=args.inter_node_gbps)
        missing = [f"--{n.replace('_', '-')}" for n in ("devices", "device_memory") if getattr(args, n) is None]
        tflops, eff = args.device_tflops, args.efficiency or DEFAULT_EFFICIENCY
        if tflops is None and measured_flops is not None:
            tflops, eff = measured_flops / 1e12, 1.0  # the profile measured the achievable speed
        elif tflops is None:
            missing.append("--device-tflops")
        if missing:
            raise UsageError(f"describe the cluster: {', '.join(missing)} (or --device-groups FILE)")
        return Cluster.uniform(devices=args.devices, devices_per_node=args.devices_per_node,
                               memory_gib=args.device_memory, tflops=tflops, efficiency=eff,
                               intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    except ClusterError as err:
        raise UsageError(str(err)) from None


def _describe_cluster(c: Any) -> str:
    groups = ", ".join(f"{g.count} x {g.name} ({g.memory_bytes / 2**30:.0f} GiB, {g.tflops:g} TFLOP/s at "
                       f"{g.efficiency:.0%})" for g in c.groups)
    return (f"cluster: {groups}; {c.devices_per_node} per node, {c.intra_node_bw / 1e9:g} GB/s inside a node, "
            f"{c.inter_node_bw / 1e9:g} GB/s between nodes")

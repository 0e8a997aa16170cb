"""The plan as JSON, as a table, as a one-paragraph reason, and as a config ``layerwise train`` reads."""

from __future__ import annotations

from typing import Any

from .estimate import Estimate
from .search import PlanResult

GIB = 2**30


def candidate_dict(e: Estimate) -> dict[str, Any]:
    """One candidate with exactly the keys of the issue's ``--json`` output."""
    s = e.strategy
    return {
        "dp": s.dp,
        "tp": s.tp,
        "pp": s.pp,
        "schedule": s.schedule,
        "chunks": s.chunks,
        "microbatch_size": s.micro,
        "microbatches": e.microbatches,
        "zero_stage": s.zero_stage,
        "recompute": s.recompute,
        "offload": s.offload,
        "params": e.params,
        "memory_bytes": {k: int(round(e.memory.get(k, 0.0)))
                         for k in ("params", "grads", "optimizer", "activations", "total")},
        "step_time_s": e.step_time,
        "tflops_per_device": e.tflops_per_device,
        "mfu": e.mfu,
        "bubble_fraction": e.bubble_fraction,
        "feasible": e.feasible,
        "why": why(e),
    }


def to_json(result: PlanResult) -> dict[str, Any]:
    cands = [candidate_dict(e) for e in result.candidates]
    if not cands and result.rejected:  # a pin broke a placement rule: say which, as infeasible
        cands = [_rejected_dict(r.strategy, r.reason) for r in result.rejected]
    return {"best": cands[0] if cands else None, "candidates": cands}


def _rejected_dict(strategy: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        **strategy, "microbatches": None, "params": None,
        "memory_bytes": {k: None for k in ("params", "grads", "optimizer", "activations", "total")},
        "step_time_s": None, "tflops_per_device": None, "mfu": None, "bubble_fraction": None,
        "feasible": False, "why": f"Cannot run: {reason}.",
    }  # fmt: skip


def why(e: Estimate) -> str:
    """What the time goes to and what binds: memory, the bubble, or communication."""
    mem = e.memory
    if not e.memory:
        return "No memory estimate."
    first = (f"Fits: {_g(mem['total'])} of {_g(e.budget)} usable per device" if e.feasible
             else f"Does not fit: {'; '.join(e.reasons)}")
    first += (f" (busiest pipeline rank: parameters {_g(mem['params'])}, gradients {_g(mem['grads'])}, "
              f"optimizer {_g(mem['optimizer'])}, activations {_g(mem['activations'])}"
              f"{_inflight(e)}).")
    if not e.step_time:
        return first
    p = e.parts
    step = e.step_time
    bubble = e.bubble_fraction * e.makespan
    costs = {
        "the pipeline bubble": bubble,
        "tensor-parallel all-reduces": p.get("tp_comm", 0.0),
        "ZeRO gathers and reduce-scatters": p.get("zero_comm", 0.0),
        "data-parallel gradient sync and parameter gathers once per step": p.get("dp_exposed", 0.0),
        "the optimizer step (offload: its host round trip)": p.get("optimizer_exposed", 0.0),
        "pipeline transfers": p.get("p2p", 0.0),
    }
    redo = {"full": "full recomputation (one more forward per block)",
            "selective": "selective recomputation (attention scores again)"}.get(e.strategy.recompute)
    second = (f"Step {step:.3g} s: compute {p.get('compute', 0.0):.3g} s per device "
              f"({p.get('compute', 0.0) / step:.0%}), bubble {e.bubble_fraction:.1%} of the pipeline, "
              f"{e.tflops_per_device:.3g} TFLOP/s per device, MFU {e.mfu:.0%}.")
    name, worst = max(costs.items(), key=lambda kv: kv[1])
    if e.feasible and mem["total"] > 0.9 * e.budget:
        binds = "Memory binds: it is over 90% full, so a larger microbatch or less recomputation would not fit"
    elif worst > 0.03 * step:
        binds = f"The largest overhead is {name}, {worst:.3g} s ({worst / step:.0%} of the step)"
    else:
        binds = "Compute binds: every overhead is under 3% of the step"
    if redo:
        binds += f"; {redo} is what makes the activations fit"
    return f"{first} {second} {binds}."


def _inflight(e: Estimate) -> str:
    if not e.inflight:
        return ""
    return f"; stage 0 holds {e.inflight[0]} microbatches in flight"


def _g(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_table(result: PlanResult, *, title: str = "") -> Any:
    """A rich table of the candidates, best first."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    for col, just in [("#", "right"), ("dp", "right"), ("tp", "right"), ("pp", "right"), ("schedule", "left"),
                      ("mb", "right"), ("m", "right"), ("zero", "right"), ("recompute", "left"),
                      ("offload", "left"), ("mem/dev", "right"), ("step s", "right"), ("TFLOP/s", "right"),
                      ("MFU", "right"), ("bubble", "right"), ("fits", "left")]:  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for k, e in enumerate(result.candidates):
        s = e.strategy
        sched = f"{s.schedule} x{s.chunks}" if s.chunks > 1 else s.schedule
        table.add_row(
            str(k + 1), str(s.dp), str(s.tp), str(s.pp), sched, str(s.micro), str(e.microbatches),
            str(s.zero_stage), s.recompute, "yes" if s.offload else "no", _g(e.memory.get("total", 0.0)),
            f"{e.step_time:.3g}", f"{e.tflops_per_device:.3g}", f"{e.mfu:.0%}", f"{e.bubble_fraction:.1%}",
            "yes" if e.feasible else "NO",
        )  # fmt: skip
    return table


def train_config(e: Estimate, *, seq: int) -> str:
    """A flat TOML file with the keys ``layerwise train`` reads (its ``TrainConfig``):
    stages, schedule, microbatches, chunks, dp, tp, batch_size (sequences per step, all
    replicas together), seq_len, activation_checkpointing (none, selective or full) and precision
    (bf16 = mixed precision with fp32 master weights, or fp32), and with dp > 1 data_parallel
    (ddp for ZeRO-0, fsdp otherwise). The ZeRO stage, offload and the microbatch size are
    written as comments: train has no keys for them."""
    s = e.strategy
    batch = s.dp * s.micro * e.microbatches
    precision = "fp32" if e.precision == "fp32" else "bf16"
    lines = [
        "# Written by `layerwise plan`; read by `layerwise train --config FILE`.",
        f"# Predicted: {e.step_time:.4g} s per step, {_g(e.memory.get('total', 0.0))} per device, "
        f"MFU {e.mfu:.0%}.",
        f"# Also chosen (no train key yet): zero_stage = {s.zero_stage}, offload = {str(s.offload).lower()}, "
        f"microbatch_size = {s.micro}.",
        f"stages = {s.pp}",
        f'schedule = "{s.schedule}"',
        f"microbatches = {e.microbatches}",
        f"chunks = {s.chunks if s.schedule == 'interleaved' else 2}",
        f"dp = {s.dp}",
        f"tp = {s.tp}",
        f"batch_size = {batch}",
        f"seq_len = {seq}",
        f'activation_checkpointing = "{s.recompute}"',
        f'precision = "{precision}"',
    ]
    if s.dp > 1:  # replicas: DDP for ZeRO-0, FSDP2 (sharded states) otherwise
        lines.append(f'data_parallel = "{"ddp" if s.zero_stage == 0 else "fsdp"}"')
    return "\n".join(lines) + "\n"

"""The planner's predictions against measured runs, and against Megatron-LM's published throughputs.

Part 1 (measured, ~3-6 minutes on 2 cores): the bench first measures this machine, as a planner
user would measure a cluster: the achieved FLOP/s of one process (one thread) training the
benchmark GPT on one microbatch, per microbatch size, and the latency and bandwidth of messages
and all-reduces between two processes. It feeds those numbers to ``layerwise.planner.estimate``
(device speed at efficiency 1, fp32 Adam, the Pipeline's uniform split), then runs each
configuration with ``layerwise.Pipeline`` in two processes and compares:

- step time: the median wall time of the timed steps on rank 0;
- peak memory per rank: parameters + gradients + optimizer state (the bytes of the tensors the
  rank holds after a step) + the most activation bytes alive after any forward of the step
  (``layerwise.parallel.activation_memory.ActivationTracker``: storages produced by the step
  and still alive, parameters, gradients and optimizer state excluded). It counts tensors, not
  the allocator's high-water mark (the CPU has none to read).

Part 2 (pure arithmetic, seconds): Narayanan et al. (2021) Table 1, the planner's TFLOP/s per GPU
with tp, pp and full recomputation pinned as published, efficiency calibrated on the 1.7B row.

    python bench/planner.py                 # both parts -> bench/results/planner.json
    python bench/planner.py --quick         # smoke test: 2 configurations, 2 timed steps
    python bench/planner.py --megatron-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from planner_calls import (  # noqa: E402
    DP_CALLS,
    fit_dp_calls,
    fit_links,
    fit_tp_calls,
    measure_dp_calls,
    measure_links,
    measure_tp_calls,
)

MODEL = {"vocab": 256, "width": 256, "heads": 4, "blocks": 6, "context": 128}
BATCH = 16
# Message sizes the runs send: a block's smallest FSDP unit (its norms) to a whole block's gradients.
LINK_SIZES = [4096, 1 << 16, 1 << 18, 1 << 20, 1 << 22]
CONFIGS: list[dict[str, Any]] = [
    {"name": "pp2 1f1b m4", "pp": 2, "schedule": "1f1b", "microbatches": 4},
    {"name": "pp2 1f1b m8", "pp": 2, "schedule": "1f1b", "microbatches": 8},
    {"name": "pp2 gpipe m8", "pp": 2, "schedule": "gpipe", "microbatches": 8},
    {"name": "pp2 interleaved x2 m8", "pp": 2, "schedule": "interleaved", "chunks": 2, "microbatches": 8},
    {"name": "pp2 1f1b m8 full recompute", "pp": 2, "schedule": "1f1b", "microbatches": 8, "recompute": "full"},
    {"name": "dp2 ddp m2", "dp": 2, "microbatches": 2, "data_parallel": "ddp"},
    {"name": "dp2 fsdp (zero-3) m2", "dp": 2, "microbatches": 2, "data_parallel": "fsdp", "zero": 3},
    {"name": "tp2 m2", "tp": 2, "microbatches": 2},
]
MEGATRON = [  # Narayanan et al. (2021), Table 1: params (B), heads, hidden, layers, t, p, GPUs, batch, TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


# -- inside launched ranks ------------------------------------------------------------------------
def _model() -> Any:
    import torch

    from layerwise.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(tie_embeddings=False, **MODEL))


def _batch(rows: int, seed: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL["vocab"], (rows, MODEL["context"] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run_config(conf: dict[str, Any], warmup: int, steps: int, speed_reps: int) -> dict[str, Any]:
    import torch

    import layerwise
    from layerwise.models import lm_loss
    from layerwise.parallel.activation_memory import ActivationTracker

    from layerwise.runtime.distributed import ensure_initialized

    torch.set_num_threads(1)
    ensure_initialized(60.0)
    # The device speed, measured by every rank at once between the timed steps: the machine is
    # shared, and what the other processes leave us changes from second to second.
    micro = BATCH // (conf.get("dp", 1) * conf["microbatches"])
    ref = _model()
    xs, ys = _batch(micro, 0)
    flops = _spec().step_flops(micro, recompute=False)

    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_params = sum(p.numel() for p in ref.parameters())
    updates: list[float] = []

    def speed_sample() -> float:
        torch.distributed.barrier()
        t0 = time.perf_counter()
        lm_loss(ref(xs), ys).backward()
        t1 = time.perf_counter()
        ref_opt.step()  # the optimizer's speed too: parameters updated per second
        ref_opt.zero_grad()
        updates.append(ref_params / (time.perf_counter() - t1))
        return flops / (t1 - t0)

    speeds = [speed_sample() for _ in range(1 + speed_reps)][1:]
    updates.clear()
    opts: dict[str, Any] = {"stages": conf.get("pp", 1), "dp": conf.get("dp", 1), "tp": conf.get("tp", 1),
                            "schedule": conf.get("schedule", "1f1b"), "chunks": conf.get("chunks", 2),
                            "microbatches": conf["microbatches"], "activation_checkpointing": conf.get("recompute", "none")}
    if conf.get("dp", 1) > 1:
        opts["data_parallel"] = conf.get("data_parallel", "ddp")
        opts["reshard_after_forward"] = conf.get("zero") == 3
    pipe = layerwise.Pipeline(_model(), loss_fn=lm_loss, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **opts)
    params = pipe.parameters()
    tracker_box: list[Any] = []
    peak = [0]

    def _held() -> list[Any]:
        held = [_local(p) for p in params] + [_local(p.grad) for p in params if p.grad is not None]
        if pipe.optimizer is not None:
            held += [_local(v) for st in pipe.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return held

    def after_forward(*_: Any) -> None:
        if tracker_box:
            peak[0] = max(peak[0], tracker_box[0].live_bytes(exclude=_held()))

    for st in pipe.stages.values():
        st.layers[-1].register_forward_hook(after_forward)
    times = []
    for k in range(warmup + steps):
        x, y = _batch(BATCH, 100 + k)
        if k >= warmup:
            speeds.append(speed_sample())
        torch.distributed.barrier()
        t0 = time.perf_counter()
        if k == warmup + steps - 1:  # the last step is measured for memory, not timed
            with ActivationTracker() as tr:
                tracker_box.append(tr)
                pipe.step(x, y)
            tracker_box.clear()
        else:
            pipe.step(x, y)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    pipe.close()
    nbytes = {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_nbytes(v) for s in (pipe.optimizer.state.values() if pipe.optimizer else [])
                         for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
        "activations": peak[0],
    }
    nbytes["total"] = sum(nbytes.values())
    return {"step_times": times, "memory": nbytes, "partition": list(pipe.partition),
            "speed_flops": speeds, "speed_flops_timed": speeds[speed_reps:], "optimizer_params_per_s": updates}


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: Any) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


# -- the planner's side ---------------------------------------------------------------------------
def _spec() -> Any:
    from layerwise.planner import ModelSpec

    return ModelSpec(name="bench-gpt", layers=MODEL["blocks"], hidden=MODEL["width"], heads=MODEL["heads"],
                     vocab=MODEL["vocab"], seq=MODEL["context"], tied_head=False, dropout=False, fused_qkv=True)


def predict(conf: dict[str, Any], speed: float, update: float, links: dict[str, Any], partition: list[int]) -> Any:
    from layerwise.planner import PRECISIONS, Cluster, Strategy, estimate
    from layerwise.planner.cluster import CallCost

    dp, tp, pp = conf.get("dp", 1), conf.get("tp", 1), conf.get("pp", 1)
    micro = BATCH // (dp * conf["microbatches"])
    calls = {f"{k}_call": CallCost(latency=links[k]["latency"], bandwidth=links[k]["bandwidth"])
             for k in ("tp", "fsdp", "ddp")}
    # overlap=False: 2 processes of one thread on 2 cores leave no core for gloo's communication
    # thread, so no collective runs while the other computes.
    cluster = Cluster.uniform(devices=2, devices_per_node=2, memory_gib=64, tflops=speed / 1e12,
                              efficiency=1.0, intra_node_gbps=links["bandwidth"] / 1e9, latency=links["latency"],
                              optimizer_params_per_s=update, overlap=False, **calls)
    zero = conf.get("zero", 0)
    chunks = conf.get("chunks", 1) if conf.get("schedule") == "interleaved" else 1
    strategy = Strategy(dp=dp, tp=tp, pp=pp, schedule=conf.get("schedule", "1f1b"), chunks=chunks, micro=micro,
                        zero_stage=zero, recompute=conf.get("recompute", "none"), sequence_parallel=False)
    return estimate(_spec(), cluster, strategy, BATCH, precision=PRECISIONS["fp32"], partition=tuple(partition))


def measured_part(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    from layerwise import launch

    warmup, steps = (1, 2) if quick else (2, 12)
    configs = CONFIGS[:2] if quick and not only else CONFIGS
    if only:
        configs = [c for c in configs if any(o in c["name"] for o in only)]
    load0 = os.getloadavg()[0]
    raw = launch(measure_links, 2, LINK_SIZES, 3 if quick else 10, threads=1, timeout=300)[0]
    links: dict[str, Any] = fit_links(raw)
    widths, counts = [256, 512, 1024], [4, 16]
    raw_dp = launch(measure_dp_calls, 2, widths, counts, 2 if quick else 10, threads=1, timeout=300)[0]
    raw_tp = launch(measure_tp_calls, 2, MODEL, LINK_SIZES, [2, 6], 3 if quick else 10, threads=1, timeout=300)[0]
    for mode, call in DP_CALLS.items():  # each fitted to its own calls
        links[mode] = fit_dp_calls({mode: raw_dp[mode]}, widths, counts, {mode: call})
    links["tp"] = fit_tp_calls(raw_tp)
    print(f"  links: message {links['latency'] * 1e3:.2f} ms + bytes / {links['bandwidth'] / 1e9:.2f} GB/s; per call "
          + ", ".join(f"{k} {links[k]['latency'] * 1e3:.2f} ms, {links[k]['bandwidth'] / 1e9:.2f} GB/s"
                      for k in ("tp", "fsdp", "ddp")), flush=True)
    rows = []
    for conf in configs:
        res = launch(run_config, 2, conf, warmup, steps, 2 if quick else 4, threads=1, timeout=900)
        # Speed samples interleave with the timed steps (one before each), so both see the same
        # share of a shared machine; the medians of each are compared. The samples taken before
        # the warm-up steps are kept in the JSON, not used.
        speed = statistics.median(x for r in res for x in r["speed_flops_timed"])
        update = statistics.median(x for r in res for x in r["optimizer_params_per_s"])
        est = predict(conf, speed, update, links, res[0]["partition"])
        measured_t = statistics.median(res[0]["step_times"])
        measured_m = max(r["memory"]["total"] for r in res)
        rows.append({
            "name": conf["name"], "config": conf, "partition": res[0]["partition"],
            "predicted_step_time_s": est.step_time, "measured_step_time_s": measured_t,
            "step_time_error": est.step_time / measured_t - 1,
            "predicted_peak_bytes": est.memory["total"], "measured_peak_bytes": measured_m,
            "memory_error": est.memory["total"] / measured_m - 1,
            "predicted_memory": est.memory, "measured_memory": [r["memory"] for r in res],
            "predicted_bubble": est.bubble_fraction, "step_times": res[0]["step_times"], "speed_flops": speed,
            "speed_flops_samples": [r["speed_flops"] for r in res], "loadavg": os.getloadavg()[0],
            "optimizer_params_per_s": update, "predicted_parts": est.parts, "links_used": links,
            "measured_step_time_min_s": min(res[0]["step_times"]),
        })  # fmt: skip
        print(f"  {conf['name']:<28} step {est.step_time * 1e3:7.1f} ms predicted {measured_t * 1e3:7.1f} measured "
              f"({rows[-1]['step_time_error']:+.0%}); peak {est.memory['total'] / 2**20:6.1f} / {measured_m / 2**20:6.1f} "
              f"MiB ({rows[-1]['memory_error']:+.0%})", flush=True)
    section = {"configs": [c["name"] for c in configs], "date": time.strftime("%Y-%m-%d %H:%M"), "links": links,
               "links_raw": raw, "dp_calls_raw": raw_dp, "tp_calls_raw": raw_tp, "loadavg_before": load0,
               "loadavg_after": os.getloadavg()[0]}
    return {"model": MODEL, "batch": BATCH, "sections": [section], "configs": rows}


def summarize(measured: dict[str, Any]) -> None:
    """Median and worst absolute errors over the configurations, in place."""
    errs_t = [abs(r["step_time_error"]) for r in measured["configs"]]
    errs_m = [abs(r["memory_error"]) for r in measured["configs"]]
    measured.update({"step_time_error_median": statistics.median(errs_t), "step_time_error_worst": max(errs_t),
                     "memory_error_median": statistics.median(errs_m), "memory_error_worst": max(errs_m)})


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s configurations replace ``old``'s of the same name; the others are kept, in
    :data:`CONFIGS`' order (a long run split into sections, each under the exclusive lock)."""
    if not old:
        return new
    rows = {r["name"]: r for r in old["configs"]} | {r["name"]: r for r in new["configs"]}
    order = [c["name"] for c in CONFIGS]
    return {**new, "sections": old.get("sections", []) + new["sections"],
            "configs": sorted(rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))}


def megatron_part() -> dict[str, Any]:
    from layerwise.planner import Cluster, ModelSpec, Pins, plan

    def predict_row(row: tuple[Any, ...], eff: float) -> Any:
        _, a, h, l, t, p, n, batch, _ = row
        model = ModelSpec(layers=l, hidden=h, heads=a, vocab=51200, seq=2048)
        cluster = Cluster.uniform(devices=n, devices_per_node=8, memory_gib=80, tflops=312, efficiency=eff)
        # The schedules Megatron-LM had in 2021 (1F1B, interleaved), not the zero-bubble ones since.
        best = [plan(model, cluster, batch, top=1, pins=Pins(tp=t, pp=p, schedule=sched, recompute="full", zero_stage=0,
                                                              offload=False)).best
                for sched in (("1f1b", "interleaved") if p > 1 else ("1f1b",))]  # fmt: skip
        return max((b for b in best if b is not None), key=lambda b: (b.feasible, b.tflops_per_device))

    # Calibrate on the smallest row: predicted TFLOP/s grows with the efficiency; bisect.
    lo, hi = 0.05, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict_row(MEGATRON[0], mid).tflops_per_device < MEGATRON[0][-1] else (lo, mid)
    eff = (lo + hi) / 2
    rows = []
    for row in MEGATRON:
        t0 = time.perf_counter()
        best = predict_row(row, eff)
        rows.append({"params_b": row[0], "gpus": row[6], "tp": row[4], "pp": row[5], "batch": row[7],
                     "published_tflops": row[-1], "predicted_tflops": best.tflops_per_device,
                     "error": best.tflops_per_device / row[-1] - 1, "chosen": best.strategy.label(),
                     "bubble": best.bubble_fraction, "feasible": best.feasible, "plan_s": time.perf_counter() - t0})
        print(f"  {row[0]:7.1f}B on {row[6]:5d}: published {row[-1]} TFLOP/s, predicted {best.tflops_per_device:6.1f} "
              f"({rows[-1]['error']:+.0%})  {best.strategy.label()}", flush=True)
    errs = [abs(r["error"]) for r in rows[1:]]
    return {"efficiency": eff, "rows": rows, "error_median": statistics.median(errs), "error_worst": max(errs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--megatron-only", action="store_true")
    ap.add_argument("--only", action="append", help="run the configurations whose name contains this (repeatable)")
    ap.add_argument("--merge", action="store_true", help="keep --out's other configurations (run in sections)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    args = ap.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": sys.version.split()[0]}
    print("Megatron-LM Table 1 (efficiency calibrated on the 1.7B row):")
    report["megatron"] = megatron_part()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if args.megatron_only and "measured" in previous:
        report["measured"] = previous["measured"]  # kept as it was
    if not args.megatron_only:
        print("measured on this machine (2 processes, 1 thread each):")
        old = previous.get("measured") if args.merge else None
        report["measured"] = m = merge(old, measured_part(args.quick, args.only))
        summarize(m)
        print(f"step time error: median {m['step_time_error_median']:.0%}, worst {m['step_time_error_worst']:.0%}; "
              f"memory error: median {m['memory_error_median']:.0%}, worst {m['memory_error_worst']:.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every pipeline schedule on 2 stages: measured throughput and bubble against the simulator's.

The GPT of ``bench/pipeline_vs_torch.py`` (6 blocks of width 256, context 128, untied embeddings,
batch 16), split over the model stages a schedule has (2, or 4 for interleaved and ZB-V) by
``layerwise.partition(balance="time")`` on FLOP estimates (``estimate_layers``: deterministic, the
same split in every run; [4, 4] for the 2-stage schedules, [2, 2, 2, 2] for interleaved and
[3, 1, 2, 2] for ZB-V, whose V puts the first and the last stage on rank 0: a uniform [2, 2, 2, 2]
gives rank 0 the cheap embedding and head and 2 blocks against rank 1's 4), trained by 2 CPU
processes with cores / ranks intra-op threads each (1 on 2 cores). That is torchrun's rule
(``OMP_NUM_THREADS=1`` when it starts several processes per host) and ``layerwise.launch``'s
default: with more threads than their share the ranks compete for the cores, and an action runs
about twice as fast while the other rank waits as while it computes, so per-stage mean costs stop
predicting the step. For m in {4, 8} and every schedule, runs alternate
(gpipe, 1f1b, ..., zbv, then again), each in a fresh pair of processes with warm-up steps and timed
steps whose timelines are recorded.

Per schedule and m: ``tokens_per_s`` (median over runs of tokens per median step), the speedup over
1F1B, the measured bubble, the bubble the simulator predicts from the same steps' measured costs,
and ``predicted_speedup_vs_1f1b``: the simulated makespan of 1F1B over this schedule's, each from
its own runs' measured per-stage costs (so a split backward that costs more than a fused one counts).

    python bench/schedules.py            # about 4-6 minutes on 2 cores -> bench/results/schedules.json
    python bench/schedules.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zbv")
STAGES = 2
FULL: dict[str, Any] = {"vocab": 256, "width": 256, "heads": 4, "blocks": 6, "context": 128, "batch": 16,
                        "microbatches": (4, 8), "warmup": 2, "steps": 6, "reps": 3, "lr": 1e-3}  # fmt: skip
QUICK: dict[str, Any] = {"vocab": 256, "width": 64, "heads": 4, "blocks": 2, "context": 32, "batch": 8,
                         "microbatches": (4,), "warmup": 1, "steps": 2, "reps": 1, "lr": 1e-3}  # fmt: skip


def split_of(cfg: dict[str, Any], schedule: str, m: int) -> list[int]:
    """The time-balanced layer counts per model stage, from FLOP estimates (the same every run)."""
    import torch

    import layerwise
    from layerwise.models import GPT, GPTConfig
    from layerwise.partition import estimate_layers

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=cfg["vocab"], context=cfg["context"], width=cfg["width"], heads=cfg["heads"],
                          blocks=cfg["blocks"], tie_embeddings=False))  # fmt: skip
    sample = torch.randint(0, cfg["vocab"], (cfg["batch"] // m, cfg["context"]))
    costs = estimate_layers(model.pipeline_layers(), sample)
    return list(layerwise.partition(None, STAGES, costs=costs, schedule=schedule, microbatches=m, chunks=2))


def run_rank(cfg: dict[str, Any], schedule: str, m: int, split: list[int]) -> dict[str, Any]:
    """Inside each launched rank: train, record every timed step, return rank 0's summary."""
    import torch
    import torch.distributed as dist

    import layerwise
    from layerwise.models import GPT, GPTConfig, lm_loss
    from layerwise.runtime import measure

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=cfg["vocab"], context=cfg["context"], width=cfg["width"], heads=cfg["heads"],
                          blocks=cfg["blocks"], tie_embeddings=False))  # fmt: skip
    pipe = layerwise.Pipeline(model.pipeline_layers(), stages=STAGES, loss_fn=lm_loss, schedule=schedule,
                              microbatches=m, chunks=2, partition=split, record=True,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=cfg["lr"]))  # fmt: skip

    def batch(step: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["context"] + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    for i in range(cfg["warmup"]):
        pipe.step(*batch(i))
    dist.barrier()
    steps, recorded = [], []
    for i in range(cfg["warmup"], cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        pipe.step(*batch(i))
        steps.append(time.perf_counter() - t0)
        recorded.append(pipe.last_events)
    sch = pipe.schedule_for(cfg["batch"])
    rows = []
    for ev in recorded:  # timeline() is collective: gathered after the timed loop
        pipe.last_events = ev
        events = pipe.timeline()
        sim = measure.predict(events, sch)
        span = max(e.end for e in events) - min(e.start for e in events if e.action.kind.is_compute)
        rows.append([measure.measured_bubble(events, STAGES), float(sim.bubble_fraction), span, float(sim.makespan),
                     measure.replay(events, sch).bubble_fraction])  # fmt: skip
    return {"rank": dist.get_rank(), "step_s": steps, "bubbles": rows}


def _one(cfg: dict[str, Any], schedule: str, m: int, split: list[int]) -> dict[str, Any]:
    import layerwise

    threads = max(1, (os.cpu_count() or 1) // STAGES)  # cores / ranks, as torchrun and launch's default
    ranks = layerwise.launch(run_rank, STAGES, cfg, schedule, m, split, threads=threads, timeout=300.0)
    step = max(statistics.median(r["step_s"]) for r in ranks)
    rows = ranks[0]["bubbles"]
    return {
        "tokens_per_s": cfg["batch"] * cfg["context"] / step,
        "measured_bubble": statistics.mean(r[0] for r in rows),
        "predicted_bubble": statistics.mean(r[1] for r in rows),
        "measured_makespan_s": statistics.mean(r[2] for r in rows),
        "predicted_makespan_s": statistics.mean(r[3] for r in rows),
        "replayed_bubble": statistics.mean(r[4] for r in rows),
        "load_average": os.getloadavg()[0],
        "split": split,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps, one run per schedule")
    ap.add_argument("--reps", type=int, default=None, help="runs per schedule and m")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "schedules.json"))
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.reps:
        cfg["reps"] = args.reps
    start = time.time()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {f"m{m}": {s: [] for s in SCHEDULES} for m in cfg["microbatches"]}
    splits = {(s, m): split_of(cfg, s, m) for s in SCHEDULES for m in cfg["microbatches"]}
    for rep in range(cfg["reps"]):
        for m in cfg["microbatches"]:
            for schedule in SCHEDULES:  # alternated: a burst of load hits one run of each, not one schedule
                run = _one(cfg, schedule, m, splits[(schedule, m)])
                runs[f"m{m}"][schedule].append(run)
                print(f"  rep {rep} m={m} {schedule:11s} {run['tokens_per_s']:7.0f} tokens/s  bubble measured "
                      f"{run['measured_bubble']:.3f} predicted {run['predicted_bubble']:.3f} replayed {run['replayed_bubble']:.3f}  "
                      f"(load {run['load_average']:.1f})", file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "schedules",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {**cfg, "microbatches": list(cfg["microbatches"]), "stages": STAGES,
                   "threads_per_process": max(1, (os.cpu_count() or 1) // STAGES),
                   "partition": "layerwise.partition(balance='time') on estimate_layers (FLOPs), per schedule",
                   "cores": os.cpu_count()},  # fmt: skip
    }
    for key, per in runs.items():
        med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "split"} for s, rs in per.items()}
        base, base_pred = med["1f1b"]["tokens_per_s"], med["1f1b"]["predicted_makespan_s"]
        result[key] = {
            s: {
                "tokens_per_s": v["tokens_per_s"],
                "speedup_vs_1f1b": v["tokens_per_s"] / base,
                "measured_bubble": v["measured_bubble"],
                "predicted_bubble": v["predicted_bubble"],
                "replayed_bubble": v["replayed_bubble"],  # each action at its own measured time
                "predicted_speedup_vs_1f1b": base_pred / v["predicted_makespan_s"],
                "measured_makespan_ms": 1e3 * v["measured_makespan_s"],
                "predicted_makespan_ms": 1e3 * v["predicted_makespan_s"],
                "runs_tokens_per_s": [r["tokens_per_s"] for r in per[s]],
                "runs_load_average": [r["load_average"] for r in per[s]],
                "split": per[s][0]["split"],
            }
            for s, v in med.items()
        }
    result["wall_s"] = time.time() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'':4s} {'schedule':11s} {'tokens/s':>8s} {'vs 1f1b':>7s} {'predicted':>9s} | {'bubble':>6s} {'predicted':>9s} {'diff':>6s}")
    for key in runs:
        for s in SCHEDULES:
            r = result[key][s]
            print(f"{key:4s} {s:11s} {r['tokens_per_s']:8.0f} {r['speedup_vs_1f1b']:7.3f} {r['predicted_speedup_vs_1f1b']:9.3f} | "
                  f"{r['measured_bubble']:6.3f} {r['predicted_bubble']:9.3f} {r['measured_bubble'] - r['predicted_bubble']:+6.3f}")  # fmt: skip
    print(f"wrote {args.out} ({result['wall_s']:.0f} s; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return result


if __name__ == "__main__":
    main()

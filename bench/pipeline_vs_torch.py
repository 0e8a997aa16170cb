"""layerwise.Pipeline against torch.distributed.pipelining: same model, split, schedule, microbatches.

Two CPU processes (one pipeline stage each, one thread each) on gloo train the same GPT with
(a) ``layerwise.Pipeline`` and (b) PyTorch's ``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleZBVZeroBubble`` (two stages per rank in a V, split backward), built by hand from the same stage modules (PyTorch's tracer path is fragile). Runs alternate
(layerwise, torch, layerwise, torch, ...) so that machine noise hits both alike; each run is a fresh
pair of processes, so the peak RSS it reports belongs to that system alone.

For layerwise the timeline of every timed step is recorded and the measured bubble is compared
with the simulator's prediction from the same step's measured costs.

The machine may be shared: every run records how many cores other processes used meanwhile, waits
briefly for quiet before it starts, and a noisy pair is run again while the time budget allows.

    python bench/pipeline_vs_torch.py            # 1.5-4 minutes on 2 cores
    python bench/pipeline_vs_torch.py --quick    # smoke test, ~20 s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_cpu, own_cpu_s, wait_quiet  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "zbv")
CHUNKS = {"zbv": 2}  # model stages per rank
SYSTEMS = ("layerwise", "torch")

# Compute dominates (a microbatch's forward + backward is ~90 ms per stage) while each run stays
# ~10 s: 6 blocks of width 256 on 128 tokens, 16 sequences in 8 microbatches of 2.
FULL: dict[str, Any] = {"vocab": 256, "width": 256, "heads": 4, "blocks": 6, "context": 128, "batch": 16,
                        "microbatches": 8, "warmup": 2, "steps": 8, "reps": 3, "lr": 1e-3}  # fmt: skip
QUICK: dict[str, Any] = {"vocab": 256, "width": 128, "heads": 4, "blocks": 4, "context": 64, "batch": 8,
                         "microbatches": 4, "warmup": 1, "steps": 2, "reps": 1, "lr": 1e-3}  # fmt: skip
STAGES = 2
TIMEOUT = 60.0  # process-group timeout per rank (s)


# -- shared by both systems ----------------------------------------------------------------------
def _setup(cfg: dict[str, Any], schedule: str = "1f1b") -> tuple[list[Any], list[int]]:
    """The model's layers (same seed on every rank and system) and the layer counts per stage."""
    import torch

    from layerwise.models import GPT, GPTConfig

    torch.set_num_threads(1)  # one core per stage process (2 processes on 2 cores)
    torch.manual_seed(0)
    # Untied embeddings: a tie across the first and last stage needs a gradient all-reduce that
    # layerwise does and torch's pipelining leaves to the user; keep both runtimes pure pipeline.
    model = GPT(GPTConfig(vocab=cfg["vocab"], context=cfg["context"], width=cfg["width"],
                          heads=cfg["heads"], blocks=cfg["blocks"], tie_embeddings=False))  # fmt: skip
    layers = model.pipeline_layers()  # [embedding, block x blocks, head]
    n = STAGES * CHUNKS.get(schedule, 1)
    if schedule == "zbv":
        # The V puts the first and the last stage on rank 0: an even split ([2, 2, 2, 2]) gives
        # rank 0 the cheap embedding and head plus 2 blocks, rank 1 4 blocks. Both systems get
        # layerwise.partition's time-balanced split from FLOP estimates instead ([3, 1, 2, 2]:
        # 3 blocks per rank), the same in every run.
        import layerwise
        from layerwise.partition import estimate_layers

        sample = torch.randint(0, cfg["vocab"], (cfg["batch"] // cfg["microbatches"], cfg["context"]))
        costs = estimate_layers(layers, sample)
        plan = layerwise.partition(None, STAGES, costs=costs, schedule=schedule, microbatches=cfg["microbatches"])
        return layers, list(plan)
    base, extra = divmod(len(layers), n)
    counts = [base + (1 if s < extra else 0) for s in range(n)]
    return layers, counts


def _batch(cfg: dict[str, Any], step: int) -> tuple[Any, Any]:
    """Step ``step``'s (inputs, targets): random bytes, identical for both systems."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["context"] + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (batch, seq) each


def _rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the two systems (run inside launched ranks) --------------------------------------------------
def run_layerwise(cfg: dict[str, Any], schedule: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import layerwise
    from layerwise.models import lm_loss
    from layerwise.runtime import measure

    rss_start = _rss_mib()
    layers, counts = _setup(cfg, schedule)
    pipe = layerwise.Pipeline(
        layers, stages=STAGES, loss_fn=lm_loss, schedule=schedule, microbatches=cfg["microbatches"],
        partition=counts, timeout=TIMEOUT, record=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=cfg["lr"]),
    )  # fmt: skip
    del layers
    losses, steps_events = [], []
    for i in range(cfg["warmup"]):
        losses.append(pipe.step(*_batch(cfg, i)))
    dist.barrier()
    t0 = time.perf_counter()
    ends = []
    for i in range(cfg["warmup"], cfg["warmup"] + cfg["steps"]):
        losses.append(pipe.step(*_batch(cfg, i)))
        steps_events.append(pipe.last_events)  # a fresh list per step; gathered after the clock stops
        ends.append(time.perf_counter())
    dist.barrier()
    elapsed = time.perf_counter() - t0
    # The timelines of the timed steps, gathered now (timeline() is collective) so that the
    # all_gather does not sit inside the timed loop.
    sch = pipe.schedule_for(cfg["batch"])
    bubbles, durations = [], defaultdict(list)
    for ev in steps_events:
        pipe.last_events = ev
        events = pipe.timeline()
        sim = measure.predict(events, sch)
        makespan = max(e.end for e in events) - min(e.start for e in events)
        bubbles.append([measure.measured_bubble(events, STAGES), float(sim.bubble_fraction), makespan, float(sim.makespan)])
        for e in events:
            durations[f"r{e.rank}.{e.action.kind.value}"].append(e.duration)
    return {
        "rank": int(dist.get_rank()), "elapsed_s": elapsed, "step_s": _diffs(t0, ends), "losses": losses,
        "rss_start_mib": rss_start, "peak_rss_mib": _rss_mib(),
        "bubbles": bubbles,  # per timed step: measured, predicted, makespan measured, predicted (s)
        # per step: time in each action kind, summed over the step's microbatches (ms)
        "action_ms": {k: statistics.median(_per_step_sums(v, len(steps_events))) * 1e3 for k, v in durations.items()},
    }  # fmt: skip


def _diffs(t0: float, ends: list[float]) -> list[float]:
    return [b - a for a, b in zip([t0, *ends[:-1]], ends)]


def _per_step_sums(values: list[float], steps: int) -> list[float]:
    per = len(values) // steps
    return [sum(values[i * per : (i + 1) * per]) for i in range(steps)]


def run_torch(cfg: dict[str, Any], schedule: str) -> dict[str, Any]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleZBVZeroBubble

    from layerwise.models import lm_loss

    rss_start = _rss_mib()
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    layers, counts = _setup(cfg, schedule)
    n = len(counts)
    # ZB-V's V: rank r holds stages r and 2p - 1 - r (layerwise's v_placement, torch's style="v")
    mine = [rank] if n == STAGES else [rank, n - 1 - rank]
    modules = [nn.Sequential(*layers[sum(counts[:s]) : sum(counts[: s + 1])]) for s in mine]
    del layers
    stages = [PipelineStage(mod, s, n, torch.device("cpu")) for mod, s in zip(modules, mine)]
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "zbv": ScheduleZBVZeroBubble}[schedule]
    # lm_loss is a mean per microbatch; scale_grads=True (default) divides the summed gradients
    # by the microbatch count, the same full-batch mean layerwise computes.
    sched = cls(stages if n > STAGES else stages[0], n_microbatches=cfg["microbatches"], loss_fn=lm_loss)
    opt = torch.optim.AdamW([p for mod in modules for p in mod.parameters()], lr=cfg["lr"])
    is_first, is_last = 0 in mine, n - 1 in mine
    losses: list[float] = []

    def step(i: int) -> None:
        x, y = _batch(cfg, i)
        opt.zero_grad(set_to_none=True)
        mb_losses: list[Any] = []
        if is_first and is_last:  # ZB-V: rank 0 holds the first and the last stage
            sched.step(x, target=y, losses=mb_losses, return_outputs=False)
        elif is_first:
            sched.step(x, return_outputs=False)
        elif is_last:
            sched.step(target=y, losses=mb_losses, return_outputs=False)
        else:
            sched.step(return_outputs=False)
        opt.step()
        if is_last:
            losses.append(float(torch.stack(mb_losses).detach().mean()))

    for i in range(cfg["warmup"]):
        step(i)
    dist.barrier()
    t0 = time.perf_counter()
    ends = []
    for i in range(cfg["warmup"], cfg["warmup"] + cfg["steps"]):
        step(i)
        ends.append(time.perf_counter())
    dist.barrier()
    elapsed = time.perf_counter() - t0
    return {"rank": rank, "elapsed_s": elapsed, "step_s": _diffs(t0, ends), "losses": losses, "rss_start_mib": rss_start,
            "peak_rss_mib": _rss_mib()}  # fmt: skip


# -- driver --------------------------------------------------------------------------------------
def _launch_run(system: str, cfg: dict[str, Any], schedule: str) -> tuple[list[dict[str, Any]], float]:
    """One run in a fresh pair of processes; returns the ranks' results and the cores that other
    processes used meanwhile (a run with much foreign load measured the machine, not the runtime)."""
    import layerwise

    fn = run_layerwise if system == "layerwise" else run_torch
    b0, o0, t0 = machine_cpu()[0], own_cpu_s(), time.perf_counter()
    ranks = layerwise.launch(fn, STAGES, cfg, schedule, threads=1, timeout=180.0)
    foreign = max(0.0, (machine_cpu()[0] - b0 - (own_cpu_s() - o0)) / (time.perf_counter() - t0))
    return ranks, foreign


def _run_tps(run: dict[str, Any], cfg: dict[str, Any]) -> float:
    """A run's tokens/s from its median step time (slower rank): robust to a burst of foreign load."""
    step = max(statistics.median(r["step_s"]) for r in run["ranks"])
    return cfg["batch"] * cfg["context"] / step


def _summary(runs: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    tokens = cfg["steps"] * cfg["batch"] * cfg["context"]
    tps = [_run_tps(run, cfg) for run in runs]
    # from the total time: the slower rank's wall time between the barriers around the timed steps
    total_tps = [tokens / max(r["elapsed_s"] for r in run["ranks"]) for run in runs]
    return {
        "tokens_per_s": statistics.median(tps),
        "step_ms": cfg["batch"] * cfg["context"] / statistics.median(tps) * 1e3,
        "runs_tokens_per_s": tps,
        "runs_tokens_per_s_from_total_time": total_tps,
        "runs_foreign_cores": [run["foreign_cores"] for run in runs],
    }


def _measure(cfg: dict[str, Any], budget: float, max_wait: float, noisy: float,
             schedules: tuple[str, ...] = SCHEDULES) -> tuple[dict[str, Any], list[Any]]:
    """Alternate layerwise and torch runs, ``reps`` pairs per schedule.

    This machine may be shared: before each run wait (at most ``max_wait`` s) for other processes
    to go quiet, and redo a pair in which another process used more than ``noisy`` cores, as long
    as the time ``budget`` allows. Redone pairs are kept in the result as ``discarded``.
    """
    deadline = time.monotonic() + budget
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {s: {sc: [] for sc in schedules} for s in SYSTEMS}
    discarded: list[Any] = []
    took: list[float] = []  # wall time of each pair so far
    left = len(schedules) * cfg["reps"]
    for schedule in schedules:
        for rep in range(cfg["reps"]):
            left -= 1
            for attempt in range(3):
                t = time.monotonic()
                pair_s = statistics.mean(took) if took else 25.0  # estimate of one pair's wall time
                pair = []
                for system in SYSTEMS:  # alternate: layerwise, torch, layerwise, torch, ...
                    spare = deadline - time.monotonic() - (left + 1) * pair_s
                    before = wait_quiet(min(max_wait, spare)) if max_wait > 0 and spare > 0 else None
                    ranks, foreign = _launch_run(system, cfg, schedule)
                    run: dict[str, Any] = {"system": system, "ranks": ranks, "foreign_cores": foreign,
                                           "foreign_cores_before": before}  # fmt: skip
                    pair.append(run)
                    print(f"  {schedule:6s} rep {rep} {system:9s} {_run_tps(run, cfg):7.0f} tokens/s  "
                          f"(other processes {foreign:.2f} cores)", file=sys.stderr)  # fmt: skip
                took.append(time.monotonic() - t)
                spare = deadline - time.monotonic() - left * statistics.mean(took)
                if max(r["foreign_cores"] for r in pair) <= noisy or attempt == 2 or spare < statistics.mean(took):
                    break
                print(f"  {schedule:6s} rep {rep}: another process was busy, running the pair again", file=sys.stderr)
                discarded.append({"schedule": schedule, "rep": rep, "runs": pair})
            for run in pair:
                raw[run["system"]][schedule].append(run)
    return raw, discarded


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps, one pair per schedule, no retries")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pipeline_vs_torch.json"))
    ap.add_argument("--reps", type=int, default=None, help="pairs of runs (layerwise, torch) per schedule")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds the benchmark may take when it waits for a quiet machine or redoes a noisy pair "
                         "(default 210; quick: no waiting)")  # fmt: skip
    ap.add_argument("--schedules", default=",".join(SCHEDULES),
                    help=f"comma-separated subset of {','.join(SCHEDULES)} (default: all)")
    args = ap.parse_args(argv)
    schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
    if not schedules or any(s not in SCHEDULES for s in schedules):
        ap.error(f"--schedules: pick from {','.join(SCHEDULES)}, got {args.schedules!r}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.reps:
        cfg["reps"] = args.reps
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 210.0)
    max_wait, noisy = (10.0, 0.3) if budget > 0 else (0.0, float("inf"))
    import torch

    start = time.time()
    raw, discarded = _measure(cfg, budget, max_wait, noisy, schedules)

    result: dict[str, Any] = {
        "benchmark": "pipeline_vs_torch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "config": {**cfg, "stages": STAGES, "threads_per_process": 1, "backend": "gloo",
                   "model": "layerwise.models.GPT (untied embeddings)", "optimizer": "AdamW",
                   "tokens_per_step": cfg["batch"] * cfg["context"],
                   "partition": "layers [embedding, blocks..., head] split evenly into 2 stages; zbv: "
                                "layerwise.partition(balance='time') on FLOP estimates, 4 model stages",
                   "throughput": "tokens/s of a run = tokens per step / its median step time (slower "
                                 "rank), warm-up excluded; tokens_per_s = median over runs",
                   "budget_s": budget, "max_wait_quiet_s": max_wait, "noisy_cores": noisy},
    }  # fmt: skip
    for system in SYSTEMS:
        result[system] = {sc: _summary(raw[system][sc], cfg) for sc in schedules}
    result["throughput_ratio"] = {
        sc: result["layerwise"][sc]["tokens_per_s"] / result["torch"][sc]["tokens_per_s"] for sc in schedules
    }
    # each layerwise run against the torch run right after it: cancels slow drifts in machine load
    result["throughput_ratio_paired"] = {
        sc: [a / b for a, b in zip(result["layerwise"][sc]["runs_tokens_per_s"], result["torch"][sc]["runs_tokens_per_s"])]
        for sc in schedules
    }  # fmt: skip
    result["throughput_ratio_paired_summary"] = {
        sc: {"median": statistics.median(v), "min": min(v), "max": max(v), "pairs": len(v)}
        for sc, v in result["throughput_ratio_paired"].items()
    }
    p, m = STAGES, cfg["microbatches"]
    result["bubble"] = {}
    for sc in schedules:
        steps = [b for run in raw["layerwise"][sc] for b in run["ranks"][0]["bubbles"]]  # rank 0's copy
        meas, pred = statistics.mean(b[0] for b in steps), statistics.mean(b[1] for b in steps)
        mk_meas, mk_pred = statistics.mean(b[2] for b in steps), statistics.mean(b[3] for b in steps)
        result["bubble"][sc] = {
            "measured": meas, "predicted": pred, "relative_error": (meas - pred) / pred if pred else None,
            "makespan_ms": {"measured": mk_meas * 1e3, "predicted": mk_pred * 1e3,
                            "relative_error": (mk_meas - mk_pred) / mk_pred if mk_pred else None},
            "theory_equal_costs": (p - 1) / (m + p - 1), "steps": len(steps),
        }  # fmt: skip
    result["bubble_note"] = ("mean over every timed step of every layerwise run; predicted = simulate(schedule, "
                             "costs measured in the same step); the makespan is run_step's (optimizer excluded)")
    result["layerwise_action_ms"] = {
        sc: {k: statistics.median(run["ranks"][0]["action_ms"][k] for run in raw["layerwise"][sc])
             for k in raw["layerwise"][sc][0]["ranks"][0]["action_ms"]}
        for sc in schedules
    }  # fmt: skip
    result["layerwise_action_ms_note"] = ("per step, median over runs: rK.X = time rank K spent in actions of kind X, "
                                          "summed over microbatches (F, B compute; SF/SB posting a send; RF/RB "
                                          "waiting for a receive)")  # fmt: skip
    result["peak_rss_mib"] = {
        system: {sc: {f"rank{r}": max(run["ranks"][r]["peak_rss_mib"] for run in raw[system][sc]) for r in range(STAGES)}
                 for sc in schedules}
        for system in SYSTEMS
    }  # fmt: skip
    result["peak_rss_note"] = ("ru_maxrss of each stage process (the process peak: the interpreter, torch, the "
                               "full model every rank builds before keeping its stage, optimizer state, "
                               "activations); max over runs. rss_at_start_mib is the peak before the model.")
    result["rss_at_start_mib"] = {system: statistics.median(r["rss_start_mib"] for sc in schedules
                                                            for run in raw[system][sc] for r in run["ranks"])
                                  for system in SYSTEMS}  # fmt: skip
    # same seed, data and split: the losses agree up to float rounding
    result["first_losses"] = {system: {sc: next(r["losses"] for r in raw[system][sc][0]["ranks"][::-1] if r["losses"])[:3]
                                       for sc in schedules}
                              for system in SYSTEMS}  # fmt: skip
    def slim(run: dict[str, Any]) -> dict[str, Any]:
        return {**run, "ranks": [{k: v for k, v in r.items() if k != "action_ms"} for r in run["ranks"]]}

    result["raw"] = {system: {sc: [slim(run) for run in raw[system][sc]] for sc in schedules} for system in SYSTEMS}
    result["discarded"] = [{**d, "runs": [slim(run) for run in d["runs"]]} for d in discarded]
    result["wall_s"] = time.time() - start

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    _print_table(result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s, {len(discarded)} noisy pairs run again)")
    return result


def _print_table(r: dict[str, Any]) -> None:
    c = r["config"]
    print(f"GPT {c['blocks']} blocks x {c['width']}, context {c['context']}, batch {c['batch']}, {c['microbatches']} "
          f"microbatches; 2 stages x 1 thread, gloo; median of {c['reps']} runs x {c['steps']} timed steps")  # fmt: skip
    print(f"{'':8s} {'tokens/s':^27s} | {'layerwise bubble':^24s} | {'peak RSS MiB, rank 0 / 1':^25s}")
    print(f"{'schedule':8s} {'layerwise':>9s} {'torch':>9s} {'ratio':>7s} | {'measured':>8s} {'predicted':>9s} "
          f"{'diff':>5s} | {'layerwise':>12s} {'torch':>12s}")  # fmt: skip
    for sc in r["throughput_ratio"]:
        b, rss = r["bubble"][sc], r["peak_rss_mib"]
        lw, th = rss["layerwise"][sc], rss["torch"][sc]
        print(f"{sc:8s} {r['layerwise'][sc]['tokens_per_s']:9.0f} {r['torch'][sc]['tokens_per_s']:9.0f} "
              f"{r['throughput_ratio'][sc]:7.3f} | {b['measured']:8.3f} {b['predicted']:9.3f} {b['relative_error']:+5.0%} | "
              f"{lw['rank0']:5.0f} / {lw['rank1']:<4.0f} {th['rank0']:5.0f} / {th['rank1']:<4.0f}")  # fmt: skip
    for sc, q in r["throughput_ratio_paired_summary"].items():
        print(f"{sc:8s} paired ratios (layerwise run / the torch run after it): median {q['median']:.3f}, "
              f"min {q['min']:.3f}, max {q['max']:.3f} over {q['pairs']} pairs")


if __name__ == "__main__":
    main()

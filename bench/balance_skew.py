"""Why a step predicted from profile medians comes out short: the skew of the run times.

Two ranks train the vocabulary-6912 GPT of ``bench/balance.py`` under one partition (1F1B, 8
microbatches). Before each recorded step both ranks profile the whole model at once, 8 chain runs
each after one warm-up (the runs ``profile_with_loss`` times, not reduced), and the step is predicted
three ways from those runs: the simulator fed with each layer's median run summed per stage (what a
profile reported before), with its mean run, and
the mean over 200 simulations that draw every action's time from the runs (Monte Carlo: what
the variance of the times adds through the schedule's waits). Printed: each prediction over the
recorded span (the schedule alone: no optimizer, no collectives; messages cost nothing in these
simulations, so every ratio reads a little low), medians over the steps.

    python bench/balance_skew.py                 # [5, 1] and [3, 3], 12 steps each, ~40 s
    python bench/balance_skew.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from balance_profile import batch, keep_heap, model, rank_costs  # noqa: E402

CFG = dict(vocab=6912, width=128, heads=4, blocks=4, context=64, rows=8, microbatches=8, lr=1e-3, keep_heap=True)
DRAWS = 200


def ranks(cfg: dict[str, Any], counts: list[int], steps: int, runs: int) -> list[dict[str, Any]]:
    """In each rank: per recorded step, this rank's profile runs and the step's whole timeline."""
    import torch
    import torch.distributed as dist

    from layerwise import Pipeline
    from layerwise.models import lm_loss

    torch.set_num_threads(1)
    keep_heap(cfg["keep_heap"])
    pipe = Pipeline(model(cfg), microbatches=cfg["microbatches"], partition=counts, loss_fn=lm_loss,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=cfg["lr"]), timeout=120.0)  # fmt: skip
    x, y = batch(cfg, cfg["rows"] * cfg["microbatches"])
    whole = model(cfg)
    for _ in range(2):
        pipe.step(x, y)
    out = []
    for _ in range(steps):
        dist.barrier()  # both ranks profile at once, as they then train
        samples = chain_runs(cfg, whole, runs)
        dist.barrier()
        pipe.record = True
        pipe.forward_backward(x, y)
        pipe.record = False
        assert pipe.optimizer is not None
        pipe.optimizer.step()
        events = [[e.rank, e.action.stage, e.action.kind.value, e.action.microbatch, e.start, e.end] for e in pipe.timeline()]
        out.append({"samples": samples, "events": events})
    return out


def chain_runs(cfg: dict[str, Any], net: Any, runs: int) -> list[list[list[float]]]:
    """Per chain run, per layer [forward_s, backward_s], the loss last: the runs that
    ``profile_with_loss`` reduces to one number per layer, timed as it times them (one warm-up run
    first). Separate ``profile_with_loss(repeats=1)`` calls are no substitute: each run would then
    follow the memory trace and a single warm-up (in one run of this script, 12-20% slow)."""
    import torch

    from layerwise.models import lm_loss
    from layerwise.partition.model_costs import _loss_layer
    from layerwise.partition.profile import _chain_times, _restored
    from layerwise.runtime.split import as_layers

    x, y = batch(cfg, cfg["rows"])
    layers = [*as_layers(net), _loss_layer(lm_loss, y)]
    with _restored(layers), torch.enable_grad():
        per_layer = _chain_times(layers, x, runs, 1)
    return [[[per_layer[k][r][0], per_layer[k][r][1]] for k in range(len(layers))] for r in range(runs)]


def predictions(
    counts: list[int], step: list[dict[str, Any]], seed: int, microbatches: int = CFG["microbatches"]
) -> dict[str, float]:
    """One recorded step: its span and the three predictions (see the module docstring)."""
    from layerwise.schedule.actions import Kind
    from layerwise.schedule.generators import one_f_one_b
    from layerwise.schedule.simulate import Costs, simulate

    sched = one_f_one_b(2, microbatches)
    runs = [[_stage_sums([run, run], counts)[r] for run in step[r]["samples"]] for r in range(2)]  # rank r's runs

    def sim(f: tuple[float, ...], b: tuple[float, ...], per_action: dict[Any, float] | None = None) -> float:
        costs = Costs(forward=f, input_grad=b, weight_grad=(0.0, 0.0), per_action=per_action or {})
        return float(simulate(sched, costs).makespan)

    def by(fn: Callable[[list[float]], float]) -> float:
        """Each layer's runs reduced by ``fn``, then summed per stage, as a profile reports them."""
        layers = [[[fn([run[k][j] for run in step[r]["samples"]]) for j in (0, 1)] for k in range(len(step[r]["samples"][0]))]
                  for r in range(2)]  # fmt: skip
        f, b = zip(*_stage_sums(layers, counts))
        return sim(tuple(f), tuple(b))

    rng = random.Random(seed)
    actions = [a for rank in sched.ranks for a in rank if a.kind in (Kind.F, Kind.B)]
    draws = []
    for _ in range(DRAWS):
        pick = {a: rng.choice(runs[a.stage])[0 if a.kind == Kind.F else 1] for a in actions}
        draws.append(sim((0.0, 0.0), (0.0, 0.0), pick))
    events = step[0]["events"]
    span = max(e[5] for e in events) - min(e[4] for e in events)
    return {"span_s": span, "median": by(statistics.median) / span, "mean": by(statistics.fmean) / span,
            "monte_carlo": statistics.fmean(draws) / span}  # fmt: skip


def _stage_sums(per_rank: list[list[list[float]]], counts: list[int]) -> list[tuple[float, float]]:
    """Per stage (forward_s, backward_s): stage k's layers from rank k's profile, the loss entry on the
    last stage, as the paired prediction costs them (``balance_profile.rank_costs``)."""
    mixed = rank_costs(per_rank, counts)
    ends = [sum(counts[: k + 1]) for k in range(len(counts) - 1)] + [len(mixed)]
    return [(sum(f for f, _ in mixed[a:e]), sum(b for _, b in mixed[a:e])) for a, e in zip([0, *ends[:-1]], ends)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "balance_skew.json"))
    args = parser.parse_args()
    from layerwise import launch

    steps, runs = (2, 3) if args.quick else (12, 8)
    cfg = dict(CFG, blocks=2, vocab=512) if args.quick else CFG
    plans = [[3, 1], [2, 2]] if args.quick else [[5, 1], [3, 3]]
    started, report = time.time(), {"benchmark": "balance_skew", "config": {**cfg, "steps": steps, "runs": runs}}
    print(f"{'partition':<10} {'median/measured':>15} {'mean/measured':>13} {'monte carlo':>11} "
          f"{'mean/median per step: min, median, max':>40}")
    for counts in plans:
        res = launch(ranks, 2, cfg, counts, steps, runs, threads=1, timeout=600)
        rows = [predictions(counts, [res[0][k], res[1][k]], seed=k, microbatches=cfg["microbatches"]) for k in range(steps)]
        skew = [r["mean"] / r["median"] for r in rows]
        med = {k: statistics.median(r[k] for r in rows) for k in ("median", "mean", "monte_carlo")}
        spread = {"min": min(skew), "median": statistics.median(skew), "max": max(skew)}
        report[str(counts)] = {"steps": rows, "medians": med, "mean_over_median": spread}
        print(f"{str(counts):<10} {med['median']:>15.3f} {med['mean']:>13.3f} {med['monte_carlo']:>11.3f} "
              f"{min(skew):>7.3f} {statistics.median(skew):.3f} {max(skew):.3f}")  # fmt: skip
    report["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {report['wall_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""The paired prediction of ``bench/balance.py``: each timed block against the step predicted from
the profile its ranks took just before it, and where the two differ (:func:`decompose`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from balance_profile import paired_error, rank_costs


def paired(cfg: dict[str, Any], net: Any, counts: list[int], devices: list[Any] | None,
            per_rank: list[list[Any]], measured: list[float], stage_opt: list[float],
            timeline: list[dict[str, Any]], collectives: list[float], optim: list[float]) -> dict[str, Any]:  # fmt: skip
    """Each timed block of one partition against the step predicted from the profile both ranks
    took just before that repetition: stage k's layers costed by rank k's profile, simulated, plus
    the slowest stage's optimizer step (profiled up front: 1-2% of a step) and the step's three
    collectives outside the schedule (batch size, tied gradient, loss; timed in the ranks with that
    profile). Also the same prediction from the per-layer
    median of all the repetitions' profiles (``interleaved``), and, per block, where measured and
    predicted differ (:func:`decompose`)."""
    import layerwise.partition
    from layerwise.partition import LayerCost

    def predict(profile: Sequence[Any]) -> Any:
        mixed = rank_costs(profile, counts)
        costs = [LayerCost(forward_s=f, backward_s=b, param_bytes=0, grad_bytes=0, optimizer_bytes=0,
                           activation_bytes=0) for f, b in mixed]  # fmt: skip
        return layerwise.partition(net, 2, balance=list(counts), costs=costs, microbatches=cfg["microbatches"],
                                   devices=devices)  # fmt: skip

    plans = [predict(p) for p in zip(*per_rank)]
    predicted = [p.predicted_step_time + max(stage_opt) + t for p, t in zip(plans, collectives)]
    median = [[[statistics.median(rep[k][j] for rep in reps) for j in range(2)] for k in range(len(reps[0]))]
              for reps in per_rank]  # per rank, per layer, over the repetitions  # fmt: skip
    interleaved = predict(median).predicted_step_time + max(stage_opt) + statistics.median(collectives)
    at = statistics.median(measured)
    return {
        "predicted_s": predicted,
        **paired_error(predicted, measured),
        "collectives_ms": [1e3 * t for t in collectives],
        "interleaved": {"predicted_s": interleaved, "measured_s": at, "error": abs(interleaved - at) / at},
        "profiles": per_rank,  # per rank, per repetition, per layer [forward_s, backward_s]
        "diagnosis": decompose(plans, measured, timeline, collectives, optim, max(stage_opt)),
    }


def decompose(plans: list[Any], measured: list[float], timeline: list[dict[str, Any]], collectives: list[float],
               optim: list[float], opt_predicted: float) -> dict[str, Any]:  # fmt: skip
    """Where a block's measured step differs from its paired prediction, per block (its recorded
    last step against its repetition's profile), medians over the blocks, in ms per step:
    ``costs``: the simulated step from the runtime's own per-stage costs (compute, posting sends,
    message latency) less the one from the profile; ``simulator``: the recorded schedule's span
    less that simulation (waits the model leaves out); ``after_schedule``: what the call spends
    after the span (the tied all-reduce, the loss broadcast) less the timed collectives (which also
    hold the batch size broadcast before the span);
    ``optimizer``: measured less profiled; ``rest``: the block's step less all of the above (the
    barrier, the step's set-up). Also each stage's compute inside the pipeline against its profile."""
    terms: dict[str, list[float]] = {k: [] for k in ("costs", "simulator", "after_schedule", "optimizer", "rest")}
    compute: list[list[float]] = []
    for plan, m, t, ar, opt in zip(plans, measured, timeline, collectives, optim):
        sim, span, call = t["simulated_from_timeline_s"], t["span_s"], t["call_s"]
        terms["costs"].append(sim - plan.predicted_step_time)
        terms["simulator"].append(span - sim)
        terms["after_schedule"].append(call - span - ar)
        terms["optimizer"].append(opt - opt_predicted)
        terms["rest"].append(m - call - opt)
        # both on the device: stage_times stretched by its speed, the recorded actions by their sleep
        compute.append([(f + b) / p for f, b, p in zip(t["forward_s"], t["backward_s"], plan.stage_times)])
    return {
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in terms.items()},
        "measured_less_predicted_ms": 1e3 * statistics.median(
            m - (p.predicted_step_time + opt_predicted + ar) for p, m, ar in zip(plans, measured, collectives)),
        # > 1: the stage computed slower inside the pipeline than its ranks' profile before the block
        "compute_vs_profile": [statistics.median(c[s] for c in compute) for s in range(len(compute[0]))],
        "simulator_error_with_runtime_costs": statistics.median((t["simulated_from_timeline_s"] - t["span_s"]) / t["span_s"]
                                                                for t in timeline),  # fmt: skip
        "latency_ms": 1e3 * statistics.median(t["latency_s"] for t in timeline),
    }

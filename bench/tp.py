"""Tensor parallelism on a CPU: tp=2 against one process, on the demo's GPT.

One training step (forward, backward, AdamW) of the whole ``layerwise demo`` model (GPT: vocab 256,
width 128, 6 blocks, 4 heads, context 64; batch 32) in each configuration:

- ``tp1_1thread``: one process, one thread (one core);
- ``tp1_2threads``: one process, two threads (the whole 2-core machine);
- ``tp2``: ``apply_tp`` over 2 processes of one thread each; ``tp2_sp``: with sequence parallelism;
  ``tp2_vocab_loss``: the head keeps its vocab shard and the loss is ``vocab_parallel_lm_loss``.

Each run is a fresh set of processes: ``warmup`` untimed steps, then ``steps`` timed ones (median).
Configurations alternate, ``reps`` times; the median over reps is reported, with the load average
around each run (the machine may be shared: numbers from a busy machine are not worth comparing).
``params_per_rank`` counts the parameter elements a rank holds (tp splits the matmuls);
``cpu_s_per_step`` is the CPU time of a step summed over ranks (the work done).
Writes ``bench/results/tp.json``.

    python bench/tp.py            # about 2 minutes on 2 cores
    python bench/tp.py --quick    # smoke test
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
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import layerwise  # noqa: E402

FULL = dict(width=128, blocks=6, heads=4, context=64, rows=32, warmup=3, steps=10, reps=3)
QUICK = dict(width=32, blocks=2, heads=4, context=16, rows=4, warmup=1, steps=2, reps=1)
CONFIGS = {  # name: (processes, threads per process, sequence_parallel, vocab_parallel_loss)
    "tp1_1thread": (1, 1, False, False),
    "tp1_2threads": (1, 2, False, False),
    "tp2": (2, 1, False, False),
    "tp2_sp": (2, 1, True, False),
    "tp2_vocab_loss": (2, 1, False, True),
}


def _worker(p: dict[str, Any], tp: int, sp: bool, vocab_loss: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from layerwise.models import GPT, GPTConfig, lm_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=256, context=p["context"], width=p["width"], heads=p["heads"], blocks=p["blocks"]))
    loss_fn = lm_loss
    barrier = lambda: None  # noqa: E731
    if tp > 1:
        from datetime import timedelta

        from torch.distributed.device_mesh import init_device_mesh

        from layerwise.parallel.tensor import apply_tp
        from layerwise.parallel.tp_loss import vocab_parallel_lm_loss

        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
        apply_tp(model.pipeline_layers(), mesh, sequence_parallel=sp, vocab_parallel_loss=vocab_loss)
        if vocab_loss:
            loss_fn = vocab_parallel_lm_loss(mesh)
        barrier = dist.barrier
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    times, cpu, losses = [], [], []
    for step in range(p["warmup"] + p["steps"]):
        tokens = torch.randint(0, 256, (p["rows"], p["context"] + 1), generator=g)
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        barrier()
        if step >= p["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        losses.append(loss.item())
    local = sum((q.to_local() if hasattr(q, "to_local") else q).numel() for q in model.parameters())
    return {
        "step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "losses": losses[:2], "params_per_rank": local,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one rep: a smoke test")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp.json"))
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for _ in range(p["reps"]):
        for name, (procs, threads, sp, vl) in CONFIGS.items():
            load = os.getloadavg()[0]
            ranks = layerwise.launch(_worker, procs, p, procs, sp, vl, threads=threads, timeout=300)
            cpu_all_ranks = sum(r["cpu_s"] for r in ranks)
            runs[name].append({**ranks[0], "cpu_s_all_ranks": cpu_all_ranks, "load_before": load, "load_after": os.getloadavg()[0]})
    step = {name: statistics.median(r["step_s"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_s_all_ranks"] for r in rs) for name, rs in runs.items()}
    tokens = p["rows"] * p["context"]
    result = {
        "model": {k: p[k] for k in ("width", "blocks", "heads", "context")} | {"vocab": 256, "batch": p["rows"]},
        "step_s": step,
        "tokens_per_s": {name: tokens / s for name, s in step.items()},
        # CPU seconds per step summed over the ranks (all threads): the work, which a busy machine
        # disturbs less than the wall time; tp2's extra over tp1_1thread is communication and overhead
        "cpu_s_per_step": cpu,
        "cpu_tp2_over_tp1": cpu["tp2"] / cpu["tp1_1thread"],
        "load_average": statistics.median(r["load_before"] for rs in runs.values() for r in rs),
        # > 1: tp=2 is faster than the other configuration
        "speedup_tp2_vs_tp1_1thread": step["tp1_1thread"] / step["tp2"],
        "speedup_tp2_vs_tp1_2threads": step["tp1_2threads"] / step["tp2"],
        "speedup_tp2_sp_vs_tp2": step["tp2"] / step["tp2_sp"],
        "speedup_tp2_vocab_loss_vs_tp2": step["tp2"] / step["tp2_vocab_loss"],
        "params_per_rank": {name: rs[0]["params_per_rank"] for name, rs in runs.items()},
        "peak_rss_mib": {name: max(r["peak_rss_mib"] for r in rs) for name, rs in runs.items()},
        "first_losses": {name: rs[0]["losses"] for name, rs in runs.items()},
        "runs": runs,
        "params": p,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "when": datetime.datetime.now().isoformat()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'config':<16}{'step ms':>10}{'tok/s':>10}{'CPU ms':>10}{'params/rank':>13}{'peak RSS MiB':>14}")
    for name in CONFIGS:
        print(f"{name:<16}{step[name] * 1e3:>10.1f}{result['tokens_per_s'][name]:>10.0f}{cpu[name] * 1e3:>10.1f}"
              f"{result['params_per_rank'][name]:>13,}{result['peak_rss_mib'][name]:>14.0f}")  # fmt: skip
    print(f"load average during the runs: {result['load_average']:.1f} on {os.cpu_count()} CPUs")
    print(f"tp2 vs tp1 (1 thread): {result['speedup_tp2_vs_tp1_1thread']:.2f}x; vs tp1 (2 threads): "
          f"{result['speedup_tp2_vs_tp1_2threads']:.2f}x; sequence parallel vs not: {result['speedup_tp2_sp_vs_tp2']:.2f}x; "
          f"vocab-parallel loss vs gathered logits: {result['speedup_tp2_vocab_loss_vs_tp2']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

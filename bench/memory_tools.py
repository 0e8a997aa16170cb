"""The memory tools on the CPU: what activation checkpointing, offload and bf16 cost and save.

One pipeline stage of GPT blocks (a middle stage: hidden states in, gradients back) runs a step in
GPipe order, every microbatch's forward and then every backward, so all microbatches' activations
are alive at once, as in the first stage of a pipeline in its warm-up. Each variant runs in a fresh
process, so its peak RSS is its own:

- ``kept_mib``: bytes of activations the forwards leave alive for the backwards, counted exactly
  (``layerwise.parallel.activation_memory.ActivationTracker``: storages still referenced after the
  forwards, parameters and inputs excluded);
- ``peak_rss_mib``: the process's peak resident memory over its steps minus its resident memory
  just before the first (the model and inputs built, torch loaded), allocator effects included;
  it also holds the gradients, the same in every variant;
- ``step_ms``: the best of the timed steps, wall clock (the machine may be shared: the best is the
  least noisy); ``cpu_ms``: the best step's CPU time of the process (one thread): on a busy machine
  it leaves out the time the process waited for a core, so its ratios hold up better than the
  wall clock's.

Variants run twice, in alternating order; ratios are against ``none`` (fp32, no tool). On a CPU,
offload copies nothing (the activations already live in host memory): its row shows the cost of
the hooks alone.

    python bench/memory_tools.py           # ~2-3 minutes on 2 cores -> bench/results/memory_tools.json
    python bench/memory_tools.py --quick   # smoke test in one process, tiny sizes, ~10 s
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = ("none", "full", "full-every-2", "selective", "offload", "bf16", "bf16+selective")
FULL = {"width": 384, "heads": 6, "blocks": 4, "seq": 256, "rows": 4, "microbatches": 4, "steps": 3, "reps": 2}
QUICK = {"width": 64, "heads": 4, "blocks": 2, "seq": 32, "rows": 2, "microbatches": 2, "steps": 1, "reps": 1}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _variant(name: str, size: dict[str, int], threads: int, conn: Any) -> None:
    """One variant in a fresh process; sends its measurements back through ``conn``."""
    import torch

    from layerwise.models import GPT, GPTConfig
    from layerwise.parallel.activation_memory import ActivationTracker
    from layerwise.parallel.checkpointing import apply_ac
    from layerwise.parallel.offload import apply_activation_offload
    from layerwise.parallel.precision import apply_precision
    from layerwise.runtime.stage import Stage

    torch.set_num_threads(threads)
    cfg = GPTConfig(width=size["width"], heads=size["heads"], blocks=size["blocks"], context=size["seq"])
    torch.manual_seed(0)
    blocks = list(GPT(cfg).blocks)
    tools = {
        "none": lambda: None,
        "full": lambda: apply_ac(blocks, "full"),
        "full-every-2": lambda: apply_ac(blocks, "full", every=2),
        "selective": lambda: apply_ac(blocks, "selective"),
        "offload": lambda: apply_activation_offload(blocks),
        "bf16": lambda: apply_precision(blocks, "bf16"),
        "bf16+selective": lambda: (apply_precision(blocks, "bf16"), apply_ac(blocks, "selective")),
    }
    tools[name]()
    stage = Stage(index=1, layers=blocks, first_layer=1, is_first=False, is_last=False, loss_fn=None,
                  split_backward=False, where="bench")  # fmt: skip
    m = size["microbatches"]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(size["rows"], cfg.context, cfg.width, generator=g) for _ in range(m)]
    gs = [torch.randn(size["rows"], cfg.context, cfg.width, generator=g) * 1e-3 for _ in range(m)]

    before = _rss_mib()  # model, inputs and torch loaded; no gradients or activations yet
    with ActivationTracker() as tracker:  # untimed: what the forwards leave for the backwards
        outs = [stage.forward(mb, xs[mb]) for mb in range(m)]
    kept = tracker.live_bytes(exclude=[*stage.parameters(), *outs])
    del outs
    for mb in range(m):
        stage.backward(mb, [gs[mb]])
    times, cpu_times = [], []
    for _ in range(size["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        for mb in range(m):
            stage.forward(mb, xs[mb])
        for mb in range(m):
            stage.backward(mb, [gs[mb]])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send({
        "kept_mib": kept / 2**20,
        "peak_rss_mib": max(peak - before, 0.0),  # ru_maxrss: the lifetime peak, in KiB on Linux
        "step_ms": min(times) * 1e3,
        "cpu_ms": min(cpu_times) * 1e3,
        "params": sum(p.numel() for p in stage.parameters()),
    })  # fmt: skip
    conn.close()


def run_variant(name: str, size: dict[str, int], threads: int, inline: bool = False) -> dict[str, Any]:
    if inline:  # smoke mode: no process per variant (its peak RSS then means nothing)
        recv, send = mp.Pipe(duplex=False)
        _variant(name, size, threads, send)
        return recv.recv()  # type: ignore[no-any-return]
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_variant, args=(name, size, threads, send))
    proc.start()
    send.close()
    try:
        if not recv.poll(600):
            raise TimeoutError(f"variant {name} did not finish in 600 s")
        out: dict[str, Any] = recv.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_tools.json"))
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(size["reps"]):
        order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            runs[v].append(run_variant(v, size, args.threads, inline=args.quick))
            print(f"  rep {rep} {v:15s} {runs[v][-1]['step_ms']:8.1f} ms", flush=True)
    table: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        table[v] = {
            "kept_mib": round(runs[v][0]["kept_mib"], 2),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs[v]), 1),
            "step_ms": round(min(r["step_ms"] for r in runs[v]), 1),
            "cpu_ms": round(min(r["cpu_ms"] for r in runs[v]), 1),
        }
    for v in VARIANTS:
        base = table["none"]
        table[v]["kept_vs_none"] = round(table[v]["kept_mib"] / base["kept_mib"], 3)
        table[v]["peak_rss_vs_none"] = round(table[v]["peak_rss_mib"] / base["peak_rss_mib"], 3) if base["peak_rss_mib"] else None
        table[v]["time_vs_none"] = round(table[v]["step_ms"] / base["step_ms"], 3)
        table[v]["cpu_vs_none"] = round(table[v]["cpu_ms"] / base["cpu_ms"], 3)
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        # 1-minute load average at start and end: above the core count, the step times are noise
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cores": os.cpu_count(),
        "size": size,
        "params": runs["none"][0]["params"],
        "tokens_per_step": size["rows"] * size["seq"] * size["microbatches"],
        "variants": table,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'variant':15s} {'kept MiB':>9s} {'x none':>7s} {'peak RSS MiB':>13s} {'x none':>7s} "
          f"{'ms/step':>9s} {'x none':>7s} {'CPU ms':>9s} {'x none':>7s}")  # fmt: skip
    for v, r in table.items():
        print(f"{v:15s} {r['kept_mib']:9.1f} {r['kept_vs_none']:7.2f} {r['peak_rss_mib']:13.1f} "
              f"{r['peak_rss_vs_none'] or 0:7.2f} {r['step_ms']:9.1f} {r['time_vs_none']:7.2f} "
              f"{r['cpu_ms']:9.1f} {r['cpu_vs_none']:7.2f}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

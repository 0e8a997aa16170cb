"""Does each rank hold only its share? Peak memory per rank of a model built on the meta device.

For a GPT whose one-process training states (fp32 parameters, gradients and AdamW's two moments:
16 bytes per parameter) take at least 3 GB, trained 2 steps with AdamW under pp=4, pp=2 x fsdp=2
and pp=2 x tp=2 (4 processes each), every rank reports:

- ``base``: its resident memory with torch loaded and the process group up, before any model (with
  the runtime's modules imported; ``base_torch_and_group_only`` is before those imports, ~47 MB less);
- ``peak``: its peak resident memory (``VmHWM``) after the steps;
- ``(peak - base) / ideal``, where ``ideal`` = one-process states / world size.

``worst_rank_over_ideal`` is the largest of those over ranks (target: at most 1.2). The model has
16 blocks, so that one block (what FSDP gathers at a time, and the unit of an uneven split) is a
small part of a rank's share; microbatches are tiny, so activations are a small part too.

``--big`` also trains 2 steps of a model whose one-process states are at least 16 GB with pp=4:
four full copies (what every rank built before meta-device construction) would need over 64 GB on
this 24 GiB machine.

    python bench/memory.py            # 3-4 minutes on 2 cores -> bench/results/memory.json
    python bench/memory.py --big      # adds the 16 GB model (needs ~18 GB free memory, ~3 minutes)
    python bench/memory.py --quick    # smoke test: a small model, same code paths
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

MODEL = dict(vocab=256, context=32, width=1024, heads=8, blocks=16)  # 201M parameters, 3.2 GB states
BIG = dict(vocab=256, context=32, width=2048, heads=16, blocks=20)  # 1.01B parameters, 16.1 GB states
QUICK = dict(vocab=256, context=32, width=128, heads=4, blocks=8)
CONFIGS = [
    {"name": "pp4", "stages": 4},
    {"name": "pp2_fsdp2", "stages": 2, "dp": 2, "reshard_after_forward": True},
    {"name": "pp2_fsdp2_gathered", "stages": 2, "dp": 2},  # parameters kept whole during the step
    {"name": "pp2_tp2", "stages": 2, "tp": 2},
]
TARGET = 1.2


def _status(field: str) -> int:
    """A size from /proc/self/status, in bytes (VmRSS: now; VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _counts(blocks: int, stages: int) -> list[int]:
    """Layers per stage: blocks evenly, the embedding with the first, the head with the last."""
    per = [blocks // stages + (1 if s < blocks % stages else 0) for s in range(stages)]
    per[0] += 1
    per[-1] += 1
    return per


def rank_main(job: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    import layerwise
    from layerwise.models import GPT, GPTConfig, lm_loss

    bare = _status("VmRSS")  # torch and the process group only
    # The runtime's code (layerwise's parallel pipeline, FSDP2, DTensor's tensor parallelism) is
    # loaded before the base is taken: ~47 MB of modules, no data. Both bases are reported.
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401

    import layerwise.parallel.data  # noqa: F401
    import layerwise.parallel.pipeline  # noqa: F401
    import layerwise.parallel.tensor  # noqa: F401

    base = _status("VmRSS")
    cfg = GPTConfig(**job["model"])
    conf = {k: v for k, v in job["config"].items() if k != "name"}
    torch.manual_seed(0)
    with torch.device("meta"):  # nothing is allocated until each rank materializes its layers
        model = GPT(cfg)
    pipe = layerwise.Pipeline(
        model, partition=_counts(cfg.blocks, conf["stages"]), microbatches=2, loss_fn=lm_loss,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=False), timeout=600, **conf,
    )  # fmt: skip
    built = _status("VmRSS")
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab, (2 * conf.get("dp", 1), cfg.context + 1), generator=g)
        t0 = time.perf_counter()
        losses.append(pipe.step(tokens[:, :-1], tokens[:, 1:]))
        times.append(time.perf_counter() - t0)
    pipe.close()
    local = sum(_local_numel(p) for p in pipe.parameters())
    return {"rank": dist.get_rank(), "base": base, "base_torch_and_group_only": bare, "after_build": built, "peak": _status("VmHWM"),
            "local_params": local, "losses": losses, "step_s": times}  # fmt: skip


def _local_numel(p: Any) -> int:
    to_local = getattr(p, "to_local", None)
    return (to_local() if callable(to_local) else p).numel()


def _params(model_cfg: dict[str, int]) -> int:
    import torch

    from layerwise.models import GPT, GPTConfig

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(GPTConfig(**model_cfg)).parameters())


def measure(model_cfg: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    import layerwise

    params = _params(model_cfg)
    states = 16 * params  # fp32 parameters, gradients, AdamW exp_avg and exp_avg_sq
    world = config["stages"] * config.get("dp", 1) * config.get("tp", 1)
    ideal = states / world
    t0 = time.perf_counter()
    ranks = layerwise.launch(rank_main, world, {"model": model_cfg, "config": config}, timeout=1500)
    over = [(r["peak"] - r["base"]) / ideal for r in ranks]
    over_bare = [(r["peak"] - r["base_torch_and_group_only"]) / ideal for r in ranks]
    return {
        "config": config, "model": model_cfg, "params": params, "one_process_states_bytes": states,
        "world_size": world, "ideal_bytes_per_rank": ideal, "ranks": ranks,
        "over_ideal": over, "worst_rank_over_ideal": max(over),
        "worst_rank_over_ideal_from_torch_and_group_only": max(over_bare), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def main() -> int:
    # glibc raises its mmap threshold to the size of the first large block freed (up to 32 MiB), after
    # which freed tensors stay in the heap and count as resident: RSS then measures the allocator's
    # history, not what a rank holds. A fixed threshold (set before the ranks start; they inherit it)
    # returns every tensor of 64 KiB or more to the OS when freed. A training job may prefer the
    # default, which saves page faults on tensors allocated every step.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    # layerwise.launch's ranks keep freed buffers on the heap (runtime/malloc.py), which would override the
    # threshold above from inside each rank: turned off here, so RSS measures what a rank holds.
    os.environ["LAYERWISE_KEEP_HEAP"] = "0"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model: checks the code paths only")
    ap.add_argument("--big", action="store_true", help="also train the 16 GB model with pp=4")
    ap.add_argument("--only", default=None, help="comma-separated config names to run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.json"))
    args = ap.parse_args()
    model = QUICK if args.quick else MODEL
    configs = [c for c in CONFIGS if args.only is None or c["name"] in args.only.split(",")]
    results: dict[str, Any] = {
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"], "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "quick": args.quick, "target_worst_rank_over_ideal": TARGET, "configs": {},
    }  # fmt: skip
    print(f"{'config':<20} {'states GB':>9} {'ideal MB':>9} {'base MB':>8} {'peak-base MB (per rank)':>30} {'worst/ideal':>11} {'(bare base)':>11}")
    for config in configs + ([{"name": "big_pp4", "stages": 4}] if args.big else []):
        r = measure(BIG if config["name"] == "big_pp4" else model, config)
        results["configs"][config["name"]] = r
        per = " ".join(f"{(x['peak'] - x['base']) / 2**20:.0f}" for x in r["ranks"])
        print(f"{config['name']:<20} {r['one_process_states_bytes'] / 1e9:>9.2f} {r['ideal_bytes_per_rank'] / 2**20:>9.0f} "
              f"{r['ranks'][0]['base'] / 2**20:>8.0f} {per:>30} {r['worst_rank_over_ideal']:>11.3f} "
              f"{r['worst_rank_over_ideal_from_torch_and_group_only']:>11.3f}", flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

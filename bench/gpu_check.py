"""The GPU check: run on a lent H100/H200 machine, under 8 minutes, via ``scripts/gpu_check.sh``.

1. Equivalence over NCCL: ``layerwise.Pipeline`` (pp, dp x pp with FSDP and DDP, tp when the
   tensor-parallel module is there, a meta-device build, bf16 with checkpointing and offload)
   against one process on one GPU with the same seed: loss, every gradient and every parameter
   after 3 SGD steps (``bench/gpu_check_nccl.py``: each group of cases is one ``torchrun`` over
   2, 4 or 8 of the visible GPUs; with one GPU, the single-stage cases).
2. The memory tools on one GPU against none (checkpointing, offload with pinned memory, bf16).
3. One pipeline stage of GPT blocks (a middle stage: hidden states in, gradients out, GPipe order,
   so every microbatch's activations are alive at once): step time, tokens/s, model FLOPs
   utilization 6 * params * tokens / time / peak (Kaplan et al., 2020; PaLM's MFU, without its
   attention term, reported apart), peak CUDA memory, for fp32, bf16, bf16 + full / selective
   checkpointing, bf16 + activation offload.
4. FSDP2 CPU offload of parameters, gradients and Adam state: peak CUDA memory per rank, with and
   without, on all GPUs.

Writes ``bench/results/gpu_check.json``. Without CUDA it prints why and exits 0 (CI skips it).
``--cpu-dry-run`` runs every part on the CPU with tiny sizes and gloo, to check the code
(results to ``bench/results/gpu_check_dry_run.json``; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from layerwise.models import GPT, GPTConfig, lm_loss  # noqa: E402

# dense bf16 FLOP/s from NVIDIA's datasheets (half the "with sparsity" figure); the first name
# contained in torch.cuda.get_device_name wins, so the PCIe / NVL variants come first
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12}  # fmt: skip
from gpu_check_nccl import FP32_TOL, run_equivalence  # noqa: E402

BUDGET_S = 420.0  # leave a minute of the 8 under the shell's hard timeout
EQUIVALENCE_S = 270.0


# -- 2. the memory tools on one device -----------------------------------------------------------
def tools_equivalence(device: torch.device) -> dict[str, Any]:
    from layerwise.parallel.checkpointing import apply_ac
    from layerwise.parallel.offload import apply_activation_offload
    from layerwise.parallel.precision import BF16_GRAD_RTOL, apply_precision

    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab=256, context=128, width=256, heads=4, blocks=4)).to(device)
    x = torch.randint(0, 256, (4, 128), device=device)
    y = torch.randint(0, 256, (4, 128), device=device)

    def grads(apply: Any) -> tuple[float, dict[str, torch.Tensor], Any]:
        model = copy.deepcopy(base)
        extra = apply(model.pipeline_layers())
        loss = lm_loss(model(x), y)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, extra

    want_loss, want, _ = grads(lambda layers: None)
    variants = {
        "full": lambda L: apply_ac(L, "full"),
        "selective": lambda L: apply_ac(L, "selective"),
        "offload": lambda L: apply_activation_offload(L),
        "bf16": lambda L: apply_precision(L, "bf16"),
    }
    out: dict[str, Any] = {}
    for name, apply in variants.items():
        loss, got, extra = grads(apply)
        diff = max((got[n] - want[n]).abs().max().item() for n in want)
        rel = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
        res: dict[str, Any] = {"loss_diff": abs(loss - want_loss), "grad_diff": diff, "grad_rel": rel}
        res["ok"] = (1e-4 < rel <= BF16_GRAD_RTOL) if name == "bf16" else diff <= FP32_TOL
        if name == "offload":
            res["packed_mib"] = round(extra.packed_bytes / 2**20, 2)
            res["ok"] = res["ok"] and extra.packed > 0
        out[name] = res
    return out


# -- 3. one pipeline stage of GPT blocks ---------------------------------------------------------
def stage_throughput(device: torch.device, dry: bool) -> dict[str, Any]:
    from layerwise.parallel.activation_memory import ActivationTracker
    from layerwise.parallel.checkpointing import apply_ac
    from layerwise.parallel.offload import apply_activation_offload
    from layerwise.parallel.precision import apply_precision
    from layerwise.runtime.stage import Stage

    if dry:
        cfg, rows, micro, warmup, steps = GPTConfig(width=64, heads=4, blocks=2, context=32), 2, 2, 1, 2
    else:  # 8 blocks of width 2048 (403M parameters), 4 microbatches of 2 x 2048 tokens
        cfg, rows, micro, warmup, steps = GPTConfig(width=2048, heads=16, blocks=8, context=2048), 2, 4, 2, 5
    torch.manual_seed(0)
    blocks = [b.to(device) for b in GPT(cfg).blocks]
    n_params = sum(p.numel() for b in blocks for p in b.parameters())
    tokens = rows * cfg.context * micro
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    gen = torch.Generator(device=device).manual_seed(1)
    xs = [torch.randn(rows, cfg.context, cfg.width, device=device, generator=gen) for _ in range(micro)]
    gs = [torch.randn(rows, cfg.context, cfg.width, device=device, generator=gen) * 1e-3 for _ in range(micro)]
    variants = {
        "fp32": lambda L: None,
        "bf16": lambda L: apply_precision(L, "bf16"),
        "bf16+full": lambda L: (apply_precision(L, "bf16"), apply_ac(L, "full")),
        "bf16+selective": lambda L: (apply_precision(L, "bf16"), apply_ac(L, "selective")),
        "bf16+offload": lambda L: (apply_precision(L, "bf16"), apply_activation_offload(L)),
        "bf16+full+offload": lambda L: (apply_precision(L, "bf16"), apply_ac(L, "full"), apply_activation_offload(L)),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"device": name, "params": n_params, "tokens_per_step": tokens, "peak_flops": peak,
                           "config": {"width": cfg.width, "heads": cfg.heads, "blocks": cfg.blocks, "seq": cfg.context,
                                      "rows": rows, "microbatches": micro}}  # fmt: skip
    for vname, apply in variants.items():
        for b in blocks:  # reset every tool, then apply this variant's
            apply_precision([b], "fp32"), apply_ac([b], "none"), apply_activation_offload([b], False)
            b.zero_grad(set_to_none=True)
        apply(blocks)
        stage = Stage(index=1, layers=blocks, first_layer=1, is_first=False, is_last=False, loss_fn=None,
                      split_backward=False, where="gpu check")  # fmt: skip

        def step() -> None:  # GPipe order: all forwards, then all backwards
            for mb in range(micro):
                stage.forward(mb, xs[mb])
            for mb in range(micro):
                stage.backward(mb, [gs[mb]])

        for _ in range(warmup):
            step()
        sync()
        base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / steps
        with ActivationTracker() as tracker:  # what one microbatch's forward leaves on the device
            kept_out = stage.forward(0, xs[0])
        kept = tracker.live_bytes(exclude=[*stage.parameters(), kept_out], device=device.type)
        stage.backward(0, [gs[0]])
        flops = 6 * n_params * tokens
        attn = 12 * cfg.blocks * cfg.width * cfg.context * tokens  # PaLM's attention term, per step
        out[vname] = {
            "step_ms": round(dt * 1e3, 2),
            "tokens_per_s": round(tokens / dt),
            "tflops": round(flops / dt / 1e12, 1),
            "mfu": round(flops / dt / peak, 4) if peak else None,
            "mfu_with_attention": round((flops + attn) / dt / peak, 4) if peak else None,
            "peak_activation_mib": round((torch.cuda.max_memory_allocated(device) - base_mem) / 2**20, 1)
            if device.type == "cuda" else None,
            "kept_per_microbatch_mib": round(kept / 2**20, 2),
        }  # fmt: skip
        print(f"  {vname:18s} {out[vname]['step_ms']:9.1f} ms  mfu {out[vname]['mfu']}", flush=True)
    for v in ("bf16+full", "bf16+selective", "bf16+offload", "bf16+full+offload"):
        out[v]["time_vs_bf16"] = round(out[v]["step_ms"] / out["bf16"]["step_ms"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU with tiny sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible, nothing to check here (CI skips this; run it on a GPU machine, "
              "or pass --cpu-dry-run to exercise the code on the CPU)")  # fmt: skip
        return 0
    deadline = time.monotonic() + BUDGET_S
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    world = 2 if dry else torch.cuda.device_count()
    out_path = Path(args.out or ROOT / "bench" / "results" / ("gpu_check_dry_run.json" if dry else "gpu_check.json"))
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "dry_run": dry, "gpus": 0 if dry else world,
        "device": "cpu" if dry else torch.cuda.get_device_name(0),
    }  # fmt: skip
    # correctness first; it gets at most EQUIVALENCE_S, the rest about two minutes
    parts = [("equivalence", lambda: run_equivalence(world, dry, min(deadline - 120, time.monotonic() + EQUIVALENCE_S))),
             ("tools_equivalence", lambda: tools_equivalence(device)),
             ("stage_throughput", lambda: stage_throughput(device, dry))]  # fmt: skip
    for name, part in parts:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = part()
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    _print_summary(result)
    print(f"wrote {out_path}")
    return 0


def _print_summary(result: dict[str, Any]) -> None:
    eq = result.get("equivalence", {})
    for name, r in eq.items():
        if isinstance(r, dict) and "per_rank" in r:  # FSDP offload memory
            for v in ("none", "cpu_offload"):
                peaks = [x[v]["peak_cuda_mib"] for x in r["per_rank"] if v in x]
                steps = [x[v]["step_s"] for x in r["per_rank"] if v in x]
                print(f"  fsdp {v:11s} peak CUDA MiB per rank {peaks}  step s {steps}")
        elif isinstance(r, dict):
            status = "ok" if r.get("ok") else "FAIL"
            detail = r.get("error") or f"loss {r.get('loss_diff', 0):.1e} grad {r.get('grad_diff', 0):.1e} param {r.get('param_diff', 0):.1e}"
            print(f"  {status:4s} {name:28s} {detail}")
    for name, r in result.get("tools_equivalence", {}).items():
        if isinstance(r, dict):
            print(f"  {'ok' if r.get('ok') else 'FAIL':4s} tools {name:22s} grad diff {r['grad_diff']:.1e} rel {r['grad_rel']:.1e}")
    st = result.get("stage_throughput", {})
    # act MiB: peak CUDA memory of a step above the parameters and gradients; kept MiB: device
    # memory one microbatch's forward leaves for its backward (ActivationTracker)
    print(f"  {'variant':18s} {'ms/step':>9s} {'tok/s':>9s} {'MFU':>6s} {'act MiB':>9s} {'kept MiB':>9s} {'vs bf16':>7s}")
    for v in ("fp32", "bf16", "bf16+full", "bf16+selective", "bf16+offload", "bf16+full+offload"):
        r = st.get(v)
        if r:
            print(f"  {v:18s} {r['step_ms']:9.1f} {r['tokens_per_s']:9d} {r['mfu'] or 0:6.3f} "
                  f"{r['peak_activation_mib'] or 0:9.0f} {r['kept_per_microbatch_mib']:9.2f} "
                  f"{r.get('time_vs_bf16', 1.0):7.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

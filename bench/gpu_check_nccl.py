"""The NCCL half of the GPU check: ``layerwise.Pipeline`` over several GPUs against one GPU.

Each group of cases runs as one ``torchrun`` of this file over as many GPUs as its degrees need
(dp x pp x tp); every rank trains the pipeline and, in the same process, the unsplit model on its
own GPU from the same seed, for 3 SGD steps, and compares loss, every gradient and every parameter.
A failing case is recorded and the next one runs; a group that hangs is killed at its time limit
(NCCL matches point-to-point messages by order, not by tag, so a mismatch hangs rather than fails)
and costs only that group. ``bench/gpu_check.py`` drives it; ``--cpu-dry-run`` runs it with gloo.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from layerwise.models import GPT, GPTConfig, lm_loss  # noqa: E402

EQ_CFG = GPTConfig(vocab=64, context=32, width=64, heads=4, blocks=8)  # tied embeddings
FP32_TOL = 1e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _equivalence(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import layerwise

    kw = dict(case["pipeline"])
    torch.manual_seed(1234)
    ref = GPT(EQ_CFG).to(device)
    torch.manual_seed(1234)
    if case.get("meta"):
        with torch.device("meta"):
            model = GPT(EQ_CFG)
    else:
        model = GPT(EQ_CFG)
    opt = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    pipe = layerwise.Pipeline(model, loss_fn=lm_loss, optimizer=opt, timeout=60, **kw)
    ref_opt = opt(list(ref.parameters()))
    ref_params = {f"{i}.{n}": p for i, layer in enumerate(ref.pipeline_layers()) for n, p in layer.named_parameters()}
    g = torch.Generator().manual_seed(99)
    out = {"loss_diff": 0.0, "grad_diff": 0.0, "grad_rel": 0.0, "param_diff": 0.0}
    for rows in (8, 7, 12):
        tokens = torch.randint(0, EQ_CFG.vocab, (rows, EQ_CFG.context + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = pipe.forward_backward(x, y)
        ref_opt.zero_grad()
        ref_loss = lm_loss(ref(x.to(device)), y.to(device))
        ref_loss.backward()
        for name, p in pipe.named_parameters().items():
            want, got = ref_params[name].grad, _full(p.grad)
            out["grad_diff"] = max(out["grad_diff"], (want - got).abs().max().item())
            out["grad_rel"] = max(out["grad_rel"], ((want - got).norm() / want.norm().clamp_min(1e-30)).item())
        pipe.optimizer.step()
        ref_opt.step()
        out["loss_diff"] = max(out["loss_diff"], abs(loss - ref_loss.item()))
    for name, p in pipe.named_parameters().items():
        out["param_diff"] = max(out["param_diff"], (ref_params[name] - _full(p.detach())).abs().max().item())
    if kw.get("precision") == "bf16":
        from layerwise.parallel.precision import BF16_GRAD_RTOL, BF16_LOSS_RTOL

        out["ok"] = out["grad_rel"] <= BF16_GRAD_RTOL and out["loss_diff"] <= BF16_LOSS_RTOL * 5
        out["tolerance"] = f"bf16: relative gradient error <= {BF16_GRAD_RTOL}"
    else:
        out["ok"] = max(out["loss_diff"], out["grad_diff"], out["param_diff"]) <= FP32_TOL
        out["tolerance"] = f"fp32: {FP32_TOL} absolute"
    pipe.close()
    return out


def _fsdp_offload_memory(device: torch.device, dry: bool) -> dict[str, Any]:
    """Peak CUDA memory of 2 AdamW steps of FSDP2-sharded GPT blocks, without and with CPU offload."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from layerwise.parallel.offload import fsdp_cpu_offload

    cfg = GPTConfig(width=64, heads=4, blocks=2, context=32) if dry else GPTConfig(width=1536, heads=12, blocks=8, context=1024)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    out: dict[str, Any] = {}
    for name, offload in (("none", False), ("cpu_offload", True)):
        torch.manual_seed(0)
        blocks = torch.nn.Sequential(*GPT(cfg).blocks).to(device)
        n_params = sum(p.numel() for p in blocks.parameters())
        policy = fsdp_cpu_offload(offload)
        for b in blocks:
            fully_shard(b, mesh=mesh, offload_policy=policy)
        fully_shard(blocks, mesh=mesh, offload_policy=policy)
        opt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(2):
            x = torch.randn(2, cfg.context, cfg.width, device=device)
            blocks(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = {
            "params": n_params,
            "step_s": round((time.perf_counter() - t0) / 2, 4),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        }
        del blocks, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def worker(cases_path: str, result_path: str, dry: bool) -> None:
    """One torchrun rank: every case in turn; rank 0 rewrites the results file after each."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dry:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        # gloo for the runtime's small CPU collectives (batch size, loss), NCCL for CUDA tensors
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=datetime.timedelta(seconds=90))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for the 1e-5 comparison
    torch.backends.cudnn.allow_tf32 = False
    cases = json.loads(Path(cases_path).read_text())
    results: dict[str, Any] = {}
    for case in cases:
        t0 = time.perf_counter()
        try:
            if case.get("kind") == "fsdp_offload":
                res = _fsdp_offload_memory(device, dry)
            else:
                res = _equivalence(case, device)
        except Exception as e:  # record and go on: one broken combination must not hide the rest
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)  # our own ranks' dicts, on a group we created
        results[case["name"]] = _merge(gathered) if case.get("kind") != "fsdp_offload" else {"per_rank": gathered}
        if dist.get_rank() == 0:
            Path(result_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _merge(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's verdict over all ranks: ok only if every rank is; the largest differences; the
    first error with the rank that raised it."""
    out: dict[str, Any] = {"ok": all(r.get("ok") for r in per_rank)}
    for key in ("loss_diff", "grad_diff", "grad_rel", "param_diff", "seconds"):
        values = [r[key] for r in per_rank if key in r]
        if values:
            out[key] = max(values)
    errors = [f"rank {i}: {r['error']}" for i, r in enumerate(per_rank) if "error" in r]
    if errors:
        out["error"] = errors[0]
    if "tolerance" in per_rank[0]:
        out["tolerance"] = per_rank[0]["tolerance"]
    return out


def _cases(world: int, dry: bool) -> list[tuple[int, list[dict[str, Any]]]]:
    """(processes, cases) per torchrun group. Every case's degrees multiply to its group's size."""
    has_tp = importlib.util.find_spec("layerwise.parallel.tensor") is not None
    mb = {"microbatches": 4}
    groups: list[tuple[int, list[dict[str, Any]]]] = []
    if world == 1 or dry:
        groups.append((1, [
            {"name": "pp1 1f1b", "pipeline": {"stages": 1, **mb}},
            {"name": "pp1 bf16 selective offload", "pipeline": {"stages": 1, "precision": "bf16",
             "activation_checkpointing": "selective", "offload": "activations", **mb}},
            {"name": "pp1 meta", "meta": True, "pipeline": {"stages": 1, **mb}},
            {"kind": "fsdp_offload", "name": "fsdp_offload_memory 1 rank"},
        ]))  # fmt: skip
    if world == 1:
        return groups
    two = [
        {"name": "pp2 1f1b", "pipeline": {"stages": 2, "schedule": "1f1b", **mb}},
        {"name": "pp2 gpipe", "pipeline": {"stages": 2, "schedule": "gpipe", **mb}},
        {"name": "pp2 zb-h1 selective", "pipeline": {"stages": 2, "schedule": "zb-h1", "activation_checkpointing": "selective", **mb}},
        {"name": "pp2 bf16 full offload", "pipeline": {"stages": 2, "precision": "bf16", "activation_checkpointing": "full",
         "offload": "activations", **mb}},
        {"name": "dp2 fsdp", "pipeline": {"stages": 1, "dp": 2, "data_parallel": "fsdp", **mb}},
        {"name": "dp2 fsdp offload all", "pipeline": {"stages": 1, "dp": 2, "data_parallel": "fsdp", "offload": "all", **mb}},
        {"name": "pp2 meta", "meta": True, "pipeline": {"stages": 2, **mb}},
        {"kind": "fsdp_offload", "name": "fsdp_offload_memory"},
    ]  # fmt: skip
    groups.append((2, two))
    if world >= 4 and not dry:
        four = [
            {"name": "dp2 x pp2 fsdp", "pipeline": {"stages": 2, "dp": 2, "data_parallel": "fsdp", **mb}},
            {"name": "dp2 x pp2 ddp", "pipeline": {"stages": 2, "dp": 2, "data_parallel": "ddp", **mb}},
            {"name": "dp2 x pp2 fsdp meta bf16", "meta": True, "pipeline": {"stages": 2, "dp": 2, "precision": "bf16", **mb}},
        ]
        if has_tp:
            four += [{"name": "pp2 x tp2", "pipeline": {"stages": 2, "tp": 2, **mb}},
                     {"name": "dp2 x tp2", "pipeline": {"stages": 1, "dp": 2, "tp": 2, **mb}}]  # fmt: skip
        groups.append((4, four))
    if world >= 8 and has_tp and not dry:
        groups.append((8, [{"name": "dp2 x pp2 x tp2", "pipeline": {"stages": 2, "dp": 2, "tp": 2, **mb}}]))
    # last, on its own: two stages per rank send on two channels between the same pair of ranks
    groups.append((2, [{"name": "pp2 interleaved", "pipeline": {"stages": 2, "schedule": "interleaved", "chunks": 2, **mb}}]))
    return groups


def run_equivalence(world: int, dry: bool, deadline: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for nprocs, cases in _cases(world, dry):
        left = deadline - time.monotonic()
        if left < 45:
            results[f"skipped ({nprocs} processes)"] = [c["name"] for c in cases]
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cases_path, result_path = Path(tmp, "cases.json"), Path(tmp, "results.json")
            cases_path.write_text(json.dumps(cases))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
                   str(Path(__file__).resolve()), str(cases_path), str(result_path)]  # fmt: skip
            if dry:
                cmd.append("--cpu-dry-run")
            env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            t0 = time.perf_counter()
            limit = min(left - 10, 200, 60 + 25 * len(cases))
            # its own session, so that a hang is ended with torchrun's ranks, which would otherwise
            # outlive it and hold their GPUs
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)  # fmt: skip
            try:
                log, _ = proc.communicate(timeout=limit)
                tail = log.strip().splitlines()[-3:] if proc.returncode else []
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                tail = [f"timed out after {limit:.0f} s"]
            got = json.loads(result_path.read_text()) if result_path.exists() else {}
            for c in cases:
                results[c["name"]] = got.get(c["name"], {"ok": False, "error": " | ".join(tail) or "no result"})
                results[c["name"]]["processes"] = nprocs
            print(f"  {nprocs} processes, {len(cases)} cases: {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":  # a torchrun rank: CASES RESULT [--cpu-dry-run]
    worker(sys.argv[1], sys.argv[2], dry="--cpu-dry-run" in sys.argv[3:])

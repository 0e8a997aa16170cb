"""The training loop one pipeline rank runs: data, steps, evaluation, checkpoints, final model.

Every rank runs :func:`train_rank` with the same settings (started by ``layerwise.launch`` or by
torchrun). Rank 0 draws the progress bar and writes ``metrics.jsonl``; the ranks holding the
first and the last stage feed the pipeline its inputs and targets.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import HFTokenizer, PackedData, cached_tokens, load_tokenizer
from .model import INDEX, TrainModel, build, save_gpt_shard
from .optim import adamw, set_current_lr, warmup_cosine

# Settings a resumed run must share with the checkpoint for its loss curve to be the one an
# uninterrupted run would have drawn. (--steps may grow: a finished run can be extended.)
MUST_MATCH = (
    "model", "data", "tokenizer", "seq_len", "batch_size", "seed", "stages", "schedule", "microbatches",
    "chunks", "lr", "warmup", "min_lr_ratio", "weight_decay", "max_grad_norm", "dp", "tp", "data_parallel",
    "precision", "activation_checkpointing",
)  # fmt: skip


def train_rank(cfg_dict: dict[str, Any], stop_after: int | None = None) -> dict[str, Any]:
    """Train as one pipeline rank; rank 0 returns the run's summary.

    ``stop_after``: return after this step with a checkpoint, as a job with a time limit would
    (the learning-rate schedule still spans ``steps``); ``resume`` continues from there.
    """
    import layerwise

    cfg = TrainConfig(**cfg_dict)
    tokenizer = load_tokenizer(cfg.tokenizer)
    tm = build(cfg.model, vocab_size=tokenizer.vocab_size, seq_len=cfg.seq_len, seed=cfg.seed)
    pipe = layerwise.Pipeline(
        tm.model, stages=cfg.stages, schedule=cfg.schedule, microbatches=cfg.microbatches, chunks=cfg.chunks,
        dp=cfg.dp, tp=cfg.tp, data_parallel=cfg.data_parallel, precision=cfg.precision,
        activation_checkpointing=cfg.activation_checkpointing,
        loss_fn=tm.loss_fn, optimizer=lambda p: adamw(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        max_grad_norm=cfg.clip,
    )  # fmt: skip
    rank = dist.get_rank()
    main = rank == 0
    # rank 0 tokenizes (once: the stream is cached under DIR/data-cache/), the others read it
    stream = cached_tokens(cfg.data, tokenizer, cfg.tokenizer, os.path.join(cfg.out, "data-cache"),
                           write=main, wait=dist.barrier)
    data = PackedData(
        stream, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
        eval_fraction=cfg.eval_fraction, eval_max=cfg.eval_max_sequences,
    )  # fmt: skip
    module = ckpt.stage_module(pipe.stages)
    sched = warmup_cosine(pipe.optimizer, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio) if pipe.optimizer else None
    root = os.path.join(cfg.out, "checkpoints")
    start = _resume(cfg, root, module, pipe, sched, data, rank) if cfg.resume else _fresh(cfg, root)
    if main:
        print(f"layerwise train: {tm.describe}; {data.train_sequences} training and {data.eval_sequences} held-out "
              f"sequences of {cfg.seq_len} tokens; {cfg.stages} stages (layers per stage {list(pipe.partition)}), "
              f"{cfg.schedule}, {cfg.microbatches} microbatches" + (f"; resuming after step {start}" if start else ""),
              file=sys.stderr)
    metrics = _Metrics(os.path.join(cfg.out, "metrics.jsonl"), start) if main else None
    bar = _bar(cfg, start) if main else None

    losses: list[float] = []
    step_times: list[float] = []
    eval_loss: float | None = None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        window = data.next_batch()
        x, y = tm.inputs_targets(window)
        t0 = time.perf_counter()
        loss = pipe.step(x, y)
        lr = None
        if sched is not None:
            lr = sched.get_last_lr()[0]
            sched.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        done = step + 1
        if metrics is not None:
            metrics.write(step=done, loss=loss, lr=lr, tokens_per_s=tokens_per_step / step_times[-1])
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / step_times[-1]:,.0f}")
            bar.update(1)
        last = done == end
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            eval_loss = evaluate(pipe, data, tm)
            if metrics is not None:
                metrics.write(step=done, eval_loss=eval_loss)
        if (cfg.save_every and done % cfg.save_every == 0) or last:
            save_checkpoint(cfg, root, done, module, pipe, sched, data, rank)
    if bar is not None:
        bar.close()
    if eval_loss is None and data.eval_sequences:  # nothing was left to train after resuming
        eval_loss = evaluate(pipe, data, tm)
    final = os.path.join(cfg.out, "final")
    if end == cfg.steps:
        save_final(final, tm, pipe, module, rank, tokenizer)
    pipe.close()
    if not main:
        return {"rank": rank}
    trained = sum(step_times)
    return {
        "steps": end,
        "resumed_from": start if cfg.resume else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "tokens_per_s": tokens_per_step * len(step_times) / trained if trained else None,
        "losses": losses,
        "train_sequences": data.train_sequences,
        "eval_sequences": data.eval_sequences,
        "model": tm.describe,
        "partition": list(pipe.partition),
        "out": os.path.abspath(cfg.out),
        "final": os.path.abspath(final) if end == cfg.steps else None,
        "checkpoint": os.path.abspath(found[1]) if (found := ckpt.latest(root)) else None,
    }


def evaluate(pipe: Any, data: PackedData, tm: TrainModel) -> float | None:
    """Mean next-token loss over the held-out sequences (layers in eval mode, weights unchanged).

    Forward only (:meth:`Pipeline.evaluate`): no backward, no gradient touched.
    """
    if not data.eval_sequences:
        return None
    layers = [layer for stage in pipe.stages.values() for layer in stage.layers]
    for layer in layers:
        layer.eval()
    total, rows = 0.0, 0
    for window in data.eval_batches(min_rows=getattr(getattr(pipe, "dims", None), "dp", 1)):
        x, y = tm.inputs_targets(window)
        total += pipe.evaluate(x, y) * window.shape[0]
        rows += window.shape[0]
    for layer in layers:
        layer.train()
    return total / rows


# -- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(cfg: TrainConfig, root: str, step: int, module: Any, pipe: Any, sched: Any,
                    data: PackedData, rank: int) -> str:
    meta = {
        "settings": {k: getattr(cfg, k) for k in MUST_MATCH},
        "steps": cfg.steps,
        "data": data.state_dict(),
        "lr_schedule": sched.state_dict() if sched is not None else None,
        "partition": list(pipe.partition),
        "world_size": dist.get_world_size(),
    }
    state = ckpt.capture(module, pipe.optimizer, rank)
    return ckpt.save(root, step, state, meta, coordinator=rank == 0, keep=cfg.keep)


def _fresh(cfg: TrainConfig, root: str) -> int:
    found = ckpt.latest(root)
    if found is not None:
        raise ckpt.CheckpointError(
            f"{cfg.out} already holds a checkpoint ({found[1]}): pass --resume to continue it, "
            "or choose another --out"
        )
    return 0


def check_resumable(cfg: TrainConfig, path: str) -> dict[str, Any]:
    """The checkpoint's metadata, if it was written with the settings that shape the loss curve."""
    meta = ckpt.read_meta(path)
    changed = [k for k in MUST_MATCH if meta["settings"].get(k) != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k} {meta['settings'].get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ckpt.CheckpointError(
            f"--resume: {path} was written with other settings ({diffs}); resume with the same settings "
            "or start a new run with another --out"
        )
    return meta


def _resume(cfg: TrainConfig, root: str, module: Any, pipe: Any, sched: Any, data: PackedData, rank: int) -> int:
    # Rank 0 picks the checkpoint and tells the others, so all read the same one even if a
    # save is committed while they look.
    found = ckpt.latest(root) if rank == 0 else None
    pick = torch.tensor([found[0] if found else -1], dtype=torch.int64)
    dist.broadcast(pick, 0)
    step = int(pick[0])
    if step < 0:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {root}; run without --resume to start")
    path = os.path.join(root, ckpt.folder_name(step))
    meta = check_resumable(cfg, path)
    ckpt.restore(module, pipe.optimizer, rank, path)
    if sched is not None and meta["lr_schedule"] is not None:
        sched.load_state_dict(meta["lr_schedule"])
        set_current_lr(pipe.optimizer, sched)
    data.load_state_dict(meta["data"])
    return step


# -- the final model ----------------------------------------------------------------------------
def save_final(folder: str, tm: TrainModel, pipe: Any, module: Any, rank: int, tokenizer: Any = None) -> None:
    """The trained model in ``folder``: one safetensors shard per pipeline rank (written by its
    first data- and tensor-parallel replica), the config and the index; HF format for a
    HuggingFace model (``save_hf``), with its tokenizer when one was given. Written beside the
    folder, then renamed into place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..models.hf_weights import pipeline_shards, save_hf

    dims = getattr(pipe, "dims", None)
    d, _, t = dims.coords(rank) if dims is not None else (0, 0, 0)
    writer = d == 0 and t == 0
    shards, shard = pipeline_shards(pipe)
    tmp = folder + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if tm.kind == "gpt":
        # whole tensors: gathered from data- or tensor-parallel shards (a collective), else as they are
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        if writer:
            part = save_gpt_shard(tmp, tm, full, shard, len(shards))
            with open(os.path.join(tmp, f".weights-{shard}.json"), "w") as f:
                json.dump(part, f)
    else:
        _gather_whole(pipe)  # every replica takes part; only the writers use the result
        if writer:
            save_hf(tm.model, tmp, shards=shards, shard=shard)
    dist.barrier()
    if rank == 0:
        if tm.kind == "gpt":
            weight_map: dict[str, str] = {}
            for k in range(len(shards)):
                piece = os.path.join(tmp, f".weights-{k}.json")
                with open(piece) as f:
                    weight_map.update(json.load(f))
                os.remove(piece)
            ckpt.write_json_atomic(os.path.join(tmp, INDEX), {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
            ckpt.write_json_atomic(os.path.join(tmp, "config.json"), tm.config)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(tmp)
        old = folder + ".old"
        if os.path.exists(folder):
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _gather_whole(pipe: Any) -> None:
    """Replace this rank's sharded parameters (FSDP2 or tensor-parallel DTensors) by whole ones,
    for save_hf, which writes parameters as they are. Only at the very end: the layers cannot
    train afterwards. ``full_tensor`` is a collective over the parameter's mesh; the replicas of
    one pipeline rank hold the same layers, so they call it in the same order."""
    from torch.distributed.tensor import DTensor

    whole: dict[int, torch.nn.Parameter] = {}  # a weight in two slots (tied) stays one
    for stage in pipe.stages.values():
        for layer in stage.layers:
            for module in layer.modules():
                for name, p in list(module._parameters.items()):
                    if isinstance(p, DTensor):
                        if id(p) not in whole:
                            whole[id(p)] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=False)
                        module._parameters[name] = whole[id(p)]


# -- output -------------------------------------------------------------------------------------
class _Metrics:
    """``metrics.jsonl``: one line per step and one per evaluation. A resumed run drops the
    lines after its checkpoint (steps that will be run again) and appends."""

    def __init__(self, path: str, start: int) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept: list[str] = []
        if start and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
        self._f = open(path, "w")
        self._f.writelines(kept)
        self._f.flush()
        self._t0 = time.time()

    def write(self, **row: Any) -> None:
        self._f.write(json.dumps({**row, "time_s": round(time.time() - self._t0, 3)}) + "\n")
        self._f.flush()


def _bar(cfg: TrainConfig, start: int) -> Any:
    import threading

    from tqdm import tqdm

    # One process draws one bar: a thread lock, not tqdm's multiprocessing one (it leaks when a
    # launched rank leaves through os._exit).
    tqdm.set_lock(threading.RLock())
    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", mininterval=0.5,
                dynamic_ncols=True, file=sys.stderr)

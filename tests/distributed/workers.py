"""Functions run inside the launched ranks (module level, so spawn can import them)."""

from __future__ import annotations

import copy
import os
import signal
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import layerwise
from layerwise.models import GPT, GPTConfig, lm_loss, mlp
from layerwise.runtime import shm

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
MICROBATCHES = (1, 3, 8)
BATCHES = (10, 7, 12)  # changes between steps; 7 and 10 do not divide into 3 or 8
_MAX_SLOTS = shm.MAX_SLOTS


class _SkipIn(torch.nn.Module):
    """First layer: keeps its input as a skip connection in a dict, with an integer tag."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": torch.tanh(self.lin(x)), "skip": x, "step": torch.ones(x.shape[0], dtype=torch.int64)}


class _SkipMid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"h": torch.tanh(self.lin(d["h"])) + 0.1 * d["skip"], "skip": d["skip"], "step": d["step"] + 1}


class _SkipOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # a tuple leaves the model: the loss sees both the output and the skip, across all stages
        return self.lin(d["h"]) + d["skip"] * d["step"][:, None].float() / 8, d["skip"]


def _skip_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0], y) + 0.01 * out[1].pow(2).mean()


def _model(kind: str) -> tuple[torch.nn.Module, Any, Any]:
    if kind == "mlp":
        return mlp(width=16, depth=8), F.mse_loss, None
    if kind == "skip":  # dicts and tuples cross every boundary, with a skip connection
        layers = [_SkipIn(), *[_SkipMid() for _ in range(6)], _SkipOut()]
        return torch.nn.Sequential(*layers), _skip_loss, None
    cfg = GPTConfig(vocab=48, context=16, width=32, heads=2, blocks=6)
    return GPT(cfg), lm_loss, cfg


def _batch(kind: str, n: int, g: torch.Generator, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if kind in ("mlp", "skip"):
        return torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    seq = int(torch.randint(8, cfg.context + 1, (1,), generator=g))  # sequence length changes too
    tokens = torch.randint(0, cfg.vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def equivalence(cases: list[list[Any]]) -> dict[str, Any]:
    """For each (model, schedule, microbatches, clip, transport): train 3 steps with the pipeline
    and, in the same process, the unsplit model; return the largest loss and parameter differences.

    transport "inline" is shared memory with no slot to spare, so every payload takes the
    fallback through the process group."""
    out: dict[str, Any] = {}
    for kind, schedule, m, clip, transport in cases:
        shm.MAX_SLOTS = 0 if transport == "inline" else _MAX_SLOTS
        torch.manual_seed(1234)
        model, loss_fn, cfg = _model(kind)
        ref = copy.deepcopy(model)
        ref_layers = layerwise.runtime.split.as_layers(ref)
        acc_layers = layerwise.runtime.split.as_layers(copy.deepcopy(model)) if kind == "mlp" else None
        # SGD with momentum is linear in the gradients, so float rounding (sums in another order)
        # stays at rounding size; Adam divides by sqrt(v) and can amplify it for tiny gradients.
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        pipe = layerwise.Pipeline(
            model, schedule=schedule, microbatches=m, chunks=2, loss_fn=loss_fn,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            max_grad_norm=clip, transport="shm" if transport == "inline" else transport,
        )  # fmt: skip
        g = torch.Generator().manual_seed(99)
        ref_params = {
            f"{i}.{name}": p for i, layer in enumerate(ref_layers) for name, p in layer.named_parameters()
        }
        loss_diff, grad_diff, losses, norms = 0.0, 0.0, [], []
        bitwise = None
        for n in BATCHES:
            x, y = _batch(kind, n, g, cfg)
            loss = pipe.forward_backward(x, y)
            if acc_layers is not None and bitwise is None:  # first step only
                bitwise = _bit_identical(pipe, acc_layers, loss_fn, x, y, m, loss)
            ref_loss = reference_backward(ref_layers, loss_fn, ref_opt, x, y)
            for name, p in pipe.named_parameters().items():
                grad_diff = max(grad_diff, (ref_params[name].grad - p.grad).abs().max().item())
            if clip is not None:  # the global norm over every stage, tied weights counted once
                norms.append(pipe.clip_grad_norm_(clip))
                ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
                grad_diff = max(grad_diff, abs(norms[-1] - ref_norm))
            pipe.optimizer.step()
            ref_opt.step()
            loss_diff = max(loss_diff, abs(loss - ref_loss.item()))
            losses.append(loss)
        # a forward-only evaluation of the trained weights on the last batch (every schedule's
        # forwards and their messages, no backward): the unsplit model's loss
        ev = pipe.evaluate(x, y)
        with torch.no_grad():
            h = x
            for layer in ref_layers:
                h = layer(h)
            eval_diff = abs(ev - loss_fn(h, y).item())
        param_diff, compared = param_differences(pipe, ref_params)
        out[case_key([kind, schedule, m, clip, transport])] = {
            "transport": type(pipe.transport).__name__,
            "loss_diff": loss_diff,
            "eval_diff": eval_diff,
            "param_diff": param_diff,
            "grad_diff": grad_diff,
            "norms": norms,
            "compared": compared,
            "all_params": sorted(ref_params),
            "losses": losses,
            "bitwise": bitwise,
        }
    return out


def reference_backward(layers: list[torch.nn.Module], loss_fn: Any, opt: torch.optim.Optimizer, x: Any, y: Any) -> torch.Tensor:
    """The unsplit model's loss and gradients on the whole batch (what the pipeline must equal)."""
    opt.zero_grad()
    h = x
    for layer in layers:
        h = layer(h)
    loss = loss_fn(h, y)
    loss.backward()
    return loss


def _bit_identical(pipe: Any, layers: list[Any], loss_fn: Any, x: Any, y: Any, m: int, loss: float) -> bool:
    """One process accumulating the same microbatches, weighted by their rows, in microbatch order:
    are the loss and every gradient bit-identical to the pipeline's? (Every stage accumulates its
    microbatches' gradients in microbatch order, whatever the schedule.)"""
    from layerwise.runtime.microbatch import split_batch

    k = min(m, x.shape[0])
    total = None
    for xi, yi in zip(split_batch(x, k, "x"), split_batch(y, k, "y")):
        h = xi
        for layer in layers:
            h = layer(h)
        li = loss_fn(h, yi) * (yi.shape[0] / x.shape[0])
        li.backward()
        total = li.detach() if total is None else total + li.detach()
    params = {f"{i}.{name}": p for i, layer in enumerate(layers) for name, p in layer.named_parameters()}
    same = all(torch.equal(p.grad, params[name].grad) for name, p in pipe.named_parameters().items())
    return same and float(total) == loss


def param_differences(
    pipe: Any, ref_params: dict[str, torch.Tensor], whole: Any = lambda t: t
) -> tuple[float, list[str]]:
    """Largest difference between this rank's parameters and the reference's, and their names.
    ``whole`` turns a sharded parameter into its full value (a collective for DTensors)."""
    diff, names = 0.0, []
    for name, p in pipe.named_parameters().items():
        diff = max(diff, (ref_params[name] - whole(p.detach())).abs().max().item())
        names.append(name)
    return diff, names


def case_key(case: list[Any]) -> str:
    kind, schedule, m, clip, transport = case
    return "/".join(map(str, [kind, schedule, m] + ([f"clip{clip}"] if clip else []) + ([transport] if transport != "auto" else [])))


def die_mid_step(victim: int, timeout: float, how: str = "kill") -> str:
    """Train a 4-stage MLP; in its second step's forward ``victim`` kills itself (SIGKILL) or,
    with ``how="hang"``, stops answering."""
    torch.manual_seed(0)
    model = mlp(width=16, depth=8)
    rank = int(os.environ["RANK"])
    # Start-up gets a generous bound (ranks may start seconds apart on a loaded machine); the
    # pipeline runs on its own group, passed in, whose timeout is the short one under test.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    group = dist.new_group(timeout=timedelta(seconds=timeout))
    pipe = layerwise.Pipeline(model, microbatches=4, loss_fn=F.mse_loss, timeout=timeout, group=group)
    step = {"n": 0}
    if rank == victim:
        first = next(iter(pipe.stages.values())).layers[0]

        def hook(*_: Any) -> None:
            if step["n"] == 1 and how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if step["n"] == 1 and how == "hang":
                time.sleep(3600)

        first.register_forward_hook(hook)
    for i in range(3):
        step["n"] = i
        pipe.step(torch.randn(8, 16), torch.randn(8, 16))
    return "finished"


def bad_boundary() -> str:
    """Stage 1's first layer expects 8 features but stage 0 produces 16."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(8, 4))
    pipe = layerwise.Pipeline(model, microbatches=2, loss_fn=F.mse_loss, timeout=20)
    pipe.step(torch.randn(4, 16), torch.randn(4, 4))
    return "finished"


def make_pipeline(kwargs: dict[str, Any]) -> str:
    model = mlp(width=8, depth=kwargs.pop("depth", 4))
    layerwise.Pipeline(model, loss_fn=F.mse_loss, timeout=20, **kwargs)
    return "built"


def _transport(kind: str) -> Any:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    return shm.make_transport(kind, None, lambda r: f"rank {r}", torch.device("cpu"), [shm.Channel(0, 1, 0)], 60.0)


def shm_messages(sizes: list[int]) -> dict[str, Any]:
    """Rank 0 sends one message per size on one channel (one-ahead receives, as the executor
    posts them), rank 1 checks every byte; every third message both meet at a barrier, so the
    sender's slots can be reused. Returns the slots rank 0 made and rank 1's checks."""
    from layerwise.runtime.wire import Structure

    t = _transport("shm")
    rank, out = dist.get_rank(), {"ok": [], "slots": 0, "prefix": t.prefix}
    data = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]
    if rank == 0:
        for i, x in enumerate(data):
            t.send([x], Structure(0), 1, tag=i, channel=0)
            if i % 3 == 2:  # now and then the receiver catches up before the next send
                dist.barrier()
        t.flush()
        out["slots"] = len(t._rings[0].slots)
        out["sizes"] = [s.size for s in t._rings[0].slots]
    else:
        posted = t.post_recv(0, 0, 0)
        for i, x in enumerate(data):
            (got,), _ = t.wait_recv(posted)
            if i + 1 < len(data):
                posted = t.post_recv(0, i + 1, 0)
            out["ok"].append(bool(torch.equal(got, x)))
            if i % 3 == 2:
                dist.barrier()
    dist.barrier()
    return out


def _refused(t: Any, send: Any) -> str:
    """Rank 0 calls ``send()``; rank 1 receives one message on channel 0 (tag 0) and returns the
    ProtocolError it raised, or "accepted"."""
    if dist.get_rank() == 0:
        send()
        dist.barrier()
        return "sent"
    try:
        t.wait_recv(t.post_recv(0, 0, 0))
    except layerwise.runtime.errors.ProtocolError as e:
        return str(e)
    finally:
        dist.barrier()
    return "accepted"


def garbage_header(kind: str) -> str:
    """Rank 0 sends a header with a wrong magic number; rank 1 receives it over ``kind``."""
    t = _transport(kind)
    header = torch.randint(0, 1000, (256,), dtype=torch.int64)

    def send() -> None:
        if kind == "dist":  # its receiver posted the header and an (empty) payload buffer
            dist.send(header, 1, tag=0)
            dist.send(torch.empty(0, dtype=torch.uint8), 1, tag=1)
        else:
            t._write(t._head_out[0], header.numpy().tobytes(), 1)

    return _refused(t, send)


def shm_garbage_route() -> str:
    """Rank 0 sends a valid header whose shared-memory route names a slot that does not exist."""
    from layerwise.runtime.wire import ROUTE, encode, flatten

    t = _transport("shm")
    header, _ = encode(*flatten(torch.randn(4)))
    header[ROUTE:] = torch.tensor([7, 3, 1 << 16, 0])
    return _refused(t, lambda: t._write(t._head_out[0], header.numpy().tobytes(), 1))


def pipeline_prefix() -> str | None:
    """Train two steps; return the shared-memory slots' path prefix."""
    torch.manual_seed(0)
    pipe = layerwise.Pipeline(mlp(width=16, depth=4), microbatches=4, loss_fn=F.mse_loss, timeout=30)
    for _ in range(2):
        pipe.step(torch.randn(8, 16), torch.randn(8, 16))
    return getattr(pipe.transport, "prefix", None)


def shm_wrong_tag() -> str:
    """Rank 0 sends microbatch 5's message where rank 1's schedule expects microbatch 0's."""
    from layerwise.runtime.wire import flatten

    t = _transport("shm")
    return _refused(t, lambda: t.send(*flatten(torch.randn(4)), 1, tag=5, channel=0))

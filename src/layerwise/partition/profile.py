"""Measure or estimate :class:`LayerCost` for a sequence of torch modules.

Convention: the layers run in order, each called as ``layer(x)`` with one argument, the previous
layer's output (a tensor, or a tuple/list/dict of tensors passed as one object); the first
layer gets ``sample``. Floating-point inputs are made to require grad, as they do inside a
pipeline where every stage but the first receives an activation; integer inputs (token ids) do
not.

Memory is counted the same way by both functions:

* ``param_bytes``: parameters and buffers. A tensor shared by several layers (tied embeddings:
  the same ``Parameter`` object in two modules) is counted once in total, in the first layer that
  holds it, like the stage that owns it in a pipeline.
* ``grad_bytes``: trainable parameters; ``optimizer_bytes = optimizer_state_factor * grad_bytes``
  (2.0 for Adam's two moments).
* ``activation_bytes``: storage of the tensors autograd saves for backward in one chained forward
  pass, found with ``torch.autograd.graph.saved_tensors_hooks``. A storage is counted once, in the
  first layer that saves it (ReLU's saved output is the next Linear's saved input), and parameter
  or buffer storages are not activations. At a stage boundary the receiving stage also holds its
  own copy of the input, which this per-layer count leaves out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._tree import describe, map_tensors, synchronize, tensors
from .costs import LayerCost

__all__ = ["ProfileError", "estimate_layers", "profile_layers", "profile_optimizer"]


class ProfileError(RuntimeError):
    """A layer failed while being profiled; the message names its index, class and input."""


def profile_layers(
    layers: Sequence[torch.nn.Module],
    sample: Any,
    *,
    repeats: int = 5,
    warmup: int = 2,
    optimizer_state_factor: float = 2.0,
    statistic: Literal["median", "mean"] = "median",
) -> list[LayerCost]:
    """Time each layer's forward and backward on its real input; measure its memory.

    The layers are timed in a chain, as a pipeline stage runs them: each run is the forward of
    all layers back to back, then one backward through all of them (the last layer's outputs get
    random gradients of their shape), with the clock read at every layer boundary. A layer's
    time is the median over ``repeats`` runs after ``warmup`` untimed ones (``time.perf_counter``,
    synchronising CUDA at each boundary). Timing a layer alone in a tight loop on the same input
    flattered it (hot caches): stages then ran 1.2-1.3x their profile.

    ``statistic="mean"`` gives the mean of the runs instead. The median is robust, which is what
    choosing a split needs (relative costs); but a pipeline pays every run's time, slow ones
    included, so a step time predicted from medians is short by the skew of the run times: on a
    shared 2-vCPU machine a stage's mean run was 0.8-1.6% above its layers' medians summed in the
    median step, up to 8% in single steps (``bench/balance_skew.py``).
    Gradients already in ``.grad`` and buffers (e.g. BatchNorm running statistics) are restored
    afterwards. Memory is counted as in the module docstring.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    mods = list(layers)
    trace = _trace(mods, sample, count_flops=False)
    statics = _static_bytes(mods, optimizer_state_factor)
    with _restored(mods), torch.enable_grad():
        runs = _chain_times(mods, sample, repeats, warmup)
    reduce = _STATISTICS[statistic]
    times = [(reduce([f for f, _ in ts]), reduce([b for _, b in ts])) for ts in runs]
    return [_cost(f, b, statics[k], trace.activations[k]) for k, (f, b) in enumerate(times)]


def profile_optimizer(
    layers: Sequence[torch.nn.Module],
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    repeats: int = 5,
    warmup: int = 2,
) -> list[float]:
    """Seconds of one ``optimizer(params).step()`` per layer on its trainable parameters (median).

    Each rank steps its stage's optimizer once per step, after its last backward. A tied
    parameter counts in the first layer holding it; a layer without one costs 0. Each layer gets
    its own optimizer (one call's fixed overhead each). Parameters and ``.grad`` are restored.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    mods = list(layers)
    seen: set[int] = set()
    out = []
    with _restored(mods):
        for layer in mods:
            params = [p for p in layer.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if not params:
                out.append(0.0)
                continue
            values = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.randn_like(p)
            opt, runs = optimizer(params), []
            for _ in range(warmup + repeats):
                start = time.perf_counter()
                opt.step()
                synchronize(params)
                runs.append(time.perf_counter() - start)
            out.append(statistics.median(runs[warmup:]))
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
    return out


def estimate_layers(
    layers: Sequence[torch.nn.Module],
    sample: Any,
    *,
    flops_per_second: float = 1e11,
    backward_factor: float = 2.0,
    optimizer_state_factor: float = 2.0,
) -> list[LayerCost]:
    """A cost model that needs no timing: forward FLOPs / ``flops_per_second``.

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and
    convolutions; element-wise layers (activations, norms) cost 0 here. Backward takes
    ``backward_factor`` times the forward (2: one product for the input gradient, one for the
    weight gradient). Runs one forward pass, so it also works with layers and ``sample`` on the
    ``meta`` device, for models too large to materialise.
    """
    if not flops_per_second > 0 or backward_factor < 0:
        raise ValueError(
            f"need flops_per_second > 0 and backward_factor >= 0, got {flops_per_second}, {backward_factor}"
        )
    mods = list(layers)
    trace = _trace(mods, sample, count_flops=True)
    statics = _static_bytes(mods, optimizer_state_factor)
    out = []
    for k in range(len(mods)):
        fwd = trace.flops[k] / flops_per_second
        out.append(_cost(fwd, backward_factor * fwd, statics[k], trace.activations[k]))
    return out


def _cost(fwd: float, bwd: float, static: tuple[int, int, float], saved: int) -> LayerCost:
    params, grads, optimizer = static
    return LayerCost(
        forward_s=fwd,
        backward_s=bwd,
        param_bytes=params,
        grad_bytes=grads,
        optimizer_bytes=optimizer,
        activation_bytes=saved,
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _static_bytes(layers: list[torch.nn.Module], factor: float) -> list[tuple[int, int, float]]:
    """Per layer ``(param_bytes, grad_bytes, optimizer_bytes)``, each shared tensor counted once."""
    if factor < 0:
        raise ValueError(f"optimizer_state_factor must be >= 0, got {factor}")
    seen: set[int] = set()  # id() of tensors already owned by an earlier layer
    out = []
    for layer in layers:
        params = grads = 0
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            params += _nbytes(tensor)
            if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                grads += _nbytes(tensor)
        out.append((params, grads, factor * grads))
    return out


class _Trace:
    """What one chained forward pass learned: each layer's saved bytes and FLOPs."""

    def __init__(self) -> None:
        self.activations: list[int] = []
        self.flops: list[int] = []


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identify the memory behind ``t`` so views and aliases of one buffer count once."""
    if t.is_meta:
        base = t._base if t._base is not None else t  # meta tensors have no addresses
        return ("meta", id(base))
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return ("object", id(t))


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return _nbytes(t)


def _trace(layers: list[torch.nn.Module], sample: Any, *, count_flops: bool) -> _Trace:
    owned = [t for layer in layers for t in [*layer.parameters(), *layer.buffers()]]
    seen = {_storage_key(t) for t in owned}
    trace = _Trace()
    held = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal held
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            held += _storage_bytes(t)
        return t

    x = map_tensors(_fresh, sample)
    # The graph of the whole chain stays alive until the loop ends, so storages are not freed and
    # reused under a new tensor, and a storage saved by two layers is recognised as the same.
    with torch.enable_grad(), _restored(layers):
        for k, layer in enumerate(layers):
            held = 0
            counter = FlopCounterMode(display=False) if count_flops else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if counter is not None:
                    with counter:
                        y = _call(k, layer, x)
                else:
                    y = _call(k, layer, x)
            trace.activations.append(held)
            trace.flops.append(counter.get_total_flops() if counter is not None else 0)
            x = y
    return trace


def _call(k: int, layer: torch.nn.Module, x: Any, what: str = "forward") -> Any:
    try:
        return layer(x)
    except Exception as exc:
        raise ProfileError(
            f"{what} of layer {k} ({type(layer).__name__}) failed on input {describe(x)}: {exc}"
        ) from exc


_STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "mean": statistics.fmean}


def _chain_times(
    layers: list[torch.nn.Module], sample: Any, repeats: int, warmup: int
) -> list[list[tuple[float, float]]]:
    """Per layer, per timed run ``(forward_s, backward_s)``: ``repeats`` runs of the whole chain
    after ``warmup`` untimed ones (:func:`profile_layers` reduces them to one number per layer).

    Each run is what a pipeline stage does with one microbatch: the forward of every layer back
    to back, the clock read between layers, then one ``torch.autograd.backward`` through the
    whole chain. Layer ``k``'s backward ends when the gradient of its input is computed (a tensor
    hook reads the clock), and starts where layer ``k + 1``'s ended; the first layer's ends with
    the call. One graph, not a graph per layer on detached inputs: at a detached boundary the
    extra copies of a large tensor (a vocabulary's logits) cost the allocator time that a stage
    does not spend (the loss measured 1.6x its in-graph time).
    """
    n = len(layers)
    times: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    for run in range(warmup + repeats):
        forward, done = [0.0] * n, [0.0] * (n + 1)  # done[k]: clock when input k's grad was ready
        x = map_tensors(_fresh, sample)
        synchronize(x)
        for k, layer in enumerate(layers):
            if k > 0:
                for t in tensors(x):
                    if t.requires_grad:
                        t.register_hook(_stamp(done, k))
            start = time.perf_counter()
            x = _call(k, layer, x)
            synchronize(x)
            forward[k] = time.perf_counter() - start
        roots = [t for t in tensors(x) if t.requires_grad]
        grads = [torch.randn_like(t) for t in roots]  # drawn before the clock starts
        done[n] = time.perf_counter()
        if roots:
            try:
                torch.autograd.backward(roots, grads)
            except Exception as exc:
                k = next((j - 1 for j in range(1, n + 1) if done[j]), n - 1)  # below the lowest stamp
                raise ProfileError(f"backward of layer {k} ({type(layers[k]).__name__}) failed: {exc}") from exc
        done[0] = time.perf_counter()
        synchronize(x)
        for k in range(1, n):  # no stamp: no gradient reached that input, nothing before it ran
            done[k] = done[k] or done[0]
        for k in range(n if run >= warmup else 0):
            times[k].append((forward[k], max(0.0, done[k] - done[k + 1])))
    return times


def _stamp(done: list[float], k: int) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        synchronize(grad)
        done[k] = max(done[k], time.perf_counter())

    return hook


class _restored:
    """Context manager: put back ``.grad`` and buffer values changed by profiling runs."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self._params = [p for layer in layers for p in layer.parameters()]
        self._buffers = [b for layer in layers for b in layer.buffers()]

    def __enter__(self) -> None:
        self._grads = [p.grad for p in self._params]
        self._values = [b.detach().clone() for b in self._buffers]

    def __exit__(self, *exc: object) -> None:
        for p, g in zip(self._params, self._grads):
            p.grad = g
        with torch.no_grad():
            for b, v in zip(self._buffers, self._values):
                b.copy_(v)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A private copy of an input; floating point ones require grad like a received activation.

    The copy is a clone of a leaf rather than the leaf itself, so a layer that works in place
    (``ReLU(inplace=True)``) neither fails on a leaf nor overwrites the stored input.
    """
    leaf = t.detach()
    if leaf.is_floating_point() or leaf.is_complex():
        leaf.requires_grad_(True)
    return leaf.clone()

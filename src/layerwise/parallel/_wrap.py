"""Wrap a layer's forward in place, so its parameter names (state_dict keys) stay unchanged.

The memory tools (precision, activation offload, activation checkpointing) each change how a
layer's forward runs, not what it computes. Wrapping the layer in a new module would prefix every
parameter name (``block.qkv.weight`` -> ``block._inner.qkv.weight``) and break checkpoints and the
reference comparisons, so instead the instance's ``forward`` is replaced by a bound method that
runs the tools around the original. Each tool is a tag with plain data (its mode), kept in the
layer's ``__dict__``; applying a tool again replaces its entry, ``None`` removes it, and the
original forward is restored when no tool is left. Because the entries are data and the wrapper
is a bound method, ``copy.deepcopy`` of a wrapped layer wraps the copy, not the original.

The tools nest in one fixed order whatever order they were applied in, outermost first:
precision (autocast must also cover the recomputation, which checkpoint replays with the autocast
state it recorded), offload (its saved-tensor hooks must sit outside checkpoint's: hooks nest and
the innermost wins, so inside they would take over the tensors checkpoint means to drop), then
checkpoint around the original forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

ORDER = ("precision", "offload", "checkpoint")  # outermost first

# tag -> run(layer, spec, call, args, kwargs): runs ``call(*args, **kwargs)`` under the tool
Runner = Callable[[nn.Module, Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
_RUNNERS: dict[str, Runner] = {}

_SPECS = "_layerwise_tools"  # {tag: spec} in the layer's __dict__
_BASE = "_layerwise_base_forward"  # a forward the user had set on the instance before, or None


def register(tag: str, runner: Runner) -> None:
    """Called once by each tool's module at import."""
    if tag not in ORDER:
        raise ValueError(f"unknown tool tag {tag!r}; known: {ORDER}")
    _RUNNERS[tag] = runner


def set_tool(layer: nn.Module, tag: str, spec: Any) -> None:
    """Run ``layer``'s forward under tool ``tag`` configured by ``spec``; ``None`` removes it."""
    specs: dict[str, Any] = layer.__dict__.get(_SPECS, {})
    if not specs and spec is None:
        return
    if not specs:  # first tool on this layer: remember a forward set on the instance, if any
        layer.__dict__[_BASE] = layer.__dict__.get("forward")
    specs = dict(specs)
    if spec is None:
        specs.pop(tag, None)
    else:
        specs[tag] = spec
    if specs:
        layer.__dict__[_SPECS] = specs
        layer.__dict__["forward"] = types.MethodType(_wrapped_forward, layer)
    else:  # no tool left: the layer is exactly as before
        base = layer.__dict__.pop(_BASE, None)
        layer.__dict__.pop(_SPECS, None)
        layer.__dict__.pop("forward", None)
        if base is not None:
            layer.__dict__["forward"] = base


def tools(layer: nn.Module) -> dict[str, Any]:
    """The tools applied to ``layer``: {tag: spec}."""
    return dict(layer.__dict__.get(_SPECS, {}))


def original_forward(layer: nn.Module) -> Callable[..., Any]:
    """The forward the tools wrap (the class's, or one the user set on the instance)."""
    if _SPECS not in layer.__dict__:
        return layer.forward
    base = layer.__dict__.get(_BASE)
    if base is not None:
        return base  # type: ignore[no-any-return]
    return types.MethodType(type(layer).forward, layer)


def _wrapped_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    specs: dict[str, Any] = self.__dict__[_SPECS]
    call = original_forward(self)
    for tag in reversed(ORDER):  # build inside out: checkpoint first, precision last
        if tag in specs:
            call = _bind(_RUNNERS[tag], self, specs[tag], call)
    return call(*args, **kwargs)


def _bind(runner: Runner, layer: nn.Module, spec: Any, call: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return runner(layer, spec, call, args, kwargs)

    return run

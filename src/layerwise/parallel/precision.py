"""Mixed precision: compute in bf16, keep fp32 master weights and fp32 gradients.

``apply_precision(layers, "bf16")`` runs each layer's forward under
``torch.autocast(device_type, dtype=torch.bfloat16)`` (Micikevicius et al., 2018, "Mixed Precision
Training", with bf16 instead of fp16, so no loss scaling is needed: bf16 has fp32's exponent
range). The parameters stay fp32 (the optimizer updates fp32 master weights), autocast casts them
to bf16 for the matmuls and attention, and the backward of that cast hands fp32 gradients to the
fp32 parameters. Any gradient reduction (DDP, FSDP, tied weights) therefore runs in fp32, which
is also the only choice on CPU: gloo has no bf16 reductions.

Each layer's floating outputs that autocast left in bf16 are cast back to fp32, so the tensors
between layers, and between pipeline stages on the wire, are fp32, as are their gradients and the
loss. (Sending bf16 would halve the traffic but round every boundary gradient to 8 bits.)

Tolerance used by the tests against fp32. bf16 keeps 8 significant bits (7 stored + 1 implicit),
so each rounding has a relative error of up to 2^-8 ~ 3.9e-3. A forward and backward through a
few transformer blocks compounds a few dozen such roundings, mostly averaging out: on the tests'
small models each gradient tensor differs from fp32 by 0.2% to 1.1% (L2 norm of the difference
over the L2 norm of the fp32 gradient, 3 seeds each), i.e. 0.5 to 3 x 2^-8. The tests accept 3e-2
per gradient tensor (about 8 x 2^-8, so about 3x the largest error seen) and 1e-2 relative on the
loss, and require a nonzero difference: they catch a wrong gradient (an error of order 1) and bf16
that silently did not happen (no difference at all). Over many optimizer steps the trajectories
drift apart further; compare bf16 runs to fp32 after one step, or to each other.

On a GPU with FSDP2, pass :func:`fsdp_mixed_precision` to ``fully_shard`` as well: FSDP then
all-gathers the parameters already in bf16 (half the traffic) and reduce-scatters gradients in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..runtime.errors import ConfigError
from . import _wrap

PRECISIONS = ("fp32", "bf16")

# bf16 against fp32, as argued in the module docstring: use these in every bf16 comparison
BF16_LOSS_RTOL = 1e-2  # |loss_bf16 - loss_fp32| / |loss_fp32|
BF16_GRAD_RTOL = 3e-2  # ||g_bf16 - g_fp32|| / ||g_fp32||, per gradient tensor


def _device_type(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Where the layer computes: its parameters' device, else its first tensor input's."""
    for p in layer.parameters():
        return p.device.type
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def _to_fp32(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t


def _run(layer: nn.Module, precision: str, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.autocast(_device_type(layer, args, kwargs), dtype=torch.bfloat16):
        out = call(*args, **kwargs)
    return tree_map(_to_fp32, out)  # tuples, lists, dicts of tensors keep their structure


_wrap.register("precision", _run)


def apply_precision(layers: Sequence[nn.Module], precision: str = "fp32") -> None:
    """Compute ``layers`` in ``precision`` (``"fp32"``, or ``"bf16"`` with fp32 master weights) in place.

    ``"fp32"`` removes an earlier ``apply_precision``. Parameter names and dtypes do not change.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    for layer in layers:
        _wrap.set_tool(layer, "precision", precision if precision == "bf16" else None)


def fsdp_mixed_precision(precision: str, device: torch.device | str) -> Any:
    """The ``MixedPrecisionPolicy`` for FSDP2's ``fully_shard``, or ``None`` for none.

    bf16 on a GPU: parameters all-gathered in bf16, gradients reduced in fp32. On the CPU (gloo,
    which has no bf16 reductions) and for fp32: ``None``; the layers' autocast does the bf16
    compute there.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or torch.device(device).type == "cpu":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

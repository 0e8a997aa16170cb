"""layerwise: train networks too large for one device by splitting them across devices."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_RUNTIME = {"LayeredModel", "launch", "run", "LaunchError", "PipelineError", "ConfigError", "StageError", "PeerLostError"}

_HF = {"from_hf": "hf", "save_hf": "hf_weights", "causal_lm_loss": "hf_loss", "causal_lm_targets": "hf_loss"}

__all__ = sorted(_RUNTIME | set(_HF) | {"Pipeline", "partition"})


def __getattr__(name: str) -> Any:
    # The runtime needs torch; the schedule and partition solvers do not. Import it on first use
    # so that `layerwise simulate` and the pure packages start fast and without torch.
    if name == "Pipeline":  # the runtime's pipeline on a dp x pp x tp mesh
        from .parallel.pipeline import Pipeline

        return Pipeline
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    if name in _HF:  # transformers is imported only when a HuggingFace model is used
        import importlib

        return getattr(importlib.import_module(f".models.{_HF[name]}", __name__), name)
    if name == "partition":  # the package, callable as layerwise.partition(model, stages, ...)
        import importlib

        return importlib.import_module(".partition", __name__)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")

"""Runtime: run a schedule's actions for one rank over a transport."""

from .errors import ConfigError, PeerLostError, PipelineError, ProtocolError, StageError
from .launch import LaunchError, launch, run
from .pipeline import Pipeline
from .split import LayeredModel

__all__ = [
    "ConfigError", "LaunchError", "LayeredModel", "PeerLostError", "Pipeline", "PipelineError",
    "ProtocolError", "StageError", "launch", "run",
]  # fmt: skip

"""Errors the runtime raises: each names the rank, stage, microbatch or layer, and what to do."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """Base class of the runtime's errors."""


class ConfigError(PipelineError, ValueError):
    """The model, partition, schedule or world size do not fit together."""


class StageError(PipelineError):
    """A stage failed while running one of its actions."""


class PeerLostError(PipelineError):
    """A peer rank stopped answering: it died, raised, or hung past the timeout."""


class ProtocolError(PipelineError):
    """A peer sent something that is not a valid layerwise message."""

"""Parallelism beyond the pipeline: the dp x pp x tp mesh, FSDP2 / DDP, tensor parallelism, the
memory tools (activation checkpointing, mixed precision, offload) and meta-device builds, each
applied to a rank's layers in its own small ``apply_*`` step, given only its own sub-mesh."""

"""Parallelisms applied to pipeline layers, each given only its own sub-mesh: data (DDP/FSDP), tensor, sequence."""

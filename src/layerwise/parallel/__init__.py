"""Parallelism and memory tools applied to a model's pipeline layers in separate ``apply_*`` steps."""

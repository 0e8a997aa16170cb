"""Small reference models used by the demo, the tests and the benchmarks."""

from .gpt import GPT, GPTConfig, lm_loss
from .mlp import mlp

__all__ = ["GPT", "GPTConfig", "lm_loss", "mlp"]

"""The driving side of the swarm (like Petals' client/): owns data and loss, assigns spans, runs steps."""

from .trainer import Trainer, TrainerOptions

__all__ = ["Trainer", "TrainerOptions"]

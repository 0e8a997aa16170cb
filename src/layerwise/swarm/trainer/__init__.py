"""The driving side of the swarm (like Petals' client/): owns data and loss, assigns spans, runs steps."""

from .options import TrainerOptions
from .trainer import Trainer

__all__ = ["Trainer", "TrainerOptions"]

"""Pipeline schedules as data (pure Python, no torch)."""

from .actions import Action, Kind, TimedAction, format_actions, parse_actions
from .core import Schedule

__all__ = ["Action", "Kind", "Schedule", "TimedAction", "format_actions", "parse_actions"]

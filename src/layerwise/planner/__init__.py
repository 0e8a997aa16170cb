"""Choose a parallel strategy for a model and a cluster (pure Python, no torch).

    model = load_hf_config("llama-70b.json")                       # or ModelSpec(layers=..., ...)
    cluster = Cluster.uniform(devices=64, devices_per_node=8, memory_gib=80, tflops=989)
    result = plan(model, cluster, global_batch=512)                # best first
    result.best.strategy, result.best.step_time, result.best.memory

:func:`estimate` prices one :class:`Strategy`: memory per device (ZeRO's model states,
Korthikanti et al.'s activations times the microbatches each stage holds under its schedule) and
time per step (FLOPs, tensor-parallel all-reduces, pipeline transfers, data-parallel collectives
and the bubble from a replay of the schedule).
"""

from .cluster import DEFAULT_EFFICIENCY, Cluster, ClusterError, DeviceGroup, load_groups
from .estimate import Estimate, estimate
from .memory import PRECISIONS, Precision, model_states
from .model import ModelSpec, ModelSpecError, from_hf_config, load_hf_config
from .search import Pins, PlanResult, plan
from .strategy import Strategy, StrategyError

__all__ = [
    "DEFAULT_EFFICIENCY",
    "PRECISIONS",
    "Cluster",
    "ClusterError",
    "DeviceGroup",
    "Estimate",
    "ModelSpec",
    "ModelSpecError",
    "Pins",
    "PlanResult",
    "Precision",
    "Strategy",
    "StrategyError",
    "estimate",
    "from_hf_config",
    "load_groups",
    "load_hf_config",
    "model_states",
    "plan",
]

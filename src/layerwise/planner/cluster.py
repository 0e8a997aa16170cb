"""The cluster as numbers: devices, their speed and memory, and the links between them.

Collective costs use the ring algorithm's volume (Patarasuk and Yuan, 2009; the alpha-beta model
of Thakur et al., 2005): an all-reduce of ``n`` bytes over ``k`` ranks moves ``2 (k - 1) / k * n``
bytes through each rank's link in ``2 (k - 1)`` steps; an all-gather or a reduce-scatter moves half
of that. A ring runs at the speed of the slowest link it crosses.

The runtime issues some collectives through software that adds its own cost per call: FSDP2's
hooks and buffer copies around each unit's all-gather and reduce-scatter, DTensor's around a
tensor-parallel all-reduce. A :class:`CallCost` prices such calls with their own latency and
bandwidth, measured on the runtime's calls (``bench/planner.py`` does); without one, a call costs
what the link does (on GPUs the copies run at memory speed and the hooks ahead of the device).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30

# Default achievable fraction of peak for a transformer layer's matrix multiplies. Calibrated on
# the smallest row of Narayanan et al. (2021) Table 1 (1.7B parameters, 32 A100s, 137 TFLOP/s
# per GPU measured, 44% of peak): with every communication (the data-parallel all-reduce after
# the backward, as Megatron-LM did then), the optimizer step and the bubble modelled, the
# compute has to run at this fraction of the 312 TFLOP/s peak for the planner to predict that
# row (bisection: 0.479). See bench/README.md, section planner.
DEFAULT_EFFICIENCY = 0.48


class ClusterError(ValueError):
    """A cluster description is inconsistent."""


@dataclass(frozen=True, kw_only=True)
class CallCost:
    """Latency (seconds per ring step) and bandwidth (bytes/s) of one kind of collective call as
    the runtime issues it, software included."""

    latency: float
    bandwidth: float

    def __post_init__(self) -> None:
        for what in ("latency", "bandwidth"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ClusterError(f"call cost {what} must be a number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DeviceGroup:
    """Devices of one kind. Pipeline stages are laid out over the groups in order."""

    name: str
    count: int
    memory_bytes: float
    tflops: float  # peak dense TFLOP/s at the training precision
    efficiency: float = DEFAULT_EFFICIENCY  # achievable fraction of tflops

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ClusterError(f"device group {self.name!r}: count must be a whole number >= 1, got {self.count!r}")
        for what in ("memory_bytes", "tflops"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ClusterError(f"device group {self.name!r}: {what} must be a number > 0, got {value!r}")
        if not 0 < self.efficiency <= 1:
            raise ClusterError(f"device group {self.name!r}: efficiency must be in (0, 1], got {self.efficiency!r}")

    @property
    def flops(self) -> float:
        """Achievable FLOP/s of one device."""
        return self.tflops * 1e12 * self.efficiency


@dataclass(frozen=True, kw_only=True)
class Cluster:
    groups: tuple[DeviceGroup, ...]
    devices_per_node: int
    intra_node_bw: float  # bytes/s per device, e.g. NVLink
    inter_node_bw: float  # bytes/s per device, e.g. one InfiniBand NIC per GPU
    latency: float = 5e-6  # seconds per message (alpha); one hop of a ring step
    host_bw: float = 25e9  # bytes/s device <-> host (PCIe 4 x16), for offload
    host_adam_params_per_s: float = 2e9  # CPU Adam updates per second per device (offload)
    memory_reserve: float = 0.1  # fraction of device memory kept for the framework and fragmentation
    # Optimizer updates per second per device: Adam reads and writes about 32 bytes per parameter
    # (fp32 master weight, two moments, gradient), so ~2 TB/s of HBM gives ~6e10.
    optimizer_params_per_s: float = 6e10
    # Whether communication runs while the device computes (GPUs: NCCL on its own streams, FSDP2
    # prefetching one unit ahead). False where the processes' collectives take the cores their
    # compute needs (CPU processes, one per core).
    overlap: bool = True
    tp_call: CallCost | None = None  # tensor-parallel all-reduces (DTensor)
    fsdp_call: CallCost | None = None  # FSDP2 units' all-gathers and reduce-scatters
    ddp_call: CallCost | None = None  # replicated units' all-reduces

    def __post_init__(self) -> None:
        if not self.groups:
            raise ClusterError("a cluster needs at least one device group")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ClusterError(f"devices per node must be a whole number >= 1, got {self.devices_per_node!r}")
        for what in ("intra_node_bw", "inter_node_bw", "host_bw", "host_adam_params_per_s", "optimizer_params_per_s"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ClusterError(f"{what} must be a number > 0, got {value!r}")
        if not 0 <= self.memory_reserve < 1:
            raise ClusterError(f"memory_reserve must be in [0, 1), got {self.memory_reserve!r}")

    @classmethod
    def uniform(cls, *, devices: int, devices_per_node: int, memory_gib: float, tflops: float,
                efficiency: float = DEFAULT_EFFICIENCY, intra_node_gbps: float = 300.0,
                inter_node_gbps: float = 25.0, **kw: Any) -> Cluster:
        """``--devices N`` devices alike. Bandwidths in GB/s per device (defaults: A100 NVLink 3's
        300 GB/s one way; one 200 Gb/s HDR InfiniBand NIC per GPU, 25 GB/s)."""
        group = DeviceGroup(name="device", count=devices, memory_bytes=memory_gib * GIB, tflops=tflops,
                            efficiency=efficiency)
        return cls(groups=(group,), devices_per_node=devices_per_node, intra_node_bw=intra_node_gbps * 1e9,
                   inter_node_bw=inter_node_gbps * 1e9, **kw)

    @property
    def devices(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def homogeneous(self) -> bool:
        first = self.groups[0]
        return all(g.memory_bytes == first.memory_bytes and g.flops == first.flops for g in self.groups)

    def group_of(self, device: int) -> DeviceGroup:
        """The group of global device index ``device`` (groups fill the index range in order)."""
        for g in self.groups:
            if device < g.count:
                return g
            device -= g.count
        raise IndexError(device)

    def bandwidth(self, span: int) -> float:
        """Per-device bandwidth of a group of devices that spans ``span`` consecutive indices:
        inside one node when the span fits in a node (groups are aligned to their span)."""
        return self.intra_node_bw if span <= self.devices_per_node else self.inter_node_bw

    # --- collectives (ring) ------------------------------------------------------------------

    def _cost(self, bw: float, call: CallCost | None) -> tuple[float, float]:
        if call is None:
            return self.latency, bw
        return call.latency, min(bw, call.bandwidth)

    def all_reduce(self, nbytes: float, ranks: int, bw: float, call: CallCost | None = None, calls: int = 1) -> float:
        """``calls`` all-reduces of ``nbytes`` in total (the latency is paid per call)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        alpha, bw = self._cost(bw, call)
        return calls * 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes / bw

    def all_gather(self, nbytes: float, ranks: int, bw: float, call: CallCost | None = None, calls: int = 1) -> float:
        """Gather (or reduce-scatter) ``nbytes`` in total, ``nbytes / ranks`` from each rank, in
        ``calls`` calls."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        alpha, bw = self._cost(bw, call)
        return calls * (ranks - 1) * alpha + (ranks - 1) / ranks * nbytes / bw

    def p2p(self, nbytes: float, bw: float) -> float:
        return self.latency + nbytes / bw


def load_groups(path: str | Path, **kw: Any) -> Cluster:
    """A cluster from a JSON file of device groups that differ::

        {"devices_per_node": 8, "intra_node_gbps": 300, "inter_node_gbps": 25,
         "groups": [{"name": "a100", "count": 32, "memory_gib": 80, "tflops": 312},
                    {"name": "v100", "count": 32, "memory_gib": 32, "tflops": 125,
                     "efficiency": 0.4}]}
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as err:
        raise ClusterError(f"cannot read --device-groups {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ClusterError(f"--device-groups {path} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list) or not data["groups"]:
        raise ClusterError(f"--device-groups {path} must hold an object with a non-empty 'groups' list")
    eff = kw.pop("efficiency", DEFAULT_EFFICIENCY)
    groups = []
    for k, g in enumerate(data["groups"]):
        if not isinstance(g, dict):
            raise ClusterError(f"--device-groups {path}: group {k} must be an object")
        unknown = set(g) - {"name", "count", "memory_gib", "tflops", "efficiency"}
        if unknown or not {"count", "memory_gib", "tflops"} <= set(g):
            raise ClusterError(
                f"--device-groups {path}: group {k} needs count, memory_gib and tflops (and optionally "
                f"name, efficiency); got {sorted(g)}"
            )
        try:
            groups.append(DeviceGroup(
                name=str(g.get("name", f"group{k}")), count=g["count"], memory_bytes=float(g["memory_gib"]) * GIB,
                tflops=float(g["tflops"]), efficiency=float(g.get("efficiency", eff)),
            ))  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ClusterError(f"--device-groups {path}: group {k}: {err}") from None
    try:
        return Cluster(
            groups=tuple(groups),
            devices_per_node=int(data.get("devices_per_node", kw.pop("devices_per_node", 8))),
            intra_node_bw=float(data.get("intra_node_gbps", kw.pop("intra_node_gbps", 300.0))) * 1e9,
            inter_node_bw=float(data.get("inter_node_gbps", kw.pop("inter_node_gbps", 25.0))) * 1e9,
            **{k: v for k, v in kw.items() if k not in ("devices_per_node", "intra_node_gbps", "inter_node_gbps")},
        )
    except (TypeError, ValueError) as err:
        raise ClusterError(f"--device-groups {path}: {err}") from None

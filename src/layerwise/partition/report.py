"""What :func:`layerwise.partition` returns, a :class:`Plan`, and its text table and bar chart.

Pure Python; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .costs import Device

_MIB = 1024.0**2


class Plan(list[int]):
    """Layers per stage, as ``Pipeline(partition=...)`` takes them, plus what was predicted.

    A plain ``list[int]`` to the runtime (``Plan == [3, 5]`` holds); the attributes describe each
    stage on its device. Times are seconds of one microbatch's forward + backward on the stage's
    device (its layers' times at speed 1 divided by the device speed); ``None`` where no time was
    measured (``balance="params"`` or ``"uniform"`` without ``sample`` or ``costs``).
    """

    def __init__(
        self,
        counts: Sequence[int],
        *,
        stage_times: list[float] | None,
        stage_memory: list[float],
        stage_params: list[int],
        stage_devices: list[Device],
        predicted_step_time: float | None,
        predicted_bubble: float | None,
        balance: str,
        devices: list[Device],
        schedule: str,
        microbatches: int,
        comm_latency: float = 0.0,
    ) -> None:
        super().__init__(counts)
        first = 0
        self.stage_layers: list[range] = []  # global layer indices of each stage
        for c in counts:
            self.stage_layers.append(range(first, first + c))
            first += c
        self.stage_times = stage_times  # seconds per microbatch on the stage's device
        self.stage_memory = stage_memory  # bytes at the schedule's peak: static + in-flight x saved
        self.stage_params = stage_params  # parameters (elements); a tied tensor counts once, first
        self.stage_devices = stage_devices  # the device (its rank's) each stage runs on
        self.predicted_step_time = predicted_step_time  # simulated makespan of one step, seconds
        self.predicted_bubble = predicted_bubble  # idle share of all ranks' time in it
        self.balance = balance  # the mode, or "given" for a partition passed as balance=[...]
        self.devices = devices  # one per pipeline rank
        self.schedule = schedule
        self.microbatches = microbatches
        self.comm_latency = comm_latency  # seconds per message in the simulation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the partition, one entry per stage, and the prediction."""
        stages = []
        for s, layers in enumerate(self.stage_layers):
            dev = self.stage_devices[s]
            stages.append({
                "stage": s,
                "device": dev.name,
                "speed": dev.speed,
                "memory_budget_bytes": dev.memory_bytes,
                "first_layer": layers.start,
                "last_layer": layers.stop - 1,
                "num_layers": len(layers),
                "params": self.stage_params[s],
                "time_s": None if self.stage_times is None else self.stage_times[s],
                "memory_bytes": self.stage_memory[s],
            })  # fmt: skip
        return {
            "partition": list(self),
            "balance": self.balance,
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "comm_latency_s": self.comm_latency,
            "devices": [{"name": d.name, "speed": d.speed, "memory_bytes": d.memory_bytes} for d in self.devices],
            "stages": stages,
            "predicted_step_time_s": self.predicted_step_time,
            "predicted_bubble": self.predicted_bubble,
        }


def _range(layers: range) -> str:
    return f"{layers.start}" if len(layers) == 1 else f"{layers.start}-{layers.stop - 1}"


def _params(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _num(x: float) -> str:
    """Three significant digits or more (1864, 97.1, 4.07, 0.0381): 0.0381 MiB must not read 0.00."""
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _mem_unit(values: Sequence[float]) -> tuple[float, str]:
    top = max(values, default=0.0)
    for name, scale in (("GiB", 1024.0**3), ("MiB", _MIB)):
        if top >= scale:
            return scale, name
    return 1024.0, "KiB"


def title(plan: Plan) -> str:
    ranks = len(plan.devices)
    depth = f"{ranks} ranks x {len(plan) // ranks} chunks" if len(plan) > ranks else f"{len(plan)} stages"
    return f"balance={plan.balance}: {depth}, {plan.schedule}, {plan.microbatches} microbatches"


def format_table(plan: Plan, *, layer_names: Sequence[str] | None = None) -> str:
    """One row per stage (device, layers, parameters, time per microbatch, peak memory), then the
    predicted step time and bubble. ``layer_names`` adds the first and last layer's names."""
    head = ["stage", "device", "layers", "#", "params", "time/mb (ms)", "memory (MiB)"]
    if layer_names is not None:
        head.append("from .. to")
    rows = [head]
    for s, layers in enumerate(plan.stage_layers):
        dev = plan.stage_devices[s]
        budget = "" if dev.memory_bytes is None else f"/{dev.memory_bytes / _MIB:.0f}"
        row = [
            str(s),
            f"{dev.name} x{dev.speed:g}",
            _range(layers),
            str(len(layers)),
            _params(plan.stage_params[s]),
            "-" if plan.stage_times is None else _num(1e3 * plan.stage_times[s]),
            _num(plan.stage_memory[s] / _MIB) + budget,
        ]
        if layer_names is not None:
            first, last = layer_names[layers.start], layer_names[layers.stop - 1]
            row.append(first if first == last else f"{first} .. {last}")
        rows.append(row)
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    numeric = {3, 4, 5, 6}
    lines = [title(plan)]
    for r in rows:
        cells = [c.rjust(w) if k in numeric else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append(f"  partition            {list(plan)}")
    if plan.predicted_step_time is None:
        lines.append("  predicted step time  - (no times: pass a sample or costs)")
    else:
        comm = f", comm latency {1e3 * plan.comm_latency:g} ms" if plan.comm_latency else ""
        lines.append(f"  predicted step time  {1e3 * plan.predicted_step_time:.2f} ms  (simulated {plan.schedule}{comm})")
        assert plan.predicted_bubble is not None
        lines.append(f"  predicted bubble     {100 * plan.predicted_bubble:.1f} %  (idle share of all ranks' time)")
    if any(d.memory_bytes is not None for d in plan.devices):
        lines.append("  memory is peak/budget")
    return "\n".join(lines)


def render_png(plan: Plan, path: str) -> None:
    """Bars per stage: time per microbatch (left axis) and peak memory (right axis), each
    labelled with its layer range and device; the budget, when set, as a tick on the memory bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plan)
    xs = list(range(n))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * n + 3), 5.0), dpi=120)
    mem_ax = ax.twinx()
    budgets = [d.memory_bytes for d in plan.stage_devices if d.memory_bytes is not None]
    scale, unit = _mem_unit([*plan.stage_memory, *budgets])
    times = [0.0] * n if plan.stage_times is None else [1e3 * t for t in plan.stage_times]
    mems = [m / scale for m in plan.stage_memory]
    t_bars = ax.bar([x - width / 2 for x in xs], times, width, color="#4878cf", label="time per microbatch (ms)")
    m_bars = mem_ax.bar([x + width / 2 for x in xs], mems, width, color="#e39b3c", label=f"peak memory ({unit})")
    handles: list[Any] = [t_bars, m_bars]
    budget_line = None
    for x, dev in zip(xs, plan.stage_devices):
        if dev.memory_bytes is not None:
            budget = dev.memory_bytes / scale
            (budget_line,) = mem_ax.plot([x, x + width], [budget, budget], color="#a0301c", linewidth=2,
                                         label=f"memory budget ({unit})")
    if budget_line is not None:
        handles.append(budget_line)
    if plan.stage_times is not None:
        ax.bar_label(t_bars, labels=[_num(t) for t in times], fontsize=8, padding=2)
        handles.append(ax.axhline(max(times), color="#4878cf", linestyle=":", linewidth=1,
                                  label="slowest stage (sets the pace)"))
    mem_ax.bar_label(m_bars, labels=[_num(m) for m in mems], fontsize=8, padding=2)
    labels = []
    for s, (layers, dev) in enumerate(zip(plan.stage_layers, plan.stage_devices)):
        labels.append(f"stage {s}\nlayers {_range(layers)}\n{dev.name} x{dev.speed:g}")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("time per microbatch (ms)", color="#2a4f8f")
    mem_ax.set_ylabel(f"peak memory ({unit})", color="#9a5d12")
    # Headroom for the value labels; the legend goes below the stage labels, clear of the bars.
    ax.set_ylim(0, 1.15 * max(times) if max(times) > 0 else 1)
    top = max([*mems, *(b / scale for b in budgets)])
    mem_ax.set_ylim(0, 1.15 * top if top > 0 else 1)
    fig.legend(handles, [str(h.get_label()) for h in handles], loc="lower center",
               ncol=len(handles) if n > 3 else 2, fontsize=8, frameon=False)
    if plan.predicted_step_time is None:
        sub = "no times measured"
    else:
        assert plan.predicted_bubble is not None
        sub = f"predicted step {1e3 * plan.predicted_step_time:.1f} ms, bubble {100 * plan.predicted_bubble:.0f}%"
    ax.set_title(f"{title(plan)}\npartition {list(plan)}: {sub}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if n > 3 else 0.1, 1, 1))
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)

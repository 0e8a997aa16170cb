"""How busy the whole machine is: the benchmarks' check that a timing measured the code, not a
neighbour (this machine is shared; a run during another process's burst is flagged, not trusted)."""

from __future__ import annotations

import math
import os
import resource
import time


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores, from /proc/stat
    (Linux only; NaN elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [float(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return math.nan, math.nan
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the launched ranks)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def foreign_cores(seconds: float) -> float:
    """Cores other processes on the machine kept busy over the next ``seconds``."""
    b0, o0, t0 = machine_cpu()[0], own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (machine_cpu()[0] - b0 - (own_cpu_s() - o0)) / (time.perf_counter() - t0))


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores; return the
    last reading."""
    deadline = time.monotonic() + max_wait
    load = foreign_cores(0.3)
    while load >= threshold and time.monotonic() < deadline:
        load = foreign_cores(0.5)
    return load

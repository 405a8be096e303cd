"""Budget clocks for training stages: wall time, or compute time on a shared machine.

``"wall"`` is ``time.perf_counter``. ``"cpu"`` counts the CPU time of this process and of its finished
children (the PAL sandbox runs programs in child processes), divided by the number of threads torch computes
with — i.e. *machine-seconds* of the cores the run is allowed to use. On an idle machine the two clocks
advance at about the same rate; on a machine shared with other jobs the CPU clock still measures the compute
the run actually received, so a "60-minute" budget buys the same work however busy the machine is (the
wall time it took is reported next to it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

CLOCKS = ("wall", "cpu")


def cpu_seconds() -> float:
    """CPU seconds (user + system, this process and its waited-for children) ÷ torch's thread count."""
    import torch

    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) / max(1, torch.get_num_threads())


def make_clock(kind: str = "wall") -> Callable[[], float]:
    if kind == "wall":
        return time.perf_counter
    if kind == "cpu":
        return cpu_seconds
    raise ValueError(f"unknown budget clock {kind!r}; use one of {', '.join(CLOCKS)}")

"""Side-by-side timing (standard library only): the engines being compared run in turn inside one loop, so each
sees the same machine state (thread pools spinning after a call, clocks, caches). Figures are ratios measured in
one run, never timings compared across runs."""
from __future__ import annotations

import time
from typing import Callable


def interleaved(calls: dict[str, Callable[[], object]], iters: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run every call once per round, in turn: ``warmup`` untimed rounds, then ``iters`` timed ones. Returns the
    milliseconds of each call per timed round, by name."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + iters):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times

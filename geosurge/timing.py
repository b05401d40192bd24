"""Side-by-side timing (standard library only): the engines being compared run in turn inside one loop, so each
sees the same machine state (thread pools spinning after a call, clocks, caches). Figures are ratios measured in
one run, never timings compared across runs."""
from __future__ import annotations

import time
from typing import Callable


def interleaved(calls: dict[str, Callable[[], object]], iters: int, warmup: int = 0, pause_ms: float = 0.0,
                results: dict[str, list] | None = None, order: list | None = None) -> dict[str, list[float]]:
    """Run every call once per round, in turn: ``warmup`` untimed rounds, then ``iters`` timed ones. Returns the
    milliseconds of each call per timed round, by name.

    ``pause_ms``: sleep this long before each call, untimed — a *paced* loop (a camera at 10 fps: 100 ms), in which
    idle thread pools have stopped spinning before the next call; 0 is back-to-back. ``results``: when given, the
    return value of each timed call is appended under its name. ``order``: when given, ``(round, name)`` of every
    call (warm-up included) is appended in the order the calls ran."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + iters):
        for name, call in calls.items():
            if pause_ms > 0:
                time.sleep(pause_ms / 1e3)
            t0 = time.perf_counter()
            out = call()
            dt = (time.perf_counter() - t0) * 1e3
            if order is not None:
                order.append((i, name))
            if i >= warmup:
                times[name].append(dt)
                if results is not None:
                    results.setdefault(name, []).append(out)
    return times

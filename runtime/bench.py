"""Runtime benchmark: latency per stage (decode, preprocess, inference, cell search, prediction) and end to end,
throughput, peak RSS and model size, on given images or the bundle's golden photos re-encoded as JPEG (no torch).
The loop is the benchmark library's (``geosurge.runtime.benchmark``), shared with ``geosurge benchmark``."""
from __future__ import annotations

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.images import list_images, load_image

from .golden import Golden
from .localizer import Localizer


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM (getrusage's ru_maxrss survives exec, so a child started
    from a large parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def bench_bundle(bundle_dir, backend: str | None = None, threads: int | None = None, images=None, iters: int = 50,
                 warmup: int = 5, pause_ms: float = 0.0) -> dict:
    """``iters`` timed ``locate`` calls after ``warmup`` untimed ones, cycling over the images, ``pause_ms`` before
    each (0: back-to-back; 100: paced as a camera at 10 fps), on the loop ``geosurge benchmark`` uses
    (:func:`geosurge.runtime.benchmark.time_scenarios`). Returns the report (per-stage p50 / p95 / mean in ms,
    ``total`` = the call's wall time; throughput in images/s = 1000 / mean total; peak RSS in MB; model and bundle
    size in MB; ``images`` timed, ``refused``: ``{"input", "error"}`` of each image that cannot be decoded, left
    out, and ``skipped``: a line per file of the folders that is not an image). Raises GeosurgeError when no image
    is readable."""
    from .benchmark import Scenario, percentiles, runtime_contender, time_scenarios

    with Localizer(bundle_dir, backend=backend, threads=threads) as loc:
        refused: list[dict] = []
        skipped: list[str] = []
        if images:
            sources = []
            listing = list_images(images)
            skipped = listing.skip_lines()  # files in the folders that are not images, each named
            for p in listing.paths:
                try:  # each image is decoded once here: one that cannot be is named and left out, not timed
                    data = p.read_bytes()
                    load_image(data, loc.spec)
                    sources.append(data)
                except (OSError, GeosurgeError) as e:
                    refused.append({"input": str(p), "error": str(e).replace("<bytes>", str(p), 1)})
        else:
            sources = Golden.load(loc.bundle.path("golden")).jpegs(loc.spec)
        if not sources:
            raise GeosurgeError("bench: no readable images" + (f" ({len(refused)} refused: {refused[0]['error']})"
                                                                if refused else ""))
        c = runtime_contender(loc, str(bundle_dir), loc.runner.name.value)
        sc = Scenario("images", "paced" if pause_ms else "back-to-back", sources, pause_ms)
        times = time_scenarios([c], [sc], iters, warmup).samples[(sc.name, c.name)]
        m = loc.bundle.manifest
    rows = [{"stage": "total" if k == "e2e" else k, "p50_ms": p50, "p95_ms": p95, "mean_ms": float(np.mean(v))}
            for k, v in times.items() for p50, p95 in [percentiles(v)]]
    return {"bundle": str(bundle_dir), "backend": c.backend, "threads": threads, "iters": iters,
            "pause_ms": pause_ms, "stages": rows, "throughput_img_s": 1000.0 / rows[-1]["mean_ms"],
            "peak_rss_mb": peak_rss_mb(), "precision": m.model.precision.value, "model_mb": c.info["model_mb"],
            "bundle_mb": c.info["bundle_mb"], "images": len(sources), "refused": refused,
            "skipped": skipped}

"""Runtime benchmark: latency per stage (decode, preprocess, inference, cell search) and end to end, throughput,
peak RSS and model size, on given images or the bundle's golden photos re-encoded as JPEG (no torch)."""
from __future__ import annotations

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.images import list_images

from .golden import Golden
from .localizer import Localizer

STAGES = ("decode", "preprocess", "inference", "cell_search", "total")


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
                 warmup: int = 5) -> dict:
    """``iters`` timed ``locate`` calls after ``warmup`` untimed ones, cycling over the images. Returns the report
    (per-stage p50 / p95 / mean in ms, throughput in images/s, peak RSS in MB, model size in MB)."""
    with Localizer(bundle_dir, backend=backend, threads=threads) as loc:
        sources = ([p.read_bytes() for p in list_images(images).paths if p.is_file()] if images
                   else Golden.load(loc.bundle.path("golden")).jpegs(loc.spec))
        if not sources:
            raise GeosurgeError("bench: no images")
        times = {k: [] for k in STAGES}
        for i in range(warmup + iters):
            pred = loc.locate(sources[i % len(sources)])
            if i >= warmup:
                for k, v in pred["timing_ms"].items():
                    times[k].append(v)
                times["total"].append(sum(pred["timing_ms"].values()))
        m = loc.bundle.manifest
        model = loc.bundle.path("model")
        model_mb = (sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) if model.is_dir()
                    else model.stat().st_size) / 1e6
        backend_name = loc.runner.name.value
    rows = [{"stage": k, "p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)),
             "mean_ms": float(np.mean(v))} for k, v in times.items()]
    return {"bundle": str(bundle_dir), "backend": backend_name, "threads": threads, "iters": iters, "stages": rows,
            "throughput_img_s": 1000.0 / rows[-1]["mean_ms"], "peak_rss_mb": peak_rss_mb(),
            "precision": m.model.precision.value, "model_mb": model_mb}

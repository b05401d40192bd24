"""The runtime benchmark library (no torch): per-stage latency (decode, preprocess, inference, cell search) and end
to end, paced and back-to-back, contenders interleaved call by call; folder throughput with decode on a worker pool
overlapped with inference; peak RSS of the runtime alone in a fresh process; model and bundle size; the test images.

One library behind both ``geosurge-run bench`` (``geosurge.runtime.bench``: one bundle, one backend) and ``geosurge
benchmark`` (``geosurge.export.benchmark``: several bundles, every installed backend, torch anchors): one loop
(:func:`time_scenarios`, on :func:`geosurge.timing.interleaved`), one set of test images (:func:`bench_images`).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import types
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import backends_for
from geosurge.images import ImageDecodeError, list_images, load_image, read_image
from geosurge.preprocess import preprocess
from geosurge.timing import interleaved

from .backends import RUNNERS, BackendUnavailable, get_runner
from .bench import peak_rss_mb
from .bundle import Bundle, open_bundle
from .golden import Golden
from .localizer import Localizer

#: the stages ``Localizer.locate`` reports (``timing_ms``), then the end-to-end wall time of the call
STAGES = ("decode", "preprocess", "inference", "cell_search", "prediction")
E2E = "e2e"
#: a 12 MP phone photo, landscape (width, height)
PHONE_SIZE = (4032, 3024)
#: the synthesised test images' recipe version (part of their cache key: a changed recipe makes new files)
SYNTH_VERSION = 1
#: a camera at 10 fps: the pause before each paced call (ms)
CAMERA_PAUSE_MS = 100.0
#: top-level modules the runtime must never load (its RSS child reports any it finds)
HEAVY_MODULES = ("torch", "torchvision", "timm", "transformers", "onnx", "coremltools", "modelopt")


# ---- test images ------------------------------------------------------------------------------------------------
def phone_photo(rgb: np.ndarray, seed: int, size: tuple[int, int] = PHONE_SIZE) -> np.ndarray:
    """A phone-size picture made from a real photo: its centre 4:3 (or 3:4) part, bicubic upscale to ``size``
    (width, height; swapped for a portrait photo), Gaussian noise sigma 2 (8-bit levels) drawn from ``seed`` so the
    JPEG holds high-frequency content as a camera's does. HxWx3 uint8 in, uint8 out; deterministic."""
    import cv2

    h, w = rgb.shape[:2]
    W, H = size if w >= h else size[::-1]
    if w * H > h * W:  # too wide: crop the width
        cw = h * W // H
        rgb = rgb[:, (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = w * H // W
        rgb = rgb[(h - ch) // 2:(h - ch) // 2 + ch]
    up = cv2.resize(rgb, (W, H), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    up += np.random.default_rng(seed).normal(0.0, 2.0, up.shape).astype(np.float32)
    return np.clip(up + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes (OpenCV, 4:2:0, ``quality``)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise GeosurgeError("could not encode a JPEG")
    return buf.tobytes()


def default_cache_dir() -> Path:
    """``$GEOSURGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/geosurge``, else ``~/.cache/geosurge``; then ``bench``."""
    root = os.environ.get("GEOSURGE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                        Path.home() / ".cache") / "geosurge"
    return Path(root) / "bench"


@dataclass
class BenchImages:
    """The benchmark's inputs, as JPEG files: ``phone`` a 12 MP JPEG, ``small`` the source photo at its own size,
    ``folder`` phone-size JPEGs (or the user's images) for throughput; ``info`` says where each came from."""

    phone: Path
    small: Path
    folder: list[Path]
    info: dict = field(default_factory=dict)

    def timed(self) -> dict[str, Path]:
        """Name -> file of the images timed one by one (``12mp``, ``small``)."""
        return {"12mp": self.phone, "small": self.small}


def _colour_photos(n: int, bundle: Bundle | None, spec) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` real colour photos: the packaged sample photos (grayscale ones left out), else the bundle's
    golden probes."""
    from geosurge.samples import sample_photo_paths

    out = []
    try:
        for p in sample_photo_paths():
            rgb = read_image(p)
            if int(np.abs(rgb.astype(np.int16) - rgb[..., :1]).max()) > 8:  # has colour
                out.append((p.stem, rgb))
                if len(out) == n:
                    break
    except GeosurgeError:
        pass
    if not out and bundle is not None:  # a device without the sample photos: the bundle's own (real) probes
        golden = Golden.load(bundle.path("golden"))
        out = [(f"golden-{n}", load_image(j)) for n, j in zip(golden.names, golden.jpegs(spec))]
    if not out:
        raise GeosurgeError("benchmark: no sample photos to build test images from; pass --images DIR")
    return out


def _cached_jpeg(cache: Path, name: str, rgb: np.ndarray, make: Callable[[], np.ndarray], tag: str) -> Path:
    from geosurge.fsutil import atomic_write_bytes

    key = hashlib.sha256(rgb.tobytes() + f"{tag} v{SYNTH_VERSION}".encode()).hexdigest()[:12]
    path = cache / f"{name}-{tag}-{key}.jpg"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_jpeg(make()))
    return path


def bench_images(folder_size: int = 4, images=None, bundle: Bundle | None = None, cache_dir=None,
                 size: tuple[int, int] = PHONE_SIZE, log: Callable[[str], None] | None = None) -> BenchImages:
    """The test images, synthesised deterministically from real photos and cached as JPEG (quality 92) under
    ``cache_dir`` (default :func:`default_cache_dir`): the 12 MP JPEG is :func:`phone_photo` of the first colour
    sample photo (seed 0), the small photo that photo as a JPEG at its own size; the throughput folder is
    ``images`` (files / folders) when given, else ``folder_size`` phone-size JPEGs of the first colour photos
    (seeds 0, 1, ...). Without the sample photos (a device) the bundle's golden probes are the sources. Files in
    ``images`` folders that are not images are named through ``log``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    n = 1 if images else max(1, folder_size)
    photos = _colour_photos(n, bundle, bundle.preprocess if bundle is not None else None)
    tag = f"{size[0]}x{size[1]}"
    phone = [_cached_jpeg(cache, name, rgb, lambda rgb=rgb, i=i: phone_photo(rgb, i, size), f"{tag}-s{i}")
             for i, (name, rgb) in enumerate(photos[:n])]
    name, rgb = photos[0]
    small = _cached_jpeg(cache, name, rgb, lambda: rgb, "native")
    info = {"12mp": {"path": str(phone[0]), "source": name, "size": list(size), "mb": phone[0].stat().st_size / 1e6},
            "small": {"path": str(small), "source": name, "size": [rgb.shape[1], rgb.shape[0]],
                      "mb": small.stat().st_size / 1e6}}
    if images:
        listing = list_images(images)
        for line in listing.skip_lines() if log else ():
            log(f"  {line}")
        folder = listing.paths
        if not folder:
            raise GeosurgeError(f"benchmark: no images in {', '.join(map(str, images))}")
        info["folder"] = {"source": "given", "images": len(folder)}
    else:
        folder = phone[:folder_size]
        info["folder"] = {"source": f"{len(folder)} phone-size JPEGs of the sample photos", "images": len(folder)}
    return BenchImages(phone[0], small, folder, info)


# ---- bundles, backends, contenders --------------------------------------------------------------------------------
def bundle_sizes(bundle: Bundle) -> tuple[float, float]:
    """(model MB, bundle MB): the model part's files (an ONNX file and its external data, or a package folder)
    and every checksummed file plus the manifest, from the manifest's records (1 MB = 1e6 bytes)."""
    from geosurge.manifest import MANIFEST_FILE

    m = bundle.manifest
    model = m.parts["model"]
    files = m.files
    model_b = sum(r.bytes for n, r in files.items() if n == model or n.startswith((model + ".", model + "/")))
    total = sum(r.bytes for r in files.values()) + (bundle.root / MANIFEST_FILE).stat().st_size
    return model_b / 1e6, total / 1e6


def runtime_backends(bundle: Bundle) -> list[str]:
    """The backends that read this bundle's format (``geosurge.formats.FORMAT_BACKENDS``) and have a registered
    runner (``geosurge.runtime.backends.RUNNERS``), in the table's order: a new backend appears here once it is in
    both."""
    return [b.value for b in backends_for(bundle.manifest.model.format) if b.value in RUNNERS]


@dataclass
class Contender:
    """One thing timed: a bundle on one backend (``kind`` "runtime": ``run`` locates an encoded image and returns
    its stage times), or a torch anchor (``kind`` "anchor": ``run`` returns None and the call's wall time is the
    inference). ``info``: precision, sizes, ... for the report."""

    bundle: str
    backend: str
    kind: str
    run: Callable[[bytes], dict | None]
    close: Callable[[], None] = lambda: None
    localizer: Localizer | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.bundle} | {self.backend}"


def runtime_contender(loc: Localizer, label: str, backend: str) -> Contender:
    """A contender that runs ``loc.locate`` on encoded bytes and reports its ``timing_ms``."""
    m = loc.bundle.manifest
    model_mb, bundle_mb = bundle_sizes(loc.bundle)
    return Contender(label, backend, "runtime", lambda data: loc.locate(data)["timing_ms"], loc.close, loc,
                     {"precision": m.model.precision.value, "format": m.model.format.value,
                      "target": m.model.target.value, "model_mb": model_mb, "bundle_mb": bundle_mb,
                      "bundle_path": str(loc.bundle.root)})


def bundle_labels(paths: Iterable) -> list[str]:
    """Short names for bundles: the folder name, or the whole path where two folders share a name."""
    paths = [Path(p) for p in paths]
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def open_contenders(bundles: list, backends: list[str] | None = None, threads: int | None = None,
                    log: Callable[[str], None] = print) -> tuple[list[Contender], list[dict], list[Bundle]]:
    """Every bundle on every backend that reads its format and can run here. Every bundle is opened (sha256
    checked) first, so a bad path fails before anything is timed (BundleError naming it). Returns (contenders,
    skipped rows ``{"bundle", "backend", "reason"}``, the open bundles). ``backends``: only these names."""
    opened, seen = [], set()
    for b in bundles:  # each bundle once, however often it is named
        b = b if isinstance(b, Bundle) else open_bundle(b)
        if b.root.resolve() not in seen:
            seen.add(b.root.resolve())
            opened.append(b)
    labels = bundle_labels([b.root for b in opened])
    contenders, skipped = [], []
    for label, bundle in zip(labels, opened):
        names = runtime_backends(bundle)
        fmt = bundle.manifest.model.format.value
        if backends:
            names = [n for n in names if n in backends]
            if not names:
                skipped.append({"bundle": label, "backend": ", ".join(backends),
                                "reason": f"none of these backends reads its {fmt} model"})
                continue
        ran = 0
        for name in names:
            used = threads if get_runner(name).thread_option else None  # a backend that takes no count gets none
            try:
                loc = Localizer(bundle, backend=name, threads=used, verify=False)
            except (BackendUnavailable, ImportError, GeosurgeError) as e:
                reason = f"{type(e).__name__}: {e}" if isinstance(e, ImportError) else str(e)
                skipped.append({"bundle": label, "backend": name, "reason": reason})
                log(f"  {label}: {name} skipped: {reason}")
                continue
            contenders.append(runtime_contender(loc, label, name))
            # what the runner runs with where it changes numerics (OpenVINO's precision hint, device)
            contenders[-1].info.update(threads=used, runner_options=dict(loc.runner.options or {}))
            ran += 1
        if not ran:
            log(f"  {label}: no installed backend runs its {fmt} model")
    return contenders, skipped, opened


# ---- latency ----------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    """Timed inputs (cycled round by round) and a pacing: ``pause_ms`` before each call, 0 = back-to-back."""

    image: str
    mode: str
    data: list[bytes]
    pause_ms: float

    @property
    def name(self) -> str:
        return f"{self.image} {self.mode}"


def scenarios(images: dict[str, list[bytes] | bytes], pause_ms: float = CAMERA_PAUSE_MS,
              paced: bool = True, back_to_back: bool = True) -> list[Scenario]:
    """Each image (name -> encoded bytes, or a list cycled over) paced (``pause_ms`` before each call) and / or
    back-to-back."""
    modes = ([("paced", pause_ms)] if paced else []) + ([("back-to-back", 0.0)] if back_to_back else [])
    return [Scenario(name, mode, [data] if isinstance(data, bytes) else list(data), pause)
            for name, data in images.items() for mode, pause in modes]


@dataclass
class TimingRun:
    """Samples of one :func:`time_scenarios` run: ``samples[(scenario name, contender name)][stage]`` -> ms per
    timed call; ``order``: ``(scenario name, round, contender name)`` of every call as it ran (warm-up included)."""

    samples: dict[tuple[str, str], dict[str, list[float]]]
    order: list[tuple[str, int, str]]
    scenarios: list[Scenario]
    iters: int
    warmup: int


def time_scenarios(contenders: list[Contender], scenario_list: list[Scenario], iters: int, warmup: int = 2,
                   log: Callable[[str], None] | None = None) -> TimingRun:
    """For each scenario, every contender once per round, in turn (interleaved call by call, so all see the same
    machine state), ``warmup`` untimed rounds then ``iters`` timed ones, with the scenario's pause before each
    call. A runtime contender's stages come from ``locate``'s ``timing_ms``; the end-to-end time (``e2e``) is the
    wall time of the call; an anchor's wall time is its ``inference``."""
    samples, order = {}, []
    for sc in scenario_list:
        if log:
            log(f"  {sc.name}: {len(contenders)} contender(s) x {iters} runs"
                + (f", {sc.pause_ms:.0f} ms pause before each" if sc.pause_ms else ", back-to-back"))
        calls = {}
        for c in contenders:
            images = cycle(sc.data)  # each contender sees the same sequence of images
            calls[c.name] = lambda c=c, images=images: c.run(next(images))
        results: dict[str, list] = {}
        rounds: list = []
        wall = interleaved(calls, iters, warmup, pause_ms=sc.pause_ms, results=results, order=rounds)
        order += [(sc.name, i, name) for i, name in rounds]
        for c in contenders:
            if c.kind == "runtime":
                stages = {s: [float(r[s]) for r in results[c.name]] for s in STAGES}
                stages[E2E] = wall[c.name]
            else:
                stages = {"inference": wall[c.name]}
            samples[(sc.name, c.name)] = stages
    return TimingRun(samples, order, scenario_list, iters, warmup)


def percentiles(v) -> tuple[float, float]:
    """(p50, p95) in the samples' unit (numpy's linear interpolation)."""
    return float(np.percentile(v, 50)), float(np.percentile(v, 95))


def latency_rows(run: TimingRun, contenders: list[Contender]) -> list[dict]:
    """One row per (contender, scenario): ``{stage}_p50_ms`` / ``_p95_ms`` for decode, preprocess, inference,
    cell_search and e2e (None where the contender has no such stage: an anchor times inference only)."""
    rows = []
    for c in contenders:
        for sc in run.scenarios:
            s = run.samples[(sc.name, c.name)]
            row = {"bundle": c.bundle, "backend": c.backend, "kind": c.kind, "image": sc.image, "mode": sc.mode,
                   "n": len(s["inference"])}
            for stage in (*STAGES, E2E):
                p50, p95 = percentiles(s[stage]) if stage in s else (None, None)
                row[f"{stage}_p50_ms"], row[f"{stage}_p95_ms"] = p50, p95
            rows.append(row)
    return rows


# ---- throughput -------------------------------------------------------------------------------------------------
def decode_preprocess(source, spec) -> np.ndarray:
    """One image -> (3, S, S) float32 per ``spec`` (``load_image`` + ``preprocess``); a module-level function so a
    process pool can run it."""
    return preprocess(load_image(source, spec), spec)


@contextmanager
def _main_hidden():
    """While spawned processes start: ``__main__`` is an empty module, so multiprocessing's preparation data names
    no main script for the children to import (``multiprocessing.spawn.get_preparation_data``)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class DecodePools:
    """The decode worker pools compared for folder throughput: ``serial`` (no pool: decode, then infer), a small
    ``threads`` pool (OpenCV's decode and resize release the GIL) and a small ``processes`` pool (spawned, so a
    parent holding torch or ORT threads is not forked). Started once, warmed, shared by every contender; close()
    shuts them down."""

    def __init__(self, workers: int = 2, kinds: Iterable[str] = ("serial", "threads", "processes")):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        self.workers = workers
        self.pools: dict[str, object] = {}
        for kind in kinds:
            if kind == "serial":
                self.pools[kind] = None
            elif kind == "threads":
                self.pools[kind] = ThreadPoolExecutor(workers, thread_name_prefix="geosurge-decode")
            elif kind == "processes":
                self.pools[kind] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            else:
                raise GeosurgeError(f"unknown decode pool {kind!r}; choose serial, threads, processes")

    def warm(self, path, spec) -> None:
        """Start every worker (a process pool imports geosurge in each) before anything is timed. Spawned workers
        start without re-running the caller's ``__main__`` script (multiprocessing would otherwise import it in
        each child, running an unguarded script's benchmark again): the job is a function of this module."""
        for pool in self.pools.values():
            if pool is not None:
                with _main_hidden():
                    list(pool.map(decode_preprocess, [path] * self.workers, [spec] * self.workers))

    def close(self) -> None:
        for pool in self.pools.values():
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DecodePools":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def folder_throughput(loc: Localizer, paths: list[Path], pool=None, prefetch: int | None = None) -> dict:
    """Locate every image of ``paths`` once: decode + preprocess on ``pool`` (an executor; None: on this thread
    before each inference) while this thread runs inference and cell search, with up to ``prefetch`` (default 4)
    images decoded ahead. An unreadable image is refused (its error line kept) and the pass goes on. Returns
    ``{"img_s", "images", "refused": [error lines], "seconds"}`` (img/s over the images located)."""
    spec, done, refused = loc.spec, 0, []

    def infer(x):
        loc.predict_embedding(loc.embed(x[None])[0])

    t0 = time.perf_counter()
    if pool is None:
        for p in paths:
            try:
                x = decode_preprocess(p, spec)
            except ImageDecodeError as e:
                refused.append(str(e))
                continue
            infer(x)
            done += 1
    else:
        ahead = prefetch or 4
        todo = iter(paths)
        queue = deque(pool.submit(decode_preprocess, p, spec) for p, _ in zip(todo, range(ahead)))
        while queue:
            fut = queue.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append(pool.submit(decode_preprocess, nxt, spec))
            try:
                x = fut.result()
            except ImageDecodeError as e:
                refused.append(str(e))
                continue
            infer(x)
            done += 1
    seconds = time.perf_counter() - t0
    return {"img_s": done / seconds if done else 0.0, "images": done, "refused": refused, "seconds": seconds}


def throughput_table(contenders: list[Contender], paths: list[Path], pools: DecodePools, passes: int = 1,
                     log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """img/s of every runtime contender over ``paths`` with every decode pool, ``passes`` times, the passes
    interleaved (contender by contender, pool by pool). Returns ``{contender name: {pool kind: {"img_s"
    (median over passes), "passes"}, "best": kind, "refused": [error lines of unreadable images]}}``; each
    refused image is named through ``log`` once."""
    runtime = [c for c in contenders if c.kind == "runtime"]
    if runtime:
        pools.warm(paths[0], runtime[0].localizer.spec)
    got: dict[str, dict[str, list]] = {c.name: {k: [] for k in pools.pools} for c in runtime}
    refused: list[str] = []
    for i in range(passes):
        for c in runtime:
            for kind, pool in pools.pools.items():
                r = folder_throughput(c.localizer, paths, pool, prefetch=2 * pools.workers)
                got[c.name][kind].append(r["img_s"])
                if log and not refused:
                    for line in r["refused"]:
                        log(f"  refused {line}")
                refused = r["refused"]
        if log:
            log(f"  folder pass {i + 1}/{passes}: {len(paths)} images x {len(runtime)} contender(s) x "
                f"{len(pools.pools)} pool(s)")
    out = {}
    for name, per in got.items():
        row = {k: {"img_s": float(np.median(v)), "passes": len(v)} for k, v in per.items()}
        out[name] = {**row, "best": max(row, key=lambda k: row[k]["img_s"]), "refused": refused,
                     "workers": pools.workers}
    return out


# ---- peak RSS of the runtime alone -------------------------------------------------------------------------------
RSS_CHILD = ("import json, sys\n"
             "from geosurge.runtime.benchmark import rss_child\n"
             "print(json.dumps(rss_child(json.loads(sys.argv[1]))))\n")


def rss_child(cfg: dict) -> dict:
    """In a fresh process that imported only ``geosurge.runtime``: open the bundle, locate each image
    ``cfg["calls"]`` times, report the peak RSS (MB) and any heavy module found loaded (there should be none)."""
    with Localizer(cfg["bundle"], backend=cfg.get("backend"), threads=cfg.get("threads"), verify=False) as loc:
        for _ in range(int(cfg.get("calls", 5))):
            for p in cfg["images"]:
                loc.locate(p)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY_MODULES))
    return {"peak_rss_mb": peak_rss_mb(), "heavy_modules": heavy, "modules_loaded": len(sys.modules)}


def runtime_peak_rss(bundle, backend: str | None, threads: int | None, images: list, calls: int = 5,
                     timeout: float = 600.0) -> dict:
    """Peak RSS of the runtime alone: :func:`rss_child` in a fresh ``python -c`` process that imports only
    ``geosurge.runtime`` (a parent's torch or caches never count). Returns its report plus the command, or
    ``{"peak_rss_mb": None, "error": ...}`` when the child failed."""
    cfg = {"bundle": str(bundle), "backend": backend, "threads": threads, "images": [str(p) for p in images],
           "calls": calls}
    cmd = [sys.executable, "-c", RSS_CHILD, json.dumps(cfg)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_rss_mb": None, "error": f"timed out after {timeout:.0f} s"}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_rss_mb": None, "error": f"the runtime process failed (exit {r.returncode}): {tail}"}
    return {**json.loads(lines[-1]), "child": cfg}

"""The Python API: what the ``geosurge`` CLI does, as functions that return typed results (the CLI commands are thin
callers of these). Importing this module imports nothing heavy; torch loads when a function that needs it runs.

    from geosurge import api

    bundle = api.export("edge", "bundles/edge-int8", precision="int8", calibration="my_photos/")
    bundle.manifest.model.precision            # Precision.INT8
    bundle.manifest.check.passed               # held-out parity vs FP32 (None: not measurable on this machine)
    report = api.parity(bundle, images="my_photos/")
    fr = api.prune(bundle, "bundles/edge-fr", countries="FR,BE", table="int8")
    api.verify(fr)["passed"]

=================  ==========================================  ===============================================
function           CLI                                         returns
=================  ==========================================  ===============================================
:func:`export`     ``geosurge export``                         :class:`geosurge.runtime.Bundle`
:func:`prune`      ``geosurge prune``                          :class:`geosurge.runtime.Bundle`
:func:`prune_cost` ``geosurge prune --report``                 report rows (dicts)
:func:`parity`     ``geosurge parity``                         report dict (``passed``, ``metrics``, ``gates``)
:func:`verify`     ``geosurge-run verify``                     report dict
:func:`bench`      ``geosurge-run bench``                      report dict
:func:`evaluate`   ``geosurge eval``                           :class:`geosurge.evaluation.EvalReport`
:func:`reference`  ``geosurge reference``                      :class:`geosurge.training.reference.ReferenceModel`
:func:`views`      ``geosurge views``                          the manifest written (Path)
:func:`benchmark`  ``geosurge benchmark``                      report dict (tables: ``format_report``)
=================  ==========================================  ===============================================

:func:`choose_backend` is ``geosurge-run choose-backend`` (the backend a bundle runs fastest with at parity on this
machine). Locating images is :class:`geosurge.runtime.Localizer` (the device API).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from .errors import GeosurgeError

__all__ = ["export", "prune", "prune_cost", "parity", "evaluate", "reference", "views", "verify", "bench",
           "benchmark", "choose_backend", "load_model", "calibration_set"]

Log = Callable[[str], None]
PathLike = str | Path
#: the most images ``export(uncertainty_images=...)`` fits the prediction's temperature on (stratified)
UNCERTAINTY_IMAGES = 1000


def _paths(x) -> list | None:
    """One path or several (files / folders) as a list; None stays None."""
    if x is None:
        return None
    return [x] if isinstance(x, (str, Path)) else list(x)


def load_model(model, seed: int = 0, cells: PathLike | None = None):
    """``model``: a config name (``geosurge.models.CONFIGS``, built from ``seed``), a checkpoint directory (a
    ``Path`` is always read as one; a string names a config first), or a GeoSurge instance. Returns (model, source record for the manifest). An in-memory model's source records no seed:
    ``parity`` then needs its checkpoint. Raises GeosurgeError for a name that is neither."""
    from .export.source import load_model as _load
    from .models.config import CONFIGS

    if not isinstance(model, (str, Path)):
        return model.eval(), {"checkpoint": None, "config": model.config.name, "seed": None}
    hierarchy = None
    if cells is not None:
        from .geo import load_hierarchy

        hierarchy = load_hierarchy(cells)
    if isinstance(model, str) and model in CONFIGS:
        return _load(model=model, seed=seed, hierarchy=hierarchy)
    if isinstance(model, Path) or Path(model).is_dir():
        return _load(checkpoint=str(model))
    raise GeosurgeError(f"{model}: neither a model config ({', '.join(CONFIGS)}) nor a checkpoint directory")


def calibration_set(source, spec, size: int = 256, hierarchy=None, cache_dir: PathLike | None = None,
                    log: Log = print, **kw):
    """A calibration set: ``source`` a folder or CSV manifest (stratified over ``hierarchy`` when it has
    coordinates), None for augmented views of the packaged sample photos, or a ready CalibrationSet. ``kw``:
    ``build_calibration_set``'s ``what`` / ``recommended`` (a set of images for another use)."""
    from .calibration import CalibrationSet, build_calibration_set, sample_views_set

    if isinstance(source, CalibrationSet):
        return source
    if source is None:
        return sample_views_set(spec, size=size, log=log)
    return build_calibration_set(source, spec, size=size, hierarchy=hierarchy, cache_dir=cache_dir, log=log, **kw)


def export(model, output: PathLike, *, format: str | None = None, target: str | None = None,
           precision: str | None = None, calibration=None, calib_size: int = 256, calib_method: str = "minmax",
           calib_cache: PathLike | None = None, precision_search: str | None = None,
           exclude_nodes: Iterable[str] = (), exclude_nodes_weights: str = "fp32", bias_correction: bool = True,
           table: str = "float16",
           dynamic_batch: bool = False,
           with_logits: bool = False, opset: int = 17, threads: int | None = 2, golden=None, cells=None,
           seed: int = 0, source: dict | None = None, gates: dict | None = None, qat: bool = False,
           qat_steps: int = 200, qat_lr: float = 2e-5, qat_rank_weight: float = 0.0, qat_save: PathLike | None = None,
           qat_init: PathLike | None = None, min_speedup: float = 1.0, reduce_range: bool = False,
           simulate_int8: bool = False, recommend_backend: bool = False, reference=None,
           uncertainty_images: PathLike | None = None, log: Log = print):
    """Export a model to a bundle at ``output`` and return the :class:`geosurge.runtime.Bundle`.

    ``model``: a config name, a checkpoint directory or an in-memory GeoSurge (:func:`load_model`).
    ``format`` / ``target`` / ``precision``: a row of ``geosurge.formats.TARGETS`` (default ONNX for onnxruntime,
    FP32); ``calibration`` (int8 / fp8): a folder, a CSV manifest, a CalibrationSet, or None for augmented views
    of the sample photos, ``calib_size`` images, split into calibrate / choose / check parts (a manifest's
    coordinates add the accuracy deltas to the gates); for fp16 / int8-dynamic a given ``calibration`` is the set
    the parity is checked on. ``precision_search="auto"``: the measured search (onnxruntime int8 / int8-dynamic);
    ``qat``: quantization-aware distillation (``qat_steps`` at learning rate ``qat_lr``; ``qat_rank_weight`` x a
    ranking loss on the finest cells added to its loss) when all-INT8 PTQ fails the gates (onnxruntime int8), its
    tuned FP32 weights saved as a checkpoint in ``qat_save`` when given, the student started from the checkpoint
    ``qat_init`` when given (an earlier ``qat_save`` of the same model: more steps without starting over);
    ``exclude_nodes`` are kept out of INT8 by hand, their weights float (``exclude_nodes_weights`` "fp32") or
    weight-only INT8 ("int8"); ``bias_correction`` (static int8): each INT8-weight node's bias absorbs the mean
    error of its rounded weights on the calibration images (never for a QAT graph);
    ``min_speedup``: an int8 / int8-dynamic model must beat FP32 by more than this ratio on this machine (0: not
    gated; ``bundle.manifest.quantization.extra["decision"]`` says what won and why); ``reduce_range``: 7-bit
    weights (x86 without VNNI); ``simulate_int8``: choose and check INT8 as simulated INT8 (exact integer
    accumulation: for ARM dot-product / VNNI / AMX devices when this CPU saturates; speed still timed here);
    ``recommend_backend``: measure the installed backends and record the fastest at
    parity for machines like this one. ``table``: the cell table's storage (float16, float32, int8); ``golden``:
    photos (files or folders) for the golden probes (default: the sample photos). ``reference``: the FP32 model
    (checkpoint directory or GeoSurge of the same architecture and hierarchy) the golden outputs, the choices and
    the held-out check are measured against (default: ``model``; for a checkpoint ``qat_save`` wrote, the model its
    QAT learned from, when recorded and present: its tuned FP32 weights are not that model).
    ``uncertainty_images``: a CSV manifest (path, lat, lon) of held-out images to fit the prediction's temperature
    on (``geosurge.export.uncertainty``: by likelihood; the record says how often ``uncertainty_km``, the 68%
    radius, then covers the truth; up to :data:`UNCERTAINTY_IMAGES`, at least 50; ``bundle.manifest.uncertainty``).
    A non-FP32 model records its held-out parity in ``bundle.manifest.check``; ``check.passed`` False means it fails
    the gates (the bundle is written for inspection). Raises GeosurgeError, writing nothing, for a bad option, a
    reference of another architecture or a failed precision search."""
    import torch

    from .fsutil import check_replaceable
    from .manifest import bundle_entries

    check_replaceable(output, "geosurge bundle", bundle_entries)  # before any work: never a user's folder or file
    from .export.bundle import write_bundle
    from .export.precision import QuantConfig
    from .export.target import ExportOptions
    from .formats import check_precision, resolve_target
    from .images import list_images
    from .samples import sample_photo_paths

    p = check_precision(resolve_target(format, target), precision)
    quant = QuantConfig(precision=p.value, calibrate_method=calib_method, nodes_to_exclude=list(exclude_nodes),
                        exclude_nodes_weights=exclude_nodes_weights, bias_correction=bias_correction,
                        search=precision_search, qat=qat, qat_steps=qat_steps, qat_lr=qat_lr,
                        qat_rank_weight=qat_rank_weight,
                        qat_save=None if qat_save is None else str(qat_save),
                        qat_init=None if qat_init is None else str(qat_init), min_speedup=min_speedup,
                        reduce_range=reduce_range, simulate_int8=simulate_int8)
    options = ExportOptions.create(format=format, target=target, precision=p.value, quant=quant, opset=opset,
                                   dynamic_batch=dynamic_batch, with_logits=with_logits, table_dtype=table,
                                   threads=threads)
    if threads:
        torch.set_num_threads(threads)
    model, src = load_model(model, seed, cells)
    if src.get("checkpoint"):  # a checkpoint QAT saved deploys the precision it trained for
        from .models.geosurge import read_checkpoint_config

        meta, _ = read_checkpoint_config(src["checkpoint"])
        if qat and meta.get("qat"):
            raise GeosurgeError(f"{src['checkpoint']} is a QAT checkpoint: --qat would train it against itself; run "
                                "--qat from the model it learned from, starting the student here: --checkpoint "
                                f"ORIGINAL --qat --qat-init {src['checkpoint']}")
        options = replace(options, quant=options.quant.for_qat_checkpoint(meta.get("qat"), log))
        if reference is None and meta.get("qat") and options.precision != "fp32":
            reference = _qat_teacher(meta["qat"], src["checkpoint"], log)
    if qat and src.get("checkpoint"):  # recorded with --qat-save: an export of the tuned weights checks against it
        options = replace(options, quant=replace(options.quant, qat_teacher=src["checkpoint"]))
    ref_model, record = None, dict(source or src)
    if reference is not None:
        if isinstance(reference, (str, Path)) and not Path(reference, "config.json").is_file():
            raise GeosurgeError(f"{reference}: --reference must be a geosurge checkpoint directory (no config.json)")
        ref_model, ref_src = load_model(Path(reference) if isinstance(reference, str) else reference, seed, cells)
        _check_reference(model, ref_model, reference)
        if ref_src.get("checkpoint") and ref_src["checkpoint"] != src.get("checkpoint"):
            record["reference"] = ref_src["checkpoint"]
    if golden:
        listing = list_images(_paths(golden))
        for line in listing.skip_lines():
            log(f"golden: {line}")
        photos = listing.paths
    else:
        photos = sample_photo_paths()
    images = None
    if options.precision.needs_calibration or (calibration is not None and options.precision != "fp32"):
        images = calibration_set(calibration, model.config.preprocess, calib_size, model.hierarchy, calib_cache, log)
    calib, check_set = (images, None) if options.precision.needs_calibration else (None, images)
    uncertainty = None
    if uncertainty_images is not None:
        uncertainty = calibration_set(uncertainty_images, model.config.preprocess, UNCERTAINTY_IMAGES,
                                      model.hierarchy, calib_cache, log, what="uncertainty", recommended=0)
        from .export.uncertainty import check_images

        check_images(uncertainty, model.hierarchy, uncertainty_images)  # before any work
    return write_bundle(output, model, record, photos, options, calibration=calib, check_set=check_set,
                        gates=gates, recommend_backend=recommend_backend, reference=ref_model, uncertainty=uncertainty,
                        uncertainty_source=None if uncertainty_images is None else str(uncertainty_images), log=log)


def _qat_teacher(qat: dict, checkpoint: str, log: Log):
    """The checkpoint a QAT checkpoint was distilled from (its ``teacher_checkpoint``), when recorded and present;
    else None, with a warning: parity is then measured against the tuned weights themselves."""
    teacher = qat.get("teacher_checkpoint")
    if teacher and Path(teacher, "config.json").is_file():
        log(f"a QAT checkpoint: parity is measured against the model it was distilled from, {teacher} "
            "(--reference to name another)")
        return teacher
    why = f"{teacher} is not here" if teacher else "it does not record the model it was distilled from"
    log(f"warning: {checkpoint} is a QAT checkpoint and {why}: parity is measured against its own tuned FP32 "
        "weights, which are not your model; pass --reference CHECKPOINT (the model QAT learned from)")
    return None


def _check_reference(model, ref, name) -> None:
    """GeosurgeError unless ``ref`` can be compared with ``model``: the same config and cell hierarchy."""
    if ref.config.name != model.config.name or ref.hierarchy.digest() != model.hierarchy.digest():
        raise GeosurgeError(f"{name}: the reference model is not the exported model's architecture (config "
                            f"{ref.config.name} vs {model.config.name}, or another cell hierarchy)")


def prune(bundle, output: PathLike, *, bbox: str | None = None, geojson: PathLike | None = None,
          countries: str | None = None, keep_mass: float | None = None, levels: int | None = None,
          drop_levels: list[int] | None = None, table: str | None = None, dim: int | None = None,
          log: Log = print):
    """Cut and compress a bundle's cell hierarchy into a new bundle at ``output`` and return it (the model part and
    golden probes are unchanged). ``bbox`` "MINLON,MINLAT,MAXLON,MAXLAT", ``geojson`` a (Multi)Polygon file,
    ``countries`` "FR,BE": keep cells intersecting the region; ``keep_mass`` P: the fewest finest cells carrying P
    of the photo counts; ``levels`` N / ``drop_levels``: fewer levels; ``table``: float16 / float32 / int8;
    ``dim`` K: PCA of the embeddings to K dimensions. Raises GeosurgeError for a cut that keeps nothing."""
    from .export.prune import Cut, prune_bundle
    from .runtime.cells import table_dtype

    cut = Cut(bbox=bbox, geojson=str(geojson) if geojson else None, countries=countries, keep_mass=keep_mass,
              levels=levels, drop_levels=drop_levels, table=table_dtype(table) if table else None, dim=dim)
    return prune_bundle(bundle, output, cut, log=log)


def prune_cost(source, pruned, *, images=None, probes: int = 512, threads: int | None = 2,
               log: Log = print) -> list[dict]:
    """What a cut costs against its unpruned source on the same embeddings: one row per (embedding set, bundle:
    "unpruned" / "cut") with cells, levels, table MB, search ms, the outside share and flag rates, per-level agreement and drift in
    km. Embedding sets: ``images`` (default: the sample photos) and ``probes`` stand-in embeddings (0: none)."""
    import numpy as np

    from .export.prune import evaluate_cut, probe_embeddings
    from .images import list_images
    from .runtime import Localizer
    from .samples import sample_photo_paths

    with Localizer(source, threads=threads) as src:
        listing = list_images(_paths(images) if images else sample_photo_paths())
        xs, summary = [], listing.summary()
        for line in listing.skip_lines():
            log(f"  {line}")
        for p in listing.paths:
            try:
                xs.append(src.preprocess(p))
                summary.count(True)
            except GeosurgeError as e:  # an unreadable image is reported and counted; the rest go on
                summary.count(False)
                log(f"  refused {e}")
        log(f"prune: {summary.line()}")
        sets = {"images": src.embed(np.stack(xs))} if xs else {}
        if probes:
            sets["probes"], _ = probe_embeddings(src.scorer, probes)
        rows = []
        for name, emb in sets.items():
            for label, b in (("unpruned", source), ("cut", pruned)):
                rows.append({"on": name, **evaluate_cut(src.scorer, b, emb), "bundle": label})
    return rows


def parity(bundle, images=None, *, checkpoint: PathLike | None = None, backend: str | None = None,
           threads: int | None = None, gates: dict | None = None, log: Log = print, **options) -> dict:
    """FP32 torch (the manifest's source, or ``checkpoint``) vs the bundle through the runtime on ``images``
    (files / folders / CSV manifests ``path, lat, lon`` — coordinates add the accuracy deltas in km; default the
    sample photos). ``options``: the backend's own (OpenVINO ``device``, ``precision_hint``). Returns the report:
    ``passed``, ``metrics``, ``gates``, ``backend``, ``runner_options``, ``skipped`` images, seconds."""
    from .export.compare import torch_vs_bundle
    from .samples import sample_photo_paths

    return torch_vs_bundle(bundle, _paths(images) or sample_photo_paths(), str(checkpoint) if checkpoint else None,
                           backend, threads, gates, log=log, **options)


def evaluate(models, source: PathLike, *, output: PathLike | None = None, images: PathLike | None = None,
             backend: str | None = None, threads: int | None = 2, tencrop: bool = False, batch: int = 16,
             labels: Iterable[str] | None = None, limit: int | None = None, plots: bool = True,
             progress: bool = False, log: Log | None = print):
    """Accuracy in km of one or several models on a labelled source, side by side (``geosurge eval``).

    ``models``: a checkpoint directory (FP32 torch), a bundle (a directory or a :class:`~geosurge.runtime.Bundle`;
    the runtime with ``backend``, default the one its format implies), an in-memory GeoSurge, or a list of them.
    ``source``: a manifest CSV (``path,lat,lon`` | ``IMG_ID,LAT,LON`` | ``id,latitude,longitude``, optional
    ``source`` column; image ids relative to ``images``) or a folder of photos whose EXIF GPS is the truth.
    ``tencrop``: the paper's protocol (per-level probabilities averaged over 10 crops). With ``output``: writes
    ``eval.json``, ``eval.txt`` and (``plots``) ``error_cdf.png`` and ``world_map.png``. Returns the
    :class:`geosurge.evaluation.EvalReport` (``results[i].summary()``: acc@1/25/200/750/2500 km in %, median and
    mean km, GeoScore, per source). Every row is a prediction or a named failure (missing file, undecodable
    image, no GPS tags). Raises InputFileError for a missing source or a malformed manifest row."""
    from .evaluation import run_eval

    if isinstance(models, (str, Path)) or not isinstance(models, (list, tuple)):
        models = [models]
    return run_eval(source, list(models), output, images=images, backend=backend, threads=threads, tencrop=tencrop,
                    batch=batch, labels=labels, limit=limit, plots=plots, progress=progress, log=log)


def reference(output: PathLike | None = None, *, recipe=None, cache_dir: PathLike = "~/.cache/geosurge",
              shipped: bool = True, retrain: bool = False, feature_cache: PathLike | None = None,
              engine: str = "onnxruntime", threads: int | None = 2, write_views: bool = True,
              ship_to: PathLike | None = None, progress: bool = False, log: Log = print):
    """The reference model (``geosurge reference``; [reference.md]): ``edge`` trained on downward views of NASA Blue
    Marble, with its held-out accuracy in km beside two baselines. Returns a
    :class:`geosurge.training.reference.ReferenceModel` (``checkpoint``, ``report``, ``heldout_manifest``).

    Without ``output``: the cached one in ``cache_dir`` (keyed by the recipe, its rasters, the hierarchy and the
    geosurge version), else assembled from the shipped weights when they match the recipe (seconds), else trained
    (minutes on 2 cores); ``retrain`` trains and replaces the cached one. With ``output``: always trains there
    (``write_views``: also ``heldout/``; ``ship_to``: also writes the trained tensors and their record as shipped
    weights there). ``recipe``: a :class:`~geosurge.training.reference.ReferenceRecipe` (default: the shipped
    one). Raises GeosurgeError for a bad recipe or a damaged shipped file."""
    import torch

    from .training.reference import ReferenceModel, ReferenceRecipe, ensure_reference_model, train_reference

    recipe = recipe or ReferenceRecipe()
    if threads:
        torch.set_num_threads(threads)
    if output is None:
        ck = ensure_reference_model(cache_dir, recipe, log=log, progress=progress, feature_cache=feature_cache,
                                    threads=threads, engine=engine, shipped=shipped, retrain=retrain)
        return ReferenceModel.at(ck)
    from .training.reference import CHECKPOINT_DIR

    report = train_reference(recipe, output, log=log, progress=progress, feature_cache=feature_cache,
                             engine=engine, write_views=write_views, threads=threads, ship_to=ship_to)
    return ReferenceModel(Path(output) / CHECKPOINT_DIR, report)


def views(output: PathLike, *, sources=("bmng",), count: int = 100, seed: int = 0,
          footprint_km: tuple[float, float] = (600.0, 1600.0), size: int = 256, jitter_km: float = 25.0,
          fmt: str = "jpg", log: Log | None = None) -> Path:
    """Render ``count`` downward views centred on the photo density (deterministic by ``seed``) from each of
    ``sources`` (named rasters or paths: the same views from each) into ``output`` (images + ``manifest.csv``:
    path, lat, lon, source, heading_deg, footprint_km; replaced whole). Returns the manifest path. Raises
    GeosurgeError when fewer than ``count`` valid views can be drawn."""
    import numpy as np

    from .data import load_raster
    from .data.views import draw_valid_specs, render_views, view_set_entries, write_view_manifest
    from .fsutil import check_replaceable

    check_replaceable(output, "view set", view_set_entries)  # before rendering: never a user's folder or file
    rasters = [load_raster(s) for s in sources]
    specs = draw_valid_specs(count, np.random.default_rng(seed), rasters, footprint_km, size, jitter_km)
    groups = [(r.name, specs, render_views(r, specs, progress=log is not None, desc=f"render {r.name}"))
              for r in rasters]
    return write_view_manifest(output, groups, fmt=fmt)


def verify(bundle, backend: str | None = None, threads: int | None = None, **options) -> dict:
    """On-device parity: every sha256, then the golden probes against their FP32 references under the manifest's
    gates (``geosurge.runtime.verify_bundle``); ``options``: the backend's own (OpenVINO ``device``,
    ``precision_hint``)."""
    from .runtime.verify import verify_bundle

    return verify_bundle(bundle, backend, threads, **options)


def choose_backend(bundle, *, threads: int | None = None, backends: Iterable[str] | None = None,
                   min_speedup: float = 1.0, iters: int = 30, pause_ms: float = 100.0, write: bool = True,
                   images=None, log: Log = print) -> dict:
    """Time every installed backend that reads ``bundle`` (interleaved, paced) and replay its golden probes under
    the manifest's gates (and, with ``images``, compare each backend with the format's default one on those images
    under the same gates); the fastest that passes and beats the default backend by more than ``min_speedup``
    becomes this machine's default for the bundle (written to ``BUNDLE/backend.json`` with ``write``;
    ``geosurge.runtime.backends.choice``). Returns the record (``backend``, ``reason``, ``measured`` rows)."""
    from .runtime.backends.choice import measure_backends, write_choice
    from .runtime.bundle import open_bundle

    b = open_bundle(bundle)
    rec = measure_backends(b, threads=threads, backends=list(backends) if backends else None, iters=iters,
                           pause_ms=pause_ms, min_speedup=min_speedup, images=_paths(images) if images else None,
                           log=log)
    if write:
        rec["sidecar"] = str(write_choice(b, rec))
    return rec


def bench(bundle, backend: str | None = None, threads: int | None = None, images=None, iters: int = 50,
          warmup: int = 5) -> dict:
    """Latency per stage, throughput, peak RSS (``geosurge.runtime.bench_bundle``)."""
    from .runtime.bench import bench_bundle

    return bench_bundle(bundle, backend, threads, _paths(images), iters, warmup)


def benchmark(bundles, *, images=None, truth: PathLike | None = None, backends: Iterable[str] | None = None,
              threads: int | None = None, iters: int | None = None, warmup: int | None = None,
              pause_ms: float = 100.0, quick: bool = False, anchors: Iterable[str] = ("eager", "compile"),
              workers: int = 2, pools: Iterable[str] = ("serial", "threads", "processes"), rss: bool = True,
              json: PathLike | None = None, png: PathLike | None = None, cache_dir: PathLike | None = None,
              accuracy_km: float = 25.0, log: Log = print) -> dict:
    """``geosurge benchmark``: every bundle (one path or several) on every installed backend that reads its format,
    beside torch anchors of its source model, in one run. Returns the report (``latency`` rows per bundle x backend
    x image x pacing with p50 / p95 ms of decode, preprocess, inference, cell_search, e2e; ``summary`` per bundle x
    backend; ``skipped`` with reasons; ``throughput``, ``memory``, ``parity``, ``task``, ``call_order``; fields in
    docs/benchmarks.md). ``images``: files / folders for the throughput folder (default: phone-size JPEGs
    synthesised from the sample photos); ``truth``: a CSV manifest (path, lat, lon) for task-level parity;
    ``backends``: only these; ``pause_ms``: the paced rows' pause before each call (100 = a camera at 10 fps);
    ``quick``: a short run; ``anchors``: a subset of ("eager", "compile"), () for none; ``workers`` / ``pools``:
    the folder's decode pools; ``rss``: measure the runtime's peak RSS in a fresh process. Writes ``json`` and
    ``png`` when given. Raises BundleError naming a bundle that cannot be opened, before anything is timed.
    Print ``geosurge.export.benchmark.format_report(report)``, or ``short_form(report)`` for one bundle's lines."""
    from .export.benchmark import run_benchmark, write_png
    from .report import write_json

    report = run_benchmark(_paths(bundles), images=_paths(images), truth=truth,
                           backends=list(backends) if backends else None, threads=threads, iters=iters,
                           warmup=warmup, pause_ms=pause_ms, quick=quick, anchors=tuple(anchors or ()),
                           workers=workers, pools=tuple(pools), rss=rss, cache_dir=cache_dir,
                           accuracy_km=accuracy_km, log=log)
    if png:
        report["png"] = str(write_png(report, png))
    if json:
        write_json(json, report)
    return report

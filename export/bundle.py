"""Writing a bundle from a model: one directory a device needs.

    manifest.json   the typed manifest (``geosurge.manifest``): model, precision, I/O, preprocessing, hierarchy,
                    cell table, quantization and held-out parity, gates, source, provenance, sha256 of every file
    model.onnx      the model part from the export target (``model.mlpackage`` for Core ML)
    cells.npz       the hierarchy (geosurge.geo.load_hierarchy)
    cell_table.npz  per-level L2-normalised cell embeddings (fp16, or int8 with per-row scales) and temperatures
    places.npz      offline place names over the hierarchy's area
    golden.npz      golden probe inputs (real photos, preprocessed) and their FP32 torch embeddings

:func:`write_bundle` assembles it the same way for every target (``geosurge.export.target``): the table first (the
precision search scores with it), the target's model part, the held-out parity check of a non-FP32 part, places,
golden probes, then the one writer (``geosurge.export.writer``) seals and swaps it into place.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from geosurge import __version__
from geosurge.errors import GeosurgeError
from geosurge.formats import Format, Precision
from geosurge.images import load_image
from geosurge.manifest import (BackendChoice, CalibrationSummary, CellTableSection, GoldenSection, HierarchySection, Manifest,
                               PlacesSection, SourceSection, UncertaintySection, parts_for)
from geosurge.parity import DEFAULT_GATES
from geosurge.preprocess import preprocess
from geosurge.runtime.bundle import Bundle
from geosurge.runtime.cells import CellScorer, save_cell_table
from geosurge.runtime.golden import Golden

from .compare import REFERENCE, heldout_parity, torch_embed
from .places import write_places
from .target import ExportJob, ExportOptions, get_target
from .writer import BundleWriter

#: the ONNX bundle's part files (``geosurge.manifest.parts_for``)
PARTS = parts_for(Format.ONNX)
GOLDEN_COUNT = 6
#: held-out images for the parity check of precisions that calibrate on nothing (fp16, int8-dynamic, Core ML)
CHECK_VIEWS = 64
#: fewer held-out check images than this and the export notes that the gates rest on thin evidence
FEW_CHECK_IMAGES = 50


def golden_probes(model, photos: list[Path]) -> Golden:
    """Real photos decoded and preprocessed per the model's spec, with their FP32 torch embeddings."""
    spec = model.config.preprocess
    # decoded as the runtime decodes (the spec's rule: JPEG DCT scaling, alpha over the spec's background)
    x = np.stack([preprocess(load_image(p, spec), spec) for p in photos]).astype(np.float32)
    return Golden(x, torch_embed(model, x), [Path(p).name for p in photos])


def cell_tables(model) -> tuple[list[np.ndarray], np.ndarray]:
    """The model's per-level L2-normalised cell embeddings (float32) and temperatures."""
    with torch.no_grad():
        tables = [torch.nn.functional.normalize(t.detach().float(), dim=-1).numpy() for t in model.head.tables]
        temps = model.head.temperatures().detach().numpy()
    return tables, temps


@dataclass
class ImageSplit:
    """The images an export sets aside, in three disjoint parts: ``calibrate`` (the quantizer's ranges, QAT's
    training images), ``choose`` (where the precision search and the QAT-vs-PTQ comparison measure parity) and
    ``check`` (the held-out parity check recorded in the manifest: never calibrated on, never chosen on). Each is a
    ``CalibrationSet`` or None; ``record`` is the manifest's ``quantization.calibration``."""

    calibrate: object = None
    choose: object = None
    check: object = None
    record: dict | None = None

    def sources(self) -> str:
        """``"views of source images: 8 calibrate / 3 choose / 3 check"`` when the parts are augmented views
        (grouped by source image: no source image in two parts), else ``""``."""
        parts = [(k, s) for k, s in (("calibrate", self.calibrate), ("choose", self.choose), ("check", self.check))
                 if s is not None and len(s)]
        if not parts or any(getattr(s, "groups", None) is None for _, s in parts):
            return ""
        return "views of source images: " + " / ".join(f"{len(np.unique(s.groups))} {k}" for k, s in parts)

    def sizes(self) -> dict:
        n = lambda s: 0 if s is None else len(s)  # noqa: E731
        return {"calibrate": n(self.calibrate), "choose": n(self.choose), "check": n(self.check),
                "ground_truth": self.check is not None and self.check.truth is not None}


def split_images(options: ExportOptions, calibration, check_set, spec) -> ImageSplit:
    """How ``options``' precision uses the images: a calibrated precision (int8 / fp8) splits the calibration set
    (``quant.holdout`` to check, ``quant.choose`` to choose on when there is a choice — the search or QAT — the
    rest to calibrate; whole source images where augmented views share one); fp16 / int8-dynamic check on
    ``check_set`` (default: augmented views of the sample photos), split in halves when the search chooses; FP32
    needs none."""
    p, q = options.precision, options.quant
    if p.needs_calibration:
        if calibration is None:
            raise GeosurgeError(f"{options.spec.flag} --precision {p} needs a calibration set (--calib DIR|MANIFEST)")
        cal, choose, check = calibration.split_parts(check=q.holdout, choose=q.choose if q.chooses else 0.0,
                                                     seed=q.seed)
        split = ImageSplit(cal, choose if q.chooses else None, check)
        split.record = {**calibration.summary(), **{f"{k}_images": v for k, v in split.sizes().items()
                                                    if k != "ground_truth"},
                        "ground_truth": split.sizes()["ground_truth"]}
        return split
    if p == Precision.FP32:
        return ImageSplit()
    if check_set is None:
        from geosurge.calibration import sample_views_set

        check_set = sample_views_set(spec, CHECK_VIEWS * (2 if q.chooses else 1), seed=1, log=lambda m: None)
    if q.chooses:
        choose, check = check_set.split(0.5, q.seed)
        return ImageSplit(None, choose, check)
    return ImageSplit(None, None, check_set)


def fit_uncertainty(ref, images, scorer, source: str | None, log) -> UncertaintySection:
    """The prediction's temperature fitted on ``images`` (a CalibrationSet with ground truth) from the FP32 model's
    logit sums over the bundle's table (``scorer``): the manifest's ``uncertainty``
    (``geosurge.export.uncertainty``)."""
    from .uncertainty import check_images, fit_temperature

    truth = check_images(images, scorer.hierarchy, source)
    scores = scorer.search(torch_embed(ref, images.inputs), 1, with_scores=True).scores
    rec = fit_temperature(scores, *truth, scorer, log=log)
    return UncertaintySection.from_dict({**rec, "source": source}, "uncertainty")


def write_bundle(out_dir, model, source: dict, golden_photos: list[Path], options: ExportOptions | None = None, *,
                 calibration=None, check_set=None, gates: dict | None = None, log=print, latency=None,
                 recommend_backend: bool = False, reference=None, uncertainty=None,
                 uncertainty_source: str | None = None, **option_kwargs) -> Bundle:
    """Export ``model`` into a bundle at ``out_dir`` (swapped into place if one exists) and return it.

    ``options``: an :class:`ExportOptions`, or its :meth:`ExportOptions.create` keywords (``format`` / ``fmt``,
    ``target``, ``precision``, ``quant``, ``opset``, ``dynamic_batch``, ``with_logits``, ``table_dtype``,
    ``threads``). ``source``: what ``load_model`` returned beside the model (the manifest's ``source``).
    ``calibration``: a CalibrationSet for int8 / fp8, split into calibrate / choose / check parts
    (:func:`split_images`; with coordinates the check includes the accuracy deltas); ``check_set``: images for the
    parity check of the other non-FP32 precisions (default: 64 augmented sample views). ``gates``: parity gates
    (default ``geosurge.parity.DEFAULT_GATES``), for the search, the check and the manifest. ``latency``: how the
    onnxruntime target times its INT8 candidates (tests inject one; default: measured here).
    ``recommend_backend``: time every installed backend that reads the bundle against the default one and record
    the winner at parity in the manifest (``backend_choice``, valid on machines like this one). ``reference``: the
    FP32 torch model of the same architecture and hierarchy that the golden outputs, the choices and the held-out
    check are measured against (default: ``model``; a QAT checkpoint's teacher). ``uncertainty``: a CalibrationSet
    with ground truth (read from ``uncertainty_source``, recorded) to fit the prediction's temperature on
    (``geosurge.export.uncertainty``; the manifest's ``uncertainty``). Raises GeosurgeError (nothing is
    written) for a bad option or a failed precision search; a non-FP32 model that fails the gates is written, with
    ``bundle.manifest.check.passed`` False."""
    if options is None:
        kw = dict(option_kwargs)
        kw["format"] = kw.pop("fmt", kw.get("format"))
        alias = kw.pop("coreml_precision", None)
        kw["precision"] = kw.get("precision") if kw.get("precision") is not None else alias
        options = ExportOptions.create(**kw)
    elif option_kwargs:
        raise TypeError(f"write_bundle: give options or keywords, not both ({', '.join(option_kwargs)})")
    o, sub = options, (lambda m: log("      " + m))
    gates = gates or DEFAULT_GATES
    model = model.eval()
    ref = model if reference is None else reference.eval()
    h = model.hierarchy
    t_start = time.perf_counter()
    with BundleWriter(out_dir, log=sub) as w:
        log(f"[1/6] cell hierarchy and table ({o.table_dtype} embeddings, fp32 temperatures) ...")
        h.save(w.add("cells"))
        tables, temps = cell_tables(model)
        save_cell_table(w.add("cell_table"), tables, temps, dtype=o.table_dtype,
                        meta={"embed_dim": model.config.head.embed_dim, "hierarchy_digest": h.digest()})
        scorer = CellScorer.from_arrays(h, tables, temps, o.table_dtype)  # what the runtime will score with
        split = split_images(o, calibration, check_set, model.config.preprocess)
        if split.check is not None:
            sizes = split.sizes()
            parts = [f"{sizes[k]} to {what}" for k, what in (("calibrate", "calibrate"), ("choose", "choose on"),
                                                             ("check", "check")) if sizes[k]]
            views = split.sources()
            notes = (["disjoint"] if len(parts) > 1 else []) + ([views] if views else []) + (
                ["with ground truth"] if sizes["ground_truth"] else [])
            sub("images: " + ", ".join(parts) + (f" ({'; '.join(notes)})" if notes else ""))
        log(f"[2/6] model part, {o.precision} ({model.config.name}): {o.spec.describe(o.precision)} ...")
        out = get_target(o.target).export(model, ExportJob(o, w.stage, w.work, split.calibrate, split.choose, scorer,
                                                           gates, sub, latency, reference))
        w.add("model", out.model_file)
        quantization = out.quantization
        if split.record is not None:
            quantization.calibration = split.record
        log("[3/6] offline place names (GeoNames) ...")
        places = write_places(w.add("places"), h)
        sub(f"{places['places']:,} places")
        photos = golden_photos[:GOLDEN_COUNT]
        log(f"[4/6] golden probes: {len(photos)} real photos with FP32 torch outputs ...")
        golden = golden_probes(ref, photos)
        golden.save(w.add("golden"))
        manifest = Manifest(
            model=out.model, quantization=quantization,
            calibration=CalibrationSummary.from_dict(calibration.summary()) if split.record is not None else None,
            preprocess=model.config.preprocess, io=out.io, hierarchy=HierarchySection.of(h),
            cell_table=CellTableSection(dtype=o.table_dtype, embed_dim=model.config.head.embed_dim),
            golden=GoldenSection(count=len(golden.names), names=golden.names),
            parity_gates={k: (op, float(t)) for k, (op, t) in gates.items()},
            source=SourceSection.from_dict(source, "source"), provenance={**versions(), **out.provenance},
            parts={}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            places=PlacesSection.from_dict(places, "places"))
        if split.check is not None:
            against = (REFERENCE if reference is None
                       else f"FP32 torch ({source.get('reference') or 'the reference model given'})")
            log(f"[5/6] held-out parity vs {against} on {len(split.check)} image(s) never calibrated or chosen on "
                "...")
            if len(split.check) < FEW_CHECK_IMAGES:
                shown = f" ({views})" if views else ""
                sub(f"note: {len(split.check)} check image(s){shown}: thin evidence for the gates (one "
                    f"image is 1/{len(split.check)} of the agreement); give --calib with more of your own images")
            quantization.check = chk = heldout_parity(ref, w.staged(manifest), split.check.inputs, scorer, gates,
                                                      o.threads, truth=split.check.truth,
                                                      simulate_int8=o.quant.simulate_int8, reference=against)
            chk.split = split.sizes()
            sub(describe_check(chk, o.precision))
        else:
            log("[5/6] held-out parity: FP32 model part, nothing to check")
        if uncertainty is not None:
            manifest.uncertainty = fit_uncertainty(ref, uncertainty, scorer, uncertainty_source, sub)
        if recommend_backend:
            from geosurge.runtime.backends.choice import measure_backends

            sub("backends: timing every installed backend that reads this bundle (paced, interleaved) with golden "
                "parity ...")
            manifest.backend_choice = BackendChoice.from_dict(
                measure_backends(w.staged(manifest), threads=o.threads, log=sub), "backend_choice")
        log("[6/6] manifest with sha256 of every file ...")
        bundle = w.commit(manifest)
    files = bundle.manifest.files
    total = sum(f.bytes for f in files.values())
    log(f"bundle: {bundle.root} ({total / 1e6:.1f} MB, {len(files) + 1} files) in "
        f"{time.perf_counter() - t_start:.1f}s")
    return bundle


def describe_check(chk, precision) -> str:
    from geosurge.runtime.cli import describe_runner

    from .precision.search import summary

    if chk.passed is None:
        return f"{precision}: parity {chk.skipped}"
    return (f"{describe_runner(chk.runner, chk.runner_options or {})}: "
            + summary({"metrics": chk.metrics, "gates": chk.gates, "passed": chk.passed}))


def versions() -> dict:
    """The versions every bundle records; the target adds its tools' (onnx, onnxruntime, coremltools, modelopt)."""
    return {"geosurge": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}

"""Writing a bundle: one directory a device needs, written into a temp dir and renamed into place.

    manifest.json   schema, model config, preprocessing spec, I/O, precision, hierarchy summary, provenance,
                    parity gates, sha256 + size of every other file
    model.onnx      the exported graph (image -> embedding) at the bundle's precision (fp32, fp16, int8 QDQ,
                    int8 dynamic; or modelopt's QDQ for the TensorRT target)
    cells.npz       the hierarchy (geosurge.geo.load_hierarchy)
    cell_table.npz  per-level L2-normalised cell embeddings (fp16, or int8 with per-row scales) and temperatures
    places.npz      offline place names over the hierarchy's area
    golden.npz      golden probe inputs (real photos, preprocessed) and their FP32 torch embeddings
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from geosurge import __version__
from geosurge.fsutil import replace_dir
from geosurge.images import load_image
from geosurge.parity import DEFAULT_GATES
from geosurge.preprocess import preprocess
from geosurge.runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, manifest_digest, sha256_file
from geosurge.runtime.cells import CellScorer, save_cell_table

from .onnx import export_onnx
from .places import write_places

PARTS = {"model": "model.onnx", "cells": "cells.npz", "cell_table": "cell_table.npz", "places": "places.npz",
         "golden": "golden.npz"}
GOLDEN_COUNT = 6


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"geosurge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "exporter": "torch.onnx (TorchScript-based)"}


def golden_inputs(model, photos: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spec = model.config.preprocess
    xs, names = [], []
    for p in photos:
        xs.append(preprocess(load_image(p, spec), spec))  # decoded as the runtime decodes (the spec's rule)
        names.append(Path(p).name)
    x = np.stack(xs).astype(np.float32)
    with torch.no_grad():
        emb = model.eval().embed(torch.from_numpy(x)).numpy()
    return x, emb, names


def finalize_manifest(tmp: Path, manifest: dict) -> dict:
    """sha256 + size of every part (an ``.mlpackage`` folder: of every file inside it), then ``manifest_sha256``;
    writes ``manifest.json`` into ``tmp``. Returns the ``files`` table."""
    files = {}
    for name in sorted(manifest["parts"].values()):
        p = tmp / name
        for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
            files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest["files"] = files
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return files


def _latency_vs_fp32(fp32: Path, deployed: Path, facts: dict, threads: int, iters: int = 20) -> dict:
    """p50 of the FP32 and the deployed ONNX on onnxruntime CPU, interleaved run by run (same machine state)."""
    from .quantize import session

    x = np.zeros((1, 3, *facts["input_hw"]), np.float32)
    a, b = session(fp32, threads), session(deployed, threads)
    ta, tb = [], []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        a.run(None, {"image": x})
        t1 = time.perf_counter()
        b.run(None, {"image": x})
        t2 = time.perf_counter()
        if i >= 3:
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    pa, pb = float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3
    return {"fp32_p50_ms": round(pa, 2), "p50_ms": round(pb, 2), "speedup": round(pa / pb, 3), "threads": threads,
            "note": "onnxruntime CPU, batch 1, interleaved; a zero image"}


def write_bundle(out_dir, model, source: dict, golden_photos: list[Path], *, precision: str = "fp32",
                 opset: int = 17, dynamic_batch: bool = False, with_logits: bool = False, quant=None,
                 calibration=None, target: str = "onnxruntime", table_dtype: str = "float16", threads: int = 2,
                 check_set=None, gates: dict | None = None, fmt: str = "onnx", coreml_precision: str = "fp16",
                 log=print) -> Path:
    """Export ``model`` into a bundle at ``out_dir`` (replaced atomically if it exists).

    ``quant`` (a :class:`geosurge.export.quantize.QuantConfig`) and ``calibration`` (a CalibrationSet) choose the
    precision; ``target="tensorrt"`` writes modelopt's QDQ ONNX and a TensorRT-readiness report instead.
    ``check_set``: images for the parity check of non-int8 precisions (default: 64 augmented sample views).
    ``gates``: parity gates (default ``geosurge.parity.DEFAULT_GATES``), used by the search and the manifest.
    ``fmt="coreml"``: the model part is a Core ML ``model.mlpackage`` at ``coreml_precision`` instead."""
    from .quantize import QuantConfig, apply_precision

    quant = quant or QuantConfig(precision=precision)
    precision = quant.precision
    out_dir = Path(out_dir).absolute()  # quantizers run in a scratch working directory
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    work = tmp / ".work"
    work.mkdir()
    t_start = time.perf_counter()
    try:
        model = model.eval()
        parts = dict(PARTS)
        if fmt == "coreml":
            from .coreml import export_coreml

            parts["model"] = "model.mlpackage"
            log(f"[1/6] export Core ML ({model.config.name}, {coreml_precision}) ...")
            facts = export_coreml(model, tmp / parts["model"], coreml_precision, with_logits,
                                  metadata={"hierarchy_digest": model.hierarchy.digest(),
                                            "embed_dim": model.config.head.embed_dim},
                                  log=lambda m: log("      " + m))
            precision = coreml_precision
        else:
            log(f"[1/6] export ONNX ({model.config.name}, FP32 graph) ...")
            fp32 = work / "model-fp32.onnx"
            facts = export_onnx(model, fp32, opset=opset, dynamic_batch=dynamic_batch, with_logits=with_logits,
                                log=lambda m: log("      " + m))
        log(f"[2/6] cell hierarchy and table ({table_dtype} embeddings, fp32 temperatures) ...")
        h = model.hierarchy
        h.save(tmp / PARTS["cells"])
        with torch.no_grad():
            tables = [torch.nn.functional.normalize(t.detach().float(), dim=-1).numpy() for t in model.head.tables]
            temps = model.head.temperatures().detach().numpy()
        save_cell_table(tmp / PARTS["cell_table"], tables, temps, dtype=table_dtype,
                        meta={"embed_dim": model.config.head.embed_dim, "hierarchy_digest": h.digest()})
        log(f"[3/6] precision: {fmt if fmt == 'coreml' else target} {precision} ...")
        if fmt == "coreml":
            qrecord = {"precision": precision, "converter": "coremltools (torch.export)"}
        elif target == "tensorrt":
            from .tensorrt import apply_tensorrt_precision

            qrecord = apply_tensorrt_precision(fp32, tmp / PARTS["model"], quant, work, calibration,
                                               log=lambda m: log("      " + m))
        else:
            scorer = CellScorer.load(tmp / PARTS["cells"], tmp / PARTS["cell_table"])
            if check_set is None and precision != "fp32" and not quant.needs_calibration:
                from geosurge.calibration import sample_views_set

                check_set = sample_views_set(model.config.preprocess, 64, seed=1, log=lambda m: None)
            qrecord = apply_precision(fp32, tmp / PARTS["model"], quant, work, calibration, scorer, gates,
                                      threads=threads, check_set=check_set, log=lambda m: log("      " + m))
            if precision != "fp32":
                qrecord["latency_vs_fp32"] = lat = _latency_vs_fp32(fp32, tmp / PARTS["model"], facts, threads)
                log(f"      onnxruntime CPU, batch 1, {threads} threads: fp32 p50 {lat['fp32_p50_ms']:.1f} ms, "
                    f"{precision} p50 {lat['p50_ms']:.1f} ms (x{lat['speedup']:.2f})"
                    + ("  -- NOT faster than FP32 on this CPU" if lat["speedup"] < 1.0 else ""))
                chk = qrecord.get("check")
                if chk:
                    m = chk["metrics"]
                    log(f"      parity vs FP32 on {chk['images']} image(s) not used to calibrate: cosine mean "
                        f"{m['cosine_mean']:.4f} min {m['cosine_min']:.4f}, level agreement "
                        f"{m['level_top1_agreement_min']:.3f}, top-1 in top-5 {m['top1_in_top5']:.3f} -> "
                        f"{'PASS' if chk['passed'] else 'FAIL'}")
        shutil.rmtree(work)
        log("[4/6] offline place names (GeoNames) ...")
        places = write_places(tmp / PARTS["places"], h)
        log(f"      {places['places']:,} places")
        log(f"[5/6] golden probes: {min(GOLDEN_COUNT, len(golden_photos))} real photos with FP32 torch outputs ...")
        gx, gemb, gnames = golden_inputs(model, golden_photos[:GOLDEN_COUNT])
        np.savez_compressed(tmp / PARTS["golden"], inputs=gx, embedding=gemb, names=np.asarray(gnames, dtype=str))
        log("[6/6] manifest with sha256 of every file ...")
        size = model.config.preprocess.size
        manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": ({"format": "onnx", "precision": precision, "target": target,
                       "config": model.config.to_dict(), "opset": facts["opset"],
                       "layernorm_ops": facts["layernorm_ops"]} if fmt != "coreml" else
                      {"format": "coreml", "precision": precision, "target": "coreml",
                       "config": model.config.to_dict(), "coreml": facts}),
            "quantization": qrecord,
            "calibration": calibration.summary() if calibration is not None and quant.needs_calibration else None,
            "preprocess": model.config.preprocess.to_dict(),
            "io": {"inputs": [{"name": "image", "shape": ["batch" if dynamic_batch else 1, 3, size, size],
                               "dtype": "float32", "layout": "NCHW"} if fmt != "coreml" else
                              {"name": "image", "shape": [1, 3, size, size], "type": "image (RGB, 0..255; "
                               "the manifest's normalisation is inside the model)", "layout": "NCHW"}],
                   "outputs": [{"name": n, "dtype": "float32"} for n in facts["outputs"]]},
            "hierarchy": {"levels": h.num_levels, "sizes": h.sizes, "digest": h.digest(),
                          "tau_max": h.meta.get("tau_max"), "tau_min": h.meta.get("tau_min")},
            "cell_table": {"dtype": table_dtype, "embed_dim": model.config.head.embed_dim},
            "places": places,
            "golden": {"count": int(len(gx)), "names": gnames},
            "parity_gates": {k: list(v) for k, v in (gates or DEFAULT_GATES).items()},
            "source": source,
            "provenance": _versions(),
            "parts": parts,
        }
        files = finalize_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in files.values())
    log(f"bundle: {out_dir} ({total / 1e6:.1f} MB, {len(files) + 1} files) in {time.perf_counter() - t_start:.1f}s")
    return out_dir

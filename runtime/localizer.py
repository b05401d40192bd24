"""``Localizer``: a bundle + one backend -> predictions for images (no torch)."""
from __future__ import annotations

import time

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.images import load_image
from geosurge.inputs import expand_inputs
from geosurge.preprocess import preprocess

from .backends import embed_batches, open_runner
from .bundle import Bundle, open_bundle
from .cells import CellScorer, log_softmax
from .memory import release_freed_heap
from .places import Places

__all__ = ["Localizer", "OUTSIDE_REGION_MASS", "expand_inputs"]


#: a pruned bundle flags a photo "outside the kept region" when less than this share of the first level's
#: probability falls on kept cells
OUTSIDE_REGION_MASS = 0.5


class Localizer:
    """Locate photos with a bundle: ``Localizer(bundle_dir).locate("photo.jpg")``, or as a context manager that
    closes the backend: ``with Localizer(bundle_dir) as loc: ...``.

    ``bundle``: a bundle directory or an open :class:`Bundle`. The bundle's checksums are verified on load
    (``verify=False`` skips it). ``backend``: a name from ``geosurge.formats.Backend`` (default: the one the bundle's
    format implies, or one measured faster at parity on this machine: ``geosurge.runtime.backends.choice``);
    ``threads``: the backend's thread count (a backend that cannot honour it refuses it); ``options``: the backend's
    own (OpenVINO: ``{"device": "GPU", "precision_hint": "f32"}``).
    ``beam`` bounds the cell search work for very large tables (see :meth:`CellScorer.topk`).
    """

    def __init__(self, bundle, backend: str | None = None, threads: int | None = None, verify: bool = True,
                 beam: int | None = None, options: dict | None = None):
        if beam is not None and beam < 1:
            raise GeosurgeError(f"beam width must be >= 1, not {beam}")
        if isinstance(bundle, Bundle):
            self.bundle = bundle
            if verify:
                bundle.verify_checksums()
        else:
            self.bundle = open_bundle(bundle, verify=verify)
        m = self.bundle.manifest
        self.spec = m.preprocess
        self.runner = open_runner(self.bundle, backend, threads, **(options or {}))
        self.scorer = CellScorer.load(self.bundle.path("cells"), self.bundle.path("cell_table"))
        self.places = (Places.load(self.bundle.path("places"), m.places.layout if m.places else None)
                       if self.bundle.has("places") else None)
        self.input = m.io.input.name
        self.output = m.io.embedding.name
        self.static_batch = m.io.static_batch
        self.beam = beam
        #: the prediction's temperature (the manifest's ``uncertainty``, fitted on held-out images; else 1)
        self.temperature = float(m.uncertainty.temperature) if m.uncertainty is not None else 1.0
        release_freed_heap()  # what reading the hierarchy, table and places freed (the runner trims its own) ...
        if beam is None:
            self.scorer.prepare_search()  # build the exact search's int8 scoring graph now, not on the first photo
            self.scorer.cell_extent_km(0)  # and every cell's extent (the radius's floor)
            release_freed_heap()  # ... and building the search index: neither stacks on what comes next

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Localizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- stages ----------------------------------------------------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        return preprocess(load_image(image, self.spec), self.spec)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) preprocessed -> (N, D) embeddings; a static-batch model runs one image at a time."""
        return embed_batches(self.runner, x, self.input, self.output, self.static_batch)

    def predict_embedding(self, emb: np.ndarray, top_k: int = 5) -> dict:
        """One embedding -> prediction: the hierarchical product over the finest cells (or the beam's), the best
        cell's representative point, its probability (renormalised over the finest level, at the bundle's
        calibrated temperature when it has one: :attr:`temperature`) as confidence, the radius holding 68% of the
        probability (at least the best cell's own extent), the nearest place, and the top-k cells. For a pruned
        bundle also ``region_mass`` (the share of probability on the kept region) and ``outside_region``; the
        confidence is then scaled by the region mass."""
        return self._prediction(emb, self._search(emb, top_k))

    def _search(self, emb: np.ndarray, top_k: int) -> tuple:
        """The cell search of :meth:`predict_embedding` (exact top-k, or the beam's candidates): (cells, the
        positions of the top-k among them best first, their probabilities, the log-probability of every cell as
        a callable, the cells the radius is taken over or None for every finest cell). Raises GeosurgeError for
        ``top_k`` < 1."""
        if top_k < 1:
            raise GeosurgeError(f"top_k must be >= 1, not {top_k}")
        t = self.temperature
        if self.beam is None:
            r = self.scorer.search(emb, top_k, with_scores=True)
            cells, top = r.indices[0], np.arange(r.indices.shape[1])
            if t == 1.0:  # the search's own normaliser; every finest cell's probability bounded (see docs)
                return cells, top, np.exp(r.log_probs[0]), lambda: r.scores[0] - np.float32(r.log_norm[0]), None
            scores = r.scores[0] / np.float32(t)  # p(f) ∝ exp(A(f) / T), the calibrated temperature
            m = float(scores.max())
            log_norm = m + float(np.log(np.exp(scores - np.float32(m)).sum(dtype=np.float64)))
            return (cells, top, np.exp(r.logit_sums[0] / t - log_norm), lambda: scores - np.float32(log_norm),
                    None)
        cells, score = self.scorer.candidates(emb, self.beam)
        kk = min(top_k, score.size)
        top = np.argpartition(-score, kk - 1)[:kk]
        top = top[np.argsort(-score[top], kind="stable")]
        log_probs = log_softmax(score / t)
        return cells, top, np.exp(log_probs[top]), lambda: log_probs, cells

    def _prediction(self, emb: np.ndarray, found: tuple) -> dict:
        """What :meth:`predict_embedding` returns, from the cell search's result (:meth:`_search`)."""
        cells, top, top_probs, log_probs, radius_cells = found
        probs = np.exp(log_probs())
        best = int(cells[top[0]])
        lat, lon = float(self.scorer.rep_lat[best]), float(self.scorer.rep_lon[best])
        mass = self.scorer.region_mass(emb)
        confidence = float(top_probs[0]) * (1.0 if mass is None else float(mass))
        region = {} if mass is None else {"region_mass": round(float(mass), 6),
                                          "outside_region": bool(mass < OUTSIDE_REGION_MASS)}
        return {
            "lat": round(lat, 6), "lon": round(lon, 6),
            "confidence": round(confidence, 6), **region,
            # the 68% radius, at least the best cell's own extent (its probability is spread over the cell, not at
            # its point: a radius of 0 km would read as certainty)
            "uncertainty_km": round(max(self.scorer.uncertainty_km(probs, lat, lon, radius_cells),
                                        self.scorer.cell_extent_km(best)), 1),
            "place": self.places.nearest(lat, lon) if self.places is not None else None,
            "top_k": [{"cell": self.scorer.tokens[cells[i]], "index": int(cells[i]),
                       "lat": round(float(self.scorer.rep_lat[cells[i]]), 6),
                       "lon": round(float(self.scorer.rep_lon[cells[i]]), 6), "prob": round(float(p), 6)}
                      for i, p in zip(top, top_probs)],
        }

    def locate(self, image, top_k: int = 5) -> dict:
        """A path, encoded bytes or an RGB array -> prediction dict (lat, lon, confidence, uncertainty_km, place,
        top_k, timing_ms: decode, preprocess, inference, cell_search (the exact top-k), prediction (probabilities,
        radius, place)). Decoding follows the bundle's spec (``geosurge.images.load_image``: JPEG DCT scaling,
        alpha over the spec's background, EXIF orientation); arrays are RGB(A) uint8, uint16 or float in [0, 1].
        Raises ImageDecodeError (one line naming the input) for an unreadable or refused image."""
        t0 = time.perf_counter()
        rgb = load_image(image, self.spec)
        t1 = time.perf_counter()
        x = preprocess(rgb, self.spec)[None]
        t2 = time.perf_counter()
        emb = self.embed(x)
        t3 = time.perf_counter()
        found = self._search(emb[0], top_k)
        t4 = time.perf_counter()
        pred = self._prediction(emb[0], found)
        t5 = time.perf_counter()
        pred["timing_ms"] = {"decode": round((t1 - t0) * 1e3, 2), "preprocess": round((t2 - t1) * 1e3, 2),
                             "inference": round((t3 - t2) * 1e3, 2), "cell_search": round((t4 - t3) * 1e3, 2),
                             "prediction": round((t5 - t4) * 1e3, 2)}
        return pred

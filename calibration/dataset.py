"""Calibration sets for quantizers: selection, preprocessing per the bundle's spec, an on-disk cache, and feeders for
onnxruntime's ``CalibrationDataReader`` and modelopt's numpy calibration input.

Selection is deterministic (a seed). With coordinates (a manifest) and a hierarchy, it is geographically stratified:
images are dealt round-robin over the hierarchy's level-0 cells, so a set of N covers as many regions as it can
instead of following the photo density. Images that fail to decode are skipped, counted and replaced.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError, InputFileError
from geosurge.fsutil import atomic_write_bytes
from geosurge.images import ReadSummary, load_image
from geosurge.inputs import list_image_source
from geosurge.preprocess import PreprocessSpec, normalize, random_resized_crop, resize_and_crop

DEFAULT_SIZE = 256
RECOMMENDED_MIN = 100
CACHE_VERSION = 3  # 2: coordinates cached beside the inputs; 3: uint8 pixels, not float32 inputs


@dataclass
class CalibrationSet:
    """N images resized and cropped per ``spec`` and held as uint8 pixels (N, S, S, 3) RGB: a quarter of the memory
    of the float32 model inputs (150 KB an image at 224 px instead of 602 KB), so a 24 GB machine holds tens of
    thousands for QAT. The photometric part (scale, mean / std, channel order) is applied per batch when read
    (:meth:`batch`, :attr:`inputs`), with :func:`geosurge.preprocess.normalize`: the same float32 values as
    :func:`geosurge.preprocess.preprocess` of each image."""
    pixels: np.ndarray  # (N, S, S, 3) uint8 RGB, resized and cropped per the spec
    spec: PreprocessSpec
    names: list[str]
    digest: str  # content hash: spec + selection + every selected file's bytes
    stratified: bool
    skipped: list[dict] = field(default_factory=list)
    from_cache: bool = False
    #: source image per item when several items come from one image (augmented views): the held-out split then
    #: holds out whole images, so no scene is on both sides
    groups: np.ndarray | None = None
    #: true coordinates (degrees) per image when the source is a manifest: the parity check then measures the
    #: accuracy deltas in km
    lat: np.ndarray | None = None
    lon: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.pixels))

    def batch(self, idx) -> np.ndarray:
        """Model inputs (k, 3, S, S) float32 of the images ``idx`` (a slice, or an int array) selects, preprocessed
        per the spec."""
        return normalize(self.pixels[idx], self.spec)

    @property
    def inputs(self) -> np.ndarray:
        """Every image's model input (N, 3, S, S) float32: made on each access, 4x the memory of :attr:`pixels`
        (read large sets with :meth:`batch`)."""
        return self.batch(slice(None))

    def summary(self) -> dict:
        """What goes into a bundle manifest."""
        return {"size": len(self), "digest": self.digest, "stratified": self.stratified,
                "skipped_undecodable": len(self.skipped)}

    def split(self, holdout: float = 0.25, seed: int = 0) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(calibration, held-out) parts, e.g. for checking parity gates on images the quantizer did not see."""
        cal, _, hold = self.split_parts(check=holdout, choose=0.0, seed=seed)
        return cal, hold

    def split_parts(self, check: float = 0.25, choose: float = 0.0,
                    seed: int = 0) -> tuple["CalibrationSet", "CalibrationSet", "CalibrationSet"]:
        """Three disjoint parts (calibrate, choose, check): ``check`` and ``choose`` are fractions of the set; the
        quantizer calibrates on the first, the precision search chooses its mix on the second, the parity gates are
        measured on the third — no image (and, for augmented views, no source image: ``groups``) is in two parts.
        ``choose`` 0 gives an empty choose part. Each non-empty fraction gets at least one unit (image or group)
        and calibration keeps at least one. Raises GeosurgeError when the set is too small for that."""
        rng = np.random.default_rng(seed)
        grouped = self.groups is not None and len(np.unique(self.groups)) > 1
        units = rng.permutation(np.unique(self.groups)) if grouped else rng.permutation(len(self))
        n = len(units)
        n_check = min(n - 1, max(1, int(round(n * check))))
        n_choose = min(n - 1 - n_check, max(1, int(round(n * choose)))) if choose > 0 else 0
        if n_check < 1 or (choose > 0 and n_choose < 1):
            raise GeosurgeError(f"a calibration set of {len(self)} image(s) cannot be split into calibrate / choose / "
                                f"check parts; give more images (--calib-size)")
        picks = (units[n_check + n_choose:], units[n_check:n_check + n_choose], units[:n_check])
        parts = []
        for tag, chosen in zip(("", ":choose", ""), picks):
            idx = np.flatnonzero(np.isin(self.groups, chosen)) if grouped else np.sort(chosen)
            parts.append(self.subset(idx, f"{self.digest}:{seed}:{check}{tag}"))
        return parts[0], parts[1], parts[2]

    def subset(self, idx: np.ndarray, digest: str | None = None) -> "CalibrationSet":
        idx = np.asarray(idx, np.int64)
        return CalibrationSet(self.pixels[idx], self.spec, [self.names[i] for i in idx], digest or self.digest,
                              self.stratified,
                              groups=None if self.groups is None else self.groups[idx],
                              lat=None if self.lat is None else self.lat[idx],
                              lon=None if self.lon is None else self.lon[idx])

    @property
    def truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(lat, lon) degrees per image when the source had coordinates (a manifest), else None."""
        return None if self.lat is None else (self.lat, self.lon)

    def ort_reader(self, input_name: str = "image", batch_size: int = 1):
        """An ``onnxruntime.quantization.CalibrationDataReader`` over the set, ``batch_size`` images a read (each
        batch preprocessed when read)."""
        return make_ort_reader(self, input_name, batch_size)

    def modelopt_input(self) -> np.ndarray:
        """modelopt's ONNX PTQ takes the calibration data as one numpy array (N, 3, S, S) float32."""
        return self.inputs


def make_ort_reader(images, input_name: str = "image", batch_size: int = 1):
    """An ``onnxruntime.quantization.CalibrationDataReader`` feeding ``images`` ``batch_size`` at a time: a
    :class:`CalibrationSet` (each batch preprocessed when read) or an (N, ...) float32 array of model inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    take = images.batch if isinstance(images, CalibrationSet) else images.__getitem__

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(images):
                return None
            batch = take(slice(self.i, self.i + batch_size))
            self.i += batch_size
            return {input_name: np.ascontiguousarray(batch, np.float32)}

        def rewind(self):
            self.i = 0

    return _Reader()


def _candidates(source, log=print,
                what: str = "calibration") -> tuple[list[Path], np.ndarray | None, np.ndarray | None]:
    return list_image_source(source, f"{what} source", log=log)


def selection_order(n_items: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """Deterministic order in which candidates are taken. With ``strata`` (a group id per item, -1 = none), items
    are dealt round-robin over the groups (groups in seeded order, items within a group shuffled), so any prefix is
    as evenly spread over the groups as it can be."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.permutation(n_items)
    groups = [rng.permutation(np.flatnonzero(strata == g)) for g in rng.permutation(np.unique(strata))]
    order = []
    depth = 0
    while len(order) < n_items:
        order += [int(g[depth]) for g in groups if depth < len(g)]
        depth += 1
    return np.asarray(order, dtype=np.int64)


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def build_calibration_set(source, spec: PreprocessSpec, size: int = DEFAULT_SIZE, seed: int = 0, hierarchy=None,
                          cache_dir=None, batch_size: int = 1, log=print, what: str = "calibration",
                          recommended: int = RECOMMENDED_MIN) -> CalibrationSet:
    """Select, decode and preprocess ``size`` images from a folder or manifest (cached by content hash). ``what``
    names the set in log lines and errors (another use of the same images, e.g. "uncertainty"); fewer than
    ``recommended`` images warns (0: never)."""
    files, lat, lon = _candidates(source, log, what)
    if not files:
        raise InputFileError(f"{source}: no images found")
    strata = None
    if lat is not None and hierarchy is not None:
        strata = hierarchy.locate(lat, lon, strict=False)[:, 0]
    order = selection_order(len(files), seed, strata)
    key_src = {"v": CACHE_VERSION, "spec": spec.to_dict(), "size": size, "seed": seed,
               "stratified": strata is not None,
               "files": [(files[i].name, _file_digest(files[i])) for i in order]}
    digest = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    cache = Path(cache_dir) / f"calib-{digest[:20]}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            cs = CalibrationSet(z["pixels"], spec, [str(s) for s in z["names"]], digest, strata is not None,
                                json.loads(bytes(z["skipped"]).decode()), from_cache=True,
                                lat=z["lat"] if "lat" in z else None, lon=z["lon"] if "lon" in z else None)
        log(f"{what}: {len(cs)} images from cache {cache}")
        return _check_size(cs, batch_size, source, what, recommended)
    xs, names, skipped, taken = [], [], [], []
    counts = ReadSummary()
    for i in order:
        if len(xs) >= size:
            break
        try:
            xs.append(resize_and_crop(load_image(files[i], spec), spec))
            names.append(str(files[i]))
            taken.append(i)
            counts.count(True)
        except InputFileError as e:
            skipped.append({"input": str(files[i]), "error": str(e)})
            counts.count(False)
    if skipped:
        log(f"{what}: refused {len(skipped)} unreadable file(s), e.g. {skipped[0]['error']}")
    log(f"{what}: {counts.read} read, {counts.refused} refused of {len(files)} candidate image(s)"
        + (f" ({len(files) - counts.files} not needed)" if len(files) > counts.files else ""))
    pixels = np.stack(xs) if xs else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    coords = {} if lat is None else {"lat": np.asarray(lat, np.float64)[taken], "lon": np.asarray(lon, np.float64)[taken]}
    cs = CalibrationSet(pixels, spec, names, digest, strata is not None, skipped, **coords)
    _check_size(cs, batch_size, source, what, recommended)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, pixels=pixels, names=np.asarray(names, dtype=str),
                 skipped=np.frombuffer(json.dumps(skipped).encode(), np.uint8), **coords)
        atomic_write_bytes(cache, buf.getvalue())
    log(f"{what}: {len(cs)} images ({'stratified over level-0 cells' if cs.stratified else 'seeded sample'}), "
        f"digest {digest[:12]}")
    return cs


def _check_size(cs: CalibrationSet, batch_size: int, source, what: str, recommended: int) -> CalibrationSet:
    if len(cs) < batch_size:
        raise GeosurgeError(f"{source}: only {len(cs)} readable {what} image(s)"
                            + (f", fewer than the batch size {batch_size}" if batch_size > 1 else "")
                            + (f" (e.g. {cs.skipped[0]['error']})" if cs.skipped else ""))
    if len(cs) < recommended:
        warnings.warn(f"{source}: {len(cs)} {what} images; at least {recommended} are recommended", stacklevel=3)
    return cs


def sample_views_set(spec: PreprocessSpec, size: int = DEFAULT_SIZE, seed: int = 0, photos=None,
                     log=print) -> CalibrationSet:
    """A calibration set when the user has none: ``size`` augmented views (random crops of 35-100% of the area,
    aspect 3:4-4:3, horizontal flips, brightness x0.7-1.3) of the packaged real sample photos. Real pixels, but few
    scenes: a set from the deployment's own images (``--calib``) calibrates better."""
    from geosurge.samples import sample_photo_paths

    photos = [Path(p) for p in (photos or sample_photo_paths())]
    key = {"v": CACHE_VERSION, "views": size, "seed": seed, "spec": spec.to_dict(),
           "photos": [(p.name, _file_digest(p)) for p in photos]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    rgbs = [load_image(p, spec, reduce=False) for p in photos]  # crops follow: keep full resolution
    rng = np.random.default_rng(seed)
    xs, names, groups = [], [], []
    for i in range(size):
        j = i % len(rgbs)
        groups.append(j)
        view = random_resized_crop(rgbs[j], rng)
        if rng.random() < 0.5:
            view = view[:, ::-1]
        view = np.clip(view.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
        xs.append(resize_and_crop(np.ascontiguousarray(view), spec))
        names.append(f"{photos[j].name}#view{i}")
    log(f"calibration: {size} augmented views of {len(photos)} sample photos (pass your own images for a "
        f"better set), digest {digest[:12]}")
    return CalibrationSet(np.stack(xs), spec, names, digest, stratified=False,
                          groups=np.asarray(groups))

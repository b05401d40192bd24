"""Image preprocessing, defined once.

The :class:`PreprocessSpec` lives in the model config, is written into every bundle manifest, and is applied by this
one OpenCV/numpy implementation on both sides: the torch toolkit (training, export golden inputs, parity) and the
torch-free runtime. No torch here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic", "area")
RESIZE_RULES = ("shorter_side", "stretch")
#: ``full``: every image is decoded at its stored size. ``jpeg_dct``: a JPEG is decoded by libjpeg at 1/2, 1/4 or
#: 1/8 scale (DCT scaling, ``cv2.IMREAD_REDUCED_COLOR_*``): the smallest that still leaves ``dct_oversample`` times
#: the resize target (see :meth:`PreprocessSpec.jpeg_reduction`).
DECODE_RULES = ("full", "jpeg_dct")
#: the background a transparent image is composited over (RGB, 0-255): white, what a browser or a photo viewer shows
#: behind a transparent PNG/WebP/GIF/HEIC on a page (the CSS initial canvas colour), so the model sees the picture
#: a person sees. Models trained on opaque photos never saw the colours hidden under alpha=0 either.
DEFAULT_BACKGROUND = (255, 255, 255)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded RGB image becomes the model's input tensor.

    ``resize="shorter_side"``: scale so the shorter side is ``resize_size``, then centre-crop ``size`` x ``size``.
    ``resize="stretch"``: scale straight to ``size`` x ``size``. Values are scaled to [0, 1], then
    ``(x - mean) / std`` per channel, in ``channel_order``; the tensor is float32 NCHW.

    Decoding is part of the spec too (:func:`geosurge.images.load_image` applies it): ``decode`` (one of
    :data:`DECODE_RULES`) and ``dct_oversample`` say whether and how far a JPEG is decoded at a reduced DCT scale
    (:meth:`jpeg_reduction`), and
    ``background`` is the RGB colour (0-255) a transparent image is composited over (:data:`DEFAULT_BACKGROUND`).
    A manifest written before these fields existed loads as ``decode="full"`` (what it was exported with) and the
    default background.
    """

    size: int = 224
    resize_size: int = 256
    resize: str = "shorter_side"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    decode: str = "jpeg_dct"
    dct_oversample: float = 2.0
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("size", "resize_size"):  # types first: a manifest's JSON can hold anything
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if (not isinstance(v, (tuple, list)) or len(v) != 3
                    or not all(_is_number(x) and np.isfinite(x) for x in v)):
                raise ValueError(f"{name} must be three numbers (R, G, B), got {v!r}")
        if not all(x > 0 for x in self.std):
            raise ValueError(f"std must be > 0, got {self.std!r}")
        if not _is_number(self.dct_oversample):
            raise ValueError(f"dct_oversample must be a number, got {self.dct_oversample!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR") or self.layout != "NCHW" or self.dtype != "float32":
            raise ValueError("only RGB/BGR, NCHW, float32 inputs are supported")
        if self.size < 1 or self.resize_size < self.size and self.resize == "shorter_side":
            raise ValueError(f"need resize_size >= size >= 1 (got {self.resize_size}, {self.size})")
        if self.decode not in DECODE_RULES:
            raise ValueError(f"decode must be one of {DECODE_RULES}, got {self.decode!r}")
        if not self.dct_oversample >= 1.0:
            raise ValueError(f"dct_oversample must be >= 1 (1 = the decoded image just covers the resize target), "
                             f"got {self.dct_oversample!r}")
        bg = tuple(self.background)
        if len(bg) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in bg):
            raise ValueError(f"background must be three integers 0-255 (RGB), got {self.background!r}")
        object.__setattr__(self, "background", tuple(int(v) for v in bg))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["background"] = list(self.mean), list(self.std), list(self.background)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """The spec of a dict (``to_dict``'s, a manifest's ``preprocess``). Raises ValueError naming the field for a
        missing, unknown or ill-typed one."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object, found {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        d = dict(d)
        d["mean"], d["std"] = (tuple(d[k]) if isinstance(d[k], (list, tuple)) else d[k] for k in ("mean", "std"))
        d.setdefault("decode", "full")  # written before the field existed: decoded at full size
        d["background"] = tuple(d.get("background", DEFAULT_BACKGROUND))
        return cls(**d)

    def jpeg_reduction(self, h: int, w: int) -> int:
        """The DCT scale divisor (1, 2, 4 or 8) for a JPEG stored at ``h`` x ``w`` pixels: with ``decode="jpeg_dct"``
        the largest divisor whose decoded shorter side (libjpeg rounds up: ``ceil(min(h, w) / k)``) is still at
        least ``dct_oversample`` times the resize target (``resize_size`` for ``shorter_side``, ``size`` for
        ``stretch``), so the resize after it still shrinks by that factor or more; 1 with ``decode="full"``.
        Orientation swaps ``h`` and ``w`` and does not change the rule.

        Why 2 by default (benchmarks/decode.py, edge model, 12 MP JPEGs of the real sample photos): decoded at 1/8
        (just covering 256 px) the embedding cosine to the full decode was 0.995 mean / 0.988 min; keeping 2x the
        target (1/4 for a 4032 x 3024 photo) it was 0.9995 / 0.9988, at most a few ms slower."""
        if self.decode != "jpeg_dct":
            return 1
        need = self.dct_oversample * (self.resize_size if self.resize == "shorter_side" else self.size)
        for k in (8, 4, 2):
            if -(-min(h, w) // k) >= need:
                return k
        return 1

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.size, self.size)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _cv2():
    import cv2

    return cv2


def _interp(name: str, shrinking: bool):
    cv2 = _cv2()
    if name == "area" or shrinking:
        # shrinking: INTER_AREA anti-aliases (as PIL/torchvision's antialiased resize does); plain bilinear or
        # bicubic sampling aliases badly on large photos
        return cv2.INTER_AREA
    return {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[name]


#: ``shorter_side`` resizes whose result would be more than this many times longer than wide take the crop-first
#: path (:func:`resize_and_crop`); every photo up to 4:1 (all camera formats, most panoramas) takes the plain
#: resize-then-crop path, unchanged
CROP_FIRST_ASPECT = 4.0


def resize_and_crop(rgb: np.ndarray, spec: PreprocessSpec, crop_first: bool | None = None) -> np.ndarray:
    """Geometric part: HxWx3 uint8 RGB -> size x size x 3 uint8.

    ``shorter_side``: resize so the shorter side is ``resize_size``, then take the centre ``size`` crop. When the
    resized image would be longer than :data:`CROP_FIRST_ASPECT` times its width (``crop_first=None``; True/False
    force it), only the source span the centre crop reads is resized: the long axis is cut to the crop's footprint
    plus the interpolation kernel's margin, at a start whose resized position falls on a whole pixel, and resized
    with the same scale factors, so the output equals resize-then-crop up to OpenCV's fixed-point rounding (tested
    on real photos) while memory and time stay those of a ``size``-wide image for any aspect ratio (a 1 x 60,000
    strip would otherwise ask for a 256 x 15,360,000 intermediate, 11.8 GB)."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    if spec.resize == "stretch":
        return cv2.resize(rgb, (spec.size, spec.size), interpolation=_interp(spec.interpolation, h * w > spec.size ** 2))
    nh, nw = _shorter_side_size(h, w, spec.resize_size)
    interp = _interp(spec.interpolation, nh < h)
    top, left = _center_offsets(nh, nw, spec.size)
    if crop_first is None:
        crop_first = max(nh, nw) > CROP_FIRST_ASPECT * min(nh, nw)
    if not crop_first:
        out = cv2.resize(rgb, (nw, nh), interpolation=interp)
        return out[top:top + spec.size, left:left + spec.size]
    y0, y1, ty = _source_span(h, nh, top, spec.size)
    x0, x1, tx = _source_span(w, nw, left, spec.size)
    out = cv2.resize(rgb[y0:y1, x0:x1], None, fx=nw / w, fy=nh / h, interpolation=interp)
    return np.ascontiguousarray(out[ty:ty + spec.size, tx:tx + spec.size])


#: source pixels kept beyond the crop's footprint on each side: bicubic reads 2 neighbours, plus rounding
_KERNEL_MARGIN = 4
#: how far back the window start may move to put its resized position on a whole pixel
_ALIGN_SEARCH = 256


def _source_span(n: int, m: int, offset: int, size: int) -> tuple[int, int, int]:
    """Source window [a0, a1) along one axis (``n`` source px resized to ``m``) that the output span
    [offset, offset + size) reads, and where that span starts in the resized window. a0 is chosen (up to
    ``_ALIGN_SEARCH`` px before the footprint) so that ``a0 * m / n`` is as close to a whole number as it gets: the
    window's resized pixels then sit on the full resize's pixel grid."""
    fx, scale = m / n, n / m
    lo = int(np.floor(offset * scale)) - _KERNEL_MARGIN
    hi = int(np.ceil((offset + size) * scale)) + _KERNEL_MARGIN + 1
    if lo <= 0:
        a0 = 0
    else:
        cand = np.arange(lo, max(-1, lo - _ALIGN_SEARCH), -1)
        err = np.abs(cand * fx - np.round(cand * fx))
        a0 = int(cand[int(np.argmin(err))])
    a1 = min(n, hi)
    if a1 >= n and a0 <= 0:
        return 0, n, offset
    return a0, a1, int(round(offset - a0 * fx))


def _shorter_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's rule (what torch training pipelines use): the long side is truncated, not rounded."""
    if h <= w:
        return short, max(short, int(short * w / h))
    return max(short, int(short * h / w)), short


def _center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision CenterCrop's offsets: round((dim - size) / 2)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def normalize(rgb_square: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Photometric part: size x size x 3 uint8 RGB -> 3 x size x size float32; a batch (n, size, size, 3) -> (n, 3,
    size, size), each image's values those of its own call."""
    x = rgb_square.astype(np.float32) * (1.0 / 255.0)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
        mean, std = spec.mean[::-1], spec.std[::-1]
    else:
        mean, std = spec.mean, spec.std
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HxWx3 uint8 RGB -> (3, size, size) float32, exactly per the spec."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    return normalize(resize_and_crop(rgb, spec), spec)


def ten_crop(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """TenCrop (the paper's test-time averaging): the shorter side resized to ``resize_size``, the 4 corner and
    centre ``size`` crops, and their horizontal flips -> (10, 3, size, size) float32."""
    cv2 = _cv2()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    nh, nw = _shorter_side_size(h, w, spec.resize_size)
    img = cv2.resize(rgb, (nw, nh), interpolation=_interp(spec.interpolation, nh < h))
    s = spec.size
    origins = [(0, 0), (0, nw - s), (nh - s, 0), (nh - s, nw - s), _center_offsets(nh, nw, s)]
    crops = [img[t:t + s, l:l + s] for t, l in origins]
    crops += [np.ascontiguousarray(c[:, ::-1]) for c in crops]
    return np.stack([normalize(c, spec) for c in crops])


def random_resized_crop(rgb: np.ndarray, rng: np.random.Generator, area=(0.35, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """A crop of ``area`` (fraction range) of the image at an aspect ratio in ``ratio`` (log-uniform), placed
    uniformly: the augmentation behind calibration views and distillation views."""
    h, w = rgb.shape[:2]
    a = rng.uniform(*area) * h * w
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = min(w, int(round(np.sqrt(a * aspect)))), min(h, int(round(np.sqrt(a / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return rgb[y0:y0 + ch, x0:x0 + cw]

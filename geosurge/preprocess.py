"""Image preprocessing, defined once.

The :class:`PreprocessSpec` lives in the model config, is written into every bundle manifest, and is applied by this
one OpenCV/numpy implementation on both sides: the torch toolkit (training, export golden inputs, parity) and the
torch-free runtime. No torch here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic", "area")
RESIZE_RULES = ("shorter_side", "stretch")

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
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR") or self.layout != "NCHW" or self.dtype != "float32":
            raise ValueError("only RGB/BGR, NCHW, float32 inputs are supported")
        if self.size < 1 or self.resize_size < self.size and self.resize == "shorter_side":
            raise ValueError(f"need resize_size >= size >= 1 (got {self.resize_size}, {self.size})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.size, self.size)


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


def resize_and_crop(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Geometric part: HxWx3 uint8 RGB -> size x size x 3 uint8."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    if spec.resize == "stretch":
        return cv2.resize(rgb, (spec.size, spec.size), interpolation=_interp(spec.interpolation, h * w > spec.size ** 2))
    nh, nw = _shorter_side_size(h, w, spec.resize_size)
    out = cv2.resize(rgb, (nw, nh), interpolation=_interp(spec.interpolation, nh < h))
    top, left = _center_offsets(nh, nw, spec.size)
    return out[top:top + spec.size, left:left + spec.size]


def _shorter_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's rule (what torch training pipelines use): the long side is truncated, not rounded."""
    if h <= w:
        return short, max(short, int(short * w / h))
    return max(short, int(short * h / w)), short


def _center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision CenterCrop's offsets: round((dim - size) / 2)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def normalize(rgb_square: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Photometric part: size x size x 3 uint8 RGB -> 3 x size x size float32."""
    x = rgb_square.astype(np.float32) * (1.0 / 255.0)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
        mean, std = spec.mean[::-1], spec.std[::-1]
    else:
        mean, std = spec.mean, spec.std
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


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

"""Decoding images to RGB uint8 with OpenCV (torch-free; shared by the toolkit and the runtime)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputFileError

#: Decompression-bomb guard: OpenCV refuses to decode an image whose header claims more pixels than this, before
#: allocating it. Set before cv2 is first imported (OpenCV reads it once); override with the same variable.
MAX_IMAGE_PIXELS = int(os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000)))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm")


class ImageDecodeError(InputFileError):
    """An input that is not a decodable image; the message names it."""


def to_rgb_uint8(arr: np.ndarray, name: str = "array") -> np.ndarray:
    """Any HxW, HxWx1/3/4 array of uint8/uint16/float in [0,1] -> HxWx3 uint8 RGB (arrays are taken as RGB(A))."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise ImageDecodeError(f"{name}: unsupported image shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported image dtype {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB. EXIF orientation is applied; gray, alpha, 16-bit and CMYK become 8-bit RGB."""
    import cv2

    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # IMREAD_COLOR honours EXIF orientation, always 3-channel 8-bit
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise ImageDecodeError(f"{name}: image too large (more than {MAX_IMAGE_PIXELS:,} pixels; refused "
                                   "before decoding as a possible decompression bomb)") from None
        raise ImageDecodeError(f"{name}: cannot decode image ({str(e).strip().splitlines()[-1]})") from None
    if bgr is None:
        raise ImageDecodeError(f"{name}: not a decodable image (truncated, corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(source) -> np.ndarray:
    """A path, encoded bytes or an array -> HxWx3 uint8 RGB."""
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source))
    path = Path(source)
    if not path.exists():
        raise ImageDecodeError(f"{path}: file not found")
    if not path.is_file():
        raise ImageDecodeError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror})") from None
    return decode_image_bytes(data, str(path))

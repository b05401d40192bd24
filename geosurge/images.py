"""Finding and decoding images: what a phone, a camera card or a web folder holds -> RGB uint8 (torch-free; shared by
the toolkit and the runtime).

* :func:`list_images` expands files and folders to the images they hold, deciding by content (magic bytes), not by
  name; every other file is accounted for as skipped, with the reason.
* :func:`load_image` decodes one image the way the model's :class:`~geosurge.preprocess.PreprocessSpec` says
  (JPEG DCT scaling, the background transparent pixels are composited over), honouring EXIF orientation, and
  refuses sizes outside the limits with an error that names the file.

Decoders: OpenCV (JPEG incl. JFIF and MPO, PNG, WebP, BMP, TIFF, JPEG 2000, PNM, GIF where OpenCV has it); Pillow
with pillow-heif for HEIF/HEIC and Pillow's own AVIF (the optional ``geosurge[heif]`` install), and Pillow for GIF
where OpenCV lacks it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .image_headers import (SNIFF_BYTES, apply_orientation, describe_non_image, exif_orientation, header_size,
                            heif_has_transform, png_significant_bits, sniff_kind)

#: Decompression-bomb guard: an image whose header claims more pixels than this is refused before it is decoded.
#: OpenCV reads the variable once, when cv2 is first imported: set it before (it is set here if unset).
MAX_IMAGE_PIXELS = int(os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000)))

#: Longest side / shortest side above which an image is refused (a 1 x 60,000 strip holds no scene to locate).
#: Preprocessing itself is bounded for any aspect ratio (crop-first resize); ``GEOSURGE_MAX_ASPECT`` changes it
#: (``inf`` turns it off), as does ``load_image(..., max_aspect=...)``.
MAX_ASPECT = float(os.environ.get("GEOSURGE_MAX_ASPECT", "20"))

#: Names that look like images. Content decides what a file is; the name only decides what happens to a file in a
#: folder whose content matches no image format: with one of these extensions it is refused with an error naming
#: it (a truncated or mislabelled photo), otherwise it is skipped as not an image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp",
                    ".tif", ".tiff", ".jp2", ".j2k", ".jpf", ".pgm", ".ppm", ".pbm", ".pnm", ".pam", ".heic", ".heif",
                    ".hif", ".avif", ".jxl", ".hdr", ".pic", ".exr", ".pfm", ".sr", ".ras", ".dng")

HEIF_HINT = "pip install 'geosurge[heif]' (pillow-heif; Pillow >= 11.3 for AVIF)"


class ImageDecodeError(InputFileError):
    """An input that is not a decodable image, or one outside the size limits; the message names it."""


# ---- listing --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageEntry:
    """One input to decode. ``kind``: the format found by content (``"jpeg"``, ``"png"``, ``"heif"``, ... see
    :data:`geosurge.image_headers.IMAGE_KINDS`), or None when the content matched no image signature or could not
    be read (decoding then raises an :class:`ImageDecodeError` that says why). ``from_folder``: found by expanding a
    folder (False: named by the caller)."""

    path: Path
    kind: str | None
    from_folder: bool = False


@dataclass(frozen=True)
class SkippedFile:
    """A file in a folder that is not an image (text, video, macOS ``._`` metadata, ...), with what it is."""

    path: Path
    reason: str


@dataclass
class ReadSummary:
    """Counts for one command's inputs: ``read`` (decoded and used), ``refused`` (an error line was given),
    ``skipped`` (files in folders that are not images). Callers count ``read``/``refused`` as they decode."""

    read: int = 0
    refused: int = 0
    skipped: int = 0

    @property
    def files(self) -> int:
        return self.read + self.refused + self.skipped

    def count(self, ok: bool) -> None:
        if ok:
            self.read += 1
        else:
            self.refused += 1

    def line(self, read_as: str = "read") -> str:
        """e.g. ``5 files: 4 read, 1 refused, 0 skipped (not an image)``"""
        return (f"{self.files} file{'s' if self.files != 1 else ''}: {self.read} {read_as}, {self.refused} refused, "
                f"{self.skipped} skipped (not an image)")

    def to_dict(self) -> dict:
        return {"files": self.files, "read": self.read, "refused": self.refused, "skipped": self.skipped}


@dataclass
class ImageListing:
    """What :func:`list_images` found: ``entries`` to decode (in order) and ``skipped`` non-image files.
    Iterating yields the entries."""

    entries: list[ImageEntry] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]

    def summary(self) -> ReadSummary:
        """A fresh :class:`ReadSummary` with ``skipped`` filled in; count reads and refusals into it."""
        return ReadSummary(skipped=len(self.skipped))

    def skip_lines(self) -> list[str]:
        return [f"skipped {s.path}: {s.reason}" for s in self.skipped]


def _head(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError:
        return None


def list_images(paths, recursive: bool = True) -> ImageListing:
    """Files and folders -> the images to decode, decided by content (magic bytes, :func:`sniff_kind`).

    A file named directly is always an entry (decoding says what is wrong with it). A folder expands (recursively
    unless ``recursive=False``, sorted by path) to every file whose content is an image, plus every file whose
    content is not but whose name says it should be (:data:`IMAGE_EXTENSIONS`: a truncated or mislabelled photo,
    refused with an error when decoded); the rest are ``skipped`` with what they are (text, a video, macOS ``._``
    metadata...). Reads at most :data:`~geosurge.image_headers.SNIFF_BYTES` of each file. Symlinked folders are
    not followed. A path that does not exist is an entry (its error is "file not found"). Standard library + numpy
    only (the runtime uses it)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = ImageListing()
    for p in map(Path, paths):
        if not p.is_dir():
            head = _head(p) if p.is_file() else None
            out.entries.append(ImageEntry(p, sniff_kind(head) if head else None, False))
            continue
        files = sorted(q for q in (p.rglob("*") if recursive else p.iterdir()) if q.is_file())
        for q in files:
            head = _head(q)
            if head is None:
                out.entries.append(ImageEntry(q, None, True))  # unreadable: refused with the OS's reason
                continue
            kind = sniff_kind(head)
            if kind is not None or q.suffix.lower() in IMAGE_EXTENSIONS and not head.startswith(b"\x00\x05\x16\x07"):
                out.entries.append(ImageEntry(q, kind, True))
            else:
                out.skipped.append(SkippedFile(q, describe_non_image(head)))
    return out


# ---- arrays ---------------------------------------------------------------------------------------------------------
#: a float array may exceed [0, 1] by this much (half an 8-bit step: arithmetic rounding) and is then clipped
FLOAT_SLACK = 1.0 / 510.0


def to_rgb_uint8(arr: np.ndarray, name: str = "array", background=None) -> np.ndarray:
    """An image array -> HxWx3 uint8 RGB. Accepted: HxW, HxWx1 (gray), HxWx3 (RGB), HxWx4 (RGBA, composited over
    ``background``, default white) of

    * uint8: 0-255;
    * uint16: 0-65535 (the top 8 bits are kept);
    * float16/32/64: **0.0-1.0** (scaled by 255 and rounded). A float array outside [0, 1] (beyond half an 8-bit
      step) or holding NaN/inf raises :class:`ImageDecodeError` naming the range found: a 0-255 float array
      (``img.astype(np.float32)``) is not silently clipped to white; divide it by 255 or pass uint8.

    Raises ImageDecodeError for any other shape or dtype."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise ImageDecodeError(f"{name}: unsupported image shape {a.shape} (expected HxW, HxWx1, HxWx3 RGB or "
                               "HxWx4 RGBA)")
    if a.dtype.kind == "f":
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageDecodeError(f"{name}: float image holds NaN or infinite values")
        if lo < -FLOAT_SLACK or hi > 1.0 + FLOAT_SLACK:
            raise ImageDecodeError(f"{name}: float image values must lie in [0, 1]; found [{lo:g}, {hi:g}] (a 0-255 "
                                   "float array: divide by 255, or pass uint8)")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported image dtype {a.dtype} (expected uint8, uint16 or float in "
                               "[0, 1])")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = composite(a[..., :3], a[..., 3], 255, background)
    return np.ascontiguousarray(a)


def composite(rgb: np.ndarray, alpha: np.ndarray, alpha_max: int, background=None) -> np.ndarray:
    """Straight (non-premultiplied, as in PNG, WebP, GIF, HEIF) alpha over a solid ``background`` (RGB 0-255,
    default :data:`~geosurge.preprocess.DEFAULT_BACKGROUND`): ``rgb * a + bg * (1 - a)`` with ``a = alpha /
    alpha_max``, rounded -> uint8. ``rgb`` is uint8 HxWx3."""
    from .preprocess import DEFAULT_BACKGROUND

    if alpha.min() == alpha_max:  # opaque: nothing to blend
        return np.ascontiguousarray(rgb)
    bg = np.asarray(DEFAULT_BACKGROUND if background is None else background, np.float32)
    a = alpha.astype(np.float32)[..., None] * (1.0 / alpha_max)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return (out + 0.5).astype(np.uint8)


# ---- decoding -------------------------------------------------------------------------------------------------------
def check_size(h: int, w: int, name: str, max_aspect: float | None = None, pixels: bool = True) -> None:
    """Refuse an image of more than :data:`MAX_IMAGE_PIXELS` pixels (``pixels=True``) or an aspect ratio above
    ``max_aspect`` (default :data:`MAX_ASPECT`), with an ImageDecodeError saying how to change the limit."""
    limit = MAX_ASPECT if max_aspect is None else max_aspect
    if pixels and h * w > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{name}: image too large ({w} x {h} = {h * w:,} pixels, more than {MAX_IMAGE_PIXELS:,};"
                               " refused before decoding as a possible decompression bomb; OPENCV_IO_MAX_IMAGE_PIXELS "
                               "raises the limit)")
    if max(h, w) > limit * min(h, w):
        raise ImageDecodeError(f"{name}: aspect ratio {max(h, w) / min(h, w):,.0f}:1 ({w} x {h} pixels) is above the "
                               f"limit of {limit:g}:1 (a strip, not a scene); GEOSURGE_MAX_ASPECT changes it")


def _opencv_error(e, name: str) -> ImageDecodeError:
    if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
        return ImageDecodeError(f"{name}: image too large (more than {MAX_IMAGE_PIXELS:,} pixels; refused before "
                                "decoding as a possible decompression bomb)")
    return ImageDecodeError(f"{name}: cannot decode image ({str(e).strip().splitlines()[-1]})")


def _imdecode(buf: np.ndarray, flags: int, name: str):
    import cv2

    try:
        return cv2.imdecode(buf, flags)
    except cv2.error as e:
        raise _opencv_error(e, name) from None


def _scale_16bit(a: np.ndarray, bits: int) -> np.ndarray:
    """uint16 samples -> uint8. A PNG's sBIT chunk may declare fewer significant bits than 16 (e.g. 12 from a
    12-bit sensor). The PNG specification (3rd ed., 12.4) says such samples are stored scaled up to 16 bits; many
    writers store the raw b-bit values instead (0-4095), which read as 16-bit come out nearly black. Raw values are
    told apart by content: all below 2**b and not all multiples of 2**(16-b) (what scaling up by a left shift
    gives). Raw samples are scaled by 255 / (2**b - 1); spec-conforming ones keep their top 8 bits, as OpenCV's
    8-bit decode does."""
    if 0 < bits < 16:
        top = int(a.max())
        step = 1 << (16 - bits)
        if top < (1 << bits) and (top == 0 or np.any(a % step)):
            return (a.astype(np.float32) * (255.0 / ((1 << bits) - 1)) + 0.5).astype(np.uint8)
    return (a >> 8).astype(np.uint8)


def _decode_opencv_unchanged(data: bytes, kind: str, name: str, background) -> np.ndarray | None:
    """PNG / WebP / GIF through OpenCV with alpha and bit depth kept (``IMREAD_UNCHANGED``), then EXIF orientation
    (PNG eXIf / WebP EXIF; what IMREAD_COLOR applies), significant bits and compositing done here."""
    import cv2

    a = _imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED, name)
    if a is None:
        return None
    if a.ndim == 2:
        a = a[..., None]
    bits = 16
    if a.dtype == np.uint16 and kind == "png":
        _, ctype, sbit = png_significant_bits(data)
        if sbit:
            n_color = 1 if ctype in (0, 4) else 3
            bits = max(sbit[:n_color])
    if a.dtype == np.uint16:
        alpha = _scale_16bit(a[..., 3], 16) if a.shape[2] == 4 else None
        color = _scale_16bit(a[..., :3] if a.shape[2] >= 3 else a[..., :1], bits)
    elif a.dtype == np.uint8:
        alpha = a[..., 3] if a.shape[2] == 4 else None
        color = a[..., :3] if a.shape[2] >= 3 else a[..., :1]
    else:
        raise ImageDecodeError(f"{name}: unsupported sample type {a.dtype} in a {kind.upper()} image")
    color = np.repeat(color, 3, axis=2) if color.shape[2] == 1 else cv2.cvtColor(color, cv2.COLOR_BGR2RGB)
    if alpha is not None:
        color = composite(color, alpha, 255, background)
    return np.ascontiguousarray(apply_orientation(color, exif_orientation(kind, data)))


_HEIF_REGISTERED = []


def _register_heif(name: str) -> None:
    if _HEIF_REGISTERED:
        return
    try:
        import pillow_heif
    except ImportError:
        raise ImageDecodeError(f"{name}: a HEIF/HEIC image needs the pillow-heif decoder: {HEIF_HINT}") from None
    # only the primary image is read: no thumbnails, depth maps or auxiliary images are decoded or kept
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    _HEIF_REGISTERED.append(True)


def _pillow_image(data: bytes, kind: str, name: str):
    """Open with Pillow (lazy: header only), registering pillow-heif for HEIF; a clear error when not installed."""
    try:
        from PIL import Image, features
    except ImportError:
        raise ImageDecodeError(f"{name}: reading {kind.upper()} needs Pillow: {HEIF_HINT}") from None
    if kind == "heif":
        _register_heif(name)
    if kind == "avif" and not features.check("avif"):
        raise ImageDecodeError(f"{name}: an AVIF image needs Pillow >= 11.3 built with AVIF: {HEIF_HINT}")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types for bad files; each becomes one line
        raise ImageDecodeError(f"{name}: cannot decode {kind.upper()} image ({e})") from None


def open_pillow(path):
    """A Pillow image of the file at ``path`` (lazy: header and metadata only, for EXIF), its kind found by content
    (:func:`geosurge.image_headers.sniff_kind`), with pillow-heif registered for HEIF/HEIC. Raises
    ImageDecodeError naming the file when it cannot be read or decoded, or when HEIF support is not installed."""
    path = Path(path)
    data = _read_bytes(path)
    return _pillow_image(data, sniff_kind(data[:SNIFF_BYTES]) or "image", str(path))


def _decode_pillow(data: bytes, kind: str, name: str, background, max_aspect) -> np.ndarray:
    """HEIF/HEIC (pillow-heif: libheif applies the container's rotation/mirror and resets EXIF orientation), AVIF
    (Pillow reports the container's rotation as EXIF orientation) and GIF: the first/primary image, EXIF
    orientation applied, transparency composited over ``background``."""
    from PIL import Image, ImageOps

    im = _pillow_image(data, kind, name)
    check_size(im.height, im.width, name, max_aspect)
    try:
        im.seek(0)
        # HEIF: pillow-heif's decode applies irot/imir and resets the EXIF tag to 1, keeping it as
        # "original_orientation"; a file without irot/imir (Canon/Sony .HIF, EXIF editors) is turned by that tag,
        # as a JPEG is. AVIF: Pillow reports irot/imir as the EXIF orientation (exif_transpose applies it).
        orientation = 1
        if kind == "heif" and not heif_has_transform(data):
            orientation = int(im.info.get("original_orientation") or 1)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"))
            rgb = composite(rgba[..., :3], rgba[..., 3], 255, background)
        else:
            rgb = np.asarray(im.convert("RGB"))
        return np.ascontiguousarray(apply_orientation(rgb, orientation if 1 <= orientation <= 8 else 1))
    except (Image.DecompressionBombError, MemoryError):
        raise ImageDecodeError(f"{name}: image too large to decode") from None
    except Exception as e:  # noqa: BLE001 -- truncated/corrupt data surfaces as OSError, ValueError, RuntimeError...
        raise ImageDecodeError(f"{name}: cannot decode {kind.upper()} image ({e})") from None


def decode_image_bytes(data: bytes, name: str = "<bytes>", spec=None, reduce: bool = True,
                       max_aspect: float | None = None) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB as a viewer shows it: EXIF orientation applied (JPEG, PNG, WebP, TIFF,
    HEIF, AVIF); gray, 16-bit (PNG sBIT honoured, see :func:`_scale_16bit`) and CMYK become 8-bit RGB; transparency
    is composited over ``spec.background`` (white without a spec); an MPO or an animated GIF gives its first image.

    With a ``spec`` and ``reduce=True``, a JPEG is decoded at the spec's DCT scale
    (:meth:`~geosurge.preprocess.PreprocessSpec.jpeg_reduction`). Sizes outside :func:`check_size`'s limits are
    refused, from the header where it gives the size. Raises ImageDecodeError naming ``name``."""
    import cv2

    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    background = None if spec is None else spec.background
    kind = sniff_kind(data[:SNIFF_BYTES])
    dims = header_size(kind, data)
    if dims is not None:
        check_size(*dims, name, max_aspect)
    rgb = None
    if kind in ("heif", "avif"):
        rgb = _decode_pillow(data, kind, name, background, max_aspect)
    elif kind in ("png", "webp", "gif"):
        rgb = _decode_opencv_unchanged(data, kind, name, background)
        if rgb is None and kind == "gif":  # an OpenCV built without its GIF decoder (before 4.11)
            rgb = _decode_pillow(data, kind, name, background, max_aspect)
    else:
        flags = cv2.IMREAD_COLOR  # honours EXIF orientation; 3-channel 8-bit out of gray, 16-bit, CMYK
        if kind == "jpeg" and spec is not None and reduce and dims is not None:
            flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                     8: cv2.IMREAD_REDUCED_COLOR_8}[spec.jpeg_reduction(*dims)]
        bgr = _imdecode(np.frombuffer(data, np.uint8), flags, name)
        if bgr is not None:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: no second full-size buffer
    if rgb is None:
        what = "" if kind else f"; its content is {describe_non_image(data[:SNIFF_BYTES])}"
        raise ImageDecodeError(f"{name}: not a decodable image (truncated, corrupt or unsupported format{what})")
    check_size(rgb.shape[0], rgb.shape[1], name, max_aspect)
    return rgb


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ImageDecodeError(f"{path}: file not found")
    if not path.is_file():
        raise ImageDecodeError(f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror})") from None


def load_image(source, spec=None, reduce: bool = True, max_aspect: float | None = None) -> np.ndarray:
    """The one decode entry point: a path (or :class:`ImageEntry`), encoded bytes, or an image array -> HxWx3 uint8
    RGB ready for :func:`geosurge.preprocess.preprocess` with the same ``spec``.

    With a ``spec`` (the bundle manifest's / model config's :class:`~geosurge.preprocess.PreprocessSpec`), decoding
    follows it: transparent pixels over ``spec.background``, and with ``reduce=True`` a JPEG decoded at the DCT
    scale ``spec.decode`` asks for, so the runtime, golden inputs, parity, calibration and training all see the
    same pixels. ``reduce=False`` decodes at full size (for augmentations that crop before resizing). Arrays are
    taken as RGB(A), see :func:`to_rgb_uint8` for the dtypes and ranges accepted. ``max_aspect`` overrides
    :data:`MAX_ASPECT`. Raises :class:`ImageDecodeError` (one line naming the input) for anything unreadable."""
    if isinstance(source, ImageEntry):
        source = source.path
    if isinstance(source, np.ndarray):
        rgb = to_rgb_uint8(source, background=None if spec is None else spec.background)
        check_size(rgb.shape[0], rgb.shape[1], "array", max_aspect, pixels=False)  # already in memory
        return rgb
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), "<bytes>", spec, reduce, max_aspect)
    path = Path(source)
    return decode_image_bytes(_read_bytes(path), str(path), spec, reduce, max_aspect)


def read_image(source) -> np.ndarray:
    """A path, encoded bytes or an array -> HxWx3 uint8 RGB at full size over the default background
    (``load_image(source)``)."""
    return load_image(source)

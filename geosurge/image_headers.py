"""What an image file is, from its first bytes and its header: the format (magic bytes), the pixel size, the EXIF
orientation and PNG's declared significant bits, without decoding any pixels. Standard library only (the runtime
uses it; it has no Pillow).

Signatures follow the WHATWG MIME Sniffing Standard, section 6.1 "Matching an image type pattern" (BMP, GIF, WebP,
PNG, JPEG) and the formats' own specifications: TIFF 6.0 (byte-order mark + 42), JPEG 2000 Part 1 (signature box and
codestream SOC/SIZ), Netpbm (P1-P7), ISO/IEC 23008-12 (HEIF) and the AV1 Image File Format (``ftyp`` brands), JPEG XL
(ISO/IEC 18181-2 container and codestream). Orientation values are EXIF 2.32 tag 0x0112.
"""
from __future__ import annotations

import struct

import numpy as np

#: formats ``sniff_kind`` recognises as images
IMAGE_KINDS = ("jpeg", "png", "gif", "webp", "bmp", "tiff", "jp2", "pnm", "heif", "avif", "jxl")

# ISO base media file format brands: HEIF still images / sequences (ISO/IEC 23008-12 annex B), AVIF (AV1 image file
# format section 9), and the common video brands (so a phone's .MOV / .MP4 beside its photos is named as a video)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2",
                b"heif"}
_AVIF_BRANDS = {b"avif", b"avis", b"avio"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"qt  ", b"M4V ", b"M4A ", b"3gp4",
                 b"3gp5", b"3gp6", b"3g2a", b"avc1", b"dash", b"crx "}

#: bytes to read from a file to sniff it (an ISO BMFF ``ftyp`` box lists its brands within its first 64 bytes in
#: every file seen; a longer list is read up to this size)
SNIFF_BYTES = 256


def _ftyp_brands(head: bytes) -> list[bytes]:
    size = struct.unpack(">I", head[:4])[0]
    end = min(len(head), size if size >= 16 else len(head))
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def sniff_kind(head: bytes) -> str | None:
    """The image format of a file from its first bytes (at least 32; :data:`SNIFF_BYTES` for a long ``ftyp``), or
    None when the bytes match no image signature. JFIF, EXIF-JPEG and MPO (multi-picture) files are all ``"jpeg"``;
    HEIC/HEIF is ``"heif"``; AVIF is ``"avif"`` (a file listing both brands is AVIF only when it lists no HEVC brand)."""
    h = bytes(head[:SNIFF_BYTES])
    if h[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if h[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "webp"
    if h[:2] == b"BM" and len(h) >= 18 and struct.unpack("<I", h[14:18])[0] in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"  # "BM" + a known DIB header size: "BM" alone starts too many text files
    if h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if h[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or h[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    if h[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n" or h[:2] == b"\xff\x0a":
        return "jxl"
    if len(h) >= 3 and h[0:1] == b"P" and h[1:2] in b"1234567" and h[2:3] in b" \t\r\n#":
        return "pnm"
    if h[4:8] == b"ftyp" and len(h) >= 16:
        brands = set(_ftyp_brands(h))
        if brands & _AVIF_BRANDS and not brands & (_HEIF_BRANDS - {b"mif1", b"msf1", b"mif2", b"heif"}):
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None


def describe_non_image(head: bytes) -> str:
    """A short name for what a non-image file is, for the line that says it was skipped."""
    h = bytes(head[:SNIFF_BYTES])
    if not h:
        return "empty file (0 bytes)"
    if h[:4] == b"\x00\x05\x16\x07":
        return "macOS metadata (AppleDouble '._' file)"
    if h[4:8] == b"ftyp" and set(_ftyp_brands(h)) & _VIDEO_BRANDS or h[:4] == b"\x1aE\xdf\xa3" \
            or h[:4] == b"RIFF" and h[8:12] == b"AVI ":
        return "a video"
    if h[:5] == b"%PDF-":
        return "a PDF document"
    if h[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "a ZIP archive"
    try:
        text = h.decode("utf-8")
    except UnicodeDecodeError:  # the last character may be cut at SNIFF_BYTES
        try:
            text = h[:-3].decode("utf-8")
        except UnicodeDecodeError:
            text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "not a known image format"


# ---- sizes from headers -------------------------------------------------------------------------------------------
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first SOFn frame header (ITU-T T.81 B.2.2) before EXIF orientation, or None
    when the header is cut short or malformed. For an MPO this is the first (primary) picture."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return (h, w) if h and w else None
        if marker == 0xDA or seg < 2:  # scan data before any frame header: not a valid JPEG
            return None
        i += 2 + seg
    return None


def png_chunks(data: bytes, wanted=(b"IHDR", b"sBIT", b"eXIf")) -> dict[bytes, bytes]:
    """The payloads of the wanted PNG chunks found before the first IDAT (PNG 3rd edition, section 5); eXIf may
    also follow the image data, so it is looked for up to the end when not found before."""
    out, i, n = {}, 8, len(data)
    while i + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[i:i + 8])
        if ctype in wanted and ctype not in out:
            out[ctype] = data[i + 8:i + 8 + length]
        if ctype == b"IEND":
            break
        i += 12 + length
    return out


def png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (h, w) if h and w else None


def gif_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a GIF's logical screen."""
    if len(data) < 10:
        return None
    w, h = struct.unpack("<HH", data[6:10])
    return (h, w) if h and w else None


def header_size(kind: str | None, data: bytes) -> tuple[int, int] | None:
    """(height, width) as stored (before orientation) from the header, where it is cheap to read; else None."""
    try:
        if kind == "jpeg":
            return jpeg_size(data)
        if kind == "png":
            return png_size(data)
        if kind == "gif":
            return gif_size(data)
    except struct.error:
        return None
    return None


def png_significant_bits(data: bytes) -> tuple[int, int, tuple[int, ...] | None]:
    """(bit depth, colour type, sBIT values or None) of a PNG; sBIT gives the significant bits per channel of the
    original samples (PNG 3rd edition, 11.3.2.4)."""
    chunks = png_chunks(data, (b"IHDR", b"sBIT"))
    ihdr = chunks.get(b"IHDR", b"")
    if len(ihdr) < 10:
        return 0, -1, None
    depth, ctype = ihdr[8], ihdr[9]
    sbit = chunks.get(b"sBIT")
    return depth, ctype, tuple(sbit) if sbit else None


# ---- EXIF orientation ---------------------------------------------------------------------------------------------
def tiff_orientation(tiff: bytes) -> int:
    """Orientation (1-8) from IFD0 of a TIFF structure (an EXIF block), 1 when absent or malformed."""
    if tiff[:6] == b"Exif\x00\x00":
        tiff = tiff[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    try:
        ifd = struct.unpack(e + "I", tiff[4:8])[0]
        count = struct.unpack(e + "H", tiff[ifd:ifd + 2])[0]
        for k in range(count):
            p = ifd + 2 + 12 * k
            tag, typ = struct.unpack(e + "HH", tiff[p:p + 4])
            if tag == 0x0112:
                v = struct.unpack(e + "H", tiff[p + 8:p + 10])[0] if typ == 3 else 1
                return v if 1 <= v <= 8 else 1
    except struct.error:
        return 1
    return 1


def webp_exif(data: bytes) -> bytes | None:
    """The payload of a WebP file's EXIF chunk (RIFF container, WebP Container Specification)."""
    i, n = 12, len(data)
    while i + 8 <= n:
        fourcc, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        if fourcc == b"EXIF":
            return data[i + 8:i + 8 + size]
        i += 8 + size + (size & 1)
    return None


def exif_orientation(kind: str | None, data: bytes) -> int:
    """EXIF orientation of a PNG (eXIf chunk) or WebP (EXIF chunk); 1 for other kinds and when absent. (JPEG and
    TIFF orientation is applied by OpenCV's decoder; HEIF/AVIF by Pillow.)"""
    try:
        if kind == "png":
            blob = png_chunks(data, (b"eXIf",)).get(b"eXIf")
        elif kind == "webp":
            blob = webp_exif(data)
        else:
            return 1
    except struct.error:
        return 1
    return tiff_orientation(blob) if blob else 1


def heif_has_transform(data: bytes) -> bool:
    """True when a HEIF/AVIF file's ``meta`` box holds an ``irot`` (rotation) or ``imir`` (mirror) property: the
    container's own orientation, which the decoder applies and which makes the EXIF orientation informative only
    (ISO/IEC 23008-12, 6.5.10-12). iPhones write both, consistently; some cameras (Canon/Sony .HIF) and EXIF editors
    write only the EXIF tag."""
    i, n = 0, len(data)
    while i + 8 <= n:
        size, btype = struct.unpack(">I4s", data[i:i + 8])
        if size == 1 and i + 16 <= n:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = n - i
        if btype == b"meta":
            body = data[i + 8:i + size]
            for prop in (b"irot", b"imir"):
                j = body.find(prop)
                while j >= 4:
                    if struct.unpack(">I", body[j - 4:j])[0] == 9:  # 8-byte header + 1 byte of angle/axis
                        return True
                    j = body.find(prop, j + 1)
            return False
        if size < 8:
            return False
        i += size
    return False


def apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (HxWxC) into what a viewer shows for EXIF orientation 1-8 (the same transforms as
    Pillow's ``ImageOps.exif_transpose`` and OpenCV's decoders)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return a.swapaxes(0, 1)[:, ::-1]
    if orientation == 7:
        return a.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return a.swapaxes(0, 1)[::-1]
    return a

"""Real-world image inputs: folders listed by content, phone formats (HEIC, AVIF, JFIF, MPO, GIF), transparency,
declared bit depth, extreme aspect ratios, float arrays, and JPEG DCT-scaled decoding per the spec."""
import io
import shutil
import struct
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import geosurge.images as gi
from geosurge.image_headers import apply_orientation, heif_has_transform, jpeg_size, sniff_kind
from geosurge.images import (ImageDecodeError, ReadSummary, list_images, load_image, read_image, to_rgb_uint8)
from geosurge.models import get_config
from geosurge.preprocess import PreprocessSpec, preprocess, resize_and_crop
from geosurge.samples import sample_photo_paths

PHONE = Path(__file__).parent / "data" / "phone_folder"  # real files: see tests/data/README.md


def _chelsea(h=120, w=180):
    import skimage.data

    return np.ascontiguousarray(cv2.resize(skimage.data.chelsea(), (w, h), interpolation=cv2.INTER_AREA))


def _encode(arr, fmt, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, fmt, **kw)
    return b.getvalue()


def _exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# ---- listing by content ---------------------------------------------------------------------------------------------
def test_folder_listing_by_content(tmp_path):
    d = tmp_path / "card"
    shutil.copytree(PHONE, d)
    (d / "notes.txt").write_text("trip notes\n")
    (d / "._IMG_0001.HEIC").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 40)
    (d / "IMG_0006.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  " + b"\x00" * 64)
    (d / "broken.jpg").write_text("not a photo")
    (d / "empty.png").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "sub" / "SHOUTING.PNG").write_bytes(_encode(_chelsea(), "PNG"))
    (d / "sub" / "no_extension").write_bytes(_encode(_chelsea(), "JPEG"))
    listing = list_images([d])
    kinds = {e.path.name: e.kind for e in listing}
    assert kinds == {"IMG_0001.HEIC": "heif", "IMG_0002.jpg": "jpeg", "IMG_0003.jfif": "jpeg",
                     "IMG_0004.avif": "avif", "IMG_0005.MPO": "jpeg", "broken.jpg": None, "empty.png": None,
                     "SHOUTING.PNG": "png", "no_extension": "jpeg"}
    assert all(e.from_folder for e in listing)
    assert listing.paths == sorted(listing.paths)
    skipped = {s.path.name: s.reason for s in listing.skipped}
    assert skipped == {"notes.txt": "text", "._IMG_0001.HEIC": "macOS metadata (AppleDouble '._' file)",
                       "IMG_0006.MOV": "a video"}
    # every file is accounted for, once
    assert len(listing) + len(listing.skipped) == sum(1 for p in d.rglob("*") if p.is_file())
    # a file named directly is always an entry; a missing one too (decoding says "file not found")
    direct = list_images([d / "notes.txt", tmp_path / "nope.jpg"])
    assert [(e.path.name, e.kind, e.from_folder) for e in direct] == [("notes.txt", None, False),
                                                                     ("nope.jpg", None, False)]
    with pytest.raises(ImageDecodeError, match="nope.jpg: file not found"):
        load_image(direct.entries[1])
    with pytest.raises(ImageDecodeError, match=r"notes.txt: not a decodable image .*content is text"):
        load_image(direct.entries[0])
    assert [e.path.name for e in list_images(d, recursive=False)] == sorted(
        n for n in kinds if n not in ("SHOUTING.PNG", "no_extension"))


def test_read_summary_counts():
    s = ReadSummary(skipped=2)
    for ok in (True, True, False):
        s.count(ok)
    assert s.to_dict() == {"files": 5, "read": 2, "refused": 1, "skipped": 2}
    assert s.line("located") == "5 files: 2 located, 1 refused, 2 skipped (not an image)"


@pytest.mark.parametrize("head, kind", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"), (b"\xff\xd8\xff\xe1\x1c\x84Exif\x00\x00MM", "jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"), (b"GIF89a\x01\x00\x01\x00", "gif"),
    (b"RIFF\x00\x01\x00\x00WEBPVP8L", "webp"), (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00", "bmp"),
    (b"II*\x00\x08\x00\x00\x00", "tiff"), (b"MM\x00*\x00\x00\x00\x08", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"), (b"P6\n4 4\n255\n", "pnm"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "heif"),
    (b"\x00\x00\x00\x20ftypavif\x00\x00\x00\x00avifmif1miafMA1A", "avif"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  ", None), (b"BMW service record 2024", None),
    (b"Plain text", None), (b"", None)])
def test_sniff_kind(head, kind):
    assert sniff_kind(head + b"\x00" * 16) == kind if head else sniff_kind(head) is None


# ---- phone formats ------------------------------------------------------------------------------------------------
def test_phone_folder_decodes_every_file():
    got = {e.path.name: load_image(e) for e in list_images([PHONE])}
    assert {k: v.shape for k, v in got.items()} == {
        "IMG_0001.HEIC": (128, 128, 3), "IMG_0002.jpg": (360, 480, 3), "IMG_0003.jfif": (128, 128, 3),
        "IMG_0004.avif": (547, 365, 3), "IMG_0005.MPO": (480, 640, 3)}
    # the HEIC and the JFIF hold the same portrait (grace_hopper at 128 px): two codecs, one picture
    diff = np.abs(got["IMG_0001.HEIC"].astype(int) - got["IMG_0003.jfif"].astype(int)).mean()
    assert diff < 8, diff  # two lossy encodes of one picture differ by a few levels; another picture by ~50
    # MPO: the first (primary) picture, as Pillow's frame 0
    with Image.open(PHONE / "IMG_0005.MPO") as im:
        assert im.n_frames == 2
        im.seek(0)
        first = np.asarray(im.convert("RGB"))
    assert np.abs(got["IMG_0005.MPO"].astype(int) - first.astype(int)).mean() < 1.0  # two libjpeg IDCTs


def test_heic_and_avif_orientation_like_jpeg(tmp_path):
    rgb = _chelsea()  # 120 x 180, landscape
    upright = np.rot90(rgb, -1)  # orientation 6: "rotate 90 CW to display"
    jpeg = load_image(_encode(rgb, "JPEG", exif=_exif(6), quality=95))
    # pillow-heif's Pillow plugin keeps the tag in EXIF only (as Canon/Sony .HIF files and EXIF editors do)
    heic_exif = load_image(_encode(rgb, "HEIF", exif=_exif(6), quality=95))
    # its own API writes the container's irot and the EXIF tag, as iPhones do: turned once, not twice
    import pillow_heif

    hf = pillow_heif.from_bytes(mode="RGB", size=(rgb.shape[1], rgb.shape[0]), data=rgb.tobytes())
    buf = io.BytesIO()
    hf.save(buf, quality=95, exif=_exif(6).tobytes())
    assert heif_has_transform(buf.getvalue()) and not heif_has_transform(_encode(rgb, "HEIF", exif=_exif(6)))
    heic_irot = load_image(buf.getvalue())
    avif = load_image(_encode(rgb, "AVIF", exif=_exif(6), quality=95))  # Pillow writes it as irot/imir
    for name, got in (("jpeg", jpeg), ("heic exif", heic_exif), ("heic irot", heic_irot), ("avif", avif)):
        assert got.shape == upright.shape == (180, 120, 3), name
        # lossy codecs at quality 95: a few levels; the unrotated or mirrored picture differs by > 40
        assert np.abs(got.astype(int) - upright.astype(int)).mean() < 6, name


def test_missing_heif_decoder_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails as if not installed
    monkeypatch.setattr(gi, "_HEIF_REGISTERED", [])
    with pytest.raises(ImageDecodeError, match=r"IMG_0001.HEIC: .*HEIF.*pip install 'geosurge\[heif\]'"):
        load_image(PHONE / "IMG_0001.HEIC")


def test_gif_first_frame_with_and_without_opencv_gif(monkeypatch):
    a, b = _chelsea(), 255 - _chelsea()
    data = _encode(a, "GIF", save_all=True, append_images=[Image.fromarray(b)])
    with Image.open(io.BytesIO(data)) as im:
        first = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_image(data), first)
    monkeypatch.setattr(gi, "_decode_opencv_unchanged", lambda *a, **k: None)  # an OpenCV without GIF
    np.testing.assert_array_equal(load_image(data), first)


# ---- what a person sees: orientation, alpha, bit depth --------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_png_webp(fmt):
    rgb = _chelsea(40, 60)
    for o in range(1, 9):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        data = _encode(rgb, fmt, exif=_exif(o), **kw)
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        np.testing.assert_array_equal(load_image(data), want, err_msg=f"{fmt} orientation {o}")
        # what OpenCV's own IMREAD_COLOR shows for the same file
        ocv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(load_image(data), ocv, err_msg=f"{fmt} orientation {o} vs OpenCV")


def test_apply_orientation_matches_pillow():
    rgb = _chelsea(5, 7)
    for o in range(1, 9):
        want = np.asarray(ImageOps.exif_transpose(_with_orientation(rgb, o)))
        np.testing.assert_array_equal(apply_orientation(rgb, o), want, err_msg=str(o))


def _with_orientation(rgb, o):
    im = Image.open(io.BytesIO(_encode(rgb, "PNG", exif=_exif(o))))
    im.load()
    return im


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "HEIF"])
def test_hidden_colours_under_transparency_do_not_matter(fmt):
    rgb = _chelsea()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, 90:] = 0  # right half fully transparent
    rng = np.random.default_rng(0)
    hidden = [rgb[:, 90:], rng.integers(0, 256, rgb[:, 90:].shape, dtype=np.uint8),
              np.zeros_like(rgb[:, 90:])]
    spec = get_config("edge").preprocess
    tensors = []
    for h in hidden:
        px = rgb.copy()
        px[:, 90:] = h
        rgba = np.dstack([px, alpha])
        if fmt == "GIF":  # a palette image: the same visible indices, a transparent index whose colour differs
            base = Image.fromarray(rgb).quantize(255)
            idx = np.asarray(base).copy()
            idx[alpha == 0] = 255
            img = Image.fromarray(idx, "P")
            img.putpalette(base.getpalette()[:255 * 3] + [int(v) for v in h.reshape(-1, 3)[-1]])
            buf = io.BytesIO()
            img.save(buf, "GIF", transparency=255)
            data = buf.getvalue()
        else:
            data = _encode(rgba, fmt, **({"lossless": True, "exact": True} if fmt == "WEBP" else
                                        {"quality": -1} if fmt == "HEIF" else {}))
        got = load_image(data, spec)
        assert (got[:, 95:] == 255).all(), fmt  # composited over the spec's white
        tensors.append(preprocess(got, spec))
    for t in tensors[1:]:
        np.testing.assert_array_equal(t, tensors[0])
    # another background recorded in the spec gives that colour
    grey = PreprocessSpec(**{**spec.to_dict(), "mean": spec.mean, "std": spec.std, "background": (128, 128, 128)})
    assert (load_image(data, grey)[:, 95:] == 128).all()


def test_partial_alpha_blends_and_arrays_follow_the_same_rule():
    rgb = _chelsea()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    want = ((rgb.astype(np.float32) * 128 + 255 * 127) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(load_image(_encode(rgba, "PNG")), want)
    np.testing.assert_array_equal(load_image(rgba), want)


def _png_chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def _with_sbit(png: bytes, bits: int, n: int = 3) -> bytes:
    end_ihdr = 8 + 12 + 13  # signature + IHDR chunk
    return png[:end_ihdr] + _png_chunk(b"sBIT", bytes([bits] * n)) + png[end_ihdr:]


def test_16bit_png_declared_12_bits_is_not_black():
    rgb = _chelsea()
    raw12 = np.round(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)  # what a 12-bit sensor tool writes
    png = cv2.imencode(".png", cv2.cvtColor(raw12, cv2.COLOR_RGB2BGR))[1].tobytes()
    got = load_image(_with_sbit(png, 12))
    assert np.abs(got.astype(int) - rgb.astype(int)).max() <= 1  # rescaled by 255/4095: rounding only
    # spec-conforming samples (scaled up to 16 bits, sBIT informative) keep their top 8 bits
    png_c = cv2.imencode(".png", cv2.cvtColor(raw12 << 4, cv2.COLOR_RGB2BGR))[1].tobytes()
    assert np.abs(load_image(_with_sbit(png_c, 12)).astype(int) - rgb.astype(int)).max() <= 1
    # without sBIT there is nothing to go by: 16-bit full range, as before (and as OpenCV's 8-bit decode)
    assert load_image(png).max() <= 16
    full = cv2.imencode(".png", cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(load_image(full), rgb)


# ---- sizes and shapes -----------------------------------------------------------------------------------------------
def _strip(n: int) -> bytes:
    row = np.random.default_rng(n).integers(0, 256, (1, n, 3), dtype=np.uint8)
    return cv2.imencode(".png", row)[1].tobytes()


def test_extreme_aspect_refused_by_default_and_bounded_when_allowed(tmp_path):
    p = tmp_path / "strip_1x60000.png"
    p.write_bytes(_strip(60_000))
    with pytest.raises(ImageDecodeError, match=r"strip_1x60000.png: aspect ratio 60,000:1 .*GEOSURGE_MAX_ASPECT"):
        load_image(p)
    spec = get_config("edge").preprocess
    rgb = load_image(p, spec, max_aspect=float("inf"))
    x = preprocess(rgb, spec)  # crop-first: a 256 x ~1,300 intermediate instead of 256 x 15,360,000
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    rows = resize_and_crop(rgb, spec).astype(int)
    # one source row upscaled: every output row is the same, up to OpenCV's fixed-point bicubic rounding (1 level)
    assert np.abs(rows - rows[:1]).max() <= 1


def test_crop_first_resize_matches_resize_then_crop():
    """The crop-first path against the plain path on real photos (forced on ordinary shapes) and on strips: the
    same pixels up to OpenCV's fixed-point rounding (at most 1 level of 255; measured: mean < 0.06 levels)."""
    tiny = get_config("tiny").preprocess
    cases = [(read_image(p), spec) for p in sample_photo_paths()[:8]
             for spec in (get_config("edge").preprocess, tiny)]
    cases += [(read_image(p)[:12], tiny) for p in sample_photo_paths()[:4]]  # 12 rows: > 20:1 wide
    cases += [(cv2.imdecode(np.frombuffer(_strip(3000), np.uint8), cv2.IMREAD_COLOR), tiny)]
    for rgb, spec in cases:
        a = resize_and_crop(rgb, spec, crop_first=False).astype(int)
        b = resize_and_crop(rgb, spec, crop_first=True).astype(int)
        b_t = resize_and_crop(np.ascontiguousarray(rgb.swapaxes(0, 1)), spec, crop_first=True).astype(int)
        a_t = resize_and_crop(np.ascontiguousarray(rgb.swapaxes(0, 1)), spec, crop_first=False).astype(int)
        assert np.abs(a - b).max() <= 1 and np.abs(a_t - b_t).max() <= 1, rgb.shape
        assert np.abs(a - b).mean() < 0.06, rgb.shape
    # photos up to 4:1 take the plain path: unchanged pixels
    rgb = read_image(sample_photo_paths()[0])
    spec = get_config("edge").preprocess
    np.testing.assert_array_equal(resize_and_crop(rgb, spec), resize_and_crop(rgb, spec, crop_first=False))


def test_float_arrays_outside_0_1_are_refused():
    rgb = _chelsea()
    with pytest.raises(ImageDecodeError, match=r"values must lie in \[0, 1\]; found \[\d+, \d+\] \(a 0-255 float"):
        load_image(rgb.astype(np.float32))
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255.0), rgb)
    assert load_image(np.full((4, 4, 3), 1.0 + 1e-4, np.float32)).min() == 255  # rounding slack is clipped
    with pytest.raises(ImageDecodeError, match=r"found \[-0.5, 0.5\]"):
        to_rgb_uint8(np.full((4, 4, 3), -0.5, np.float32) + np.eye(4, dtype=np.float32)[..., None])
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        to_rgb_uint8(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ImageDecodeError, match="unsupported image dtype int64"):
        to_rgb_uint8(rgb.astype(np.int64))


# ---- decode at the size the model needs ----------------------------------------------------------------------------
def test_jpeg_reduction_rule_and_manifest_field():
    edge, paper = get_config("edge").preprocess, get_config("paper").preprocess
    assert edge.decode == "jpeg_dct" and edge.dct_oversample == 2.0 and edge.background == (255, 255, 255)
    assert edge.jpeg_reduction(3024, 4032) == 4  # 756 x 1008 keeps 2 x 256; 1/8 (378) would not
    assert edge.jpeg_reduction(4032, 3024) == 4  # orientation does not matter
    assert paper.jpeg_reduction(3024, 4032) == 4  # 756 >= 2 x 336
    assert edge.jpeg_reduction(1000, 1500) == 1  # 1/2 gives 500 < 512
    assert edge.jpeg_reduction(1022, 4000) == 1  # libjpeg's 1/2 gives ceil(1022 / 2) = 511 rows
    assert edge.jpeg_reduction(1023, 4000) == 2  # ceil(1023 / 2) = 512
    just_cover = replace(edge, dct_oversample=1.0)
    assert just_cover.jpeg_reduction(3024, 4032) == 8 and just_cover.jpeg_reduction(1000, 1500) == 2
    stretch = PreprocessSpec(size=224, resize="stretch")
    assert stretch.jpeg_reduction(1000, 5000) == 2  # 500 >= 2 x 224
    assert replace(stretch, dct_oversample=1.0).jpeg_reduction(1000, 5000) == 4  # 250 >= 224
    d = edge.to_dict()
    assert d["decode"] == "jpeg_dct" and d["background"] == [255, 255, 255]
    assert PreprocessSpec.from_dict(d) == edge
    old = {k: v for k, v in d.items() if k not in ("decode", "background")}  # a manifest from before the fields
    assert PreprocessSpec.from_dict(old).decode == "full" and PreprocessSpec.from_dict(old).jpeg_reduction(
        3024, 4032) == 1
    with pytest.raises(ValueError, match="decode must be one of"):
        PreprocessSpec(decode="thumbnail")
    with pytest.raises(ValueError, match="dct_oversample must be >= 1"):
        PreprocessSpec(dct_oversample=0.5)
    with pytest.raises(ValueError, match="background must be three integers"):
        PreprocessSpec(background=(0, 0, 300))


def test_dct_scaled_decode_honours_orientation_and_stays_close_to_full():
    rgb = cv2.resize(read_image(sample_photo_paths()[0]), (2016, 1512), interpolation=cv2.INTER_CUBIC)
    spec = get_config("edge").preprocess
    full = PreprocessSpec.from_dict({**spec.to_dict(), "decode": "full"})
    data = _encode(rgb, "JPEG", quality=92, exif=_exif(6))
    assert jpeg_size(data) == (1512, 2016)
    small = load_image(data, spec)
    assert small.shape == (1008, 756, 3)  # 1/2 scale (1/4 would leave 378 < 2 x 256), rotated to portrait
    big = load_image(data, full)
    assert big.shape == (2016, 1512, 3)
    np.testing.assert_array_equal(load_image(data, spec, reduce=False), big)
    # the model's input from both decodes: DCT scaling is a box filter like INTER_AREA; measured mean |diff|
    # 0.01-0.02 in normalised units (an 8-bit level is 0.017), worst pixels a few levels at sharp edges
    a, b = preprocess(small, spec), preprocess(big, spec)
    assert np.abs(a - b).mean() < 0.03 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert jpeg_size(data[:100]) is None

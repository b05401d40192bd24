"""Preprocessing (one OpenCV implementation for both sides) against an independent torchvision pipeline, EXIF
orientation, and unusual image formats."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from geosurge.images import ImageDecodeError, read_image
from geosurge.models import get_config
from geosurge.preprocess import PreprocessSpec, preprocess
from geosurge.samples import sample_photo_paths


def torchvision_reference(pil: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[spec.interpolation]
    tf = T.Compose([T.PILToTensor(), T.Resize(spec.resize_size, interpolation=interp, antialias=True),
                    T.CenterCrop(spec.size), T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)])
    return tf(pil).numpy()


@pytest.mark.parametrize("config", ["edge", "paper"])
def test_matches_torchvision_on_real_photos(config):
    spec = get_config(config).preprocess
    for path in sample_photo_paths()[:6]:
        ours = preprocess(read_image(path), spec)
        ref = torchvision_reference(Image.open(path).convert("RGB"), spec)
        assert ours.shape == ref.shape == (3, spec.size, spec.size) and ours.dtype == np.float32
        # same geometry (torchvision sizing and crop offsets) and normalisation; only the resampling kernels differ
        assert np.abs(ours - ref).mean() < 0.025, path.name
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999, path.name


def test_exif_orientation_is_honoured(tmp_path):
    import skimage.data

    rgb = skimage.data.chelsea()  # 300 x 451, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(p, exif=exif, quality=95)
    ours = read_image(p)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    assert ours.shape == upright.shape == (451, 300, 3)
    assert np.abs(ours.astype(int) - upright.astype(int)).mean() < 2.0
    spec = get_config("edge").preprocess
    ref = torchvision_reference(Image.fromarray(upright), spec)
    assert np.abs(preprocess(ours, spec) - ref).mean() < 0.025


def test_gray_alpha_16bit_cmyk_inputs(tmp_path):
    import cv2
    import skimage.data

    rgb = skimage.data.astronaut()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    g = read_image(tmp_path / "gray.png")
    assert g.shape == (512, 512, 3) and (g[..., 0] == g[..., 2]).all()
    # alpha 128 over the default white background (tests/test_images.py holds the compositing rule)
    over_white = ((rgb.astype(np.float32) * 128 + 255 * 127) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), over_white)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), rgb)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == rgb.shape and np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 12
    # arrays: gray, RGBA, uint16 and float in [0, 1]
    assert read_image(gray).shape == (512, 512, 3)
    np.testing.assert_array_equal(read_image(rgba), over_white)
    np.testing.assert_array_equal(read_image(rgb.astype(np.uint16) * 257), rgb)
    assert np.abs(read_image(rgb / 255.0).astype(int) - rgb).max() <= 1
    with pytest.raises(ImageDecodeError, match="unsupported image shape"):
        read_image(np.zeros((4, 4, 2), np.uint8))


def test_spec_validation_and_roundtrip():
    spec = get_config("paper").preprocess
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        PreprocessSpec(resize="fit")
    with pytest.raises(ValueError):
        PreprocessSpec(size=300, resize_size=256)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess(np.zeros((10, 10), np.uint8), spec)

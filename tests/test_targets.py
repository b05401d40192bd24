"""TensorRT and Core ML targets: what can be checked here. Core ML conversion, spec / MIL inspection, precision,
metadata and the folded normalisation; the TensorRT builder's settings, trtexec line and sidecar checks; camera /
stream input. Runs of TensorRT itself and Core ML predictions are skipped here with the reason (never faked)."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from geosurge.export.bundle import write_bundle
from geosurge.export.coreml import image_scale_bias, inspect_mlpackage
from geosurge.export.source import load_model
from geosurge.export.wrapper import ExportWrapper as _CoreMLWrapper
from geosurge.manifest import BuilderHints, QuantizationSection
from geosurge.preprocess import PreprocessSpec
from geosurge.runtime import BundleError, open_bundle
from geosurge.runtime.backends import BackendUnavailable
from geosurge.runtime.trt import BuildSettings, check_sidecar, settings_for_bundle, sidecar_for, trtexec_command
from geosurge.samples import sample_photo_paths

from .conftest import run_cli

QUIET = {"log": lambda m: None}
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
ON_MAC = sys.platform == "darwin"


@pytest.fixture(scope="module")
def tiny(default_hierarchy):
    return load_model("tiny", seed=0, hierarchy=default_hierarchy)


@pytest.fixture(scope="module")
def coreml_bundles(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("coreml")
    model, source = tiny
    out = {}
    for precision, logits in (("fp16", True), ("int8-weights", False), ("palettize4", False)):
        out[precision] = write_bundle(root / precision, model, source, sample_photo_paths(), fmt="coreml",
                                      coreml_precision=precision, with_logits=logits, **QUIET)
    return out


def test_coreml_spec_io_precision_and_metadata(coreml_bundles, tiny):
    model = tiny[0]
    b = open_bundle(coreml_bundles["fp16"])
    m = b.manifest.to_dict()
    assert m["model"]["format"] == "coreml" and m["parts"]["model"] == "model.mlpackage"
    assert any(name.startswith("model.mlpackage/") for name in m["files"])
    facts = inspect_mlpackage(b.path("model"))
    (inp,) = facts["inputs"]
    assert inp == {"name": "image", "type": "imageType", "width": 64, "height": 64, "color": "RGB"}
    outs = {o["name"]: o for o in facts["outputs_spec"]}
    assert outs["embedding"]["shape"] == [1, model.config.head.embed_dim] and outs["embedding"]["dtype"] == "FLOAT32"
    assert [f"logits_{k}" for k in range(7)] == [n for n in outs if n.startswith("logits_")]
    assert outs["logits_6"]["shape"] == [1, model.hierarchy.sizes[-1]]
    assert facts["ops"].get("layer_norm", 0) >= 10 and facts["ops"].get("softmax", 0) >= 1
    assert facts["weight_dtypes"].get("const:FLOAT16", 0) > 10  # fp16 weights
    meta = facts["metadata"]
    assert meta["com.geosurge.hierarchy_digest"] == model.hierarchy.digest()
    assert json.loads(meta["com.geosurge.preprocess"]) == model.config.preprocess.to_dict()


def test_coreml_weight_compression(coreml_bundles):
    sizes = {k: inspect_mlpackage(open_bundle(v).path("model")) for k, v in coreml_bundles.items()}
    assert sizes["int8-weights"]["weight_dtypes"].get("quantized_data:INT8", 0) > 5
    assert "constexpr_affine_dequantize" in sizes["int8-weights"]["ops"]
    assert sizes["palettize4"]["weight_dtypes"].get("lut:FLOAT16", 0) > 5
    assert "constexpr_lut_to_dense" in sizes["palettize4"]["ops"]
    # fp16 carries in-model logits (7 tables more): compare the compressed ones with each other and the fp16 body
    assert sizes["palettize4"]["bytes"] < sizes["int8-weights"]["bytes"] < sizes["fp16"]["bytes"]


def test_coreml_bundle_checksums_cover_the_package(coreml_bundles, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(coreml_bundles["int8-weights"], b)
    open_bundle(b)
    weight = max((p for p in (b / "model.mlpackage").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 1
    weight.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        open_bundle(b)


@pytest.mark.skipif(ON_MAC, reason="on macOS the coreml backend predicts")
def test_coreml_backend_refuses_off_macos(coreml_bundles):
    from geosurge.runtime import Localizer

    with pytest.raises(BackendUnavailable, match="only on macOS"):
        Localizer(coreml_bundles["fp16"], backend="coreml")
    r = run_cli("geosurge-run", "verify", coreml_bundles["fp16"], "--backend", "coreml")
    assert r.returncode == 2 and "only on macOS" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("geosurge-run", "verify", coreml_bundles["fp16"])  # the backend follows the bundle's format
    assert r.returncode == 2 and "only on macOS" in r.stderr


@pytest.mark.skipif(not ON_MAC, reason="Core ML predicts only on macOS")
def test_coreml_predictions_match_fp32_on_macos(coreml_bundles):  # pragma: no cover - macOS only
    from geosurge.runtime.verify import verify_bundle

    rep = verify_bundle(coreml_bundles["fp16"], backend="coreml")
    assert rep["metrics"]["cosine_mean"] > 0.99


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_image_normalisation_is_folded_exactly(mean, std, tiny):
    spec = PreprocessSpec(size=64, resize_size=64, mean=mean, std=std)
    scale, bias, gain = image_scale_bias(spec)
    assert (gain is None) == (len(set(std)) == 1)
    pix = np.random.default_rng(0).uniform(0, 255, size=(1, 3, 8, 8))
    want = (pix / 255.0 - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]
    coreml_in = pix * scale + np.asarray(bias)[None, :, None, None]  # what Core ML's ImageType hands the graph
    got = coreml_in * (np.asarray(gain)[None, :, None, None] if gain else 1.0)
    np.testing.assert_allclose(got, want, atol=1e-9)
    # and the wrapper applies the gain in-graph
    model = tiny[0]
    w = _CoreMLWrapper(model, False, gain).eval()
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, (1, 3, 64, 64))).float()
    core_in = x * scale + torch.tensor(bias).view(1, 3, 1, 1)
    ref = (x / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(w(core_in.float()), model.eval().embed(ref.float()), atol=1e-4, rtol=1e-4)


def test_coreml_cli_rejects_onnx_only_options(tmp_path):
    r = run_cli("geosurge", "export", "--model", "tiny", "--format", "coreml", "--precision", "int8",
                "-o", tmp_path / "x")
    assert r.returncode == 2 and "coreml takes --precision" in r.stderr


# ---- TensorRT ---------------------------------------------------------------------------------------------------
def test_trtexec_line_and_builder_settings():
    s = BuildSettings(fp16=True, int8=True, workspace_gb=1.5, dla_core=0, timing_cache="t.cache", max_batch=8)
    line = trtexec_command("b/model.onnx", "b/model.plan", s, shape=[1, 3, 224, 224])
    for part in ("--onnx=b/model.onnx", "--saveEngine=b/model.plan", "--memPoolSize=workspace:1536M", "--fp16",
                 "--int8", "--useDLACore=0", "--allowGPUFallback", "--timingCacheFile=t.cache",
                 "--minShapes=image:1x3x224x224", "--maxShapes=image:8x3x224x224"):
        assert part in line
    st = trtexec_command("m.onnx", "m.plan", BuildSettings(fp16=True, strongly_typed=True))
    assert "--stronglyTyped" in st and "--fp16" not in st
    qdq = QuantizationSection("int8", builder=BuilderHints(["FP16", "INT8"]))
    got = settings_for_bundle(qdq, BuildSettings())
    assert got.fp16 and got.int8 and not got.fp8
    assert not settings_for_bundle(None, BuildSettings()).int8


def test_engine_sidecar_refuses_another_tensorrt_gpu_or_model():
    dev = {"gpu": "Orin (nvgpu)", "compute_capability": "8.7", "machine": "aarch64"}
    side = sidecar_for(dev, BuildSettings(fp16=True), "abc", "10.3.0")
    assert check_sidecar(side, "10.3.0", dev, "abc") == []
    probs = check_sidecar(side, "10.7.0", {**dev, "compute_capability": "8.6"}, "def")
    assert any("TensorRT 10.3.0" in p for p in probs) and any("compute_capability" in p for p in probs)
    assert any("another model.onnx" in p for p in probs)
    assert json.loads(json.dumps(side))["builder"]["fp16"] is True  # plain JSON, no header in the plan


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the no-TensorRT message is not reachable")
def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path, tiny):
    model, source = tiny
    b = write_bundle(tmp_path / "b", model, source, sample_photo_paths()[:2], **QUIET)
    r = run_cli("geosurge-run", "build-engine", b)
    assert r.returncode == 2 and "TensorRT is not installed" in r.stderr and "Traceback" not in r.stderr
    assert "trtexec --onnx=" in r.stdout  # the equivalent command is printed for users who prefer trtexec
    r = run_cli("geosurge-run", "verify", b, "--backend", "tensorrt")
    # the reason is the missing TensorRT, not the missing engine (which cannot be built here either)
    assert r.returncode == 2 and "TensorRT is not installed" in r.stderr and "no engine" not in r.stderr


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installable here (JetPack / NVIDIA's index only)")
def test_build_engine_and_run_on_a_gpu(tmp_path, tiny):  # pragma: no cover - needs TensorRT and a GPU
    from geosurge.manifest import ENGINE_FILE as PLAN
    from geosurge.runtime.trt import build_engine
    from geosurge.runtime.verify import verify_bundle

    model, source = tiny
    b = write_bundle(tmp_path / "b", model, source, sample_photo_paths(), **QUIET)
    build_engine(open_bundle(b), BuildSettings(fp16=True))
    assert (b / PLAN).is_file() and (b / (PLAN + ".json")).is_file()
    assert verify_bundle(b, backend="tensorrt")["metrics"]["cosine_mean"] > 0.99


# ---- camera / stream input ---------------------------------------------------------------------------------------
def test_locate_stream_from_a_video_file(tmp_path, tiny):
    import cv2

    model, source = tiny
    b = write_bundle(tmp_path / "b", model, source, sample_photo_paths()[:2], **QUIET)
    video = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 80))
    if not vw.isOpened():  # OpenCV's built-in MJPEG/AVI writer; a build without videoio cannot write it
        pytest.skip("this OpenCV build cannot write an MJPG AVI")
    from geosurge.images import read_image

    for p in sample_photo_paths()[:6]:
        vw.write(cv2.resize(cv2.cvtColor(read_image(p), cv2.COLOR_RGB2BGR), (96, 80)))
    vw.release()
    r = run_cli("geosurge-run", "locate", b, "--source", video, "--max-frames", "3", "--every", "2", "--fuse", "2",
                "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["frame"] for x in recs] == [0, 2, 4] and [x["fused_frames"] for x in recs] == [1, 2, 2]
    assert all(-90 <= x["lat"] <= 90 for x in recs)
    r = run_cli("geosurge-run", "locate", b, "--source", tmp_path / "missing.mp4")
    assert r.returncode == 2 and "cannot open the video source" in r.stderr


def test_locate_needs_inputs_or_source(tmp_path, tiny):
    model, source = tiny
    b = write_bundle(tmp_path / "b", model, source, sample_photo_paths()[:2], **QUIET)
    r = run_cli("geosurge-run", "locate", b)
    assert r.returncode == 2 and "give image paths or --source" in r.stderr


def test_edge_converts_to_coreml_int8(tmp_path, default_hierarchy):
    from geosurge.export.coreml import export_coreml

    model, _ = load_model("edge", seed=0, hierarchy=default_hierarchy)
    f = export_coreml(model, tmp_path / "edge.mlpackage", "int8-weights", **QUIET)
    assert f["inputs"][0]["width"] == 224 and f["outputs_spec"][0]["shape"] == [1, 512]
    assert f["ops"].get("conv", 0) >= 40 and f["weight_dtypes"].get("quantized_data:INT8", 0) >= 40
    assert f["bytes"] < 10e6  # the FP32 ONNX of the same graph is 27.1 MB


@pytest.mark.skipif(ON_MAC, reason="on macOS the Core ML check is measured")
def test_coreml_export_records_why_its_parity_is_not_measured_here(coreml_bundles):
    for b in coreml_bundles.values():
        chk = open_bundle(b).manifest.check
        assert chk.passed is None and "only on macOS" in chk.skipped and chk.images > 0

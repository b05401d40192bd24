"""ONNX export, the bundle, the torch-free runtime and parity."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from geosurge.export.bundle import write_bundle
from geosurge.export.source import load_model
from geosurge.runtime import BundleError, Localizer, open_bundle
from geosurge.runtime.verify import verify_bundle
from geosurge.samples import sample_photo_paths

from .conftest import run_cli


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, default_hierarchy):
    model, source = load_model("tiny", seed=0, hierarchy=default_hierarchy)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    write_bundle(out, model, source, sample_photo_paths(), log=lambda m: None)
    return out, model


def _torch_embed(model, x):
    with torch.no_grad():
        return model.eval().embed(torch.from_numpy(x)).numpy()


def test_tiny_bundle_contents_and_roundtrip(tiny_bundle):
    path, model = tiny_bundle
    b = open_bundle(path)
    m = b.manifest.to_dict()
    assert sorted(p.name for p in path.iterdir()) == ["cell_table.npz", "cells.npz", "golden.npz", "manifest.json",
                                                      "model.onnx", "places.npz"]
    assert set(m["files"]) == {"cell_table.npz", "cells.npz", "golden.npz", "model.onnx", "places.npz"}
    assert m["model"]["opset"] >= 17 and m["model"]["layernorm_ops"] >= 10
    assert m["io"]["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert m["preprocess"] == model.config.preprocess.to_dict()
    assert {"torch", "onnx", "onnxruntime", "geosurge"} <= set(m["provenance"])
    assert m["hierarchy"]["digest"] == model.hierarchy.digest()
    loc = Localizer(path)
    g = np.load(path / "golden.npz")
    # FP32 through two engines: ORT (MLAS) and torch sum in different orders, and each picks kernels by CPU (AVX2,
    # AVX-512, NEON), so elements of the unit-norm 32-d embedding differ by reassociation error (a few float32
    # epsilons per layer, ~1e-6 here); 1e-5 bounds that with margin and still catches any real graph difference
    np.testing.assert_allclose(loc.embed(g["inputs"]), _torch_embed(model, g["inputs"]), atol=1e-5)
    # the stored reference against torch in this same process: same kernels, same order
    np.testing.assert_allclose(g["embedding"], _torch_embed(model, g["inputs"]), atol=1e-6)


def test_edge_roundtrip_within_fp32_tolerance(tmp_path, default_hierarchy):
    model, source = load_model("edge", seed=0, hierarchy=default_hierarchy)
    write_bundle(tmp_path / "edge", model, source, sample_photo_paths()[:3], log=lambda m: None)
    loc = Localizer(tmp_path / "edge")
    x = np.stack([loc.preprocess(p) for p in sample_photo_paths()[:5]])
    # the edge graph is ~1 GFLOP deep (51 convs): reassociation error grows with depth, 1e-4 on a 512-d unit vector
    np.testing.assert_allclose(loc.embed(x), _torch_embed(model, x), atol=1e-4)
    assert verify_bundle(tmp_path / "edge")["passed"]


def test_dynamic_batch_with_logits(tmp_path, default_hierarchy):
    import onnxruntime as ort

    model, source = load_model("tiny", seed=1, hierarchy=default_hierarchy)
    write_bundle(tmp_path / "b", model, source, sample_photo_paths()[:2], dynamic_batch=True, with_logits=True,
                 log=lambda m: None)
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["embedding"] + [f"logits_{k}" for k in range(7)]
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    outs = sess.run(None, {"image": x})
    with torch.no_grad():
        emb = model.embed(torch.from_numpy(x))
        logits = model.head.level_logits(emb)
    np.testing.assert_allclose(outs[0], emb.numpy(), atol=1e-5)  # as in the roundtrip test above
    # logits are cosines / temperature (1/0.07 ~ 14x) of the embedding: the same error, scaled, plus the table product
    np.testing.assert_allclose(outs[7], logits[6].numpy(), atol=1e-3)
    assert Localizer(tmp_path / "b").embed(x).shape == (3, 32)


BLOCK_TORCH = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'timm', 'transformers', 'torchvision', 'coremltools', 'modelopt'}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
try:
    import torch
    raise SystemExit('torch was importable')
except ImportError:
    pass
from geosurge.runtime import Localizer
from geosurge.runtime.cli import main
rc = main(['verify', BUNDLE])
pred = Localizer(BUNDLE).locate(IMAGE)
heavy = [m for m in sys.modules if m.split('.')[0] in {'torch', 'timm', 'transformers'}]
print(json.dumps({'rc': rc, 'lat': pred['lat'], 'heavy': heavy}))
"""


def test_runtime_runs_where_importing_torch_raises(tiny_bundle):
    path, _ = tiny_bundle
    code = BLOCK_TORCH.replace("BUNDLE", repr(str(path))).replace("IMAGE", repr(str(sample_photo_paths()[1])))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0 and out["heavy"] == [] and -90 <= out["lat"] <= 90


def test_beam_search_equals_brute_force_when_wide(tiny_bundle):
    loc = Localizer(tiny_bundle[0])
    sc = loc.scorer
    emb = np.load(tiny_bundle[0] / "golden.npz")["embedding"]
    r = sc.search(emb, k=10)
    idx, val = sc.topk(emb, k=10)
    np.testing.assert_array_equal(idx, r.indices)
    widest = max(sc.hierarchy.sizes)
    bidx, bval = sc.topk(emb, k=10, beam=widest)
    np.testing.assert_array_equal(idx, bidx)
    # both are log-probabilities renormalised over the finest level: the exact search's normaliser is within its
    # stated bound; 1e-4 covers the beam's own float32 logits (|logit| < 15, 7 levels)
    assert (np.abs(val - bval) <= r.log_norm_error[:, None] + 1e-4).all()
    # brute force by hand: sum of per-level log-probs along each finest cell's ancestor chain
    lps = sc.level_log_probs(emb[:1])
    anc = sc.hierarchy.ancestors()
    manual = sum(lps[k][0, anc[:, k]] for k in range(sc.num_levels))
    assert idx[0, 0] == int(np.argmax(manual))
    # a narrow beam scores far fewer cells and still returns k sorted cells
    cells, scores = sc.candidates(emb[0], beam=8)
    assert cells.size < 0.05 * sc.hierarchy.sizes[-1]
    nidx, nval = sc.topk(emb, k=5, beam=8)
    assert nidx.shape == (len(emb), 5) and (np.diff(nval, axis=1) <= 0).all()


def test_verify_fails_after_any_single_flipped_byte(tiny_bundle, tmp_path):
    src = tiny_bundle[0]
    assert verify_bundle(src)["passed"]
    for name in sorted(p.name for p in src.iterdir()):
        size = (src / name).stat().st_size
        for pos in (0, size // 2, size - 1):
            dst = tmp_path / f"{name}-{pos}"
            shutil.copytree(src, dst)
            data = bytearray((dst / name).read_bytes())
            data[pos] ^= 0x01
            (dst / name).write_bytes(bytes(data))
            with pytest.raises(BundleError) as e:
                verify_bundle(dst)
            assert name in str(e.value)
            shutil.rmtree(dst)
    # and through the CLI: a clear FAIL line, exit 1
    dst = tmp_path / "cli"
    shutil.copytree(src, dst)
    with open(dst / "model.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run_cli("geosurge-run", "verify", dst)
    assert r.returncode == 1 and "model.onnx: sha256 mismatch" in r.stderr and "Traceback" not in r.stderr


def test_bundle_refusals(tiny_bundle, tmp_path):
    src = tiny_bundle[0]
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    (dst / "places.npz").unlink()
    with pytest.raises(BundleError, match="places.npz: missing bundle file"):
        open_bundle(dst)
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    from geosurge.runtime.bundle import manifest_digest

    m = json.loads((dst / "manifest.json").read_text())
    m["schema_version"] = 99
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        open_bundle(dst)
    with pytest.raises(BundleError, match="bundle directory not found"):
        open_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="backend 'coreml' needs coreml"):
        open_bundle(src, backend="coreml")
    r = run_cli("geosurge-run", "locate", tmp_path / "nope", sample_photo_paths()[0])
    assert r.returncode == 2 and "bundle directory not found" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BundleError, match="a file, not a bundle directory \\(give the folder that holds it\\)"):
        open_bundle(src / "manifest.json")
    # a file whose size is not the recorded one is refused before it is hashed (and no size is reported from it)
    m = json.loads((src / "manifest.json").read_text())
    name = next(iter(m["files"]))
    m["files"][name]["bytes"] += 1
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"{name}: size mismatch"):
        open_bundle(dst).verify_checksums()
    # a preprocessing spec of the wrong type is named, without Python's words
    m = json.loads((src / "manifest.json").read_text())
    m["preprocess"]["size"] = "big"
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a preprocessing spec \\(size must be an integer, got 'big'\\)"):
        open_bundle(dst)


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_locate_goes_past_bad_files(tiny_bundle, tmp_path):
    good = sample_photo_paths()[2]
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(good, d / "a_good.png")
    (d / "b_empty.jpg").write_bytes(b"")
    jpg = sample_photo_paths()[3].read_bytes()
    (d / "c_truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (d / "d_text.png").write_text("hello, not an image")
    (d / "e_bomb.png").write_bytes(_bomb_png())
    shutil.copy(good, d / "f_good.png")
    r = run_cli("geosurge-run", "locate", tiny_bundle[0], d, "--json", "--geojson", tmp_path / "out.geojson")
    assert r.returncode == 1, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["input"].rsplit("/", 1)[1] for x in lines] == sorted(p.name for p in d.iterdir())
    by = {x["input"].rsplit("/", 1)[1]: x for x in lines}
    assert "error" not in by["a_good.png"] and "error" not in by["f_good.png"]
    assert "0 bytes" in by["b_empty.jpg"]["error"]
    assert "not a decodable image" in by["d_text.png"]["error"]
    assert "too large" in by["e_bomb.png"]["error"]
    trunc = by["c_truncated.jpg"]  # OpenCV decodes a truncated JPEG's first part; otherwise a named error
    assert ("error" in trunc and "c_truncated.jpg" in trunc["error"]) or "lat" in trunc
    good_pred = by["a_good.png"]
    assert {"lat", "lon", "confidence", "uncertainty_km", "place", "top_k"} <= set(good_pred)
    assert len(good_pred["top_k"]) == 5 and good_pred["place"]["country"]
    gj = json.loads((tmp_path / "out.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) >= 2
    r = run_cli("geosurge-run", "locate", tiny_bundle[0], d / "a_good.png", d / "f_good.png")
    assert r.returncode == 0 and r.stdout.count("confidence") == 2


def test_parity_cli_passes_and_fails_on_a_different_model(tiny_bundle, tmp_path, default_hierarchy):
    r = run_cli("geosurge", "parity", tiny_bundle[0], "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["passed"] and rep["metrics"]["cosine_min"] > 0.9999
    # gated in km (cosine a diagnostic); no ground truth in a folder of photos: the accuracy gate is SKIP
    gates = {g["gate"]: g["pass"] for g in rep["gates"]}
    assert gates == {"median_drift_km": "PASS", "p95_drift_km": "PASS", "top1_agreement_confident": "PASS",
                     "accuracy_delta_min_pts": "SKIP"}
    other, _ = load_model("tiny", seed=5, hierarchy=default_hierarchy)
    other.save_pretrained(tmp_path / "other")
    r = run_cli("geosurge", "parity", tiny_bundle[0], "--checkpoint", tmp_path / "other")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_interrupted_export_leaves_nothing(tmp_path, default_hierarchy, monkeypatch):
    import geosurge.export.bundle as eb

    model, source = load_model("tiny", seed=0, hierarchy=default_hierarchy)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eb, "write_places", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(tmp_path / "b", model, source, sample_photo_paths(), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_errors(tmp_path):
    r = run_cli("geosurge", "export", "-o", tmp_path / "b")
    assert r.returncode == 2 and "--model NAME or --checkpoint" in r.stderr
    r = run_cli("geosurge", "export", "--checkpoint", tmp_path / "nope", "-o", tmp_path / "b")
    assert r.returncode == 2 and "nope: no such checkpoint folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("geosurge", "export", "--checkpoint", tmp_path / "empty", "-o", tmp_path / "b")
    assert r.returncode == 2 and "not a geosurge checkpoint (no config.json)" in r.stderr
    r = run_cli("geosurge", "export", "--checkpoint", tmp_path / "empty", "--model", "tiny", "-o", tmp_path / "b")
    assert r.returncode == 2 and "not both" in r.stderr and not (tmp_path / "b").exists()
    r = run_cli("geosurge", "export", "--model", "tiny", "--calib-size", "5", "-o", tmp_path / "b")
    assert r.returncode == 0 and "an FP32 export has none, they change nothing" in r.stdout


def test_locate_accounts_for_every_file_of_a_phone_folder(tiny_bundle, tmp_path):
    from pathlib import Path

    import cv2

    d = tmp_path / "card"
    shutil.copytree(Path(__file__).parent / "data" / "phone_folder", d)
    (d / "notes.txt").write_text("not a photo")
    strip = np.random.default_rng(0).integers(0, 256, (1, 60_000, 3), dtype=np.uint8)
    (d / "strip_1x60000.png").write_bytes(cv2.imencode(".png", strip)[1].tobytes())
    r = run_cli("geosurge-run", "locate", tiny_bundle[0], d, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = {Path(x["input"]).name: x for x in map(json.loads, r.stdout.strip().splitlines())}
    phone = ["IMG_0001.HEIC", "IMG_0002.jpg", "IMG_0003.jfif", "IMG_0004.avif", "IMG_0005.MPO"]
    assert sorted(lines) == sorted(phone + ["strip_1x60000.png"])
    assert all("lat" in lines[n] and "error" not in lines[n] for n in phone)
    assert "aspect ratio 60,000:1" in lines["strip_1x60000.png"]["error"]
    assert f"skipped {d / 'notes.txt'}: text" in r.stderr
    assert "7 files: 5 located, 1 refused, 1 skipped (not an image)" in r.stderr
    # the plain-text error line names the file once
    r = run_cli("geosurge-run", "locate", tiny_bundle[0], d / "strip_1x60000.png")
    strip_path = str(d / "strip_1x60000.png")
    assert r.returncode == 1 and f"{strip_path}: ERROR aspect ratio 60,000:1" in r.stdout, r.stdout
    assert r.stdout.count(strip_path) == 1, r.stdout
    # the limit is the user's: raised, the strip is located too (crop-first resize keeps it small)
    r = run_cli("geosurge-run", "locate", tiny_bundle[0], d / "strip_1x60000.png", "--json",
                env={"GEOSURGE_MAX_ASPECT": "inf"})
    assert r.returncode == 0 and "lat" in json.loads(r.stdout), r.stderr


def test_runtime_decodes_jpeg_per_the_manifest_rule(tiny_bundle, tmp_path):
    import cv2

    from geosurge.images import load_image
    from geosurge.preprocess import PreprocessSpec, preprocess

    loc = Localizer(tiny_bundle[0])
    assert loc.spec.decode == "jpeg_dct" and loc.bundle.manifest.to_dict()["preprocess"]["decode"] == "jpeg_dct"
    rgb = cv2.resize(np.asarray(load_image(sample_photo_paths()[0])), (1600, 1200))
    data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    reduced = preprocess(load_image(data, loc.spec), loc.spec)
    full_spec = PreprocessSpec.from_dict({**loc.spec.to_dict(), "decode": "full"})
    full = preprocess(load_image(data, full_spec), full_spec)
    np.testing.assert_array_equal(loc.preprocess(data), reduced)  # the device decodes as the manifest says
    assert not np.array_equal(reduced, full)  # (a different rule gives different pixels: the test can fail)


def test_a_graph_onnxruntime_cannot_load_is_one_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from geosurge.errors import GeosurgeError
    from geosurge.export.onnx import check_loads
    from geosurge.runtime.backends import BackendUnavailable
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    # an op no onnxruntime kernel implements (as the OneFormer segmenter's float64 GridSample turned out to be)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="org.example")], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)]),
              str(path))
    with pytest.raises(BackendUnavailable, match=r"m\.onnx: onnxruntime .* cannot load this model \(.*Frobnicate"):
        OnnxRuntimeRunner(path)
    with pytest.raises(GeosurgeError, match="does not export to a graph the runtime can run"):
        check_loads(path)


def test_a_closed_output_pipe_stops_quietly(tiny_bundle, tmp_path):
    """``geosurge-run locate ... --json | head -c 10``: the reader goes away; no traceback, exit 141 (SIGPIPE's)."""
    import subprocess
    import sys
    from pathlib import Path

    photos = [str(p) for p in sample_photo_paths()] * 20  # more output than a pipe buffer holds
    exe = Path(sys.executable).parent / "geosurge-run"
    p = subprocess.Popen([str(exe), "locate", str(tiny_bundle[0]), *photos, "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err

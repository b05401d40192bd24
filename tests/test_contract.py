"""The bundle contract on the numpy side: the typed manifest (round trip, schema 1 read, other versions refused by
name, validation naming the key), the formats table the CLIs read, and the writer's file-system rules (umask, no gap
when replacing, leftovers of a killed writer swept, only ours)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geosurge import fsutil
from geosurge.errors import GeosurgeError
from geosurge.formats import (PRECISIONS, TARGETS, Backend, Format, Precision, Target, check_backend,
                              check_precision, default_backend, resolve_target)
from geosurge.manifest import SCHEMA_VERSION, BundleError, Manifest, ManifestError, manifest_digest

DATA = Path(__file__).parent / "data"
V1 = {name: json.loads((DATA / f"manifest_v1_{name}.json").read_text()) for name in ("fp32", "dyn", "pruned",
                                                                                     "coreml")}


# ---- the typed manifest -------------------------------------------------------------------------------------------
def test_schema_1_manifests_read_as_typed_objects():
    fp32, dyn, pruned, coreml = (Manifest.from_dict(V1[k]) for k in ("fp32", "dyn", "pruned", "coreml"))
    assert all(m.read_version == 1 and m.schema_version == SCHEMA_VERSION for m in (fp32, dyn, pruned, coreml))
    assert fp32.model.format == Format.ONNX and fp32.model.precision == Precision.FP32
    assert fp32.model.target == Target.ONNXRUNTIME and fp32.model.opset == 17
    assert fp32.io.static_batch == 1 and fp32.io.input.shape == [1, 3, 64, 64]
    assert fp32.io.embedding.name == "embedding" and fp32.io.embedding.shape is None  # schema 1: no output shapes
    assert fp32.gates()["median_drift_km"] == ("<=", 25.0) and fp32.check is None
    assert fp32.file_record("model").sha256 == V1["fp32"]["files"]["model.onnx"]["sha256"]
    assert fp32.preprocess.size == 64 and fp32.source.config == "tiny" and fp32.source.seed == 0
    assert dyn.model.precision == Precision.INT8_DYNAMIC and dyn.check.passed is False and dyn.check.images == 64
    assert dyn.check.failed_gates() == ["cosine_mean", "cosine_min", "level_top1_agreement_min", "top1_in_top5"]
    assert dyn.quantization.extra["quantizer"] == "onnxruntime.quantization.quantize_dynamic"
    assert pruned.is_pruned and pruned.hierarchy.source_levels == list(range(7))
    assert pruned.cell_table.dtype == "int8" and pruned.cell_table.dim == 32 and pruned.pruning.cut["countries"] == "FR"
    assert coreml.model.format == Format.COREML and coreml.parts["model"] == "model.mlpackage"
    assert coreml.io.input.type.startswith("image") and coreml.model.coreml["precision"] == "fp16"


@pytest.mark.parametrize("name", sorted(V1))
def test_manifest_round_trip(name):
    m = Manifest.from_dict(V1[name])
    d = m.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION == 4
    again = Manifest.from_dict(json.loads(json.dumps(d)))
    assert again == m and again.to_dict() == d
    # keys this version does not know survive a round trip, in any section
    d["golden"]["note"] = "from a newer writer"
    d["future_section"] = {"x": 1}
    assert Manifest.from_dict(d).to_dict() == d


def test_the_preprocess_section_carries_the_decode_rule():
    # a manifest written before the decode fields existed was decoded at full size: it reads so
    old = Manifest.from_dict(V1["fp32"]).preprocess
    assert old.decode == "full" and old.background == (255, 255, 255)
    d = Manifest.from_dict(V1["fp32"]).to_dict()
    d["preprocess"].update(decode="jpeg_dct", dct_oversample=3.0, background=[0, 64, 128])
    m = Manifest.from_dict(json.loads(json.dumps(d)))
    assert (m.preprocess.decode, m.preprocess.dct_oversample, m.preprocess.background) == \
        ("jpeg_dct", 3.0, (0, 64, 128))
    assert m.to_dict()["preprocess"] == d["preprocess"]
    d["preprocess"]["decode"] = "thumbnail"
    with pytest.raises(ManifestError, match="manifest.preprocess: not a preprocessing spec .*decode must be one of"):
        Manifest.from_dict(d)


@pytest.mark.parametrize("version", [0, 5, 99, "2", None])
def test_other_schema_versions_are_refused_by_name(version):
    d = {**V1["fp32"], "schema_version": version}
    with pytest.raises(ManifestError, match=f"schema version {version} is not supported by this runtime "
                                            r"\(reads versions 1, 2, 3, 4\)"):
        Manifest.from_dict(d)
    with pytest.raises(ManifestError, match="not a geosurge bundle manifest"):
        Manifest.from_dict({**V1["fp32"], "schema": "something.else"})


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["model"].update(precision="fp8"), r"manifest.model.precision: fp8 is not a precision of target "
                                                   "onnxruntime"),
    (lambda d: d["model"].update(precision="fp64"), r"manifest.model.precision: 'fp64' is not one of"),
    (lambda d: d.pop("io"), r"manifest.io: missing"),
    (lambda d: d["golden"].update(count="6"), r"manifest.golden.count: expected an integer"),
    (lambda d: d["hierarchy"]["sizes"].pop(), r"manifest.hierarchy: 7 levels but 6 sizes"),
    (lambda d: d["parity_gates"].update(x=["==", 1]), r"manifest.parity_gates: x: the operator"),
    (lambda d: d["parts"].pop("cells"), r"manifest.parts: no cells"),
    (lambda d: d["files"].pop("golden.npz"), r"manifest.files: no checksum for the golden part"),
])
def test_validation_names_the_key(edit, match):
    d = json.loads(json.dumps(V1["fp32"]))
    edit(d)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(d)


def test_schema_2_requires_the_held_out_parity_of_a_non_fp32_model():
    d = Manifest.from_dict(V1["dyn"]).to_dict()
    Manifest.from_dict(d)  # has its check
    d["quantization"].pop("check")
    with pytest.raises(ManifestError, match="int8-dynamic model must record its held-out parity"):
        Manifest.from_dict(d)
    d["schema_version"] = 1  # a schema-1 bundle (e.g. TensorRT-bound INT8) had none: read as not measured
    check = Manifest.from_dict(d).check
    assert check.passed is None and "schema 1" in check.skipped


# ---- the formats table --------------------------------------------------------------------------------------------
def test_one_table_of_targets_formats_backends_and_precisions():
    assert resolve_target().target == Target.ONNXRUNTIME
    assert resolve_target("coreml").target == Target.COREML
    assert resolve_target(target="tensorrt").format == Format.ONNX
    with pytest.raises(GeosurgeError, match="--format coreml does not take --target tensorrt"):
        resolve_target("coreml", "tensorrt")
    # fp8 is valid in one place only: the TensorRT row
    assert [t for t, s in TARGETS.items() if Precision.FP8 in s.precisions] == [Target.TENSORRT]
    # the export banner names only what the chosen precision does (an fp16 export is not "QDQ")
    ort = TARGETS[Target.ONNXRUNTIME]
    assert "QDQ" in ort.describe("int8") and "QDQ" not in ort.describe("fp16") + ort.describe("fp32")
    assert ort.describe(Precision.FP32) == ort.summary and "FP16" in ort.describe("fp16")
    assert check_precision(Target.TENSORRT, "fp8") == Precision.FP8
    with pytest.raises(GeosurgeError, match=r"not fp8 \(fp8 is for TensorRT: --target tensorrt\)"):
        check_precision(Target.ONNXRUNTIME, "fp8")
    assert check_precision(Target.COREML) == Precision.FP16 and check_precision("onnxruntime") == Precision.FP32
    assert default_backend(Format.COREML) == Backend.COREML and default_backend("onnx") == Backend.ONNXRUNTIME
    assert check_backend("onnx", "tensorrt") == Backend.TENSORRT
    with pytest.raises(GeosurgeError, match="backend 'coreml' needs coreml"):
        check_backend("onnx", "coreml")


def _choices(parser, *path):
    for name in path[:-1]:
        parser = next(a for a in parser._actions if a.dest in ("command",)).choices[name]
    return next(a for a in parser._actions if a.dest == path[-1]).choices


def test_the_clis_read_their_choices_from_the_tables():
    from geosurge.cli import build_parser
    from geosurge.models.config import CONFIGS
    from geosurge.runtime.cli import build_parser as run_parser

    p = build_parser()
    assert list(_choices(p, "export", "precision")) == list(PRECISIONS)
    assert list(_choices(p, "export", "model")) == list(CONFIGS)
    assert list(_choices(p, "train", "model")) == list(CONFIGS)
    assert set(_choices(p, "export", "format")) == {f.value for f in Format}
    for command in ("locate", "verify", "bench"):
        assert list(_choices(run_parser(), command, "backend")) == [b.value for b in Backend]


# ---- writing: umask, swap without a gap, leftovers ----------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    for mask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
        umask(mask)
        fsutil.atomic_write_bytes(tmp_path / f"f{mask}", b"x")
        assert (tmp_path / f"f{mask}").stat().st_mode & 0o777 == mode
        d = fsutil.make_staging_dir(tmp_path / f"b{mask}")
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask
        fsutil.release_staging(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f18", "f2", "f23"]


def _bundle_dir(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(tag)
    (path / "model.onnx").write_bytes(tag.encode() * 1000)
    return path


def _watch(monkeypatch, target: Path):
    """Check, before and after every file-system step replace_dir takes, that ``target`` holds a whole bundle."""
    seen = []

    def check(step):
        seen.append((step, (target / "manifest.json").is_file()))

    for name in ("rename", "replace"):
        real = getattr(os, name)

        def wrapped(*a, _real=real, _name=name, **k):
            check(f"before {_name}")
            r = _real(*a, **k)
            check(f"after {_name}")
            return r

        monkeypatch.setattr(fsutil.os, name, wrapped)
    real_exchange = fsutil.exchange

    def exchange(a, b):
        check("before exchange")
        r = real_exchange(a, b)
        check("after exchange")
        return r

    monkeypatch.setattr(fsutil, "exchange", exchange)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's (macOS: renamex_np)")
def test_replacing_a_bundle_leaves_no_moment_without_one(tmp_path, monkeypatch):
    out = _bundle_dir(tmp_path / "b", "old")
    new = _bundle_dir(tmp_path / ".b.staging-new", "new")
    seen = _watch(monkeypatch, out)
    assert fsutil.replace_dir(new, out) == "exchange"
    assert seen and all(ok for _, ok in seen), seen
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_without_an_exchange_the_fallback_still_replaces(tmp_path, monkeypatch):
    """Where no atomic exchange exists the old bundle is renamed away first: the watcher sees that gap (so the
    check above would fail on the rename-away scheme), and the result is still the new bundle, nothing left."""
    out = _bundle_dir(tmp_path / "b", "old")
    new = _bundle_dir(tmp_path / ".b.staging-new", "new")
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    seen = _watch(monkeypatch, out)
    assert fsutil.replace_dir(new, out) == "rename"
    assert not all(ok for _, ok in seen)
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


KILLED_WRITER = """
import os, signal, sys
from geosurge.export.writer import BundleWriter
w = BundleWriter(sys.argv[1], log=lambda m: None)
with open(w.add("cells"), "wb") as f:
    f.write(os.urandom(1 << 20))
print(w.stage, flush=True)
os.kill(os.getpid(), signal.SIGKILL)   # what kill -9, an OOM kill or a power cut leaves
"""


def test_a_killed_writers_staging_folder_is_swept_by_the_next_writer(tmp_path):
    from geosurge.export.writer import BundleWriter

    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    left = Path(r.stdout.strip())
    assert left.is_dir() and fsutil.owner_file(left).is_file()  # today's leak: the staging folder stays
    # not ours: a hidden folder with a similar name but no owner marker, and the folder of a writer still running
    stranger = tmp_path / ".bundle.staging-1-cafe"
    stranger.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".bundle.staging-{sleeper.pid}-beef"
        live.mkdir()
        fsutil.owner_file(live).write_text(json.dumps({"pid": sleeper.pid, "host": __import__("socket").gethostname(),
                                                       "start": fsutil._process_start(sleeper.pid),
                                                       "created": 0}))
        swept = []
        w = BundleWriter(out, log=swept.append)
        w.abort()
        assert not left.exists() and not fsutil.owner_file(left).exists()
        assert swept == [f"removed {left.name}: left by an interrupted run"]
        assert stranger.is_dir() and live.is_dir() and fsutil.owner_file(live).is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
    # once its owner is gone, the other one goes too
    BundleWriter(out, log=lambda m: None).abort()
    assert not live.exists() and stranger.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [stranger.name]


def test_the_writer_refuses_nothing_half_written(tmp_path):
    from geosurge.export.writer import BundleWriter

    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b", log=lambda m: None) as w:
            w.add("cells").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ---- the cell scorer from memory equals the one from the file ------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "int8", "float32"])
def test_cell_scorer_from_arrays_equals_the_saved_one(tmp_path, dtype):
    from geosurge.geo import build_hierarchy
    from geosurge.runtime.cells import CellScorer, save_cell_table

    from .conftest import random_sphere_points

    lat, lon = random_sphere_points(3000, seed=3)
    h = build_hierarchy(lat, lon, tau_max=[400, 80], tau_min=2, max_s2_level=12)
    rng = np.random.default_rng(0)
    tables = [rng.normal(size=(n, 16)).astype(np.float32) for n in h.sizes]
    tables = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in tables]
    temps = np.array([0.07, 0.05], np.float32)
    h.save(tmp_path / "cells.npz")
    save_cell_table(tmp_path / "t.npz", tables, temps, dtype=dtype)
    a, b = CellScorer.load(tmp_path / "cells.npz", tmp_path / "t.npz"), CellScorer.from_arrays(h, tables, temps, dtype)
    # held in the stored dtype like the loaded one (no FP32 copy of an fp16 / int8 table)
    assert b.table_dtype == a.table_dtype == dtype and b.table_bytes == a.table_bytes
    for x, y in zip(a.tables, b.tables):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.temperatures, b.temperatures)


def test_bundle_errors_name_the_file(tmp_path):
    from geosurge.runtime.bundle import open_bundle

    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({**V1["fp32"], "schema_version": 7}))
    with pytest.raises(BundleError, match=r"b/manifest.json: bundle schema version 7 is not supported"):
        open_bundle(b)
    d = {**V1["fp32"]}
    d["model"] = {**d["model"], "precision": "fp8"}
    d["manifest_sha256"] = manifest_digest(d)
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"manifest.json.model.precision: fp8 is not a precision of target"):
        open_bundle(b, verify=False)


def test_listing_a_calibration_folder_imports_no_torch(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")  # listed by content: skipped, and said so
    code = ("import sys\nfrom geosurge.calibration.dataset import _candidates\n"
            f"files, lat, lon = _candidates({str(tmp_path)!r})\n"
            "print(len(files), lat is None, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') "
            "or m.startswith('geosurge.training')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *listing, last = r.stdout.splitlines()
    assert last.split() == ["1", "True", "[]"]
    assert f"calibration source: skipped {tmp_path / 'notes.txt'}: text" in listing
    assert f"calibration source: 1 image file(s) in {tmp_path}, 1 other file(s) skipped (not an image)" in listing

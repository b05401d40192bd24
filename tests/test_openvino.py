"""The OpenVINO runner behind the runner interface: it opens a tiny ONNX bundle, matches onnxruntime FP32, honours
threads, records its precision hint, passes verify; the default-backend rule (a measured recommendation, for this
machine only, for an installed backend only)."""
import json
import shutil

import numpy as np
import pytest

from geosurge import api
from geosurge.errors import GeosurgeError
from geosurge.formats import Backend, backends_for
from geosurge.runtime import Localizer, open_bundle
from geosurge.runtime.backends import BackendUnavailable, open_runner
from geosurge.runtime.backends import choice as choice_mod
from geosurge.runtime.golden import Golden
from geosurge.samples import sample_photo_paths

from .conftest import run_cli

ov = pytest.importorskip("openvino", reason="the openvino backend needs `pip install 'geosurge[openvino]'`")
QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "tiny"
    return api.export("tiny", out, golden=sample_photo_paths()[:3], **QUIET)


def test_openvino_reads_onnx_bundles():
    assert Backend.OPENVINO in backends_for("onnx") and backends_for("onnx")[0] == Backend.ONNXRUNTIME


def test_runner_matches_onnxruntime_fp32_and_honours_threads(bundle):
    x = Golden.load(bundle.path("golden")).inputs
    with open_runner(bundle, "onnxruntime", threads=2) as ref_runner:
        ref = np.concatenate([ref_runner.infer({"image": x[i:i + 1]})["embedding"] for i in range(len(x))])
    with open_runner(bundle, "openvino", threads=2, precision_hint="f32") as r:
        assert r.name == Backend.OPENVINO and r.input_names == ["image"] and r.output_names == ["embedding"]
        assert r.options["INFERENCE_NUM_THREADS"] == 2 and r.options["INFERENCE_PRECISION_HINT"] == "float32"
        assert r.options["device"] == "CPU" and r.options["requested_precision_hint"] == "f32"
        out = np.concatenate([r.infer({"image": x[i:i + 1]})["embedding"] for i in range(len(x))])
    # FP32 on both: the same graph, different kernels and summation orders. 1e-4 on a unit vector's elements is
    # ~1e3 x float32 epsilon (measured ~1e-6 here); a real bug (a wrong input layout, a missed op) is >= 1e-2
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4)
    with pytest.raises(GeosurgeError, match="runner is closed"):
        r.infer({"image": x[:1]})
    r.close()  # idempotent
    # the device's default hint (bf16 on CPUs with AMX / AVX512-BF16, f32 elsewhere): recorded, and close to FP32
    # (cosine 0.999 measured with bf16; a wrong result is far below 0.99)
    with open_runner(bundle, "openvino", threads=1) as r:
        assert r.options["requested_precision_hint"] == "device default" and r.options["INFERENCE_NUM_THREADS"] == 1
        e = r.infer({"image": x[:1]})["embedding"]
    assert float((e * ref[:1]).sum() / np.linalg.norm(e) / np.linalg.norm(ref[:1])) > 0.99


def test_options_are_checked(bundle):
    with pytest.raises(GeosurgeError, match="the onnxruntime backend has no option device"):
        open_runner(bundle, "onnxruntime", device="GPU")
    with pytest.raises(GeosurgeError, match="--precision-hint must be one of f32, bf16, f16"):
        open_runner(bundle, "openvino", precision_hint="int4")
    with pytest.raises(BackendUnavailable, match="OpenVINO device 'NPU.7' is not present here"):
        open_runner(bundle, "openvino", device="NPU.7")
    with pytest.raises(GeosurgeError, match="--threads must be >= 1"):
        open_runner(bundle, "openvino", threads=0)


def test_verify_and_parity_with_openvino_name_the_backend_and_hint(bundle, tmp_path):
    rep = api.verify(bundle, backend="openvino", threads=2, precision_hint="f32")
    assert rep["passed"] and rep["backend"] == "openvino"
    assert rep["runner_options"]["INFERENCE_PRECISION_HINT"] == "float32"
    r = run_cli("geosurge-run", "verify", bundle, "--backend", "openvino", "--precision-hint", "f32",
                "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "golden replay (openvino, CPU, INFERENCE_PRECISION_HINT float32)" in r.stdout
    assert json.loads((tmp_path / "v.json").read_text())["runner_options"]["device"] == "CPU"
    r = run_cli("geosurge-run", "verify", bundle, "--device", "GPU")  # onnxruntime takes no device
    assert r.returncode != 0 and "has no option device" in r.stderr and "Traceback" not in r.stderr


def _sidecar(bundle, backend, machine=None):
    choice_mod.write_choice(bundle, {"backend": backend, "machine": machine or choice_mod.machine_fingerprint(),
                                     "reason": "test", "measured": []})


def test_the_default_backend_follows_a_measurement_for_this_machine_only(bundle, tmp_path, monkeypatch):
    b = open_bundle(shutil.copytree(bundle.root, tmp_path / "b"))
    assert b.backend() == Backend.ONNXRUNTIME  # nothing measured: the format's default
    _sidecar(b, "openvino")
    assert b.backend() == Backend.OPENVINO and b.backend("onnxruntime") == Backend.ONNXRUNTIME  # explicit wins
    with Localizer(b) as loc:
        assert loc.runner.name == Backend.OPENVINO
    monkeypatch.setattr(choice_mod, "installed", lambda backend: Backend(str(backend)) != Backend.OPENVINO)
    assert b.backend() == Backend.ONNXRUNTIME  # recommended, but not installed here
    monkeypatch.undo()
    _sidecar(b, "openvino", machine="aarch64 | Cortex-A78AE | asimddp")  # measured on another machine
    assert b.backend() == Backend.ONNXRUNTIME
    _sidecar(b, "coreml")  # a backend that does not read ONNX
    assert b.backend() == Backend.ONNXRUNTIME
    (b.root / choice_mod.SIDECAR_FILE).write_text("{not json")  # advice that cannot be read is ignored
    assert b.backend() == Backend.ONNXRUNTIME


def test_measure_backends_recommends_only_faster_at_parity(bundle, monkeypatch):
    def times(ms):  # an injected measurement (never real timings in a test)
        return lambda calls: {k: [ms[k]] * 5 for k in calls}

    # whatever precision hint OpenVINO picks on this CPU (bf16 on AVX512-BF16 / AMX): here, as if f32
    monkeypatch.setattr(choice_mod, "reduced_precision", lambda options: None)

    rec = choice_mod.measure_backends(bundle, threads=1, measure=times({"onnxruntime": 4.0, "openvino": 2.0}),
                                      **QUIET)
    assert rec["backend"] == "openvino" and "x2.00 faster than onnxruntime" in rec["reason"]
    assert rec["machine"] == choice_mod.machine_fingerprint()
    rows = {r["backend"]: r for r in rec["measured"]}
    assert rows["openvino"]["speedup_p10"] == rows["openvino"]["speedup_p90"] == 2.0  # round by round: all x2
    spread = {"onnxruntime": [4.0, 4.0, 8.0, 4.0, 4.0], "openvino": [2.0, 4.0, 4.0, 1.0, 2.0]}
    r2 = {r["backend"]: r for r in choice_mod.measure_backends(bundle, threads=1, measure=lambda calls: spread,
                                                                **QUIET)["measured"]}
    assert r2["openvino"]["speedup"] == 2.0  # p50 over p50 (4 / 2) ...
    assert r2["openvino"]["speedup_p10"] == pytest.approx(1.4) and r2["openvino"]["speedup_p90"] == pytest.approx(3.2)
    assert rows["openvino"]["parity_passed"] and rows["openvino"]["options"]["INFERENCE_PRECISION_HINT"]
    assert "skipped" in rows["tensorrt"]  # not installed / no GPU here: named, not timed
    rec = choice_mod.measure_backends(bundle, threads=1, measure=times({"onnxruntime": 4.0, "openvino": 3.9}),
                                      min_speedup=1.1, **QUIET)
    assert rec["backend"] == "onnxruntime" and "more than x1.1 faster" in rec["reason"]
    # the deployment's own images: a backend must also pass on them, measured against the default backend
    import geosurge.parity as parity_mod

    real = parity_mod.compare
    photos = sample_photo_paths()[3:7]  # four: the bundle's golden probes are three
    bad = bundle.root.parent / "not-a-photo.jpg"
    bad.write_bytes(b"not a jpeg")

    def compare(ref, dep, scorer, gates=None, truth=None):  # the user's images fail for the non-default backend
        rep = real(ref, dep, scorer, gates, truth=truth)
        if len(ref) == len(photos) and not np.array_equal(ref, dep):
            rep = {**rep, "passed": False}
        return rep

    monkeypatch.setattr(parity_mod, "compare", compare)
    rec = choice_mod.measure_backends(bundle, threads=1, measure=times({"onnxruntime": 4.0, "openvino": 2.0}),
                                      images=[*photos, bad], **QUIET)
    rows = {r["backend"]: r for r in rec["measured"]}
    assert rec["images"]["n"] == 4 and rec["images"]["reference"].startswith("onnxruntime")
    assert [b["input"] for b in rec["images"]["refused"]] == [str(bad)]  # named, not dropped
    assert rows["onnxruntime"]["images_parity_passed"] and not rows["openvino"]["images_parity_passed"]
    assert not rows["openvino"]["parity_passed"] and rec["backend"] == "onnxruntime"
    assert rows["openvino"]["golden_parity_passed"]  # the golden verdict is kept beside the combined one
    assert 0.0 <= rows["openvino"]["images_cosine_mean"] <= 1.0 + 1e-6
    monkeypatch.undo()
    with pytest.raises(GeosurgeError, match="no readable images"):
        choice_mod.measure_backends(bundle, threads=1, measure=times({"onnxruntime": 4.0, "openvino": 2.0}),
                                    images=[bad], **QUIET)
    # parity failures never win, however fast
    rows = [{"backend": "onnxruntime", "p50_ms": 4.0, "parity_passed": True},
            {"backend": "openvino", "p50_ms": 1.0, "parity_passed": False}]
    assert choice_mod.decide(rows, "onnxruntime")[0] == "onnxruntime"


def test_a_reduced_precision_backend_is_chosen_only_on_the_users_images(bundle, monkeypatch):
    """Six golden probes cannot judge a bf16 / f16 backend: without --images, or with fewer than FEW_IMAGES of
    them, it is measured and never the default; judged on enough of the user's images (and passing), it may be."""
    assert choice_mod.reduced_precision({"INFERENCE_PRECISION_HINT": "bf16"}) == "bf16"
    assert choice_mod.reduced_precision({"INFERENCE_PRECISION_HINT": "<Type: 'float16'>"})
    assert choice_mod.reduced_precision({"INFERENCE_PRECISION_HINT": "f32"}) is None
    assert choice_mod.reduced_precision({}) is None
    real = choice_mod.reduced_precision
    monkeypatch.setattr(choice_mod, "reduced_precision",  # OpenVINO as if at bf16 on any CPU
                        lambda o: "bf16" if "device" in (o or {}) else real(o))
    fast = lambda calls: {k: [{"onnxruntime": 4.0}.get(k, 2.0)] * 5 for k in calls}  # noqa: E731
    rec = choice_mod.measure_backends(bundle, threads=1, measure=fast, **QUIET)
    rows = {r["backend"]: r for r in rec["measured"]}
    assert rows["openvino"]["parity_passed"] and "add --images" in rows["openvino"]["needs_images"]
    assert rec["backend"] == "onnxruntime" and "add --images" in rec["reason"]
    photos = sample_photo_paths()[3:7]
    rec = choice_mod.measure_backends(bundle, threads=1, measure=fast, images=photos, **QUIET)
    rows = {r["backend"]: r for r in rec["measured"]}
    assert "needs_images" in rows["openvino"] and rec["backend"] == "onnxruntime"  # 4 images: too few
    monkeypatch.setattr(choice_mod, "FEW_IMAGES", len(photos))  # as if they were enough
    rec = choice_mod.measure_backends(bundle, threads=1, measure=fast, images=photos, **QUIET)
    rows = {r["backend"]: r for r in rec["measured"]}
    assert "needs_images" not in rows["openvino"]
    assert rec["backend"] == ("openvino" if rows["openvino"]["parity_passed"] else "onnxruntime")


def test_locate_names_a_recorded_backend(bundle, tmp_path):
    b = open_bundle(shutil.copytree(bundle.root, tmp_path / "b"))
    photo = sample_photo_paths()[0]
    r = run_cli("geosurge-run", "locate", b.root, photo)
    assert r.returncode == 0 and "recorded choice" not in r.stderr  # the format's default: nothing to say
    _sidecar(b, "openvino")
    r = run_cli("geosurge-run", "locate", b.root, photo)
    assert r.returncode == 0, r.stderr
    assert "backend openvino" in r.stderr and "recorded choice" in r.stderr and "--backend overrides" in r.stderr
    r = run_cli("geosurge-run", "locate", b.root, photo, "--backend", "openvino")
    assert r.returncode == 0 and "recorded choice" not in r.stderr  # asked for by name


def test_choose_backend_cli_writes_the_sidecar(bundle, tmp_path):
    b = shutil.copytree(bundle.root, tmp_path / "b")
    r = run_cli("geosurge-run", "choose-backend", b, "--iters", "3", "--pause-ms", "1", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    side = json.loads((b / choice_mod.SIDECAR_FILE).read_text())
    assert side["backend"] in ("onnxruntime", "openvino") and {m["backend"] for m in side["measured"]} >= {
        "onnxruntime", "openvino"}
    assert "choose-backend: default for this bundle on this machine ->" in r.stdout
    assert open_bundle(b).backend() == Backend(side["backend"])
    # on the user's images: a dry run writes nothing and says so; one image is named as too few
    r = run_cli("geosurge-run", "choose-backend", b, "--iters", "2", "--pause-ms", "1", "--threads", "1",
                "--images", sample_photo_paths()[5], "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--dry-run: nothing written" in r.stdout and "too few to hold a backend" in r.stderr
    assert "golden" in r.stdout and "images" in r.stdout
    r = run_cli("geosurge-run", "choose-backend", b, "--images", tmp_path / "nope.jpg", "--dry-run")
    assert r.returncode == 2 and "no readable images among" in r.stderr and "Traceback" not in r.stderr

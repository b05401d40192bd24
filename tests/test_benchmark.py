"""``geosurge benchmark`` (and the runtime timing it shares with ``geosurge-run bench``): what the report holds, not
how fast anything ran — no assertion here reads a timing."""
import json
import shutil
import sys

import numpy as np
import pytest

from geosurge import api
from geosurge.cli import main
from geosurge.manifest import manifest_digest
from geosurge.runtime.backends import RUNNERS
from geosurge.runtime.benchmark import STAGES, open_contenders, runtime_backends
from geosurge.samples import sample_photo_paths
from geosurge.timing import interleaved

from .conftest import run_cli

ITERS, WARMUP = 2, 1


def _as_coreml(src, dst):
    """A copy of an ONNX bundle whose manifest says Core ML (checksums re-sealed): a format that no backend
    installed on Linux runs."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"]["format"] = m["model"]["target"] = "coreml"
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One quick CLI run on a tiny ONNX bundle and a Core ML one, with ground truth (two photos and a missing
    file), the eager anchor, and the JSON + PNG written."""
    root = tmp_path_factory.mktemp("benchmark")
    photos = sample_photo_paths()[:2]
    tiny = api.export("tiny", root / "tiny", golden=photos, log=lambda m: None)
    coreml = _as_coreml(tiny.root, root / "tiny-coreml")
    truth = root / "truth.csv"
    truth.write_text("path,lat,lon\n" + "".join(f"{p},{48.85 + i},{2.35 - i}\n" for i, p in enumerate(photos))
                     + f"{root / 'missing.jpg'},0,0\n")
    out = root / "report.json"
    rc = main(["benchmark", str(tiny.root), str(coreml), "--quick", "--iters", str(ITERS), "--warmup", str(WARMUP),
               "--pause-ms", "5", "--anchors", "eager", "--workers", "1", "--cache-dir", str(root / "cache"),
               "--truth", str(truth), "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), out, tiny, root


def test_report_has_every_stage_backend_and_bundle(run):
    rep, _, tiny, _ = run
    ran = [c for c in rep["contenders"] if c["kind"] == "runtime"]
    # every backend that reads the bundle's format and has a runner is either timed or skipped with a reason
    seen = {c["backend"] for c in ran if c["bundle"] == "tiny"} | {s["backend"] for s in rep["skipped"]
                                                                   if s["bundle"] == "tiny"}
    assert seen == set(runtime_backends(tiny)) and "onnxruntime" in seen
    scen = {("12mp", "paced"), ("12mp", "back-to-back"), ("small", "paced"), ("small", "back-to-back")}
    for c in rep["contenders"]:
        rows = [r for r in rep["latency"] if (r["bundle"], r["backend"]) == (c["bundle"], c["backend"])]
        assert {(r["image"], r["mode"]) for r in rows} == scen and all(r["n"] == ITERS for r in rows)
        for r in rows:
            for stage in (*STAGES, "e2e"):
                got = (r[f"{stage}_p50_ms"], r[f"{stage}_p95_ms"])
                if c["kind"] == "anchor" and stage != "inference":  # anchors are inference-only rows
                    assert got == (None, None)
                else:
                    assert 0 <= got[0] <= got[1]
    assert any(c["backend"] == "torch eager FP32" for c in rep["contenders"])
    (row,) = [r for r in rep["summary"] if (r["bundle"], r["backend"]) == ("tiny", "onnxruntime")]
    assert row["model_mb"] > 0 and row["bundle_mb"] > row["model_mb"]
    assert row["x_eager"] > 0 and row["img_s"] > 0 and row["img_s_pool"] in ("serial", "threads", "processes")
    assert row["golden"] == "PASS" and row["recorded"] == "reference"  # FP32: its own reference, replay exact
    # the folder's images are all accounted for, on every pool
    t = rep["throughput"]["tiny | onnxruntime"]
    assert {"serial", "threads", "processes"} <= set(t) and t["refused"] == []


def test_contenders_are_interleaved_call_by_call(run):
    rep, *_ = run
    names = [c["name"] for c in rep["contenders"]]
    assert len(names) >= 2
    by_scenario = {}
    for scenario, rnd, name in rep["call_order"]:
        by_scenario.setdefault(scenario, []).append((rnd, name))
    assert len(by_scenario) == 4
    for calls in by_scenario.values():
        # round after round, each contender once, in the same turn: never two calls of one contender in a row
        assert calls == [(r, n) for r in range(ITERS + WARMUP) for n in names]


def test_peak_rss_is_measured_in_a_process_without_torch(run):
    rep, *_ = run
    assert "torch" in sys.modules  # this process exported the bundle with torch ...
    mem = rep["memory"]["tiny | onnxruntime"]
    assert mem["heavy_modules"] == [] and mem["peak_rss_mb"] > 0  # ... the measured runtime process did not load it
    assert mem["child"]["backend"] == "onnxruntime" and len(mem["child"]["images"]) == 2


def test_json_schema(run):
    rep, *_ = run
    assert rep["schema"] == "geosurge-benchmark/1"
    assert {"schema", "machine", "settings", "images", "contenders", "skipped", "latency", "summary", "throughput",
            "memory", "parity", "task", "call_order", "seconds", "png"} <= set(rep)
    assert {"threads", "iters", "warmup", "pause_ms", "quick", "workers", "anchors"} <= set(rep["settings"])
    assert rep["settings"]["iters"] == ITERS and rep["settings"]["quick"] is True
    assert rep["images"]["12mp"]["size"] == [4032, 3024]
    for r in rep["latency"]:
        assert {"bundle", "backend", "kind", "image", "mode", "n"} <= set(r)
    for s in rep["skipped"]:
        assert set(s) == {"bundle", "backend", "reason"} and s["reason"]
    p = rep["parity"]["tiny | onnxruntime"]
    assert p["recorded"]["status"] == "reference" and 0.999 <= p["golden"]["cosine_mean"] <= 1.0 + 1e-6


def test_png_is_written(run):
    import cv2

    rep, out, _, _ = run
    png = out.with_suffix(".png")
    assert rep["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(png))
    assert img is not None and img.shape[1] > 600


def test_a_bundle_no_installed_backend_runs_is_skipped_with_a_reason(run):
    rep, *_ = run
    (skip,) = [s for s in rep["skipped"] if s["bundle"] == "tiny-coreml"]
    assert skip["backend"] == "coreml" and "macOS" in skip["reason"]
    assert not [r for r in rep["latency"] + rep["summary"] if r["bundle"] == "tiny-coreml"]


def test_task_parity_with_ground_truth_accounts_for_every_row(run):
    rep, *_ = run
    task = rep["task"]["tiny | onnxruntime"]
    assert task["n"] == 2 and len(task["refused"]) == 1 and "missing.jpg" in task["refused"][0]["input"]
    assert set(task["deployed"]["accuracy"]) == {"1km", "25km", "200km", "750km", "2500km"}
    assert all(0 <= v <= 1 for v in task["deployed"]["accuracy"].values())
    # the FP32 torch reference on the same pixels, and the parity of the two embeddings
    assert task["fp32"]["n"] == 2 and task["parity"]["cosine_min"] > 0.999
    assert rep["summary"][0]["acc@25km"] == task["deployed"]["accuracy"]["25km"]
    # gated in km with the truth: drift median / p95, agreement where confident, the accuracy deltas in points.
    # FP32 torch vs onnxruntime FP32 of the same graph: tie-aware drift is 0 km (a flip among FP32's near-ties is
    # not drift); the accuracy deltas are not asserted at 0 — on this flat, untrained head an exact tie may flip
    gates = {g["gate"]: g for g in task["parity"]["gates"]}
    assert {"median_drift_km", "p95_drift_km", "top1_agreement_confident", "accuracy_delta_min_pts"} <= set(gates)
    assert gates["accuracy_delta_min_pts"]["pass"] in ("PASS", "FAIL") and task["parity"]["p95_drift_km"] == 0.0
    assert set(task["delta_accuracy_pts"]) == {f"acc@{t}km" for t in (1, 25, 200, 750, 2500)}
    assert min(task["delta_accuracy_pts"].values()) == task["parity"]["accuracy_delta_min_pts"]
    row = rep["summary"][0]
    assert row["task"] == ("PASS" if task["parity"]["passed"] else "FAIL") and row["drift_p95_km"] == 0.0
    assert row["acc_delta_min_pts"] == task["parity"]["accuracy_delta_min_pts"]
    p = rep["parity"]["tiny | onnxruntime"]
    assert {"median_drift_km", "p95_drift_km", "top1_agreement_confident", "cosine_mean"} <= set(p["golden"])


def test_openvino_runs_when_installed_with_its_precision_hint(run):
    pytest.importorskip("openvino", reason="the openvino backend is not installed here")
    rep, *_ = run
    (c,) = [c for c in rep["contenders"] if (c["bundle"], c["backend"]) == ("tiny", "openvino")]
    assert c["runner_options"]["INFERENCE_PRECISION_HINT"] and c["runner_options"]["device"] == "CPU"
    (row,) = [r for r in rep["summary"] if (r["bundle"], r["backend"]) == ("tiny", "openvino")]
    assert row["precision_hint"] == str(c["runner_options"]["INFERENCE_PRECISION_HINT"])
    assert row["golden"] == "PASS" and row["drift_p95_km"] == 0.0  # checked like any backend, in km
    assert rep["memory"]["tiny | openvino"]["heavy_modules"] == []


def test_short_form_for_the_demo(run):
    from geosurge.export.benchmark import short_form

    rep, *_ = run
    text = short_form(rep, "tiny")
    assert "tiny" in text and "onnxruntime" in text and "x_torch_eager" in text and "12mp_e2e_p95_ms" in text
    assert short_form(rep, run[2].root) == text == short_form(rep)  # by path, and the first bundle by default
    with pytest.raises(Exception, match="no results"):
        short_form(rep, "tiny-coreml")


def test_bad_bundle_path_is_one_clear_error(tmp_path, capsys):
    rc = main(["benchmark", str(tmp_path / "nope"), "--quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0] and "not found" in err[0] and "Traceback" not in err[0]


def test_a_registered_runner_appears_without_a_change_here(run):
    """The benchmark asks the formats table and the runner registry: give a backend of the ONNX format a runner
    that runs here and it becomes a contender."""
    from geosurge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    rep, _, tiny, _ = run
    # every ONNX backend that could not run here (TensorRT without an engine; OpenVINO where it is not installed)
    cannot = [s["backend"] for s in rep["skipped"] if s["bundle"] == "tiny"]
    assert cannot
    saved = {b: dict.__getitem__(RUNNERS, b) for b in cannot}  # (Registry.get imports a lazy entry; keep it)
    for b in cannot:
        RUNNERS[b] = OnnxRuntimeRunner
    try:
        contenders, skipped, _ = open_contenders([tiny.root], log=lambda m: None)
    finally:
        for b, entry in saved.items():
            RUNNERS[b] = entry
    for c in contenders:
        c.close()
    assert {c.backend for c in contenders} == set(runtime_backends(tiny)) and not skipped


def test_interleaved_pause_results_and_order():
    seen = []
    calls = {"a": lambda: seen.append("a") or 1, "b": lambda: seen.append("b") or 2}
    results, order = {}, []
    times = interleaved(calls, iters=3, warmup=1, pause_ms=1, results=results, order=order)
    assert seen == ["a", "b"] * 4 and order == [(i, n) for i in range(4) for n in "ab"]
    assert results == {"a": [1, 1, 1], "b": [2, 2, 2]} and [len(v) for v in times.values()] == [3, 3]


def test_geosurge_run_bench_uses_the_shared_loop(run):
    from geosurge.runtime.bench import bench_bundle

    _, _, tiny, _ = run
    rep = bench_bundle(tiny.root, iters=3, warmup=1, pause_ms=1)
    assert [r["stage"] for r in rep["stages"]] == [*STAGES, "total"] and rep["pause_ms"] == 1
    assert np.isfinite(rep["throughput_img_s"]) and rep["model_mb"] > 0 and rep["bundle_mb"] > rep["model_mb"]
    assert rep["refused"] == []


def test_geosurge_run_bench_names_and_skips_unreadable_images(run, tmp_path):
    _, _, tiny, _ = run
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("not an image either")
    shutil.copyfile(sample_photo_paths()[0], folder / "photo.jpg")
    r = run_cli("geosurge-run", "bench", tiny.root, "--images", folder, "--iters", "2", "--warmup", "1",
                "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    assert f"refused {folder / 'empty.jpg'}: empty file" in r.stderr and f"refused {folder / 'text.jpg'}" in r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["images"] == 1 and len(rep["refused"]) == 2 and len(rep["skipped"]) == 1
    assert f"skipped {folder / 'notes.txt'}" in r.stderr
    (folder / "photo.jpg").unlink()
    r = run_cli("geosurge-run", "bench", tiny.root, "--images", folder, "--iters", "2")
    assert r.returncode == 2 and "no readable images" in r.stderr and "Traceback" not in r.stderr


def test_folder_throughput_goes_past_a_bad_image_and_names_it(run, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from geosurge.runtime import Localizer
    from geosurge.runtime.benchmark import folder_throughput

    _, _, tiny, _ = run
    good = sample_photo_paths()[0]
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)  # a JPEG signature, then nothing decodable
    with Localizer(tiny) as loc, ThreadPoolExecutor(1) as pool:
        for p in (None, pool):
            r = folder_throughput(loc, [good, bad, good], p)
            assert r["images"] == 2 and len(r["refused"]) == 1 and "cut.jpg" in r["refused"][0]


def test_bad_options_fail_before_anything_runs(run, tmp_path, capsys):
    _, _, tiny, _ = run
    rc = main(["benchmark", str(tiny.root), "--truth", str(tmp_path / "truth.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "truth.csv" in err[0] and "not found" in err[0]
    with pytest.raises(Exception, match="unknown anchor 'jit'"):
        api.benchmark(tiny.root, anchors=("jit",), log=lambda m: None)


def test_test_images_are_deterministic_and_fall_back_to_the_golden_probes(run, tmp_path, monkeypatch):
    import geosurge.samples
    from geosurge.errors import GeosurgeError
    from geosurge.runtime.benchmark import bench_images

    _, _, tiny, _ = run
    a = bench_images(2, cache_dir=tmp_path / "a", size=(400, 300))
    b = bench_images(2, cache_dir=tmp_path / "b", size=(400, 300))
    assert [p.read_bytes() for p in a.folder] == [p.read_bytes() for p in b.folder] and len(a.folder) == 2
    assert a.info["12mp"]["size"] == [400, 300] and a.phone == a.folder[0]

    def no_samples():  # a device: scikit-image / matplotlib not installed
        raise GeosurgeError("no sample photos found")

    monkeypatch.setattr(geosurge.samples, "sample_photo_paths", no_samples)
    c = bench_images(1, bundle=tiny, cache_dir=tmp_path / "c", size=(400, 300))
    assert c.info["12mp"]["source"].startswith("golden-") and c.phone.is_file()


@pytest.mark.slow
def test_the_compile_anchor_joins_the_run(run, tmp_path):
    """torch.compile of the source model (compiles for a minute or more on 2 cores) is a timed, inference-only row
    and the summary's x_compile."""
    _, _, tiny, _ = run
    rep = api.benchmark(tiny.root, quick=True, iters=2, warmup=1, pause_ms=5, anchors=("compile",), pools=(),
                        rss=False, cache_dir=tmp_path, log=lambda m: None)
    assert [c["backend"] for c in rep["contenders"] if c["kind"] == "anchor"] == ["torch.compile FP32"]
    assert rep["summary"][0]["x_compile"] > 0


# ---- noisy anchor ratios: the flagging logic on synthetic timings (no clock read) -------------------------------
def test_ratio_spread_flags_a_spread_anchor_and_a_wobbling_ratio():
    from geosurge.export.benchmark import NOISY_ANCHOR_P95_P50, NOISY_RATIO_P75_P25, ratio_spread

    this = [10.0] * 8
    steady = ratio_spread([40.0, 41.0, 40.5, 39.5, 40.0, 42.0, 40.0, 41.0], this)
    assert not steady["noisy"] and steady["why"] is None and steady["rounds"] == 8
    assert steady["ratio_min"] == 3.95 and steady["ratio_max"] == 4.2 and 3.95 <= steady["ratio_p25"] <= 4.0
    # a user's loaded run: torch eager p50 1,525 ms with a p95 of 2,522 ms (p95/p50 1.65)
    loaded = ratio_spread([1525.0] * 6 + [2522.0] * 2, this)
    assert loaded["noisy"] and f"anchor p95/p50 {loaded['anchor_p95_p50']:.2f} > {NOISY_ANCHOR_P95_P50:g}" \
        in loaded["why"] and loaded["anchor_p95_p50"] > NOISY_ANCHOR_P95_P50
    # the anchor steady, this contender's time wobbling round by round: the per-round ratio's quartiles split
    wobble = ratio_spread([40.0] * 8, [10.0, 20.0] * 4)
    assert wobble["anchor_p95_p50"] == 1.0 and wobble["noisy"] and "per-round ratio p25-p75 2-4" in wobble["why"]
    assert wobble["ratio_p75"] / wobble["ratio_p25"] > NOISY_RATIO_P75_P25
    # ratios pair calls of the same round: the anchor slow in the rounds this one is slow is not noise
    paired = ratio_spread([40.0, 80.0] * 4, [10.0, 20.0] * 4)
    assert paired["ratio_min"] == paired["ratio_max"] == 4.0 and "per-round" not in (paired["why"] or "")
    with pytest.raises(ValueError):
        ratio_spread([], [])


def _noisy_report(rep, anchor_ms):
    """The fixture's report with its summary recomputed from synthetic samples: ``anchor_ms`` for the eager anchor,
    a steady 10 ms for every runtime row (headline scenario)."""
    from geosurge.export.benchmark import summary_rows
    from geosurge.runtime.benchmark import Contender

    cs = [Contender(c["bundle"], c["backend"], c["kind"], None, info=dict(c)) for c in rep["contenders"]]
    anchor = next(c for c in cs if c.kind == "anchor")
    samples = {("12mp paced", c.name): {"inference": list(anchor_ms) if c is anchor else [10.0] * len(anchor_ms)}
               for c in cs}
    anchor_of = {c.bundle: {"eager": (anchor.bundle, anchor.backend)} for c in cs if c.kind == "runtime"}
    summary = summary_rows(cs, rep["latency"], rep["throughput"], rep["memory"], rep["parity"], rep["task"],
                           anchor_of, rep["settings"]["accuracy_km"], samples)
    return {**rep, "summary": summary}


def test_noisy_x_eager_is_flagged_in_the_json_the_table_and_the_short_form(run):
    from geosurge.export.benchmark import format_report, short_form

    rep, *_ = run
    # the fixture's own run: the spread is recorded whatever the machine's load (not asserted: it is a timing)
    assert {"anchor_p95_p50", "ratio_p25", "ratio_p75", "rounds"} <= set(rep["summary"][0]["x_eager_spread"])
    assert isinstance(rep["summary"][0]["x_eager_noisy"], bool) and "loadavg" in rep["machine"]
    quiet = _noisy_report(rep, [40.0, 41.0, 40.0, 39.0, 40.0])
    noisy = _noisy_report(rep, [1525.0, 1500.0, 1550.0, 2522.0, 2522.0])
    assert quiet["summary"][0]["x_eager_noisy"] is False and noisy["summary"][0]["x_eager_noisy"] is True
    assert noisy["summary"][0]["x_eager_spread"]["rounds"] == 5
    text = format_report(noisy)
    warn = [ln for ln in text.splitlines() if ln.startswith("warning: x_eager")]
    assert len(warn) == len(noisy["summary"])  # every runtime row is compared with the same, noisy, anchor
    (ort,) = [ln for ln in warn if "tiny | onnxruntime is noisy" in ln]
    assert "torch eager FP32: anchor p95/p50 1.6" in ort
    assert "x_eager_spread" not in text and "x_eager_noisy" not in text  # JSON fields, not table columns
    assert "warning" not in format_report(quiet)
    assert "warning: x_eager" in short_form(noisy) and "warning" not in short_form(quiet)


def test_the_cuda_home_note_is_dropped_around_torch_compile_only(caplog):
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when inductor imports it on a
    # machine with a CUDA toolkit but no GPU; the compile anchor drops exactly that record, nothing else
    import logging

    from geosurge.export.benchmark import _quiet_cuda_home_note

    log = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger=log.name):
        with _quiet_cuda_home_note():
            log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
            log.warning("another warning")
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    assert [r.getMessage() for r in caplog.records] == ["another warning",
                                                        "No CUDA runtime is found, using CUDA_HOME='/usr/local'"]

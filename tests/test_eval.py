"""``geosurge eval``: every manifest format, EXIF GPS folders, failures named, plots, bundle vs checkpoint."""
import csv
import json

import cv2
import numpy as np
import pytest
import torch

from geosurge.cli import main
from geosurge.evaluation import evaluate, exif_gps, load_predictor, read_items

from .synthetic import LOCATIONS, make_image, make_manifest


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny checkpoint over a small hierarchy, and its FP32 bundle (FP32 cell table: exact agreement)."""
    from geosurge import api
    from geosurge.models import build_model

    root = tmp_path_factory.mktemp("eval_models")
    _, h, _ = make_manifest(root / "data", n_locations=8, per_location=4)
    torch.manual_seed(0)
    model = build_model("tiny", h).eval()
    ck = model.save_pretrained(root / "ckpt")
    photos = sorted((root / "data").glob("*.png"))[:2]
    bundle = api.export(model, root / "bundle", source={"checkpoint": str(ck), "config": "tiny", "seed": None},
                        golden=photos, table="float32", log=lambda m: None)
    return ck, bundle


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def photo_dir(tmp_path):
    """4 photos at known places, one missing row and one undecodable file, in every manifest format."""
    from PIL import ExifTags, Image

    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for i in range(4):
        lat, lon = LOCATIONS[i]
        rgb = cv2.cvtColor(make_image(i, 0), cv2.COLOR_BGR2RGB)
        ex = Image.Exif()
        ex[ExifTags.IFD.GPSInfo] = {
            ExifTags.GPS.GPSLatitudeRef: "N" if lat >= 0 else "S", ExifTags.GPS.GPSLatitude: _dms(abs(lat)),
            ExifTags.GPS.GPSLongitudeRef: "E" if lon >= 0 else "W", ExifTags.GPS.GPSLongitude: _dms(abs(lon))}
        Image.fromarray(rgb).save(d / f"{1000 + i}.jpg", exif=ex, quality=95)
        rows.append((f"{1000 + i}.jpg", lat, lon))
    (d / "1004.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # undecodable
    rows.append(("1004.jpg", 10.0, 10.0))
    rows.append(("1005.jpg", 20.0, 20.0))  # missing
    return d, rows


def _dms(x):
    d = int(x)
    m = int((x - d) * 60)
    return float(d), float(m), round((x - d - m / 60) * 3600, 4)


def test_exif_gps_roundtrip(photo_dir):
    d, rows = photo_dir
    for name, lat, lon in rows[:4]:
        la, lo = exif_gps(d / name)
        assert la == pytest.approx(lat, abs=1e-4) and lo == pytest.approx(lon, abs=1e-4)


def test_every_manifest_format_gives_the_same_result(tiny_models, photo_dir, tmp_path):
    ck, _ = tiny_models
    d, rows = photo_dir
    ours = _write_csv(d / "ours.csv", ["path", "lat", "lon"], rows)
    im2gps = _write_csv(tmp_path / "im2gps.csv", ["IMG_ID", "AUTHOR", "LAT", "LON"],
                        [(n, "someone", la, lo) for n, la, lo in rows])
    osv = _write_csv(tmp_path / "osv.csv", ["id", "latitude", "longitude", "country"],
                     [(n.split(".")[0], la, lo, "xx") for n, la, lo in rows])
    pred = load_predictor(ck)
    results = {}
    for name, src, images in (("geosurge", ours, None), ("im2gps", im2gps, d), ("osv5m", osv, d), ("exif", d, None)):
        items, fmt = read_items(src, images)
        assert fmt == name
        results[name] = evaluate(pred, items)
    by_path = {k: {p["path"]: (p["pred_lat"], p["pred_lon"], p["km"]) for p in r.predictions}
               for k, r in results.items()}
    assert len(by_path["geosurge"]) == 4
    for k in ("im2gps", "osv5m"):
        assert by_path[k] == by_path["geosurge"]
    # the EXIF folder holds the same 4 photos (truth to 1e-4 degrees) plus the undecodable one; the CSVs list the
    # missing one as well: every row is accounted for, with its reason
    assert by_path["exif"].keys() == by_path["geosurge"].keys()
    for k, v in by_path["exif"].items():
        assert v[2] == pytest.approx(by_path["geosurge"][k][2], abs=0.05)
    for k in ("geosurge", "im2gps", "osv5m"):
        fails = {f["path"].rsplit("/", 1)[-1]: f for f in results[k].failures}
        assert set(fails) == {"1004.jpg", "1005.jpg"}
        assert "not found" in fails["1005.jpg"]["error"] and fails["1005.jpg"]["row"] == 7
        assert "decod" in fails["1004.jpg"]["error"]
        assert results[k].summary()["all"]["failed"] == 2
    assert [f["path"].rsplit("/", 1)[-1] for f in results["exif"].failures] == ["1004.jpg"]


def test_bad_csv_row_is_one_clear_error(tiny_models, tmp_path, capsys):
    ck, _ = tiny_models
    bad = _write_csv(tmp_path / "bad.csv", ["path", "lat", "lon"], [("a.jpg", 1, 2), ("b.jpg", "north", 3)])
    assert main(["eval", str(bad), "-m", str(ck), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.csv: row 3" in err[0]
    odd = _write_csv(tmp_path / "odd.csv", ["file", "y", "x"], [("a.jpg", 1, 2)])
    assert main(["eval", str(odd), "-m", str(ck), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "unrecognised manifest header" in capsys.readouterr().err


def test_cli_side_by_side_with_sources_json_and_plots(tiny_models, photo_dir, tmp_path, capsys):
    ck, bundle = tiny_models
    d, rows = photo_dir
    man = _write_csv(d / "m.csv", ["path", "lat", "lon", "source"],
                     [(n, la, lo, "even" if i % 2 == 0 else "odd") for i, (n, la, lo) in enumerate(rows)])
    out = tmp_path / "out"
    rc = main(["eval", str(man), "-m", str(ck), "-m", str(bundle), "--label", "torch", "--label", "runtime",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch" in text and "runtime" in text and "1005.jpg (row 7): file not found" in text
    rep = json.loads((out / "eval.json").read_text())
    assert rep["format"] == "geosurge" and rep["items"] == 6 and len(rep["results"]) == 2
    summ = rep["results"][0]["summary"]
    assert set(summ) == {"all", "even", "odd"}
    assert summ["all"]["n"] == 4 and summ["all"]["failed"] == 2 and summ["even"]["n"] + summ["odd"]["n"] == 4
    for k in ("acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km", "mean_km", "geoscore"):
        assert k in summ["all"]
    km = np.array([p["km"] for p in rep["results"][0]["predictions"]])
    assert summ["all"]["median_km"] == pytest.approx(float(np.median(km)))
    for png in ("error_cdf.png", "world_map.png"):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] > 300 and img.shape[1] > 500
        assert img.reshape(-1, 3).std(axis=0).mean() > 5  # not blank
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp


@pytest.mark.parametrize("tencrop", [False, True])
def test_bundle_and_checkpoint_agree(tiny_models, photo_dir, tencrop):
    ck, bundle = tiny_models
    d, rows = photo_dir
    items, _ = read_items(_write_csv(d / "m.csv", ["path", "lat", "lon"], rows))
    a = evaluate(load_predictor(ck), items, tencrop=tencrop)
    b = evaluate(load_predictor(bundle), items, tencrop=tencrop)
    assert len(a.predictions) == len(b.predictions) == 4
    # same images, same preprocessing, FP32 on both sides with an FP32 cell table: ONNX Runtime and torch differ by
    # ~1e-6 in the embedding, far below the score margins, so the same cell (and point) wins
    for p, q in zip(a.predictions, b.predictions):
        assert p["path"] == q["path"]
        assert p["pred_lat"] == pytest.approx(q["pred_lat"], abs=1e-9)
        assert p["pred_lon"] == pytest.approx(q["pred_lon"], abs=1e-9)


def test_api_evaluate_library_call(tiny_models, photo_dir):
    from geosurge import api

    ck, bundle = tiny_models
    d, rows = photo_dir
    (d / "notes.txt").write_text("not a photo")
    rep = api.evaluate([ck, bundle], _write_csv(d / "m.csv", ["path", "lat", "lon"], rows), log=None)
    assert rep.items == 6 and [r.summary()["all"]["n"] for r in rep.results] == [4, 4]
    assert rep.results[0].errors().shape == (4,) and rep.results[1].model["kind"] == "bundle"
    assert rep.results[1].model["precision"] == "fp32" and rep.results[1].model["backend"] == "onnxruntime"
    assert rep.inputs() == {"files": 6, "read": 4, "refused": 2, "skipped": 0}
    # a folder of GPS-tagged photos: listed by content (geosurge.images.list_images); the text file and the CSV are
    # skipped with what they are, the undecodable .jpg is refused with its reason
    logged = []
    rep = api.evaluate(ck, d, log=logged.append)
    assert rep.format == "exif" and rep.items == 5 and rep.inputs()["skipped"] == 2
    assert {s.path.name for s in rep.skipped} == {"notes.txt", "m.csv"}
    assert sum(line.startswith("skipped ") for line in logged) == 2


def test_drift_km_between_two_results():
    """Task-level drift of one predictor vs another on the rows both predicted: km between predicted points, the
    share with the same point, acc@km deltas (other minus reference)."""
    from geosurge.evaluation import EvalResult
    from geosurge.evaluation.baselines import drift_km

    def result(preds):
        r = EvalResult({"label": "x"}, False)
        for path, (plat, plon, km) in preds.items():
            r.predictions.append({"path": path, "source": "s", "lat": 0.0, "lon": 0.0, "pred_lat": plat,
                                  "pred_lon": plon, "km": km})
        return r

    ref = result({"a": (0.0, 0.0, 10.0), "b": (0.0, 1.0, 100.0), "c": (5.0, 5.0, 3000.0)})
    other = result({"a": (0.0, 0.0, 10.0), "b": (0.0, 2.0, 300.0), "d": (9.0, 9.0, 1.0)})  # "d": not in ref
    d = drift_km(ref, other)
    assert d["n"] == 2 and d["same_point"] == 0.5
    assert d["drift_max_km"] == pytest.approx(111.19, abs=0.1)  # 1 degree of longitude on the equator
    assert d["delta_acc@200km"] == -50.0 and d["delta_acc@25km"] == 0.0
    with pytest.raises(ValueError, match="share no image"):
        drift_km(ref, result({"z": (0.0, 0.0, 1.0)}))


def test_demo_accuracy_gate():
    """The demo fails unless the trained model beats every baseline within 750 and 2,500 km and in median km on the
    held-out views of the training source (the other source's rows do not count)."""
    from geosurge.commands.demo import beats_baselines

    def row(model, source, a750, a2500, med):
        return {"model": model, "source": source, "acc@750km": a750, "acc@2500km": a2500, "median_km": med}

    base = [row("prior", "bmng", 0.0, 1.4, 8127), row("untrained", "bmng", 0.0, 4.8, 9530),
            row("prior", "shadedrelief", 0.0, 1.4, 8127), row("untrained", "shadedrelief", 0.0, 2.6, 8541)]
    good = base + [row("FP32", "bmng", 26.0, 54.0, 1867), row("FP32", "shadedrelief", 0.0, 1.0, 9000)]
    g = beats_baselines(good, "FP32", ["prior", "untrained"], "bmng")
    assert g["passed"] and "PASS" in g["line"]
    worse_median = base + [row("FP32", "bmng", 26.0, 54.0, 8200)]
    assert not beats_baselines(worse_median, "FP32", ["prior", "untrained"], "bmng")["passed"]
    assert not beats_baselines(base, "FP32", ["prior", "untrained"], "bmng")["passed"]  # no rows: fails, says so


def test_a_gps_folder_of_phone_formats_is_evaluated(tiny_models, photo_dir, tmp_path, capsys):
    """A folder of GPS-tagged photos where phones' formats sit beside JPEG: HEIC (pillow-heif) and WebP carry the
    same EXIF GPS as the JPEGs and are evaluated like them; a photo without GPS is a named failure."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="HEIC needs `pip install 'geosurge[heif]'`")
    from PIL import ExifTags, Image

    ck, _ = tiny_models
    src, rows = photo_dir
    d = tmp_path / "phone"
    d.mkdir()
    pillow_heif.register_heif_opener()
    for (name, lat, lon), ext in zip(rows[:3], ("heic", "webp", "jpg")):
        with Image.open(src / name) as im:
            exif = im.getexif()
            im.convert("RGB").save(d / f"{name[:-4]}.{ext}", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (64, 48), (90, 120, 60)).save(d / "no_gps.png")
    for ext in ("heic", "webp"):
        la, lo = exif_gps(next(d.glob(f"*.{ext}")))
        want = next((r[1], r[2]) for r in rows if next(d.glob(f"*.{ext}")).stem == r[0][:-4])
        assert (la, lo) == pytest.approx(want, abs=1e-3)  # DMS to 1e-4 arc-seconds
    out = tmp_path / "out"
    assert main(["eval", str(d), "-m", str(ck), "-o", str(out), "--no-progress", "--no-plots"]) == 0
    rep = json.loads((out / "eval.json").read_text())
    summ = rep["results"][0]["summary"]["all"]
    assert summ["n"] == 3 and summ["failed"] == 1
    assert "no_gps.png" in capsys.readouterr().out

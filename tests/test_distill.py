"""Distillation: a tiny teacher into a smaller (nano) student on real photos with augmentation — held-out agreement
rises well above the untrained student's, the teacher cache is hit after the first epoch, a 2-process torchrun run
completes with one checkpoint, resume continues from the saved step, --eval reports agreement and cost."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geosurge.images import read_image
from geosurge.samples import sample_photo_paths
from geosurge.training.distill import DistillConfig, distill

from .conftest import run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher on a small hierarchy (tens of cells per level), saved as a checkpoint; 42 real-photo images
    (3 crops of each sample photo)."""
    import cv2

    from geosurge.geo import build_default_hierarchy
    from geosurge.models import build_model

    root = tmp_path_factory.mktemp("distill")
    h = build_default_hierarchy(tau_max=[30000, 15000, 8000, 4000, 2000, 1000, 500], tau_min=150)
    assert 5 <= h.sizes[0] and h.sizes[-1] < 1000
    import torch

    torch.manual_seed(0)
    build_model("tiny", h).save_pretrained(root / "teacher")
    images = root / "images"
    images.mkdir()
    for p in sample_photo_paths():
        rgb = read_image(p)
        hh, ww = rgb.shape[:2]
        for j, (y0, x0, f) in enumerate(((0, 0, 1.0), (hh // 5, ww // 5, 0.8), (hh // 3, 0, 0.66))):
            crop = rgb[y0:y0 + int(hh * f), x0:x0 + int(ww * f)]
            cv2.imwrite(str(images / f"{p.stem}-{j}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return root


def _cfg(setup, out, **kw):
    base = dict(teacher=str(setup / "teacher"), student="nano", images=str(setup / "images"), output=str(out),
                epochs=6, batch_size=8, lr=3e-3, views=2, val_fraction=0.25, patience=10, progress=False,
                device="cpu", save_every=0)
    base.update(kw)
    return DistillConfig(**base)


def test_agreement_rises_and_cache_is_hit(setup, tmp_path):
    state = distill(_cfg(setup, tmp_path / "run"))
    ini, fin = state["initial"], state["final"]
    assert fin["n"] >= 8
    assert fin["mean_agreement"] >= ini["mean_agreement"] + 0.25, (ini, fin)
    assert fin["embedding_cosine"] > ini["embedding_cosine"] + 0.3
    cache = state["cache"]
    assert cache[0]["hits"] == 0 and cache[0]["misses"] > 0
    assert all(c["hits"] > 0 for c in cache[1:])
    n_train = 42 - round(42 * 0.25)
    assert sum(c["misses"] for c in cache) <= 2 * n_train  # each (image, view) computed once
    files = list((tmp_path / "run" / "teacher-cache").rglob("*.npz"))
    assert len(files) == sum(c["misses"] for c in cache)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    hist = state["history"]
    assert hist[-1]["loss_total"] < hist[0]["loss_total"] and hist[0]["loss_seg"] > 0  # seg KL in use


def test_resume_continues_from_the_saved_step(setup, tmp_path):
    out = tmp_path / "run"
    first = distill(_cfg(setup, out, max_steps=3, epochs=3))
    assert first["step"] == 3 and first["batch_in_epoch"] == 3  # stopped mid-epoch (4 batches per epoch)
    saved = json.loads((out / "checkpoint" / "distill_state.json").read_text())
    assert saved["step"] == 3
    second = distill(_cfg(setup, out, max_steps=6, epochs=3, resume=str(out / "checkpoint")))
    assert second["step"] == 6 and second["epoch"] >= 1
    assert second["history"][0]["epoch"] == 1 and len(second["history"]) >= 2


def test_torchrun_two_processes_one_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "geosurge", "distill", "--teacher",
           str(setup / "teacher"), "--student", "nano", "--images", str(setup / "images"), "-o", str(out),
           "--epochs", "1", "--batch-size", "4", "--views", "1", "--device", "cpu", "--no-progress",
           "--save-every", "0", "--json", str(tmp_path / "state.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert r.stdout.count("done:") == 1, log
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["best", "checkpoint",
                                                                                  "teacher-cache"], log
    state = json.loads((out / "checkpoint" / "distill_state.json").read_text())
    assert state["world_size"] == 2 and state["epoch"] == 1
    # 42 images, 8 held out (val 0.2): 34 over 2 ranks = 17 each, batch 4 -> 5 steps
    assert state["step"] == 5


def test_eval_reports_agreement_and_cost(setup, tmp_path):
    r = run_cli("geosurge", "distill", "--eval", "--teacher", setup / "teacher", "--student", "nano", "--images",
                setup / "images", "--latency-iters", "2", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["agreement"]["n"] == 42 and len(rep["agreement"]["level_agreement"]) == 7
    cost = rep["cost"]
    assert cost["ratio"]["params_m"] > 1 and cost["ratio"]["gflops"] > 1 and cost["teacher"]["latency_ms"] > 0
    assert np.isfinite(rep["agreement"]["median_km"])


def test_distill_bad_inputs(tmp_path, setup):
    r = run_cli("geosurge", "distill", "--teacher", "nope", "--student", "nano", "--images", setup / "images",
                "-o", tmp_path / "o")
    assert r.returncode == 2 and "--teacher 'nope'" in r.stderr
    r = run_cli("geosurge", "distill", "--teacher", setup / "teacher", "--student", "huge", "--images",
                setup / "images", "-o", tmp_path / "o")
    assert r.returncode == 2 and "--student 'huge'" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("geosurge", "distill", "--teacher", setup / "teacher", "--student", "nano", "--images",
                tmp_path / "empty", "-o", tmp_path / "o")
    assert r.returncode == 2 and "no images" in r.stderr

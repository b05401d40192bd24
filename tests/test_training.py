"""Training: the loss goes down and training images land in their true finest cells; resume; DDP via torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from geosurge.models import GeoSurge
from geosurge.preprocess import preprocess
from geosurge.images import load_image
from geosurge.training.data import read_manifest
from geosurge.training.train import TrainConfig, train

from .conftest import run_cli
from .synthetic import make_manifest


def _train(tmp_path, epochs, **kw):
    csv, h, locs = make_manifest(tmp_path / "data", bad_files=2)
    h.save(tmp_path / "cells.npz")
    cfg = TrainConfig(manifest=str(csv), output=str(tmp_path / "run"), model="tiny", cells=str(tmp_path / "cells.npz"),
                      epochs=epochs, batch_size=8, lr=3e-3, lr_decay=0.85, val_fraction=0, progress=False, **kw)
    return cfg, train(cfg), h


def test_tiny_learns_its_training_cells(tmp_path):
    cfg, state, h = _train(tmp_path, epochs=12)
    losses = [r["train_loss"] for r in state["history"]]
    assert losses[-1] < 0.3 * losses[0], losses
    assert state["skipped_undecodable"] == 2 * 12  # the two broken files, counted every epoch, never fatal
    model = GeoSurge.from_pretrained(tmp_path / "run" / "checkpoint").eval()
    m = read_manifest(cfg.manifest)
    ok = [i for i, p in enumerate(m.paths) if not p.name.startswith("broken")]
    spec = model.config.preprocess  # decoded as training decoded them (the spec's rule)
    x = torch.stack([torch.from_numpy(preprocess(load_image(m.paths[i], spec), spec)) for i in ok])
    truth = h.locate(m.lat[ok], m.lon[ok])[:, -1]
    pred = model.predict(x, top_k=1)["cell"][:, 0].numpy()
    assert (pred == truth).mean() >= 0.9


def test_resume_continues_from_the_saved_step(tmp_path):
    cfg, state, _ = _train(tmp_path, epochs=2)
    ck = tmp_path / "run" / "checkpoint"
    saved = json.loads((ck / "trainer_state.json").read_text())
    assert saved["epoch"] == 2 and saved["step"] == state["step"]
    cfg.resume, cfg.epochs = str(ck), 3
    state2 = train(cfg)
    assert state2["epoch"] == 3
    assert state2["step"] > saved["step"] and len(state2["history"]) == 3
    assert state2["history"][:2] == saved["history"]


def test_validation_and_early_stop(tmp_path):
    csv, h, _ = make_manifest(tmp_path / "data")
    h.save(tmp_path / "cells.npz")
    cfg = TrainConfig(manifest=str(csv), output=str(tmp_path / "run"), model="tiny", cells=str(tmp_path / "cells.npz"),
                      epochs=30, batch_size=8, lr=0.0, val_fraction=0.25, patience=2, progress=False)
    state = train(cfg)  # lr 0: validation never improves after the first epoch -> stops after 1 + patience epochs
    assert state["stopped_early"] and state["epoch"] == 3
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert all("val_loss" in r for r in state["history"])


def test_torchrun_two_processes(tmp_path):
    csv, h, _ = make_manifest(tmp_path / "data", n_locations=6, per_location=4)
    h.save(tmp_path / "cells.npz")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "geosurge", "train", "--manifest", str(csv),
           "--cells", str(tmp_path / "cells.npz"), "--model", "tiny", "--epochs", "2", "--batch-size", "4",
           "--lr", "1e-3", "--val-fraction", "0", "--device", "cpu", "--no-progress", "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("done:") == 1, log  # only rank 0 reports and writes
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"], (list(out.iterdir()), log)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    info = {k: state.get(k) for k in ("world_size", "epoch", "step", "rank_param_checksums")}
    assert state["world_size"] == 2 and state["epoch"] == 2, info
    sums = state["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1], info  # ranks stayed in sync
    # each rank saw half the data per epoch: 24 images / (2 ranks x batch 4) = 3 steps per epoch
    assert state["step"] == 6, info
    GeoSurge.from_pretrained(out / "checkpoint")


def test_train_cli_bad_manifest(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,lat,lon\na.jpg,1,2\n")
    r = run_cli("geosurge", "train", "--manifest", bad, "-o", tmp_path / "o")
    assert r.returncode == 2 and "missing column(s) path" in r.stderr and "Traceback" not in r.stderr

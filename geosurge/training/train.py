"""``geosurge train``: per-level InfoNCE over all cells of each level, summed; AdamW, lr x0.5 per epoch, early
stopping on a validation split, resume, DDP through torchrun (only rank 0 writes)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..errors import GeosurgeError
from ..models.geosurge import OPTIMIZER_FILE, TRAIN_STATE_FILE
from ..report import write_json
from . import dist as D
from .checkpoint import load_optimizer_state, save_optimizer_state
from .data import ManifestDataset, collate_skip_bad, read_manifest, split_indices

CHECKPOINT_DIR = "checkpoint"  # latest state, with optimizer: what --resume takes
BEST_DIR = "best"  # best validation loss, model only
STATE_FILE = TRAIN_STATE_FILE


@dataclass
class TrainConfig:
    manifest: str
    output: str
    model: str = "tiny"
    init: str | None = None
    cells: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_decay: float = 0.5
    val_fraction: float = 0.1
    patience: int = 3
    resume: str | None = None
    workers: int = 0
    seed: int = 0
    augment: bool = True
    device: str | None = None
    max_steps: int | None = None
    progress: bool = True


def level_losses(level_logits: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """InfoNCE per level: cross-entropy of the cosine/temperature logits against every cell of the level."""
    return [F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(level_logits)]


def _build_or_load(cfg: TrainConfig):
    from ..geo import build_default_hierarchy, load_hierarchy
    from ..models import GeoSurge, build_model

    if cfg.resume:
        return GeoSurge.from_pretrained(cfg.resume)
    if cfg.init:
        return GeoSurge.from_pretrained(cfg.init)
    hierarchy = load_hierarchy(cfg.cells) if cfg.cells else build_default_hierarchy()
    return build_model(cfg.model, hierarchy)


@torch.no_grad()
def evaluate(model, loader, device) -> dict:
    model.eval()
    total, n, correct = 0.0, 0, 0
    for x, y, _ in loader:
        if x is None:
            continue
        x, y = x.to(device), y.to(device)
        out = model(x)
        total += float(sum(level_losses(out["level_logits"], y))) * len(x)
        correct += int((out["level_logits"][-1].argmax(-1) == y[:, -1]).sum())
        n += len(x)
    return {"loss": total / max(n, 1), "finest_top1": correct / max(n, 1), "n": n}


def train(cfg: TrainConfig) -> dict:
    info = D.init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        D.cleanup(info)


def _train(cfg: TrainConfig, info: D.DistInfo) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + info.rank)
    out_dir = Path(cfg.output)
    model = _build_or_load(cfg).to(info.device)
    hierarchy = model.hierarchy
    manifest = read_manifest(cfg.manifest)
    tr_idx, va_idx = split_indices(len(manifest), cfg.val_fraction, cfg.seed)
    train_ds = ManifestDataset(manifest, hierarchy, model.config.preprocess, augment=cfg.augment, indices=tr_idx)
    val_ds = ManifestDataset(manifest, hierarchy, model.config.preprocess, augment=False, indices=va_idx)
    if len(train_ds) == 0:
        raise GeosurgeError(f"{cfg.manifest}: no training image lies in a cell of the hierarchy")
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False) if info.distributed else None
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate_skip_bad)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.lr_decay)
    state = {"epoch": 0, "step": 0, "best_val_loss": math.inf, "bad_epochs": 0, "history": [],
             "skipped_undecodable": 0, "uncovered_rows": train_ds.uncovered + val_ds.uncovered}
    if cfg.resume:
        rdir = Path(cfg.resume)
        saved = json.loads((rdir / STATE_FILE).read_text())
        sched.load_state_dict(saved.pop("scheduler"))
        for transient in ("train_config", "rank_param_checksums", "stopped_early", "rank", "world_size"):
            saved.pop(transient, None)
        state.update(saved)
        load_optimizer_state(opt, rdir / OPTIMIZER_FILE)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if info.distributed else model

    if info.is_main:
        print(f"train: {len(train_ds)} images ({len(val_ds)} validation, {state['uncovered_rows']} rows outside the "
              f"hierarchy), {hierarchy.num_levels} levels / {len(hierarchy):,} cells, model {model.config.name}, "
              f"{info.world_size} process(es) on {info.device}")
    start_epoch = state["epoch"]
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp_model.train()
        t0, run_loss, seen, skipped = time.perf_counter(), 0.0, 0, 0
        bar = _progress(loader, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and info.is_main)
        for x, y, bad in bar:
            skipped += bad
            opt.zero_grad(set_to_none=True)
            if x is None:  # a whole batch failed to decode: keep DDP's collectives in step with a zero loss
                loss = sum(p.sum() for p in params) * 0.0
            else:
                x, y = x.to(info.device), y.to(info.device)
                loss = sum(level_losses(ddp_model(x)["level_logits"], y))
                run_loss += float(loss.detach()) * len(x)
                seen += len(x)
            loss.backward()
            opt.step()
            state["step"] += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{run_loss / max(seen, 1):.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        sched.step()
        skipped = int(D.all_reduce_sum(skipped, info))
        train_loss = D.all_reduce_sum(run_loss, info) / max(D.all_reduce_sum(seen, info), 1)
        state["skipped_undecodable"] += skipped
        val = evaluate(model, val_loader, info.device) if len(val_ds) else None
        state["epoch"] = epoch + 1
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
               "skipped_undecodable": skipped, **({"val_loss": val["loss"], "val_finest_top1": val["finest_top1"]}
                                                   if val else {})}
        state["history"].append(rec)
        improved = val is not None and val["loss"] < state["best_val_loss"]
        if val is not None:
            state["best_val_loss"] = min(state["best_val_loss"], val["loss"])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if info.is_main:
            msg = f"epoch {epoch + 1}: train loss {train_loss:.4f}"
            if val:
                msg += f", val loss {val['loss']:.4f}, val finest top-1 {val['finest_top1']:.3f}"
            if skipped:
                msg += f", skipped {skipped} undecodable image(s)"
            print(msg, flush=True)
            _save(model, opt, sched, state, out_dir, cfg, best=improved)
        D.barrier(info)
        if val is not None and state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            if info.is_main:
                print(f"early stop: validation loss has not improved for {cfg.patience} epoch(s)")
            break
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break

    # ranks must hold identical weights: compare a checksum across processes
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    checksums = D.all_gather_floats(checksum, info)
    state["rank_param_checksums"] = checksums
    state["world_size"] = info.world_size
    state["rank"] = info.rank
    state["stopped_early"] = stopped_early
    if info.is_main and (out_dir / CHECKPOINT_DIR).is_dir():
        write_json(out_dir / CHECKPOINT_DIR / STATE_FILE, {**state, "scheduler": sched.state_dict(),
                                                            "train_config": asdict(cfg)})
    return state


def _save(model, opt, sched, state, out_dir: Path, cfg: TrainConfig, best: bool) -> None:
    ck = model.save_pretrained(out_dir / CHECKPOINT_DIR)
    save_optimizer_state(opt, ck / OPTIMIZER_FILE)
    write_json(ck / STATE_FILE, {**state, "scheduler": sched.state_dict(), "train_config": asdict(cfg)})
    if best:
        model.save_pretrained(out_dir / BEST_DIR)


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)

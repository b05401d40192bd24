"""``geosurge distill``: a teacher (the paper model or a user's checkpoint) into a smaller student, from unlabelled
images. The student learns the teacher's fused embedding (cosine), its per-level cell distributions (KL at a
temperature, over the student's hierarchy: the teacher's or a subset of it) and its segmentation map (per-pixel KL at
the student's resolution). Loss weights are config fields.

Teacher outputs are cached on disk keyed by (image sha256, view, teacher hash), so epochs after the first do not run
the teacher. The augmentations the student sees are therefore a fixed set of ``views`` per image: view 0 is the
image, view 1 its mirror, views 2.. are fixed random resized crops (35-100% of the area, seeded by the image hash and
view index), some mirrored. A run picks one cached view per image per epoch.

A plain loop (nvidia-modelopt's distillation API wraps a single teacher/student forward with one loss and no
cache of teacher outputs, which is the point here). DDP through torchrun like ``geosurge train``; only rank 0 writes
checkpoints (the cache is written atomically by whichever rank computes an entry).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import GeosurgeError, InputFileError
from ..fsutil import atomic_write_bytes
from ..images import load_image
from ..models.geosurge import DISTILL_STATE_FILE, OPTIMIZER_FILE
from ..preprocess import preprocess
from ..report import write_json
from . import dist as D
from .checkpoint import load_optimizer_state, save_optimizer_state

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
STATE_FILE = DISTILL_STATE_FILE


@dataclass
class DistillConfig:
    teacher: str  # checkpoint directory, or a config name built from teacher_seed
    student: str  # config name (edge, tiny, nano) or a JSON config file
    images: str  # folder or CSV manifest (coordinates only used for evaluation)
    output: str
    teacher_seed: int = 0
    student_seed: int = 0
    cells: str | None = None  # student hierarchy (a subset of the teacher's); default: the teacher's
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    temperature: float = 2.0  # KL temperature for the cell distributions
    w_embed: float = 1.0
    w_cells: float = 1.0
    w_seg: float = 0.5
    views: int = 4
    val_fraction: float = 0.2
    patience: int = 3
    save_every: int = 50
    resume: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    device: str | None = None
    max_steps: int | None = None
    progress: bool = True


# ---- models -----------------------------------------------------------------------------------------------------
def load_teacher(spec: str, seed: int = 0, hierarchy=None):
    from ..models import CONFIGS, GeoSurge, build_model

    if Path(spec).is_dir():
        return GeoSurge.from_pretrained(spec).eval()
    if spec in CONFIGS:
        torch.manual_seed(seed)
        return build_model(spec, hierarchy).eval()
    raise GeosurgeError(f"--teacher {spec!r}: not a checkpoint directory nor one of {', '.join(CONFIGS)}")


def student_config(spec: str):
    from ..models import CONFIGS, GeoSurgeConfig, get_config

    if spec in CONFIGS:
        return get_config(spec)
    p = Path(spec)
    if p.is_file():
        try:
            return GeoSurgeConfig.from_json(p.read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise InputFileError(f"{p}: not a geosurge model config ({e})") from None
    raise GeosurgeError(f"--student {spec!r}: not a config name ({', '.join(CONFIGS)}) nor a JSON config file")


def model_hash(model) -> str:
    """sha256 over config + every tensor: identifies the teacher whose outputs a cache holds."""
    h = hashlib.sha256(model.config.to_json().encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cell_maps(teacher_h, student_h) -> list[np.ndarray]:
    """Per level, the teacher index of each student cell (the student's hierarchy must be a subset)."""
    if student_h.num_levels != teacher_h.num_levels:
        raise GeosurgeError(f"the student hierarchy has {student_h.num_levels} levels, the teacher's "
                            f"{teacher_h.num_levels}")
    maps = []
    for k in range(teacher_h.num_levels):
        t_ids, s_ids = teacher_h.level(k).cell_id, student_h.level(k).cell_id
        idx = np.searchsorted(t_ids, s_ids)
        idxc = np.minimum(idx, len(t_ids) - 1)
        if not (t_ids[idxc] == s_ids).all():
            raise GeosurgeError(f"level {k}: the student hierarchy has cells the teacher's does not")
        maps.append(idxc.astype(np.int64))
    return maps


def projection(teacher, d_student: int) -> torch.Tensor:
    """(D_t, D_s): identity when widths agree, else the top principal directions (uncentred) of the teacher's cell
    embeddings — the student's tables and the embedding target are the teacher's, projected."""
    tables = [F.normalize(t.detach().float(), dim=-1) for t in teacher.head.tables]
    d_t = tables[0].shape[1]
    if d_t == d_student:
        return torch.eye(d_t)
    if d_student > d_t:
        raise GeosurgeError(f"the student's embedding ({d_student}) is wider than the teacher's ({d_t})")
    gram = sum(t.double().T @ t.double() for t in tables)
    w, v = torch.linalg.eigh(gram)
    return v[:, torch.argsort(w, descending=True)[:d_student]].float().contiguous()


def init_student(config, teacher, student_h, maps, proj, seed: int):
    """The student with cell tables (and temperatures) from the teacher's, projected to its width."""
    from ..models import build_model

    torch.manual_seed(seed)
    student = build_model(config, student_h)
    with torch.no_grad():
        for k, table in enumerate(student.head.tables):
            t = F.normalize(teacher.head.tables[k].detach().float(), dim=-1)[torch.from_numpy(maps[k])] @ proj
            table.copy_(F.normalize(t, dim=-1))
        student.head.log_temperature.copy_(teacher.head.log_temperature.detach())
    return student


# ---- data and views ---------------------------------------------------------------------------------------------
def list_images(source, log=print) -> tuple[list[Path], np.ndarray | None, np.ndarray | None]:
    """--images (a folder, by content, or a CSV manifest) -> (paths, lat, lon); folder files that are not images
    are named and counted through ``log``."""
    from .data import list_image_source

    return list_image_source(source, "--images", log=log)


def make_view(rgb: np.ndarray, view: int, image_sha: str) -> np.ndarray:
    """The fixed augmented view ``view`` of an image (see the module docstring)."""
    if view == 0:
        return rgb
    if view == 1:
        return np.ascontiguousarray(rgb[:, ::-1])
    from ..preprocess import random_resized_crop

    rng = np.random.default_rng(int(image_sha[:12], 16) + 7919 * view)
    out = random_resized_crop(rgb, rng)
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


class ViewDataset(Dataset):
    """Items: (student input, teacher input, cache key); ``None`` for an image that fails to decode."""

    def __init__(self, paths, shas, student_spec, teacher_spec, views: int, fixed_view: int | None = None,
                 seed: int = 0):
        self.paths, self.shas = paths, shas
        self.sspec, self.tspec = student_spec, teacher_spec
        self.views, self.fixed_view = views, fixed_view
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        v = self.fixed_view if self.fixed_view is not None else int(self.rng.integers(0, self.views))
        try:
            # full resolution: views crop before resizing; the teacher's spec decides the background
            rgb = make_view(load_image(self.paths[i], self.tspec, reduce=False), v, self.shas[i])
        except InputFileError:
            return None
        return (torch.from_numpy(preprocess(rgb, self.sspec)), torch.from_numpy(preprocess(rgb, self.tspec)),
                f"{self.shas[i][:24]}-v{v}")


def collate(items):
    good = [it for it in items if it is not None]
    if not good:
        return None, None, [], len(items)
    xs, ts, keys = zip(*good)
    return torch.stack(xs), torch.stack(ts), list(keys), len(items) - len(good)


# ---- the teacher-output cache -----------------------------------------------------------------------------------
class TeacherCache:
    """One ``.npz`` per (image, view): the teacher's embedding, its per-level logits over the student's cells and
    its segmentation log-probabilities at the student's map size. Keyed by the teacher's hash (folder name) and
    the student hierarchy / seg size (part of the folder name), so a changed teacher never hits a stale entry."""

    def __init__(self, root: Path, teacher_hash: str, student_key: str):
        self.dir = Path(root) / f"{teacher_hash[:16]}-{student_key[:12]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get(self, key: str):
        p = self.dir / f"{key}.npz"
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a torn file from another process: recompute
            return None

    def put(self, key: str, arrays: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.dir / f"{key}.npz", buf.getvalue())


@torch.no_grad()
def teacher_targets(teacher, cache: TeacherCache, tx, keys, maps, seg_hw, device) -> dict:
    """Targets for a batch: from the cache where present, else one teacher forward for the misses."""
    got = [cache.get(k) for k in keys]
    miss = [i for i, g in enumerate(got) if g is None]
    cache.hits += len(keys) - len(miss)
    cache.misses += len(miss)
    if miss:
        out = teacher(tx[miss].to(device))
        seg = F.log_softmax(F.interpolate(out["seg_logits"].float(), size=seg_hw, mode="bilinear",
                                          align_corners=False), dim=1)
        for j, i in enumerate(miss):
            arrays = {"embedding": out["embedding"][j].cpu().numpy().astype(np.float32),
                      "seg": seg[j].cpu().numpy().astype(np.float16)}
            for k, lg in enumerate(out["level_logits"]):
                arrays[f"logits_{k}"] = lg[j, torch.from_numpy(maps[k]).to(device)].cpu().numpy().astype(np.float16)
            cache.put(keys[i], arrays)
            got[i] = arrays
    n_levels = len(maps)
    return {"embedding": torch.from_numpy(np.stack([g["embedding"] for g in got])).to(device),
            "seg": torch.from_numpy(np.stack([g["seg"] for g in got]).astype(np.float32)).to(device),
            "logits": [torch.from_numpy(np.stack([g[f"logits_{k}"] for g in got]).astype(np.float32)).to(device)
                       for k in range(n_levels)]}


def distill_losses(out: dict, tgt: dict, proj: torch.Tensor, cfg: DistillConfig, use_seg: bool) -> dict:
    emb_t = F.normalize(tgt["embedding"] @ proj.to(tgt["embedding"].device), dim=-1)
    emb = (1.0 - F.cosine_similarity(out["embedding"], emb_t, dim=-1)).mean()
    tau = cfg.temperature
    cells = sum(F.kl_div(F.log_softmax(s / tau, dim=-1), F.log_softmax(t / tau, dim=-1), log_target=True,
                         reduction="batchmean") * tau * tau for s, t in zip(out["level_logits"], tgt["logits"]))
    seg = torch.zeros((), device=emb.device)
    if use_seg:
        s = F.log_softmax(out["seg_logits"].float(), dim=1)
        seg = F.kl_div(s, tgt["seg"], log_target=True, reduction="none").sum(1).mean()
    total = cfg.w_embed * emb + cfg.w_cells * cells + cfg.w_seg * seg
    return {"total": total, "embed": emb, "cells": cells, "seg": seg}


# ---- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def agreement(teacher, student, paths, maps, proj, device, batch: int = 16) -> dict:
    """Student vs teacher on ``paths`` (plain view): per-level top-1 agreement (over the student's cells), embedding
    cosine (vs the projected teacher embedding), km between their hierarchical top-1 points."""
    from ..geo import haversine_km

    teacher.eval()
    student.eval()
    agree = [[] for _ in maps]
    cos, km = [], []
    th, sh = teacher.hierarchy, student.hierarchy
    for i in range(0, len(paths), batch):
        rgbs = []
        for p in paths[i:i + batch]:
            try:
                rgbs.append(load_image(p, teacher.config.preprocess, reduce=False))
            except InputFileError:
                continue
        if not rgbs:
            continue
        tx = torch.stack([torch.from_numpy(preprocess(r, teacher.config.preprocess)) for r in rgbs]).to(device)
        sx = torch.stack([torch.from_numpy(preprocess(r, student.config.preprocess)) for r in rgbs]).to(device)
        to, so = teacher(tx), student(sx)
        for k, (tl, sl) in enumerate(zip(to["level_logits"], so["level_logits"])):
            t_sub = tl[:, torch.from_numpy(maps[k]).to(device)]
            agree[k] += (t_sub.argmax(-1) == sl.argmax(-1)).cpu().tolist()
        target = F.normalize(to["embedding"] @ proj.to(device), dim=-1)
        cos += F.cosine_similarity(so["embedding"], target).cpu().tolist()
        tp = teacher.head.hierarchical_scores([F.log_softmax(lg, -1) for lg in to["level_logits"]]).argmax(-1)
        sp = student.head.hierarchical_scores([F.log_softmax(lg, -1) for lg in so["level_logits"]]).argmax(-1)
        tp, sp = tp.cpu().numpy(), sp.cpu().numpy()
        tf, sf = th.level(-1), sh.level(-1)
        km += list(haversine_km(tf.rep_lat[tp], tf.rep_lon[tp], sf.rep_lat[sp], sf.rep_lon[sp]))
    per_level = [float(np.mean(a)) if a else float("nan") for a in agree]
    return {"n": len(cos), "level_agreement": per_level, "mean_agreement": float(np.nanmean(per_level)),
            "embedding_cosine": float(np.mean(cos)) if cos else float("nan"),
            "median_km": float(np.median(km)) if km else float("nan"),
            "p95_km": float(np.percentile(km, 95)) if km else float("nan")}


def cost_ratio(teacher, student, iters: int = 5) -> dict:
    """Params, GFLOPs (meta-device count) and measured torch eager latency (batch 1, interleaved) of both."""
    from ..models.info import model_info

    def total(cfg, h):
        return next(r for r in model_info(cfg, h)["parts"] if r["part"] == "total")

    ti, si = total(teacher.config, teacher.hierarchy), total(student.config, student.hierarchy)
    xt = torch.zeros(1, 3, teacher.config.preprocess.size, teacher.config.preprocess.size)
    xs = torch.zeros(1, 3, student.config.preprocess.size, student.config.preprocess.size)
    tt, ts = [], []
    with torch.inference_mode():
        for i in range(iters + 1):
            t0 = time.perf_counter()
            teacher.embed(xt)
            t1 = time.perf_counter()
            student.embed(xs)
            t2 = time.perf_counter()
            if i:
                tt.append(t1 - t0)
                ts.append(t2 - t1)
    rows = {"teacher": {"config": teacher.config.name, "params_m": ti["params_M"], "gflops": ti["GFLOPs"],
                        "latency_ms": float(np.median(tt)) * 1e3},
            "student": {"config": student.config.name, "params_m": si["params_M"], "gflops": si["GFLOPs"],
                        "latency_ms": float(np.median(ts)) * 1e3}}
    rows["ratio"] = {k: rows["teacher"][k] / rows["student"][k] for k in ("params_m", "gflops", "latency_ms")}
    return rows


# ---- the loop -----------------------------------------------------------------------------------------------------
def distill(cfg: DistillConfig) -> dict:
    info = D.init_distributed(cfg.device)
    try:
        return _distill(cfg, info)
    finally:
        D.cleanup(info)


def _setup(cfg: DistillConfig, device):
    from ..geo import load_hierarchy
    from ..models import GeoSurge

    teacher = load_teacher(cfg.teacher, cfg.teacher_seed).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    th = teacher.hierarchy
    sh = load_hierarchy(cfg.cells) if cfg.cells else th
    maps = cell_maps(th, sh)
    s_config = student_config(cfg.student)
    proj = projection(teacher, s_config.head.embed_dim)
    if cfg.resume:
        student = GeoSurge.from_pretrained(cfg.resume)
    else:
        student = init_student(s_config, teacher, sh, maps, proj, cfg.student_seed)
    return teacher, student.to(device), maps, proj


def _distill(cfg: DistillConfig, info: D.DistInfo) -> dict:
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output)
    teacher, student, maps, proj = _setup(cfg, info.device)
    paths, _, _ = list_images(cfg.images, log=print if info.is_main else (lambda m: None))
    if not paths:
        raise InputFileError(f"{cfg.images}: no images")
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "0" * 64 for p in paths]
    perm = np.random.default_rng(cfg.seed).permutation(len(paths))
    n_val = int(round(len(paths) * cfg.val_fraction)) if len(paths) > 1 else 0
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    tr_paths, val_paths = [paths[i] for i in tr_idx], [paths[i] for i in val_idx]
    ds = ViewDataset(tr_paths, [shas[i] for i in tr_idx], student.config.preprocess, teacher.config.preprocess,
                     cfg.views, seed=cfg.seed + 1000 * info.rank)
    sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=False) if info.distributed else None
    use_seg = teacher.config.segmenter.num_classes == student.config.segmenter.num_classes and cfg.w_seg > 0
    size = student.config.preprocess.size
    with torch.no_grad():
        seg_hw = tuple(student.eval()(torch.zeros(1, 3, size, size, device=info.device))["seg_logits"].shape[-2:])
    student_key = hashlib.sha256(json.dumps([student.hierarchy.digest(), seg_hw,
                                             teacher.config.preprocess.to_dict()]).encode()).hexdigest()
    cache = TeacherCache(Path(cfg.cache_dir or out_dir / "teacher-cache"), model_hash(teacher), student_key)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "best_agreement": -1.0, "bad_epochs": 0, "history": [],
             "skipped_undecodable": 0, "cache": []}
    if cfg.resume:
        saved = json.loads((Path(cfg.resume) / STATE_FILE).read_text())
        for transient in ("config", "rank", "world_size", "stopped_early", "initial", "final"):
            saved.pop(transient, None)
        state.update(saved)
        load_optimizer_state(opt, Path(cfg.resume) / OPTIMIZER_FILE)
    ddp = torch.nn.parallel.DistributedDataParallel(student) if info.distributed else student
    if info.is_main:
        print(f"distill: teacher {teacher.config.name} -> student {student.config.name}, {len(tr_paths)} training "
              f"image(s) x {cfg.views} cached views, {len(val_paths)} held out; seg KL "
              f"{'on' if use_seg else 'off (class counts differ)'}; {info.world_size} process(es) on {info.device}")
        if not cfg.resume and val_paths:
            state["initial"] = agreement(teacher, student, val_paths, maps, proj, info.device)
            print(f"held-out agreement before: mean {state['initial']['mean_agreement']:.3f}, embedding cosine "
                  f"{state['initial']['embedding_cosine']:.3f}")
    stopped_early = False
    for epoch in range(state["epoch"], cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                            collate_fn=collate, generator=g)
        ddp.train()
        t0, sums, seen, skipped = time.perf_counter(), {"total": 0.0, "embed": 0.0, "cells": 0.0, "seg": 0.0}, 0, 0
        hits0, miss0 = cache.hits, cache.misses
        bar = _progress(loader, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and info.is_main)
        for b, (sx, tx, keys, bad) in enumerate(bar):
            if b < state["batch_in_epoch"]:  # resuming mid-epoch: the order is the same, skip what was done
                continue
            skipped += bad
            opt.zero_grad(set_to_none=True)
            if sx is None:
                loss = {"total": sum(p.sum() for p in params) * 0.0}
            else:
                tgt = teacher_targets(teacher, cache, tx, keys, maps, seg_hw, info.device)
                loss = distill_losses(ddp(sx.to(info.device)), tgt, proj, cfg, use_seg)
                for k in sums:
                    sums[k] += float(loss[k].detach()) * len(sx)
                seen += len(sx)
            loss["total"].backward()
            opt.step()
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            if hasattr(bar, "set_postfix") and seen:
                bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()})
            if info.is_main and cfg.save_every and state["step"] % cfg.save_every == 0:
                _save(student, opt, state, out_dir, cfg, best=False)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        finished_epoch = state["batch_in_epoch"] >= len(loader)
        n = max(D.all_reduce_sum(seen, info), 1)
        rec = {"epoch": epoch + 1, **{f"loss_{k}": D.all_reduce_sum(v, info) / n for k, v in sums.items()},
               "seconds": time.perf_counter() - t0, "cache_hits": cache.hits - hits0,
               "cache_misses": cache.misses - miss0, "skipped_undecodable": int(D.all_reduce_sum(skipped, info))}
        state["skipped_undecodable"] += rec["skipped_undecodable"]
        state["cache"].append({"epoch": epoch + 1, "hits": rec["cache_hits"], "misses": rec["cache_misses"]})
        improved = False
        if val_paths and info.is_main:
            ev = agreement(teacher, student, val_paths, maps, proj, info.device)
            rec.update(val_agreement=ev["mean_agreement"], val_cosine=ev["embedding_cosine"])
            improved = ev["mean_agreement"] > state["best_agreement"]
            state["best_agreement"] = max(state["best_agreement"], ev["mean_agreement"])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if finished_epoch:
            state["epoch"] = epoch + 1
            state["batch_in_epoch"] = 0
        state["history"].append(rec)
        if info.is_main:
            print(f"epoch {epoch + 1}: loss {rec['loss_total']:.4f} (embed {rec['loss_embed']:.4f}, cells "
                  f"{rec['loss_cells']:.4f}, seg {rec['loss_seg']:.4f}), teacher cache {rec['cache_hits']} hit / "
                  f"{rec['cache_misses']} miss" + (f", held-out agreement {rec['val_agreement']:.3f}"
                                                   if "val_agreement" in rec else "")
                  + (f", {rec['skipped_undecodable']} image(s) refused (not decodable)"
                     if rec["skipped_undecodable"] else ""), flush=True)
            _save(student, opt, state, out_dir, cfg, best=improved or not val_paths)
        D.barrier(info)
        state["bad_epochs"] = int(D.all_reduce_sum(state["bad_epochs"] if info.is_main else 0, info))
        if val_paths and state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            if info.is_main:
                print(f"early stop: held-out agreement has not improved for {cfg.patience} epoch(s)")
            break
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
    state["stopped_early"] = stopped_early
    state["rank"], state["world_size"] = info.rank, info.world_size
    if info.is_main:
        if val_paths:
            state["final"] = agreement(teacher, student, val_paths, maps, proj, info.device)
        _save(student, opt, state, out_dir, cfg, best=False)
    return state


def _save(student, opt, state, out_dir: Path, cfg: DistillConfig, best: bool) -> None:
    ck = student.save_pretrained(out_dir / CHECKPOINT_DIR, extra={"distilled_from": cfg.teacher})
    save_optimizer_state(opt, ck / OPTIMIZER_FILE)
    write_json(ck / STATE_FILE, {**state, "config": asdict(cfg)})
    if best:
        student.save_pretrained(out_dir / BEST_DIR, extra={"distilled_from": cfg.teacher})


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)

"""Parameters and GFLOPs per part (backbone, segmenter, fusion, cell tables), counted on the meta device:
the paper-size model is never materialised."""
from __future__ import annotations

from pathlib import Path

import torch

from ..geo import CellHierarchy
from .config import GeoSurgeConfig
from .geosurge import GeoSurge, resolve_config, weightless
from .backbone import BACKBONES
from .segmentation import SEGMENTERS, build_segmenter


def model_info(config: GeoSurgeConfig, hierarchy: CellHierarchy, resolve: bool = True) -> dict:
    """Parameters (M), trainable parameters (M) and GFLOPs per part, plus ``weights``: where each part's weights
    come from and the architecture they have (:func:`describe_weights`). ``resolve``: read the local weight folders'
    configs first (a fresh config); False for a checkpoint's config, which already records what was loaded."""
    if resolve:
        config = resolve_config(config)
    cfg = weightless(config)
    with torch.device("meta"):
        # .to: a few transformers parameters are made with the legacy torch.Tensor(...), which ignores the default
        model = GeoSurge(cfg, hierarchy).to("meta").eval()
        x = torch.empty(1, 3, cfg.preprocess.size, cfg.preprocess.size)
    counts = {}
    feats, counts["backbone"] = _counted(model.backbone, x)
    try:
        seg, counts["segmenter"] = _counted(model.segmenter, x, feats.feature_map)
    except RuntimeError:  # OneFormer's data-dependent checks (Tensor.item) cannot run on meta: count it on CPU
        seg, counts["segmenter"] = _counted_on_cpu(cfg, model, x, feats.feature_map)
    sem, flops_sem = _counted(model.semantic, seg)
    counts["segmenter"] += flops_sem
    emb, counts["fusion"] = _counted(model.fusion, feats.tokens, feats.global_token, sem)
    _, counts["cell_tables"] = _counted(model.head.level_logits, emb)
    rows = []
    for name, part in model.parts().items():
        n = sum(p.numel() for p in part.parameters())
        trainable = sum(p.numel() for p in part.parameters() if p.requires_grad)
        rows.append({"part": name, "params_M": n / 1e6, "trainable_M": trainable / 1e6,
                     "GFLOPs": counts[name] / 1e9})
    rows.append({"part": "total", "params_M": sum(r["params_M"] for r in rows),
                 "trainable_M": sum(r["trainable_M"] for r in rows), "GFLOPs": sum(r["GFLOPs"] for r in rows)})
    return {"config": config.name, "input": list(x.shape), "cells": hierarchy.sizes,
            "embed_dim": config.head.embed_dim, "parts": rows,
            "weights": describe_weights(config, checkpoint=not resolve)}


def _counted(fn, *args, device="meta"):
    """(output, FLOPs) of ``fn(*args)``; tensors the forward creates stay on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = FlopCounterMode(display=False)
    with torch.no_grad(), torch.device(device), flops:
        out = fn(*args)
    return out, flops.get_total_flops()


def _counted_on_cpu(cfg: GeoSurgeConfig, model: GeoSurge, x: torch.Tensor, feature_map: torch.Tensor):
    """The segmenter alone, materialised on CPU with random weights (only its own size), run on zeros."""
    seg = build_segmenter(cfg.segmenter, model.backbone.out_channels, cfg.preprocess.mean, cfg.preprocess.std).eval()
    seg.requires_grad_(False)  # FlopCounterMode's module hooks trip over parameters passed on as inputs
    out, flops = _counted(seg, torch.zeros(x.shape), torch.zeros(feature_map.shape), device="cpu")
    return torch.empty(out.shape, device="meta"), flops


def checkpoint_info(directory) -> dict:
    """:func:`model_info` of a checkpoint (read from its ``config.json`` and ``cells.npz``; no weights loaded)."""
    from ..geo import load_hierarchy
    from .geosurge import read_checkpoint_config

    meta, config = read_checkpoint_config(directory)
    info = model_info(config, load_hierarchy(Path(directory) / meta["hierarchy"]["file"]), resolve=False)
    info["config"] = f"{directory} ({config.name})"
    return info


def describe_weights(config: GeoSurgeConfig, checkpoint: bool = False) -> list[dict]:
    """One row per part: ``part``, ``source`` (random init, a package, a local folder; in a checkpoint the
    weights are the checkpoint's and the folder is where they started) and ``architecture`` in words (each
    registered backbone / segmenter class describes itself: ``describe``)."""
    bb, seg = config.backbone, config.segmenter

    def source(pretrained, package: str | None = None) -> str:
        if not pretrained:
            return "checkpoint" if checkpoint else "random init"
        where = f"package {package}" if pretrained == "package" and package else f"folder {pretrained}"
        return f"checkpoint (built on {where})" if checkpoint else where

    arch, package = BACKBONES.get(bb.family).describe(bb, config.preprocess)
    rows = [{"part": "backbone", "source": source(bb.pretrained, package), "architecture": arch}]
    arch = SEGMENTERS.get(seg.kind).describe(seg)
    rows.append({"part": "segmenter", "source": source(seg.pretrained), "architecture": arch})
    pre = config.preprocess
    rows.append({"part": "input", "source": "config" if not bb.hf_config else "config + backbone folder",
                 "architecture": f"{pre.size} px ({pre.resize} {pre.resize_size}, {pre.interpolation}), mean "
                                 f"{[round(v, 4) for v in pre.mean]}, std {[round(v, 4) for v in pre.std]}"})
    return rows

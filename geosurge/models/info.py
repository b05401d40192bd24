"""Parameters and GFLOPs per part (backbone, segmenter, fusion, cell tables), counted on the meta device:
the paper-size model is never materialised."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..geo import CellHierarchy
from .config import GeoSurgeConfig
from .geosurge import GeoSurge


def model_info(config: GeoSurgeConfig, hierarchy: CellHierarchy) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = replace(config, backbone=replace(config.backbone, pretrained=None),
                  segmenter=replace(config.segmenter, pretrained=None),
                  head=replace(config.head, init_from_geoclip=False))
    with torch.device("meta"):
        model = GeoSurge(cfg, hierarchy).eval()
        x = torch.empty(1, 3, cfg.preprocess.size, cfg.preprocess.size)
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops:
        feats = model.backbone(x)
        counts = {"backbone": flops.get_total_flops()}
        seg = model.segmenter(x, feats.feature_map)
        sem = model.semantic(seg)
        counts["segmenter"] = flops.get_total_flops() - sum(counts.values())
        emb = model.fusion(feats.tokens, feats.global_token, sem)
        counts["fusion"] = flops.get_total_flops() - sum(counts.values())
        model.head.level_logits(emb)
        counts["cell_tables"] = flops.get_total_flops() - sum(counts.values())
    rows = []
    for name, part in model.parts().items():
        n = sum(p.numel() for p in part.parameters())
        trainable = sum(p.numel() for p in part.parameters() if p.requires_grad)
        rows.append({"part": name, "params_M": n / 1e6, "trainable_M": trainable / 1e6,
                     "GFLOPs": counts[name] / 1e9})
    rows.append({"part": "total", "params_M": sum(r["params_M"] for r in rows),
                 "trainable_M": sum(r["trainable_M"] for r in rows), "GFLOPs": sum(r["GFLOPs"] for r in rows)})
    return {"config": config.name, "input": list(x.shape), "cells": hierarchy.sizes,
            "embed_dim": config.head.embed_dim, "parts": rows}

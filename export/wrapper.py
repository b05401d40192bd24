"""The one trace-only export wrapper every target converts (ONNX for onnxruntime and TensorRT, Core ML).

image (1 or N, 3, S, S) float32 -> ``embedding`` (N, D), the L2-normalised fused embedding, and with
``with_logits`` the per-level cell logits ``logits_<k>`` (N, cells_k), for apps that want one file. The runtime
scores cells itself, so a hierarchy can be pruned without re-export. ``channel_gain`` (Core ML) multiplies the input
per channel first: Core ML's image input applies one global scale and a per-channel bias, and the gain completes a
per-channel std the scale cannot (``geosurge.export.coreml.image_scale_bias``).
"""
from __future__ import annotations

import torch
from torch import nn

#: the image input's name in every exported model
INPUT_NAME = "image"


class ExportWrapper(nn.Module):
    """Trace-only: ``forward`` is what the exporters record; nothing here is trained or called at run time."""

    def __init__(self, model, with_logits: bool = False, channel_gain: list[float] | None = None):
        super().__init__()
        self.model = model
        self.with_logits = with_logits
        gain = torch.tensor(channel_gain or [1.0, 1.0, 1.0], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("gain", gain)
        self.apply_gain = channel_gain is not None

    def forward(self, image: torch.Tensor):
        x = image * self.gain if self.apply_gain else image
        emb = self.model.embed(x)
        if not self.with_logits:
            return emb
        return (emb, *self.model.head.level_logits(emb))


def output_names(model, with_logits: bool) -> list[str]:
    """``embedding`` and, with logits, ``logits_0`` .. ``logits_<L-1>``."""
    return ["embedding"] + ([f"logits_{k}" for k in range(model.head.num_levels)] if with_logits else [])


def output_dims(model, with_logits: bool) -> list[int]:
    """The non-batch size of each output: the embedding width D, then each level's cell count."""
    return [model.config.head.embed_dim] + (list(model.hierarchy.sizes) if with_logits else [])

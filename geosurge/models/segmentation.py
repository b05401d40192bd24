"""Semantic branch: a class-probability map, linearly projected into semantic tokens on the patch grid."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GeosurgeError
from ..registry import Registry
from .config import SegmenterConfig
from .weights import config_record, load_folder_model, read_folder_config, read_processor

SEGMENTERS: Registry = Registry("segmenter")
register_segmenter = SEGMENTERS.register


def build_segmenter(cfg: SegmenterConfig, backbone_channels: int, input_mean, input_std) -> nn.Module:
    return _kind(cfg)(cfg, backbone_channels=backbone_channels, input_mean=input_mean, input_std=input_std)


def resolve_segmenter(cfg: SegmenterConfig) -> SegmenterConfig:
    """The config of the segmenter ``cfg`` will actually build: where weights come from a local folder, its
    architecture and class count (read from its ``config.json``, no weights loaded) replace the config's."""
    resolve = getattr(_kind(cfg), "resolve", None)
    return resolve(cfg) if resolve else cfg


def _kind(cfg: SegmenterConfig):
    return SEGMENTERS.get(cfg.kind)  # ValueError naming the registered segmenters


class ImageSegmenter(nn.Module):
    """A segmenter that reads the model input (normalised for the backbone) and re-normalises it in-graph for
    its own weights: ``x_seg = (x * std_in + mean_in - mean_seg) / std_seg``, folded into one scale and shift."""

    uses_image = True

    def _input_norm(self, cfg: SegmenterConfig, input_mean, input_std) -> None:
        std_in, mean_in = torch.tensor(input_std), torch.tensor(input_mean)
        std_s, mean_s = torch.tensor(cfg.std), torch.tensor(cfg.mean)
        self.register_buffer("scale", (std_in / std_s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean_s) / std_s).view(1, 3, 1, 1), persistent=False)

    def _freeze(self, cfg: SegmenterConfig) -> None:
        if cfg.frozen:
            for p in self.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _resolve(cfg: SegmenterConfig, config_cls, what: str, fields: dict) -> SegmenterConfig:
        """A local folder's config -> ours: ``fields`` (ours -> transformers attribute), the full config in
        ``hf_config``, and mean / std from its ``preprocessor_config.json`` when it has them."""
        if not cfg.pretrained:
            return cfg
        hc = read_folder_config(cfg.pretrained, config_cls, what)
        named = {ours: tuple(getattr(hc, theirs)) if isinstance(getattr(hc, theirs), list) else getattr(hc, theirs)
                 for ours, theirs in fields.items()}
        norm = {k: v for k, v in read_processor(cfg.pretrained).items() if k in ("mean", "std")}
        return replace(cfg, hf_config=config_record(hc), **named, **norm)


def _hf_segmenter_config(config_cls, cfg: SegmenterConfig, named: dict):
    """``cfg.hf_config`` with the named fields on top; labels follow ``num_classes``."""
    d = dict(cfg.hf_config)
    if len(d.get("id2label") or {}) != cfg.num_classes:
        d.pop("id2label", None)
        d.pop("label2id", None)
    return config_cls.from_dict({**d, **named, "num_labels": cfg.num_classes})


# our SegmenterConfig field -> transformers SegformerConfig attribute
SEGFORMER_FIELDS = {"num_classes": "num_labels", "hidden_sizes": "hidden_sizes", "depths": "depths",
                    "num_heads": "num_attention_heads", "decoder_hidden_size": "decoder_hidden_size"}


@register_segmenter("segformer")
class SegformerSegmenter(ImageSegmenter):
    """transformers' SegFormer (ADE20K, 150 classes), config-built; real weights from a local folder.

    Output: logits (B, K, H/4, W/4).
    """

    def __init__(self, cfg: SegmenterConfig, backbone_channels: int, input_mean, input_std):
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        cfg = self.resolve(cfg)  # a local folder decides the architecture (no-op without one)
        if cfg.hf_config:
            sc = _hf_segmenter_config(SegformerConfig, cfg, {
                "hidden_sizes": list(cfg.hidden_sizes), "depths": list(cfg.depths),
                "num_attention_heads": list(cfg.num_heads), "decoder_hidden_size": cfg.decoder_hidden_size})
        else:
            sc = SegformerConfig(num_labels=cfg.num_classes, hidden_sizes=list(cfg.hidden_sizes),
                                 depths=list(cfg.depths), num_attention_heads=list(cfg.num_heads),
                                 decoder_hidden_size=cfg.decoder_hidden_size,
                                 sr_ratios=[8, 4, 2, 1][:len(cfg.depths)])
        if cfg.pretrained:
            self.model = load_folder_model(SegformerForSemanticSegmentation, cfg.pretrained, sc, "SegFormer")
        else:
            self.model = SegformerForSemanticSegmentation(sc)
        self._input_norm(cfg, input_mean, input_std)
        self._freeze(cfg)

    @classmethod
    def describe(cls, cfg: SegmenterConfig) -> str:
        """The architecture in words (``geosurge model info``)."""
        return (f"SegFormer: widths {list(cfg.hidden_sizes)}, depths {list(cfg.depths)}, heads "
                f"{list(cfg.num_heads)}, decoder {cfg.decoder_hidden_size}, {cfg.num_classes} classes")

    @classmethod
    def resolve(cls, cfg: SegmenterConfig) -> SegmenterConfig:
        from transformers import SegformerConfig

        return cls._resolve(cfg, SegformerConfig, "SegFormer", SEGFORMER_FIELDS)

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(pixel_values=image * self.scale + self.shift).logits


ONEFORMER_TASK = "the task is semantic"  # OneFormerProcessor's task prompt for semantic segmentation
NO_OBJECT_EPS = 1e-6  # floor of the semantic map before its log (a class no query claims: log 1e-6, not -inf)


@register_segmenter("oneformer")
class OneFormerSegmenter(ImageSegmenter):
    """transformers' ``OneFormerForUniversalSegmentation`` on the semantic task; weights from a local folder
    (config.json + weights + the CLIP tokenizer files that encode its task prompt). Without one it is built at
    the default OneFormerConfig (Swin-T, ADE20K's 150 classes), randomly initialised.

    The semantic map is OneFormer's own semantic post-processing (``post_process_semantic_segmentation``): per
    class, the sum over queries of P(class | query) (no-object column dropped) times the query's sigmoid mask.
    Returned as its log (B, K, H/4, W/4), so that the softmax the semantic tokenizer applies gives the map
    normalised over classes. The tokenised prompt is a persistent buffer: a checkpoint needs no tokenizer.
    """

    def __init__(self, cfg: SegmenterConfig, backbone_channels: int, input_mean, input_std):
        super().__init__()
        from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

        cfg = self.resolve(cfg)  # a local folder decides the architecture (no-op without one)
        oc = _hf_segmenter_config(OneFormerConfig, cfg, {}) if cfg.hf_config else \
            OneFormerConfig(num_labels=cfg.num_classes)
        oc.is_training = False  # no text mapper / contrastive head: inference only
        if cfg.pretrained:
            self.model = load_folder_model(OneFormerForUniversalSegmentation, cfg.pretrained, oc, "OneFormer")
            task = _oneformer_task_tokens(cfg.pretrained, oc.task_seq_len)
        else:
            self.model = OneFormerForUniversalSegmentation(oc)
            task = torch.zeros(1, oc.task_seq_len)
        self.register_buffer("task_inputs", task)
        self._input_norm(cfg, input_mean, input_std)
        self._freeze(cfg)

    @classmethod
    def describe(cls, cfg: SegmenterConfig) -> str:
        """The architecture in words (``geosurge model info``)."""
        hc = cfg.hf_config or {}
        backbone = (hc.get("backbone_config") or {}).get("model_type", "swin")
        return (f"OneFormer ({backbone}): {hc.get('num_queries', 150)} queries, hidden {hc.get('hidden_dim', 256)}, "
                f"{cfg.num_classes} classes, semantic task")

    @classmethod
    def resolve(cls, cfg: SegmenterConfig) -> SegmenterConfig:
        from transformers import OneFormerConfig

        return cls._resolve(cfg, OneFormerConfig, "OneFormer", {"num_classes": "num_labels"})

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(pixel_values=image * self.scale + self.shift,
                         task_inputs=self.task_inputs.expand(image.shape[0], -1))
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K): drop the no-object column
        masks = out.masks_queries_logits.sigmoid()  # (B, Q, h, w)
        semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
        return semantic.clamp_min(NO_OBJECT_EPS).log()


def _oneformer_task_tokens(path, seq_len: int) -> torch.Tensor:
    """OneFormerProcessor's task input: the prompt tokenised with the folder's CLIP tokenizer, padded to
    ``task_seq_len``, as float (1, seq_len)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        # AutoTokenizer would fall back to an empty CLIP vocabulary here and encode the prompt as padding
        raise GeosurgeError(f"{path}: OneFormer needs the folder's tokenizer (tokenizer.json, or vocab.json + "
                            "merges.txt) to encode its task prompt; copy them from the model's repository")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        ids = tok([ONEFORMER_TASK], padding="max_length", max_length=seq_len, truncation=True)["input_ids"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise GeosurgeError(f"{path}: OneFormer needs the folder's tokenizer (tokenizer.json, or vocab.json + "
                            f"merges.txt) to encode its task prompt ({type(e).__name__}: {e})") from None
    return torch.tensor(ids, dtype=torch.float32)


@register_segmenter("light_head")
class LightSegHead(nn.Module):
    """A light head on the backbone's own feature map (the edge student's): conv-BN-ReLU-conv to K classes."""

    uses_image = False

    @classmethod
    def describe(cls, cfg: SegmenterConfig) -> str:
        """The architecture in words (``geosurge model info``)."""
        return f"light head on backbone features: {cfg.head_hidden} hidden, {cfg.num_classes} classes"

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
        h, w = probs.shape[-2:]
        if (h, w) != size:
            if w >= size[1]:  # adaptive average pooling as two constant matrices: a static MatMul in ONNX
                probs = _pool_matrix(h, size[0], probs) @ probs @ _pool_matrix(w, size[1], probs).t()
            else:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return self.proj(probs.flatten(2).transpose(1, 2)) + self.pos


def _pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): row i averages inputs floor(i n_in / n_out) .. ceil((i + 1) n_in / n_out) - 1, the bins of
    ``F.adaptive_avg_pool2d``. Built from Python ints, so a traced export holds it as a constant (the ONNX
    exporter cannot export adaptive pooling of a map whose size it does not know, e.g. SegFormer's output)."""
    rows = []
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(n_in)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)

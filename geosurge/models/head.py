"""The cell head: one embedding table per hierarchy level, a learnable temperature per level, per-level
log-softmax, and hierarchical-product inference in log space."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geo import CellHierarchy

MIN_TEMPERATURE = 0.01


class CellHead(nn.Module):
    def __init__(self, hierarchy: CellHierarchy, embed_dim: int, temperature_init: float = 0.07):
        super().__init__()
        self.sizes = hierarchy.sizes
        self.num_levels = hierarchy.num_levels
        self.embed_dim = embed_dim
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(n, embed_dim) * embed_dim ** -0.5)
                                       for n in self.sizes)
        self.log_temperature = nn.Parameter(torch.full((self.num_levels,), math.log(temperature_init)))
        self.register_buffer("ancestors", torch.from_numpy(hierarchy.ancestors()), persistent=False)
        fin = hierarchy.level(-1)
        self.register_buffer("rep_latlon", torch.from_numpy(np.stack([fin.rep_lat, fin.rep_lon], 1)),
                             persistent=False)

    def temperatures(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def level_logits(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Cosine similarity / temperature against every cell of every level: a list of (B, n_k)."""
        z = F.normalize(embedding, dim=-1)
        t = self.temperatures()
        return [z @ F.normalize(table, dim=-1).t() / t[k] for k, table in enumerate(self.tables)]

    def level_log_probs(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        return [lg.log_softmax(dim=-1) for lg in self.level_logits(embedding)]

    def hierarchical_scores(self, level_log_probs: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_finest): each finest cell's log-prob plus its ancestors' (product of probabilities in log space)."""
        score = level_log_probs[-1].clone()
        for k in range(self.num_levels - 1):
            score = score + level_log_probs[k][:, self.ancestors[:, k]]
        return score

    def topk(self, embedding: torch.Tensor, k: int = 5) -> dict:
        scores = self.hierarchical_scores(self.level_log_probs(embedding))
        val, idx = scores.topk(min(k, scores.shape[1]), dim=-1)
        return {"cell": idx, "log_score": val, "latlon": self.rep_latlon[idx]}

    @torch.no_grad()
    def init_from_geoclip(self, hierarchy: CellHierarchy, batch: int = 4096) -> None:
        """Initialise every level's table with GeoCLIP's trained location encoder (512-d) evaluated at each cell's
        representative point. The encoder and its weights ship in the ``geoclip`` package (no download)."""
        if self.embed_dim != 512:
            raise ValueError(f"GeoCLIP's location encoder is 512-d; this head is {self.embed_dim}-d")
        encoder = load_geoclip_location_encoder()
        for k, table in enumerate(self.tables):
            lv = hierarchy.level(k)
            pts = torch.from_numpy(np.stack([lv.rep_lat, lv.rep_lon], 1)).float()
            out = torch.cat([encoder(pts[i:i + batch]) for i in range(0, len(pts), batch)])
            table.copy_(F.normalize(out, dim=-1))


def load_geoclip_location_encoder() -> nn.Module:
    """GeoCLIP's GPS encoder with its packaged weights (loaded by geoclip with ``weights_only=True``)."""
    try:
        # geoclip decorates its random-Fourier-feature functions with @torch.jit.script at import
        # (geoclip/model/rff/functional.py), which torch >= 2.14 answers with a FutureWarning on every run; the
        # decorators are geoclip's, not ours: silence exactly that warning for this import
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            from geoclip.model.location_encoder import LocationEncoder
    except ImportError:
        raise ImportError("initialising cell embeddings from GeoCLIP needs the 'geoclip' package "
                          "(pip install 'geosurge[toolkit]')") from None
    return LocationEncoder(from_pretrained=True).eval()

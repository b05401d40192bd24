"""Semantic fusion: blocks of latent cross-attention (semantic tokens query the RGB tokens).

The paper: "3 blocks of latent cross-attention: semantic tokens are the queries, RGB tokens keys/values; MLP,
residual, LayerNorm; the fused CLS -> LayerNorm -> linear -> 768-d". The queries are [global (CLS) token; semantic
tokens]; the output is the fused CLS. For the semantic tokens to reach it, the queries must also attend to each other
(as the latents of a Perceiver do, Jaegle et al. 2021): ``FusionConfig.query_self_attention``. Without it each
query only reads the RGB tokens, the CLS never reads a semantic token, and the embedding is independent of the
segmentation map (the behaviour of checkpoints written before the field existed, kept for them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, Nq, D) over ``ctx`` (B, Nk, D) (self-attention when ``ctx`` is ``x``) with
    explicit projections and ``F.scaled_dot_product_attention`` (export-friendly: no nn.MultiheadAttention fast
    path)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {num_heads} heads")
        self.h = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape
        nk = ctx.shape[1]
        q = self.q(x).view(b, nq, self.h, d // self.h).transpose(1, 2)
        k = self.k(ctx).view(b, nk, self.h, d // self.h).transpose(1, 2)
        v = self.v(ctx).view(b, nk, self.h, d // self.h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, nq, d))


class FusionBlock(nn.Module):
    """q <- q + CrossAttn(LN(q), LN(rgb)); with ``self_attention``: q <- q + SelfAttn(LN(q)) (the queries, CLS
    included, attend to each other); q <- q + MLP(LN(q)). Every attention is ``F.scaled_dot_product_attention`` and
    every LayerNorm one ``nn.LayerNorm`` (one ONNX LayerNormalization op)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0,
                 self_attention: bool = False):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, dropout)
        if self_attention:  # absent (not merely unused) when off: old checkpoints' state dicts load as they are
            self.norm_self = nn.LayerNorm(dim)
            self.self_attn = CrossAttention(dim, num_heads, dropout)
        else:
            self.norm_self = self.self_attn = None
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_kv(rgb))
        if self.self_attn is not None:
            n = self.norm_self(q)
            q = q + self.self_attn(n, n)
        return q + self.mlp(self.norm_mlp(q))


class SemanticFusion(nn.Module):
    """Queries = [global token; semantic tokens]; keys/values = RGB patch tokens; with
    ``cfg.query_self_attention`` the queries also attend to each other in every block. The fused global token ->
    LayerNorm -> linear -> ``embed_dim``, L2-normalised. Shapes: rgb_tokens (B, N, C), global_token (B, C),
    sem_tokens (B, M, dim) -> (B, embed_dim) float32."""

    def __init__(self, cfg: FusionConfig, rgb_channels: int, embed_dim: int):
        super().__init__()
        self.rgb_proj = nn.Linear(rgb_channels, cfg.dim)
        self.global_proj = nn.Linear(rgb_channels, cfg.dim)
        self.blocks = nn.ModuleList(
            FusionBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.query_self_attention)
            for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, embed_dim)

    def forward(self, rgb_tokens: torch.Tensor, global_token: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        rgb = self.rgb_proj(rgb_tokens)
        q = torch.cat([self.global_proj(global_token).unsqueeze(1), sem_tokens], dim=1)
        for blk in self.blocks:
            q = blk(q, rgb)
        return F.normalize(self.out(self.norm(q[:, 0])), dim=-1)

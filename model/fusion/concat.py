"""Concatenation of both pooled features + an MLP: the simplest strong baseline."""

from __future__ import annotations

import torch
from torch import nn

from model.fusion.base import FUSIONS, Fusion


class ConcatFusion(Fusion):
    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.out_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(image_dim + text_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        )

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        return self.mlp(torch.cat([image_pooled, text_pooled], dim=-1))


@FUSIONS.register("concat")
def build_concat(image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1) -> Fusion:
    return ConcatFusion(image_dim, text_dim, hidden_dim, dropout)

"""Concatenation of both pooled features + an MLP: the simplest strong baseline.

Sequence stage: over the two-element modality sequence [image, text] of per-modality H-dim
projections (see ``model/fusion/sequence.py``); the contextualised pair is then concatenated.
Without a stage the MLP reads the raw pooled features directly, as it always has (same
parameter names, so earlier checkpoints still load).
"""

from __future__ import annotations

import torch
from torch import nn

from model.fusion.base import FUSIONS, Fusion, pooled_pair_builder
from model.fusion.sequence import build_sequence_stage, modality_pair


class ConcatFusion(Fusion):
    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1,
        sequence_stage: str = "none", num_heads: int = 4,
    ):
        super().__init__()
        self.out_dim = hidden_dim
        self.sequence_stage = sequence_stage
        self.stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.image_in: nn.Module = nn.Identity()
        self.text_in: nn.Module = nn.Identity()
        in_dim = image_dim + text_dim
        if sequence_stage != "none":  # the pair must share one width to form a sequence
            self.image_in = nn.Linear(image_dim, hidden_dim)
            self.text_in = nn.Linear(text_dim, hidden_dim)
            in_dim = 2 * hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        )

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        image, text = modality_pair(self.image_in(image_pooled), self.text_in(text_pooled), self.stage)
        return self.mlp(torch.cat([image, text], dim=-1))


build_concat = FUSIONS.register("concat")(pooled_pair_builder(ConcatFusion))

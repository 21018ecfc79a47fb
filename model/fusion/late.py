"""Late fusion: one classifier per modality, final logits = the mean of the two.

The modalities never meet before the logits, which makes this the baseline that tells whether
the other strategies' interaction is worth anything, and keeps working (at one modality's
accuracy) when the other is uninformative. The strategy outputs logits itself
(``produces_logits``), so ``FusionModel`` puts no classifier on top; it therefore needs
``num_classes`` at build time.

Sequence stage: over each modality's *own* sequence with one stage per modality (image
regions [B, R, H], all valid; text tokens [B, T, H], masked), then masked mean pooling, so the
fusion stays late. Without a stage the heads read the pooled features directly.
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoders.base import masked_mean
from model.fusion.base import FUSIONS, Fusion, modality_mask
from model.fusion.sequence import build_sequence_stage


def _head(in_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
    )


class LateFusion(Fusion):
    produces_logits = True

    def __init__(
        self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.1,
        sequence_stage: str = "none", num_heads: int = 4,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"late fusion needs num_classes >= 1, got {num_classes}")
        self.out_dim = num_classes
        self.sequence_stage = sequence_stage
        self.image_stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.text_stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.image_in: nn.Module | None = None
        self.text_in: nn.Module | None = None
        if sequence_stage != "none":
            self.image_in = nn.Linear(image_dim, hidden_dim)
            self.text_in = nn.Linear(text_dim, hidden_dim)
            image_dim = text_dim = hidden_dim
        self.image_head = _head(image_dim, hidden_dim, num_classes, dropout)
        self.text_head = _head(text_dim, hidden_dim, num_classes, dropout)

    def modality_logits(
        self, image_pooled: torch.Tensor, image_regions: torch.Tensor, text_pooled: torch.Tensor,
        text_tokens: torch.Tensor, text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits [B, C], text logits [B, C]); ``forward`` is exactly their mean."""
        if self.image_in is None or self.text_in is None:
            return self.image_head(image_pooled), self.text_head(text_pooled)
        regions = self.image_in(image_regions)
        region_mask = modality_mask(regions)
        image = masked_mean(self.image_stage(regions, region_mask), region_mask)
        text = masked_mean(self.text_stage(self.text_in(text_tokens), text_mask), text_mask)
        return self.image_head(image), self.text_head(text)

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        image_logits, text_logits = self.modality_logits(
            image_pooled, image_regions, text_pooled, text_tokens, text_mask
        )
        return 0.5 * (image_logits + text_logits)


@FUSIONS.register("late")
def build_late(
    image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, *,
    num_classes: int | None = None, num_regions: int | None = None, sequence_stage: str = "none", num_heads: int = 4,
) -> Fusion:
    """``num_classes`` is required: the per-modality heads are the classifier. ``num_regions`` is unused."""
    if num_classes is None:
        raise ValueError(
            "late fusion outputs class logits itself and needs num_classes: pass num_classes=<number of labels> "
            "to the fusion builder (model/build.py does this from the dataset's labels)"
        )
    return LateFusion(image_dim, text_dim, num_classes, hidden_dim, dropout, sequence_stage, num_heads)

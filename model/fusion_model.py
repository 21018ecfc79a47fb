"""The full fusion model and the three export views the bundle contract defines.

Splitting into image encoder / text encoder / fusion head graphs lets each endpoint run only
what it needs (text-only search never runs the image encoder).
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoders.base import ImageEncoder, TextEncoder
from model.fusion.base import Fusion
from model.heads import ClassificationHead, ContrastiveHead


class FusionModel(nn.Module):
    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        fusion: Fusion,
        num_classes: int,
        embed_dim: int = 128,
        aux_heads: bool = False,
    ):
        """``aux_heads``: add one linear classifier per modality on the pooled encoder features
        (``aux_logits``), for an auxiliary per-modality loss that keeps both encoders
        discriminative on their own, so the fused classifier cannot lean on one modality only.
        They are training-only: no export view uses them.
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.num_classes = num_classes
        self.classifier: ClassificationHead | None = None
        if fusion.produces_logits:  # e.g. late fusion: its per-modality heads are the classifier
            if fusion.out_dim != num_classes:
                raise ValueError(f"fusion outputs {fusion.out_dim} logits but the model has {num_classes} classes")
        else:
            self.classifier = ClassificationHead(fusion.out_dim, num_classes)
        self.contrastive = ContrastiveHead(image_encoder.out_dim, text_encoder.out_dim, embed_dim)
        self.aux_image: ClassificationHead | None = None
        self.aux_text: ClassificationHead | None = None
        if aux_heads:
            self.aux_image = ClassificationHead(image_encoder.out_dim, num_classes)
            self.aux_text = ClassificationHead(text_encoder.out_dim, num_classes)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_encoder(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(input_ids, attention_mask)

    def classify_features(
        self,
        image_pooled: torch.Tensor,
        image_regions: torch.Tensor,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        fused = self.fusion(image_pooled, image_regions, text_pooled, text_tokens, text_mask)
        return fused if self.classifier is None else self.classifier(fused)

    def aux_logits(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality logits (image [B, C], text [B, C]) for the auxiliary loss
        ``aux_weight * (CE(image, y) + CE(text, y))``; needs ``aux_heads=True``."""
        if self.aux_image is None or self.aux_text is None:
            raise RuntimeError("this FusionModel was built without auxiliary heads: build it with aux_heads=True")
        return self.aux_image(image_pooled), self.aux_text(text_pooled)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        ip, ir = self.encode_image(pixel_values)
        tp, tt = self.encode_text(input_ids, attention_mask)
        return self.classify_features(ip, ir, tp, tt, attention_mask)


class ImageEncoderGraph(nn.Module):
    """pixel_values -> image_features, image_regions, image_embedding."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, regions = self.model.encode_image(pixel_values)
        return pooled, regions, self.model.contrastive.embed_image(pooled, regions)


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask -> text_features, text_tokens, text_embedding."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, tokens = self.model.encode_text(input_ids, attention_mask)
        return pooled, tokens, self.model.contrastive.embed_text(pooled)


class FusionHeadGraph(nn.Module):
    """Both modalities' features -> class probabilities (softmax inside the graph)."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(
        self,
        image_features: torch.Tensor,
        image_regions: torch.Tensor,
        text_features: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        logits = self.model.classify_features(image_features, image_regions, text_features, text_tokens, attention_mask)
        return torch.softmax(logits, dim=-1)

"""Shared encoder interfaces: every encoder returns pooled features and token/region features.

Region/token features let cross-attention fusion look inside an image or a sentence; pooled
features serve the cheaper strategies and the contrastive head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.registry import Registry


@dataclass
class EncoderSpec:
    """What an encoder needs from the data pipeline (image size, normalisation, tokenizer)."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "bicubic"
    tokenizer_file: str | None = None
    max_length: int = 64
    extra: dict[str, object] = field(default_factory=dict)


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> (pooled [B, D], regions [B, R, D])."""

    out_dim: int
    pretrained: bool = False

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TextEncoder(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> (pooled [B, D], tokens [B, T, D])."""

    out_dim: int
    pretrained: bool = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


IMAGE_ENCODERS: Registry = Registry("image encoder")
TEXT_ENCODERS: Registry = Registry("text encoder")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions only, so padding length never changes the result."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-6)

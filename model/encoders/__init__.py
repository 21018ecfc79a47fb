"""Encoder registry; importing this package registers every built-in encoder."""

from model.encoders import bilstm, efficientnet_lite, minilm, small_cnn  # noqa: F401  (registration side effects)
from model.encoders.base import IMAGE_ENCODERS, TEXT_ENCODERS, EncoderSpec, ImageEncoder, TextEncoder

__all__ = ["IMAGE_ENCODERS", "TEXT_ENCODERS", "EncoderSpec", "ImageEncoder", "TextEncoder"]

"""Text -> token ids with the bundle's own ``tokenizer.json`` (HuggingFace ``tokenizers``).

Training and serving share this class, so ids can never drift between the two halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class EncodedText:
    """A padded batch: ``input_ids``/``attention_mask`` are int64 [batch, seq]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: list[bool]


class TextTokenizer:
    """Truncates to the manifest's ``max_length`` and pads to the longest text in the batch."""

    def __init__(self, tokenizer_file: Path | str, max_length: int, pad_id: int = 0):
        self.max_length = max_length
        self.pad_id = pad_id
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        # Files exported from transformers often bake in fixed-length padding/truncation; we
        # pad per batch instead (much less work for short texts) and truncate to max_length.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)

    def encode(self, texts: list[str]) -> EncodedText:
        encs = self._tok.encode_batch(texts)
        longest = max((len(e.ids) for e in encs), default=1) or 1
        ids = np.full((len(encs), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), longest), dtype=np.int64)
        truncated: list[bool] = []
        for i, enc in enumerate(encs):
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            mask[i, :n] = enc.attention_mask
            truncated.append(bool(enc.overflowing))
        return EncodedText(ids, mask, truncated)

    def token_ids(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

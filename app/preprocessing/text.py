"""Text -> token ids with the bundle's own ``tokenizer.json`` (HuggingFace ``tokenizers``).

Training and serving share this class, so ids can never drift between the two halves.

Control characters are **stripped** before tokenisation (:func:`clean_text`): every character of
Unicode category ``Cc`` except tab, line feed and carriage return (which are whitespace and kept).
Why strip rather than keep: they carry no meaning for a text model, a word-level tokenizer turns
each into an ``[UNK]`` token (``"a\\x00b"`` -> ``a [UNK] b``), and BERT-style tokenizers (MiniLM's)
already drop them in their normaliser, so stripping makes both encoders see the same text. Format
characters (``Cf``: zero-width joiner/non-joiner, soft hyphen) are kept: they matter in emoji
sequences and in scripts such as Persian. Lone surrogates (possible in JSON as ``"\\ud800"``, not
encodable as UTF-8, and a ``TypeError`` inside ``tokenizers``) become U+FFFD here; the HTTP layer
refuses them earlier with a 422 (``app.api.payload.check_text``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from app.core.errors import BundleError

# C0 and C1 controls and DEL, except \t \n \r.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Strip control characters (see the module docstring) and replace lone surrogates with U+FFFD."""
    text = _CONTROL.sub("", text)
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return text


def has_lone_surrogate(text: str) -> bool:
    """True if ``text`` cannot be encoded as UTF-8 (a surrogate code point outside a pair)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


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
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception ("Model missing.", ...)
            raise BundleError(f"{tokenizer_file} is not a readable tokenizer.json: {exc}") from None
        # Files exported from transformers often bake in fixed-length padding/truncation; we
        # pad per batch instead (much less work for short texts) and truncate to max_length.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to ``vocab_size - 1``, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: list[str]) -> EncodedText:
        """``truncated[i]`` is True when text ``i`` had more than ``max_length`` tokens (the rest is cut)."""
        encs = self._tok.encode_batch([clean_text(t) for t in texts])
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
        return list(self._tok.encode(clean_text(text)).ids)

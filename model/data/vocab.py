"""Build a word-level ``tokenizer.json`` for the from-scratch text encoder.

Using the ``tokenizers`` library (not a hand-rolled dict) means the server tokenises the
BiLSTM's text exactly as it does MiniLM's: one ``tokenizer.json``, one code path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"


def build_word_tokenizer(texts: Iterable[str], out_file: Path, min_frequency: int = 1) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK], min_frequency=min_frequency)
    tok.train_from_iterator(texts, trainer=trainer)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_file))
    return out_file

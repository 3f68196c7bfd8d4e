"""Encoders started from other checkpoints (our stages, transformers FLAVA, transformers ViT)."""

import dataclasses
import json

import pytest
import torch
import transformers
from conftest import hf_config, randomize_

import flava
from flava.config import FlavaConfig
from flava.errors import CheckpointError
from flava.interop.hf import config_from_hf
from flava.interop.vit import image_config_from_vit, load_vit, read_vit
from flava.model.encoders import ImageEncoder
from flava.pretraining import PretrainingModel
from flava.storage import read_checkpoint, save_model
from flava.train.init import GROUPS, initialise_encoders

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
           patch_size=8)


# --------------------------------------------------------------------------- ViT


def save_vit(path, cls=transformers.ViTModel, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize_(cls(transformers.ViTConfig(**dict(VIT, **kw))), seed=seed)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("cls", [transformers.ViTModel, transformers.ViTForImageClassification,
                                 transformers.ViTForMaskedImageModeling])
def test_vit_checkpoint_gives_the_same_hidden_states(tmp_path, cls):
    ref = save_vit(tmp_path, cls)
    vit = ref if cls is transformers.ViTModel else ref.vit
    cfg = image_config_from_vit(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_size, cfg.image_size, cfg.patch_size) == (
        64, 2, 4, 128, 32, 8)
    ours = ImageEncoder(cfg).eval()
    mask_before = ours.mask_token.detach().clone()
    notes = load_vit(ours, tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patch_mask = None
    if cls is transformers.ViTForMaskedImageModeling:
        # This ViT has a mask token: ours takes it and masks the same way.
        patch_mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.4
        assert torch.equal(ours.mask_token, vit.embeddings.mask_token) and notes == ["its decoder not loaded"]
    else:
        assert torch.equal(ours.mask_token, mask_before) and "mask token" in notes[0]
        assert notes[1] == ("its pooler not loaded" if cls is transformers.ViTModel else "its classifier not loaded")
    with torch.no_grad():
        got = ours(pixels, patch_mask, output_hidden_states=True)
        want = vit(pixel_values=pixels, bool_masked_pos=patch_mask, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_vit_for_another_image_size_is_resized_like_interpolate_pos_encoding(tmp_path):
    vit = save_vit(tmp_path)
    cfg = image_config_from_vit(json.loads((tmp_path / "config.json").read_text()))
    native = ImageEncoder(cfg).eval()
    load_vit(native, tmp_path)
    bigger = ImageEncoder(dataclasses.replace(cfg, image_size=48)).eval()
    notes = load_vit(bigger, tmp_path)
    assert "4x4 to 6x6" in notes[0]
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = bigger(pixels).last_hidden_state
        same = native(pixels, interpolate_pos_encoding=True).last_hidden_state
        want = vit(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.equal(got, same)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_vit_that_does_not_fit_is_refused(tmp_path):
    save_vit(tmp_path / "heads", num_attention_heads=8)
    cfg = image_config_from_vit(dict(VIT, model_type="vit"))
    with pytest.raises(CheckpointError, match="num_heads is 8, this model's is 4"):
        load_vit(ImageEncoder(cfg), tmp_path / "heads")
    save_vit(tmp_path / "patch", patch_size=4)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \[1, 65, 64\] there and \[1, 17, 64\] in this "
                                                  r"model \(its patch_size is 4, this model's is 8\)"):
        load_vit(ImageEncoder(cfg), tmp_path / "patch")
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="not a Hugging Face ViT checkpoint"):
        read_vit(tmp_path / "bert")


# --------------------------------------------------------------------------- initialise_encoders


def small() -> FlavaConfig:
    """A model small enough that building it takes milliseconds even on a busy machine."""
    enc = dict(hidden_size=32, num_heads=2, mlp_size=64)
    cfg = flava.preset("tiny")
    cfg.image = dataclasses.replace(cfg.image, **enc, image_size=32, vocab_size=16)
    cfg.text = dataclasses.replace(cfg.text, **enc, vocab_size=100, max_position_embeddings=16)
    cfg.multimodal = dataclasses.replace(cfg.multimodal, **enc)
    cfg.projection_dim = 16
    return cfg


def tiny_pretraining(seed: int, cfg: FlavaConfig | None = None) -> PretrainingModel:
    torch.manual_seed(seed)
    return PretrainingModel(cfg or small())


def group(model, name):
    return {k: v.clone() for k, v in model.model.state_dict().items() if k.startswith(GROUPS[name])}


def test_a_text_stage_checkpoint_initialises_the_text_encoder_only(tmp_path):
    stage = randomize_(tiny_pretraining(0), seed=1)
    run = tmp_path / "text-run"
    # As the trainer writes it: the whole model, with the run's settings beside it.
    save_model(run / "checkpoints" / "step_00000010", stage.config, {"model": stage.model, "heads": stage.heads},
               extra={"train": {"stage": "text-mlm"}})
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 10, "path": "step_00000010"}))

    for source in (run, run / "checkpoints" / "step_00000010"):
        fresh = tiny_pretraining(1)
        image, mm, scale = group(fresh, "image"), group(fresh, "multimodal"), fresh.model.logit_scale.clone()
        described = initialise_encoders(fresh, text=str(source))
        assert list(described) == ["text"] and "step_00000010" in described["text"]
        assert "text_projection" in described["text"]
        for k, v in group(stage, "text").items():
            assert torch.equal(fresh.model.state_dict()[k], v), k
        for name, before in (("image", image), ("multimodal", mm)):
            for k, v in group(fresh, name).items():
                assert torch.equal(v, before[k]), k
        assert torch.equal(fresh.model.logit_scale, scale)
    described = initialise_encoders(fresh, image=str(run))
    assert "written by a text-mlm stage, which does not train the image encoder" in described["image"]


def test_a_transformers_flava_checkpoint_initialises_every_encoder(tmp_path):
    ref = randomize_(transformers.FlavaModel(hf_config()), seed=2)
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    fresh = tiny_pretraining(0, cfg)
    described = initialise_encoders(fresh, image=str(tmp_path), text=str(tmp_path), multimodal=str(tmp_path))
    assert set(described) == {"image", "text", "multimodal"}
    assert "transformers FLAVA" in described["multimodal"]
    loaded = read_checkpoint(tmp_path).parts["model"]
    own = fresh.model.state_dict()
    for k in own:
        if k != "logit_scale":
            assert torch.equal(own[k], loaded[k]), k
    assert torch.equal(own["text_encoder.word_embeddings.weight"], ref.text_model.embeddings.word_embeddings.weight)


def test_a_vit_initialises_the_image_encoder(tmp_path):
    save_vit(tmp_path / "vit")
    vit = read_vit(tmp_path / "vit")
    cfg = small()
    cfg.image = dataclasses.replace(image_config_from_vit(dict(VIT, model_type="vit")), vocab_size=16)
    fresh = tiny_pretraining(0, cfg)
    mask, pooler, proj, text = (fresh.model.image_encoder.mask_token.clone(),
                                fresh.model.image_encoder.pooler.dense.weight.clone(),
                                fresh.model.image_projection.weight.clone(), group(fresh, "text"))
    described = initialise_encoders(fresh, image=str(tmp_path / "vit"))
    assert "ViT" in described["image"] and "mask token" in described["image"]
    enc = fresh.model.image_encoder.state_dict()
    for k, v in vit.state_dict.items():
        assert torch.equal(enc[k], v), k
    assert torch.equal(enc["mask_token"], mask) and torch.equal(enc["pooler.dense.weight"], pooler)
    assert torch.equal(fresh.model.image_projection.weight, proj)
    assert all(torch.equal(v, text[k]) for k, v in group(fresh, "text").items())
    with pytest.raises(CheckpointError, match="text encoder .* a ViT checkpoint holds an image encoder only"):
        initialise_encoders(fresh, text=str(tmp_path / "vit"))


def test_checkpoints_that_do_not_fit_are_refused_before_anything_changes(tmp_path):
    other = small()
    other.text = dataclasses.replace(other.text, hidden_size=16)
    tiny_pretraining(0, other).save_pretrained(tmp_path / "narrow")
    heads = small()
    heads.multimodal = dataclasses.replace(heads.multimodal, num_heads=4)
    tiny_pretraining(0, heads).save_pretrained(tmp_path / "heads")
    good = tmp_path / "good"
    randomize_(tiny_pretraining(3), seed=3).save_pretrained(good)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")

    fresh = tiny_pretraining(1)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        initialise_encoders(fresh, image=str(good), text=str(tmp_path / "narrow"))
    assert "text encoder" in str(e.value) and str(tmp_path / "narrow") in str(e.value)
    assert "text_encoder.word_embeddings.weight has shape [100, 16] there and [100, 32]" in str(e.value)
    with pytest.raises(CheckpointError, match="multimodal encoder .* num_heads is 4, this model's is 2"):
        initialise_encoders(fresh, multimodal=str(tmp_path / "heads"))
    with pytest.raises(CheckpointError, match="neither a checkpoint .* nor a run directory"):
        initialise_encoders(fresh, image=str(tmp_path / "notes"))
    with pytest.raises(CheckpointError, match="does not exist"):
        initialise_encoders(fresh, image=str(tmp_path / "nowhere"))
    # The good image checkpoint named beside the bad text one was not applied either.
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())

"""Public image towers as FLAVA's image encoder (`interop.towers`, `train.init`): random-weight ViT,
DeiT (distilled), DINOv2 (with and without registers) and CLIP (vision model and whole CLIPModel)
checkpoints written by transformers, loaded through init_image, compute what transformers'
own models compute on the same pixels (1e-5), also at image sizes other than the checkpoint's;
the model's config follows the tower, and its pixel statistics reach the processor and the data."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import randomize_, tiny_run
from PIL import Image

import flava
from flava.config import CLIP_MEAN, FlavaConfig
from flava.data.batch import ImageBatch
from flava.data.processor import Processor
from flava.data.transforms import to_tensor
from flava.errors import CheckpointError, ConfigError
from flava.interop import towers
from flava.interop.transformers import _HF_TRANSFORMER_DEFAULTS
from flava.objectives.pretraining import PretrainingModel
from flava.train.init import follow_image_tower, initialise_encoders

ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def flava_config() -> FlavaConfig:
    """A small FLAVA whose image encoder differs from every tower here (width 24, patch 4, 16 px)."""
    enc = dict(hidden_size=24, num_heads=2, mlp_size=48)
    cfg = flava.preset("tiny")
    cfg.image = dataclasses.replace(cfg.image, **enc, image_size=16, patch_size=4, vocab_size=16)
    cfg.text = dataclasses.replace(cfg.text, **enc, vocab_size=100, max_position_embeddings=16)
    cfg.multimodal = dataclasses.replace(cfg.multimodal, **enc)
    cfg.projection_dim = 16
    return cfg


def processor(name: str, **kw):
    """transformers' image processor class (its PIL variant: there is no torchvision here)."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


# name: (model class, config, image processor, its settings, the side our model runs at)
CASES = {
    "vit": (transformers.ViTModel, transformers.ViTConfig(**ENC, intermediate_size=64, image_size=32, patch_size=8),
            "ViTImageProcessor", dict(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3],
                                      image_std=[0.4, 0.5, 0.6]), 48),
    "deit": (transformers.DeiTForImageClassificationWithTeacher,
             transformers.DeiTConfig(**ENC, intermediate_size=64, image_size=32, patch_size=8, num_labels=5),
             "DeiTImageProcessor", dict(size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48},
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), 48),
    # DINOv2 as released: a larger position grid (its 518 px) run at the processor's crop size.
    "dinov2": (transformers.Dinov2Model,
               transformers.Dinov2Config(**ENC, mlp_ratio=2, image_size=56, patch_size=8),
               "BitImageProcessor", dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), 32),
    "dinov2-registers": (transformers.Dinov2WithRegistersModel,
                         transformers.Dinov2WithRegistersConfig(**ENC, mlp_ratio=2, image_size=56, patch_size=8,
                                                                num_register_tokens=3),
                         "BitImageProcessor", dict(crop_size={"height": 32, "width": 32}), 32),
    "clip-vision": (transformers.CLIPVisionModel,
                    transformers.CLIPVisionConfig(**ENC, intermediate_size=64, image_size=32, patch_size=8),
                    "CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                    32),
    "clip": (transformers.CLIPModel,
             transformers.CLIPConfig(vision_config=dict(ENC, intermediate_size=64, image_size=32, patch_size=8),
                                     text_config=dict(ENC, intermediate_size=64, vocab_size=99), projection_dim=16),
             "CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), 32),
}


def write_tower(path, name, seed=0, with_processor=True):
    cls, cfg, proc, settings, _ = CASES[name]
    torch.manual_seed(seed)
    model = randomize_(cls(cfg), seed=seed)
    model.save_pretrained(path)
    if with_processor:
        processor(proc)(**settings).save_pretrained(path)
    return model


def reference(model, name):
    """The bare vision tower inside what was saved."""
    return {"deit": lambda m: m.deit, "clip": lambda m: m.vision_model}.get(name, lambda m: m)(model)


def pixels(side, seed=1):
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_a_tower_through_init_image_computes_what_transformers_does(tmp_path, name):
    ref = write_tower(tmp_path, name)
    side = CASES[name][4]
    torch.manual_seed(1)
    pm = PretrainingModel(flava_config())
    described = initialise_encoders(pm, image=str(tmp_path))
    image = pm.model.config.image
    assert pm.config is pm.model.config and pm.model.image_encoder.cfg is image
    assert image.image_size == side and image.hidden_size == 32 and image.patch_size == 8 and image.num_layers == 2
    assert "\n" not in described["image"] and "its config taken" in described["image"]
    # The projections and the MIM head follow the tower's width.
    assert pm.model.image_projection.in_features == pm.model.image_to_mm_projection.in_features == 32
    assert pm.heads.mim.dense.in_features == 32
    assert "image_to_mm_projection" in described["image"] and "MIM head" in described["image"]

    x = pixels(side)
    vision = reference(ref, name)
    with torch.no_grad():
        ours = pm.model.image_encoder.eval()(x, output_hidden_states=True)
        interpolate = {} if name.startswith("dinov2") else {"interpolate_pos_encoding": side != 32}
        want = vision(pixel_values=x, output_hidden_states=True, **interpolate)
    if name.startswith("clip"):
        # CLIP's last_hidden_state is before post_layernorm, which it applies to the pooled CLS only.
        torch.testing.assert_close(ours.pre_norm_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.last_hidden_state[:, 0], want.pooler_output, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(ours.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    assert len(ours.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(ours.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if name == "clip":  # its visual_projection fits projection_dim 16: the embeddings are CLIP's
        assert "image_projection from its visual_projection" in described["image"]
        with torch.no_grad():
            got = pm.model.eval().encode_image(x)
            features = ref.get_image_features(pixel_values=x)
            features = getattr(features, "pooler_output", features)
        torch.testing.assert_close(got, torch.nn.functional.normalize(features, dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["deit", "clip-vision", "dinov2-registers"])
def test_init_image_size_runs_the_tower_at_another_size(tmp_path, name):
    ref = write_tower(tmp_path, name)
    pm = PretrainingModel(flava_config())
    described = initialise_encoders(pm, image=str(tmp_path), image_size=64)
    assert pm.model.config.image.image_size == 64 and "to 8x8 patches" in described["image"]
    x = pixels(64, seed=2)
    with torch.no_grad():
        ours = pm.model.image_encoder.eval()(x)
        interpolate = {} if name.startswith("dinov2") else {"interpolate_pos_encoding": True}
        want = reference(ref, name)(pixel_values=x, **interpolate)
    got = ours.pre_norm_hidden_state if name.startswith("clip") else ours.last_hidden_state
    torch.testing.assert_close(got, want.last_hidden_state, atol=1e-5, rtol=0)


def test_tower_outputs_feed_the_objectives_in_flavas_layout(tmp_path):
    """DeiT's distillation token and DINOv2's registers stay inside the image encoder: MIM reads the
    patches, the multimodal encoder CLS and the patches."""
    write_tower(tmp_path / "reg", "dinov2-registers")
    pm = PretrainingModel(flava_config())
    initialise_encoders(pm, image=str(tmp_path / "reg"))
    x = pixels(32)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        out = pm.model.encode_image_tokens(x, mask)
        assert out.prefix_tokens == 4 and out.last_hidden_state.shape[1] == 4 + 16
        assert torch.equal(out.patches, out.last_hidden_state[:, 4:])
        mm = pm.model.image_to_multimodal(out)
        assert mm.shape[1] == 1 + 16
        torch.testing.assert_close(mm[:, 1:], pm.model.image_to_mm_projection(out.pre_norm_hidden_state[:, 4:]))
        # DINOv2's mask token replaces the masked patches as transformers' does.
        ref = reference(write_tower(tmp_path / "plain", "dinov2"), "dinov2")
        pm2 = PretrainingModel(flava_config())
        initialise_encoders(pm2, image=str(tmp_path / "plain"))
        want = ref(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        torch.testing.assert_close(pm2.model.image_encoder.eval()(x, mask).last_hidden_state, want, atol=1e-5, rtol=0)
    batch = ImageBatch(pixel_values=(x.clamp(-1, 1) * 100 + 128).to(torch.uint8), patch_mask=mask,
                       image_targets=torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(4)))
    batch = batch.to("cpu")  # the loader's uint8 pixels normalised, as the trainer moves every batch
    loss = pm(batch).losses.total
    assert torch.isfinite(loss)
    loss.backward()
    assert pm.model.image_encoder.register_tokens.grad is not None


def test_the_pixel_statistics_follow_the_tower_everywhere(tmp_path):
    write_tower(tmp_path / "deit", "deit")
    cfg = follow_image_tower(flava_config(), str(tmp_path / "deit"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert cfg.image.image_mean == mean and cfg.image.image_std == std and cfg.image.distillation_token
    model = flava.FlavaModel(cfg)
    proc = model.processor
    assert proc.image_mean == tuple(mean) and proc.image_std == tuple(std) and proc.image_size == 48
    model.save_pretrained(tmp_path / "saved")
    again = Processor.from_pretrained(tmp_path / "saved")
    assert again.image_mean == tuple(mean) and again.image_std == tuple(std)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 70, 3), dtype=np.uint8))
    x = to_tensor(picture.resize((48, 48)))
    want = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(proc.image(picture.resize((48, 48))), want)
    # The training data: uint8 pixels normalised on the device with the model's statistics.
    uint8 = (x * 255).round().to(torch.uint8)[None]
    batch = ImageBatch(pixel_values=uint8, patch_mask=torch.zeros(1, 36, dtype=torch.bool))
    moved = batch.to("cpu", mean=cfg.image.image_mean, std=cfg.image.image_std)
    torch.testing.assert_close(moved.pixel_values[0], want, atol=1e-5, rtol=0)
    # A DINO stage's crops, the features of evaluation, and transformers' own processor agree.
    from flava.evaluate.features import pixel_batches

    ours = next(pixel_batches([picture], 48, 1, mean, std))
    theirs = processor("DeiTImageProcessor").from_pretrained(tmp_path / "deit")(picture, return_tensors="pt")
    assert ours.shape == theirs["pixel_values"].shape
    assert flava.config.preset("tiny").image.image_mean == list(CLIP_MEAN)
    # A model started from that one (a stage, then the joint run, as the README goes) reads
    # images with the statistics its encoder learned, not the preset's.
    again = follow_image_tower(flava_config(), str(tmp_path / "saved"))
    assert again.image.image_mean == mean and again.image.image_std == std


def test_without_a_preprocessor_config_the_familys_processor_defaults_apply(tmp_path):
    write_tower(tmp_path, "vit", with_processor=False)
    tower = towers.read_tower(tmp_path, weights=False)
    defaults = processor("ViTImageProcessor")()
    assert tower.preprocessing.mean == tuple(defaults.image_mean) and tower.preprocessing.std == tuple(defaults.image_std)
    assert tower.image_config(flava_config().image).image_size == 32  # its config's
    assert "ViTImageProcessor's defaults" in tower.describe(tower.image_config(flava_config().image))


@pytest.mark.parametrize("family, config", [
    ("ViT", transformers.ViTConfig()), ("DeiT", transformers.DeiTConfig()), ("DINOv2", transformers.Dinov2Config()),
    ("DINOv2 with registers", transformers.Dinov2WithRegistersConfig()), ("CLIP", transformers.CLIPVisionConfig())])
def test_the_families_defaults_are_transformers(family, config):
    """Older config.json files leave defaults out: ours must be transformers' own."""
    fam = next(f for f in towers.FAMILIES if f.name == family)
    assert towers.image_config(fam, {"model_type": fam.model_types[0]}) == towers.image_config(fam, config.to_dict())
    assert set(fam.defaults) - set(_HF_TRANSFORMER_DEFAULTS) <= set(config.to_dict())


def test_checkpoints_of_the_wrong_kind_fail_in_one_line(tmp_path):
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32)).save_pretrained(tmp_path / "bert")
    transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
                             ).save_pretrained(tmp_path / "resnet")
    pm = PretrainingModel(flava_config())
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        initialise_encoders(pm, image=str(tmp_path / "resnet"))
    message = str(e.value)
    assert "\n" not in message and "Hugging Face resnet checkpoint" in message
    assert all(f in message for f in ("ViT", "DeiT", "DINOv2", "CLIP", "bert", "roberta")), message
    # A BERT is a text tower: taken for the text encoder, refused for the image encoder in one line.
    with pytest.raises(CheckpointError, match="image encoder from .*: a bert checkpoint holds a text encoder only$"):
        initialise_encoders(pm, image=str(tmp_path / "bert"))
    write_tower(tmp_path / "clip", "clip")
    # A whole CLIPModel holds a text encoder too, which is not a BERT-family one (said so, not "image only").
    with pytest.raises(CheckpointError, match="text encoder .* a CLIP model holds an image encoder and a causal text "
                                              r"transformer, not one of the text towers \(bert, .*\); init_image takes"):
        initialise_encoders(pm, text=str(tmp_path / "clip"))
    write_tower(tmp_path / "clip-vision", "clip-vision")
    with pytest.raises(CheckpointError, match="text encoder .* a CLIP checkpoint holds an image encoder only"):
        initialise_encoders(pm, text=str(tmp_path / "clip-vision"))
    with pytest.raises(ConfigError, match="init_image_size applies to public image towers"):
        follow_image_tower(pm.config, str(tmp_path / "bert"), image_size=64)
    # SwiGLU (DINOv2 giant) is named and refused.
    transformers.Dinov2Model(transformers.Dinov2Config(**ENC, use_swiglu_ffn=True, image_size=16, patch_size=8)
                             ).save_pretrained(tmp_path / "giant")
    with pytest.raises(CheckpointError, match="use_swiglu_ffn is true .* SwiGLU MLP"):
        initialise_encoders(pm, image=str(tmp_path / "giant"))
    # A tower whose config.json and weights disagree: the tower's files are at fault, no setting here.
    transformers.ViTModel(transformers.ViTConfig(**dict(ENC, hidden_size=48), image_size=16, patch_size=8)
                          ).save_pretrained(tmp_path / "mixed")
    transformers.ViTConfig(**ENC, image_size=16, patch_size=8).save_pretrained(tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="its config.json does not match its weights .* download the tower"):
        initialise_encoders(pm, image=str(tmp_path / "mixed"))
    assert all(torch.equal(v, before[k]) for k, v in pm.model.state_dict().items())


def test_a_tower_of_other_than_three_channels_is_refused_at_the_start(tmp_path):
    """A 1-channel ViT was taken, then training failed at its first step telling the user to
    convert their images to RGB."""
    transformers.ViTModel(transformers.ViTConfig(**ENC, intermediate_size=64, image_size=16, patch_size=8,
                                                 num_channels=1)).save_pretrained(tmp_path / "grey")
    said = r"image tower .*grey takes 1-channel images \(num_channels=1 in its config.json\).* 3-channel tower$"
    with pytest.raises(ConfigError, match=said):
        follow_image_tower(flava_config(), str(tmp_path / "grey"))
    pm = PretrainingModel(flava_config())
    with pytest.raises(ConfigError, match=said):
        initialise_encoders(pm, image=str(tmp_path / "grey"))
    from flava.train.config import TrainConfig
    from flava.train.init import find_sources

    with pytest.raises(ConfigError, match=said):  # before a start's first work (a demo codebook of minutes)
        find_sources(TrainConfig(model=flava_config(), init_image=str(tmp_path / "grey")))


def test_a_start_from_a_tower_trains_the_demo_codebook_for_its_image_and_refuses_a_wrong_kind_first(tmp_path,
                                                                                                     monkeypatch):
    # The demo codebook was trained for the preset's image (64 px, 8x8 tokens), then the tower made
    # the model 32 px: the run trained on targets of another scale. A BERT as init_image was refused
    # only after that codebook's minutes.
    from rich.console import Console

    from flava.train import run as run_module
    from flava.train.config import TrainConfig
    from flava.train.init import find_sources

    write_tower(tmp_path / "vit", "vit")
    model = flava_config()
    model.codebook = dataclasses.replace(model.codebook, vocab_size=model.image.vocab_size)
    cfg = TrainConfig(model=model, init_image=str(tmp_path / "vit"))
    trained = []
    monkeypatch.setattr(run_module, "train_demo_codebook", lambda model, *args, **kwargs: trained.append(model))
    run_module.ensure_demo_codebook(cfg, tmp_path / "codebook", Console())
    followed = follow_image_tower(model, str(tmp_path / "vit"))
    assert trained[0].codebook_image_size == followed.codebook_image_size == 48 != model.codebook_image_size
    transformers.BertModel(transformers.BertConfig(**ENC, intermediate_size=64, vocab_size=99)
                           ).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="cannot initialise the image encoder from .*bert: a bert checkpoint "
                                              "holds a text encoder only"):
        find_sources(TrainConfig(model=model, init_image=str(tmp_path / "bert")))


def test_a_multimodal_source_beside_a_wider_tower_keeps_its_encoder_and_leaves_the_projection(tmp_path):
    torch.manual_seed(0)
    randomize_(PretrainingModel(flava_config()), seed=5).save_pretrained(tmp_path / "flava")
    write_tower(tmp_path / "deit", "deit")
    pm = PretrainingModel(flava_config())
    described = initialise_encoders(pm, image=str(tmp_path / "deit"), multimodal=str(tmp_path / "flava"))
    assert "image_to_mm_projection is not taken" in described["multimodal"]
    theirs = flava.load(tmp_path / "flava").multimodal_encoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in pm.model.multimodal_encoder.state_dict().items())
    assert pm.model.image_to_mm_projection.in_features == 32


def test_export_to_transformers_flava_names_what_it_cannot_hold(tmp_path):
    from flava.interop.export import export_hf
    from flava.loading import read_checkpoint

    write_tower(tmp_path / "dinov2", "dinov2")
    cfg = follow_image_tower(flava_config(), str(tmp_path / "dinov2"))
    flava.FlavaModel(cfg).save_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="has LayerScale, which transformers' FLAVA image model cannot hold"):
        export_hf(read_checkpoint(tmp_path / "model"), tmp_path / "out")


def test_weights_under_transformers_in_memory_names_load_too(tmp_path):
    """transformers 5 writes `attention.attention.query` but holds `attention.q_proj`, `layers.N`."""
    ref = write_tower(tmp_path / "saved", "deit")
    from safetensors.torch import save_file

    (tmp_path / "mem").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "mem" / "model.safetensors")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    (tmp_path / "mem" / "config.json").write_text(json.dumps(config))
    a, b = towers.read_tower(tmp_path / "saved"), towers.read_tower(tmp_path / "mem")
    assert any(".q_proj." in k for k in ref.state_dict()) and a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.dropped and sorted(a.dropped) == sorted(b.dropped)


# --------------------------------------------------------------------------- training from a tower


def joint_config(data, tower, **over):
    cfg = tiny_run(data, init_image=str(tower), max_steps=3, save_every=3, log_every=1)
    cfg.optim.warmup_steps = 1
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def test_a_joint_run_trains_from_a_deit_tower(train_data, tmp_path):
    from flava.train.trainer import Trainer

    ref = write_tower(tmp_path / "deit", "deit")
    trainer = Trainer(joint_config(train_data, tmp_path / "deit"), tmp_path / "run")
    image = trainer.cfg.model.image
    assert image.distillation_token and image.image_size == 48 and image.image_mean == [0.485, 0.456, 0.406]
    assert "DeiT" in trainer.initialised["image"] and trainer.model.model.config is trainer.cfg.model
    x = pixels(48)
    with torch.no_grad():
        got = trainer.model.model.image_encoder.eval()(x).last_hidden_state
        want = ref.deit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    trainer.model.train()
    rows = trainer.fit()
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    model = flava.load(tmp_path / "run")
    assert model.config.image == image and model.processor.image_mean == (0.485, 0.456, 0.406)
    assert model.encode_image(x).shape == (2, model.config.projection_dim)


def test_the_dino_stage_starts_from_a_dinov2_tower(tmp_path):
    from flava.train.presets import demo_config
    from flava.train.trainer import Trainer

    ref = write_tower(tmp_path / "dinov2", "dinov2")
    cfg = demo_config(stage="image-dino", init_image=str(tmp_path / "dinov2"))
    d = cfg.dino
    d.out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.local_crops = 64, 32, 16, 2
    cfg.data.batch_size, cfg.data.num_workers = 4, 0
    cfg.max_steps, cfg.save_every, cfg.log_every, cfg.optim.warmup_steps = 2, 2, 1, 1
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.cfg.model.image.layer_scale and trainer.cfg.model.image.image_size == 32
    assert trainer.stage.sample_maker().spec.mean == (0.485, 0.456, 0.406)
    x = pixels(32)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        for net in (trainer.model.dino.student, trainer.model.dino.teacher):
            torch.testing.assert_close(net.backbone.eval()(x).last_hidden_state, want, atol=1e-5, rtol=0)
    trainer.model.train()
    assert all(np.isfinite(r["loss"]) for r in trainer.fit())


@pytest.mark.slow
def test_flava_pretrain_from_a_clip_tower(train_data, tmp_path):
    import os

    from conftest import pretrain_args
    from zygote import python

    write_tower(tmp_path / "clip", "clip")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = pretrain_args(train_data, run) + ["--set", f"init_image={tmp_path / 'clip'}", "--set", "max_steps=2",
                                             "--set", "save_every=2", "--set", "model.projection_dim=16"]
    done = python(["-m", "flava.cli", *args], env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("image encoder from the CLIP"))
    assert "image_projection from its visual_projection" in done.stdout
    settings = json.loads((run / "train_config.json").read_text())
    assert settings["model"]["image"]["embed_norm"] and not settings["model"]["image"]["patch_bias"], line
    again = python(["-m", "flava.cli", "pretrain", "--output", str(run), "--resume", "--max-steps", "3"], env,
                   timeout=600)
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr[-2000:]


def test_a_setting_the_source_decides_is_refused_beside_it_and_one_it_leaves_is_taken(tmp_path, capsys):
    # The source's value had replaced the user's without a word (a 64-px tower trained at 64 after
    # --set model.image.image_size=32; a 2-layer text tower after model.text.num_layers=4).
    from flava.cli import main as cli

    write_tower(tmp_path / "vit", "vit")
    capsys.readouterr()  # transformers' progress bar
    out = tmp_path / "run"
    refused = {
        ("init_text=minilm", "model.text.num_layers=4"):
            "init_text=minilm decides the text encoder's settings, so model.text.num_layers=4 (it has 6) would be "
            "ignored: drop it (of model.text, dropout and attention_dropout stay yours)",
        (f"init_image={tmp_path / 'vit'}", "model.image.image_size=64"):
            f"init_image={tmp_path / 'vit'} decides the image encoder's settings, so model.image.image_size=64 (it "
            "has 48) would be ignored: drop it; init_image_size=N runs the tower at another size (a public tower "
            "leaves dropout, attention_dropout, use_mask_token, vocab_size to you)",
    }
    for (source, setting), said in refused.items():
        assert cli(["pretrain", "--output", str(out), "--set", source, "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"flava pretrain: error: {said}", err
    assert not out.exists()
    from flava.cli.pretrain import settings
    from flava.cli import build_parser

    # What a source leaves to the run is taken, and a value the source has anyway is no conflict.
    args = build_parser().parse_args(["pretrain", "--output", str(out), "--set", f"init_image={tmp_path / 'vit'}",
                                      "--set", "model.image.dropout=0.2", "--set", "init_text=minilm",
                                      "--set", "model.text.attention_dropout=0.3", "--set", "model.text.num_layers=6",
                                      "--set", "model.image.image_size=48"])
    cfg = settings(args)
    assert (cfg.model.image.dropout, cfg.model.text.attention_dropout) == (0.2, 0.3)


def test_dinov2_with_registers_resizes_its_positions_as_transformers_does_at_run_time(tmp_path):
    # Run below its trained size (DINO's local crops): transformers' table is resized with
    # antialiasing for this family, and so is ours, not only when the tower is loaded. (Kept at
    # the tower's own 56 px, our table is its table; at another size it is resized once at load.)
    ref = write_tower(tmp_path, "dinov2-registers")
    pm = PretrainingModel(flava_config())
    initialise_encoders(pm, image=str(tmp_path), image_size=56)
    assert pm.model.config.image.pos_antialias
    side = 32
    x = pixels(side, seed=3)
    with torch.no_grad():
        ours = pm.model.image_encoder.eval()(x, interpolate_pos_encoding=True)
        want = reference(ref, "dinov2-registers")(pixel_values=x)
    torch.testing.assert_close(ours.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    # A model built at that size from a checkpoint of this one (a stage's) resizes the table as
    # the checkpoint's encoder would, and keeps doing so.
    pm.model.save_pretrained(tmp_path / "stage")
    cfg = flava_config()
    cfg.image = dataclasses.replace(pm.model.config.image, image_size=side, pos_antialias=False,
                                    image_mean=list(CLIP_MEAN))
    cfg = follow_image_tower(cfg, str(tmp_path / "stage"))
    assert cfg.image.pos_antialias and cfg.image.image_mean == pm.model.config.image.image_mean
    joint = PretrainingModel(cfg)
    initialise_encoders(joint, image=str(tmp_path / "stage"))
    with torch.no_grad():
        again = joint.model.image_encoder.eval()(x)
    torch.testing.assert_close(again.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)

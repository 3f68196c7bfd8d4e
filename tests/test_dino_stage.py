"""Stage `image-dino`: DINO self-distillation of the image encoder in the training loop: the loss
falls on the demo images, a resumed run repeats the uninterrupted one (teacher and center
included), a joint run takes the teacher's encoder, a transformers ViT starts the stage, and a
typo in the dino section is one clear line."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import randomize_

from flava.cli import main as cli
from flava.train.config import TrainConfig
from flava.train.presets import demo_config
from flava.train.run import saved_settings
from flava.train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def dino_config(**over) -> TrainConfig:
    """A tiny DINO stage on the packaged demo images (no data named), 32 px."""
    cfg = demo_config(stage="image-dino")
    cfg.model.image.image_size = 32
    d = cfg.dino
    d.out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.local_crops = 128, 64, 16, 2
    cfg.data.batch_size, cfg.data.num_workers = 8, 0
    cfg.max_steps, cfg.save_every, cfg.log_every = 6, 3, 1
    cfg.optim.warmup_steps = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def teacher_state(trainer):
    return {k: v.clone() for k, v in trainer.model.dino.teacher.state_dict().items()}


def settle_center(trainer, batches=40, batch_size=8):
    """Move the center to the teacher's mean output on other crops of the demo images, as DINO's
    learning-rate warm-up lets it settle before the student moves; otherwise a short run's loss
    measures the center leaving zero, not the student learning (see tests/test_dino.py)."""
    from flava.data.multicrop import collate_multicrop
    from flava.data.samples import MultiCropMaker
    from flava.data.registry import demo_source
    from flava.data.sources import open_shard

    records = open_shard(demo_source("images").shards[0]).records
    maker = MultiCropMaker(trainer.cfg.dino.crop_spec(trainer.cfg.model.image), 99)
    with torch.no_grad():
        for b in range(batches):
            crops = collate_multicrop([maker("images", records[(b * batch_size + i) * 7 % len(records)], (b, i))
                                       for i in range(batch_size)])
            trainer.model.dino.loss.update_center(trainer.model.dino.teacher(crops.global_crops))


def test_loss_falls_on_the_demo_images(tmp_path):
    cfg = dino_config(max_steps=10, save_every=10, log_every=5)
    cfg.optim.warmup_steps = 0
    d = cfg.dino
    d.lr = 1e-3 * 256 / cfg.data.batch_size  # DINO's rule scales it back to 1e-3 at this batch
    d.out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.local_crops = 256, 128, 32, 4
    trainer = Trainer(cfg, tmp_path)
    assert not trainer.stage.sample_maker().colour_on_device  # on the CPU the workers colour the crops
    settle_center(trainer)
    rows = trainer.fit()
    losses = [r["loss"] for r in rows]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    for r in rows:  # a cross-entropy is never below the entropy of its target (Gibbs)
        assert r["loss"] >= r["metrics"]["teacher_entropy"] - 1e-4
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [5, 10]
    assert set(logged[-1]["metrics"]) >= {"teacher_entropy", "kl_teacher_student", "dims_in_use", "teacher_temp",
                                          "teacher_momentum"}
    assert logged[-1]["losses"] == {"dino": pytest.approx(logged[-1]["loss"])}
    assert logged[-1]["metrics"]["teacher_momentum"] == pytest.approx(1.0)  # the cosine ends on 1


def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    full_trainer = Trainer(dino_config(), tmp_path / "full")
    full = full_trainer.fit()
    Trainer(dino_config(), tmp_path / "cut").fit(max_steps=4)  # stops after step 4; last checkpoint: 3
    # The images as sized now (shards added since, another way of sizing them): the resumed run
    # keeps the epoch its schedules started with.
    import flava.train.dino as dino_stage

    monkeypatch.setattr(dino_stage, "estimated_size", lambda source: 7 * source.known_size)
    resumed = Trainer(dino_config(), tmp_path / "cut")
    assert resumed.stage.steps_per_epoch != full_trainer.stage.steps_per_epoch
    assert resumed.resume() and resumed.step == 3
    assert resumed.stage.steps_per_epoch == full_trainer.stage.steps_per_epoch
    rest = resumed.fit()
    assert [r["step"] for r in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        for k, v in a["metrics"].items():
            assert v == pytest.approx(b["metrics"][k], abs=1e-6), k
    want, got = teacher_state(full_trainer), teacher_state(resumed)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.model.dino.loss.center, full_trainer.model.dino.loss.center, atol=1e-6,
                               rtol=0)


def test_a_joint_run_takes_the_teachers_encoder(train_data, tmp_path, capsys):
    stage = Trainer(dino_config(max_steps=2, save_every=2), tmp_path / "dino")
    stage.fit()
    # The stage is no model: said so where a model is wanted, and what to do with it.
    capsys.readouterr()
    assert cli(["export-hf", str(tmp_path / "dino"), str(tmp_path / "hf")]) == 2
    assert "is an image-dino stage: it holds DINO's image encoder alone" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert cli(["info", str(tmp_path / "dino")]) == 0
    assert "an image-dino stage, not a model" in " ".join(capsys.readouterr().out.split())
    teacher = stage.model.dino.teacher.backbone.state_dict()
    assert any(not torch.equal(v, stage.model.dino.student.backbone.state_dict()[k]) for k, v in teacher.items())

    inside = next((tmp_path / "dino" / "checkpoints").glob("step_*")) / "config.json"  # a file names its checkpoint
    cfg = demo_config(seed=1, init_image=str(inside), codebook=str(train_data / "codebook"))
    cfg.model.image.image_size = 32
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.model.codebook.hidden_size = 8
    cfg.data.pairs, cfg.data.images = [str(train_data / "pairs.csv")], [str(train_data / "img")]
    cfg.data.text, cfg.data.batch_size, cfg.data.num_workers = [str(train_data / "text.txt")], 4, 0
    joint = Trainer(cfg, tmp_path / "joint")
    assert "DINO teacher" in joint.initialised["image"]
    got = joint.model.model.image_encoder.state_dict()
    assert got.keys() == teacher.keys()
    for k, v in teacher.items():
        assert torch.equal(got[k], v), k


def test_a_transformers_vit_starts_the_stage(tmp_path):
    vit_cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, image_size=32, patch_size=8, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    vit = randomize_(transformers.ViTModel(vit_cfg))
    vit.save_pretrained(tmp_path / "vit")
    trainer = Trainer(dino_config(init_image=str(tmp_path / "vit"), max_steps=1), tmp_path / "run")
    assert "ViT" in trainer.initialised["image"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vit(pixel_values=pixels).last_hidden_state
        for net in (trainer.model.dino.student, trainer.model.dino.teacher):
            got = net.backbone.eval()(pixels).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    trainer.model.train()
    assert np.isfinite(trainer.fit()[0]["loss"])  # and it trains on from there
    # Resumed, the run is built from its own checkpoint: the tower may be gone.
    (tmp_path / "vit").rename(tmp_path / "gone")
    cfg = saved_settings(tmp_path / "run")
    cfg.max_steps = 2
    resumed = Trainer(cfg, tmp_path / "run", resume=True)
    assert resumed.resume() and resumed.step == 1
    assert [row["step"] for row in resumed.fit()] == [2]


def test_a_typo_in_the_dino_section_is_one_clear_line(tmp_path, capsys):
    base = ["pretrain", "--output", str(tmp_path / "run"), "--set", "stage=image-dino"]
    assert cli(base + ["--set", "dino.out_dimm=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dino.out_dimm" in err and "did you mean 'dino.out_dim'" in err, err
    assert cli(["config", "show", "--set", "stage=image-dino"]) == 0
    shown = capsys.readouterr().out
    assert "dino.teacher_temp" in shown and "Teacher temperature after warm-up" in shown
    # Settings that do not fit the image encoder are refused before any training, in one line.
    assert cli(base + ["--set", "model.image.image_size=32", "--set", "dino.local_crop_size=12"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dino.local_crop_size" in err and "try 16" in err, err

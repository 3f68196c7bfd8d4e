"""The pretraining loop: a run stopped after a checkpoint and resumed repeats the uninterrupted
run step for step; mixing is seeded; bad data is counted in the metrics."""

import json

import numpy as np
import pytest
import torch

import flava
from conftest import narrow, pretrain_args, tiny_run
from flava.train.config import TrainConfig
from flava.train.kinds import step_kind
from flava.train.trainer import Trainer


@pytest.fixture
def data(train_data):
    return train_data


def config(data, **over) -> TrainConfig:
    cfg = tiny_run(data, max_steps=8, save_every=3, log_every=1)
    cfg.optim.warmup_steps = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def with_dropout(data) -> TrainConfig:
    # Dropout draws from torch's global generator: resume must restore it, not only the data's.
    cfg = narrow(config(data))
    for encoder in (cfg.model.image, cfg.model.text, cfg.model.multimodal):
        encoder.dropout = 0.1
    return cfg


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(data, tmp_path):
    full = Trainer(with_dropout(data), tmp_path / "full").fit()
    assert [r["step"] for r in full] == list(range(1, 9))
    assert {r["kind"] for r in full} >= {"pairs"}

    Trainer(with_dropout(data), tmp_path / "cut").fit(max_steps=5)  # stops after step 5; last checkpoint: 3
    resumed = Trainer(with_dropout(data), tmp_path / "cut")
    assert resumed.resume() and resumed.step == 3
    rest = []
    resumed.log = rest.append
    # As `flava pretrain` runs it: the rows are logged, not also held for the run's length.
    assert resumed.fit(keep_rows=False) == [] and [r["step"] for r in rest] == [4, 5, 6, 7, 8]
    for a, b in zip(full[3:], rest):
        assert a["kind"] == b["kind"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert a["losses"].keys() == b["losses"].keys()
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))  # no step logged twice
    assert lines[-1]["skipped"].get("missing image file", 0) >= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cut" / "tensorboard")).Reload()
    # The resumed writer purges what the first run logged after its checkpoint: each step once.
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([x["loss"] for x in lines])
    assert (tmp_path / "cut" / "loss_curves.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000008"]  # keep_last = 2
    final = flava.load(tmp_path / "cut" / "checkpoints" / "step_00000008", pretraining=True)
    assert isinstance(final.model, flava.FlavaModel) and final.codebook is not None


def test_a_stop_amid_removing_an_old_checkpoint_leaves_it_whole_or_out_of_sight(data, tmp_path, monkeypatch):
    # A second signal while keep_last removed an old checkpoint in place left one with its config and
    # no weights, and the stop named the checkpoint before the one just written.
    import shutil

    from flava import stopping

    real = shutil.rmtree

    def cut(path, *args, **kwargs):  # the signal lands amid the deletion
        if path.name.startswith(".step_") and (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    stopping.tell_saves("nothing was saved", "go on with --resume")
    try:
        monkeypatch.setattr(shutil, "rmtree", cut)
        with pytest.raises(KeyboardInterrupt):
            Trainer(narrow(config(data, max_steps=4, save_every=2, keep_last=1)), tmp_path / "run").fit()
        newest = tmp_path / "run" / "checkpoints" / "step_00000004"
        assert stopping.Interrupted(2, 1.0).saves.startswith(f"saved {newest}")
    finally:
        stopping.tell_saves("", "")
        monkeypatch.setattr(shutil, "rmtree", real)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000004"]
    resumed = Trainer(narrow(config(data, max_steps=4, save_every=2, keep_last=1)), tmp_path / "run")
    assert resumed.resume() and resumed.step == 4
    assert "removed .step_00000002.old, left by a write that was killed" in resumed.notes
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_milestones_are_saved_and_kept_beside_the_newest(data, tmp_path):
    Trainer(narrow(config(data, max_steps=5, save_every=2, keep_every=3, keep_last=1)), tmp_path / "run").fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000005"]  # 3 a milestone (saved though not a save_every step), 5 the newest


@pytest.mark.slow
def test_a_resume_with_other_rates_trains_at_them(data, tmp_path):
    first = Trainer(config(data, max_steps=4, save_every=2), tmp_path / "run")
    first.fit(max_steps=2)
    unchanged = [(g["initial_lr"], g["lr"], g["betas"], g["eps"]) for g in first.optimizer.param_groups]
    same = Trainer(config(data, max_steps=4, save_every=2), tmp_path / "run")
    assert same.resume() and same.step == 2
    assert [(g["initial_lr"], g["lr"], g["betas"], g["eps"]) for g in same.optimizer.param_groups] == unchanged
    # --resume --override --set optim.lr=... (the way out of a divergence): the rate, betas and
    # eps the settings give, at the restored step of the schedule, not the saved ones.
    cfg = config(data, max_steps=4, save_every=2)
    cfg.optim.lr, cfg.optim.beta2, cfg.optim.eps = 1e-2, 0.5, 1e-6
    changed = Trainer(cfg, tmp_path / "run")
    assert changed.resume() and changed.step == 2
    for g, (initial, lr, _, _) in zip(changed.optimizer.param_groups, unchanged):
        assert g["initial_lr"] == 1e-2 and g["betas"] == (cfg.optim.beta1, 0.5) and g["eps"] == 1e-6
        assert g["lr"] == pytest.approx(lr * 1e-2 / initial, rel=1e-12) and lr > 0
    assert changed.scheduler.base_lrs == [1e-2] * len(changed.optimizer.param_groups)
    # The first resumed step logs the rate it trains at, not the saved schedule's.
    rate = changed.optimizer.param_groups[0]["lr"]
    assert changed.train_step()["lr"] == rate != unchanged[0][1]


def test_mixing_follows_the_probabilities_and_the_seed():
    kinds = ("pairs", "images", "text")
    probs = np.array([0.7, 0.15, 0.15])
    draws = [step_kind(0, s, kinds, probs) for s in range(4000)]
    assert abs(draws.count("pairs") / 4000 - 0.7) < 0.03
    assert draws == [step_kind(0, s, kinds, probs) for s in range(4000)]
    assert draws != [step_kind(1, s, kinds, probs) for s in range(4000)]


def test_bad_settings_fail_before_training(data, tmp_path):
    with pytest.raises(flava.ConfigError, match="stage"):
        Trainer(config(data, stage="everything"), tmp_path)
    cfg = config(data)
    cfg.data.pairs = [str(tmp_path / "nothing.csv")]
    with pytest.raises(flava.DataError, match="does not exist"):
        Trainer(cfg, tmp_path)


@pytest.mark.slow
def test_pretrain_command_line(data, tmp_path, capsys):
    from flava.cli import main as cli

    base = pretrain_args(data, tmp_path / "run")
    assert cli(base + ["--set", "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learning_rate'" in err and "lr, weight_decay" in err
    assert cli(base + ["--set", "optim.weight_decy=1"]) == 2
    assert "did you mean 'optim.weight_decay'" in capsys.readouterr().err
    assert cli(base + ["--max-steps", "4", "--save-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "skipped records:" in out and (tmp_path / "run" / "summary.json").is_file()
    assert "the learning rate never reaches its peak" in " ".join(out.split())  # 50 warm-up steps, fewer run
    assert cli(pretrain_args(data, tmp_path / "eq") + ["--max-steps", "2", "--set", "optim.warmup_steps=2"]) == 0
    assert "reaches its peak at the last step and never decays" in " ".join(capsys.readouterr().out.split())
    assert cli(base + ["--max-steps", "4"]) == 2  # the output already holds a run
    assert "--resume" in capsys.readouterr().err
    assert cli(base + ["--max-steps", "6", "--resume"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_stages_chain_through_encoder_initialisation(data, tmp_path):
    text_stage = Trainer(config(data, stage="text-mlm", max_steps=2, save_every=2), tmp_path / "text")
    text_stage.fit()
    joint = Trainer(config(data, seed=1, init_text=str(tmp_path / "text")), tmp_path / "joint")
    assert "text" in joint.initialised and "image" not in joint.initialised
    trained = text_stage.model.model.text_encoder.state_dict()
    for k, v in joint.model.model.text_encoder.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not torch.equal(joint.model.model.image_encoder.patch_embed.weight,
                           text_stage.model.model.image_encoder.patch_embed.weight)
    # One learning rate for all by default; init_lr_scale slows the initialised encoder alone.
    assert {g["initial_lr"] for g in joint.optimizer.param_groups} == {joint.cfg.optim.lr}
    cfg = config(data, seed=1, init_text=str(tmp_path / "text"))
    cfg.optim.init_lr_scale = 0.25
    slow = Trainer(cfg, tmp_path / "slow")
    lr = {id(p): g["initial_lr"] for g in slow.optimizer.param_groups for p in g["params"]}
    base = slow.cfg.optim.lr
    for name, p in slow.model.named_parameters():
        if p.requires_grad:
            assert lr[id(p)] == (base * 0.25 if name.startswith("model.text_encoder.") else base), name
    slow.scheduler.step()  # the schedule scales every group alike
    assert [g["lr"] / slow.optimizer.param_groups[0]["lr"] for g in slow.optimizer.param_groups] == [1, 1, 0.25, 0.25]


def test_init_lr_scaled_names_the_encoders_the_scale_applies_to(data, tmp_path):
    for stage, name in (("text-mlm", "text"), ("image-mim", "image")):
        Trainer(config(data, stage=stage, max_steps=2, save_every=2), tmp_path / name).fit()
    cfg = config(data, seed=1, init_text=str(tmp_path / "text"), init_image=str(tmp_path / "image"))
    cfg.optim.init_lr_scale, cfg.optim.init_lr_scaled = 0.1, ["text"]
    joint = Trainer(cfg, tmp_path / "joint")
    assert {"text", "image"} <= set(joint.initialised)
    lr = {id(p): g["initial_lr"] for g in joint.optimizer.param_groups for p in g["params"]}
    base = joint.cfg.optim.lr
    for name, p in joint.model.named_parameters():
        if p.requires_grad:
            assert lr[id(p)] == pytest.approx(base * 0.1 if name.startswith("model.text_encoder.") else base), name


def test_a_stage_is_pluggable_and_its_state_resumes(data, tmp_path):
    from flava.train.pretraining import PretrainingStage

    class Counting(PretrainingStage):
        """The text stage, counting its updates in state that lives beside the weights."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.updates = 0

        def after_update(self, step, finite):
            self.updates += 1
            return {**super().after_update(step, finite), "updates": float(self.updates)}

        def state_dict(self):
            return {"updates": self.updates}

        def load_state_dict(self, state):
            self.updates = state["updates"]

        def build(self):  # a build that takes no checkpoint to resume from builds as at the start
            return super().build()

    cfg = config(data, stage="text-mlm", max_steps=4, save_every=2)
    first = Trainer(cfg, tmp_path, stage=Counting(cfg))
    assert [r["metrics"]["updates"] for r in first.fit(max_steps=3)] == [1, 2, 3]
    again = Trainer(cfg, tmp_path, stage=Counting(cfg), resume=True)
    assert again.resume() and again.step == 2 and again.stage.updates == 2
    assert [r["metrics"]["updates"] for r in again.fit()] == [3, 4]


def test_steps_between_logs_wait_for_nothing_and_train_the_same(data, tmp_path, monkeypatch):
    # The same saves as the sparse run's: the logging alone differs.
    every = Trainer(narrow(config(data, save_every=8)), tmp_path / "every").fit()
    synced_at = []
    settle = Trainer._settle

    def counted(self):
        synced_at.append(self.step)
        return settle(self)

    monkeypatch.setattr(Trainer, "_settle", counted)
    sparse = Trainer(narrow(config(data, log_every=4, save_every=8)), tmp_path / "sparse").fit()
    # The host read the device only on the first, logged and saved steps; every row was filled in.
    assert synced_at == [1, 4, 8]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in sparse] == [(r["step"], r["loss"], r["grad_norm"])
                                                                     for r in every]
    logged = [json.loads(x)["step"] for x in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4, 8] and all(r["samples_per_s"] > 0 for r in sparse)


def test_a_loss_over_no_targets_is_left_out_of_the_row_not_logged_as_zero(data, tmp_path):
    # Captions so short that no token is masked: the MLM and MMM-text losses average over nothing
    # and read 0, which the rows, the summary and the curves showed as a loss that fell to 0.
    cfg = config(data, max_steps=12)
    cfg.objectives.text_mask_probability, cfg.data.mixing = 1e-9, [0.34, 0.33, 0.33]
    rows = Trainer(cfg, tmp_path / "run").fit()
    pairs = [r for r in rows if r["kind"] == "pairs"]
    assert pairs and all("mmm_text" not in r["losses"] and "itm" in r["losses"] for r in pairs)
    text = [r for r in rows if r["kind"] == "text"]
    assert text and all("mlm" not in r["losses"] for r in text)
    assert not any(k.startswith("targets/") for r in rows for k in r["metrics"])
    assert {"mim"} <= {k for r in rows if r["kind"] == "images" for k in r["losses"]}
    # A text step measured nothing at all: its loss is none (it was logged, drawn and shown as 0.0)
    # and its update is skipped (it was made of the optimizer's momentum and weight decay alone).
    assert all(r["loss"] is None and r["update_skipped"] for r in text)
    assert all(r["loss"] is not None and not r["update_skipped"] for r in rows if r["kind"] != "text")
    cfg = config(data, max_steps=3, stage="text-mlm")
    cfg.objectives.text_mask_probability = 1e-9
    trainer = Trainer(cfg, tmp_path / "text")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(r["loss"] is None for r in trainer.fit())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_a_non_finite_update_is_skipped_on_the_device(data, tmp_path):
    from flava.errors import DivergedError

    cfg = config(data, log_every=4, save_every=100, max_nonfinite_steps=2)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e30, 0, 0.0
    t = Trainer(cfg, tmp_path / "run")
    with pytest.raises(DivergedError, match="in a row"):
        t.fit()
    # The stop came at a sync point, after steps whose updates the optimizer skipped by itself.
    assert t.step in (4, 8) and t.nonfinite_steps >= 2
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_an_update_fp16s_scaler_skips_is_reported_skipped_but_is_no_divergence(data, tmp_path):
    # A loss scale far past fp16's range: the first steps' gradients overflow, the scaler skips
    # their updates and halves the scale until they fit. Those steps updated nothing (the row says
    # so; DWA, uncertainty and adaptive mixing do not count them) and are no divergence.
    cfg = config(data, precision="fp16", max_steps=3, log_every=1, max_nonfinite_steps=1)
    t = Trainer(cfg, tmp_path / "run")
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120, backoff_factor=2.0 ** -60)
    before = [p.detach().clone() for p in t.model.parameters()]
    rows = t.fit()
    assert [r["update_skipped"] for r in rows[:2]] == [True, True] and t.nonfinite_steps == 0
    assert not rows[2]["update_skipped"] and np.isfinite(rows[2]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_the_divergence_patience_goes_on_after_a_resume(data, tmp_path):
    # Steps 3 and 4 skipped, saved at 4: the resumed run has two of its max_nonfinite_steps used.
    t = Trainer(config(data, max_steps=4, save_every=100), tmp_path / "run")
    t.fit()
    t.progress.nonfinite_run = [3, 4]
    t.save()
    resumed = Trainer(config(data, max_steps=4, save_every=100), tmp_path / "run")
    assert resumed.resume() and resumed.progress.nonfinite_run == [3, 4]


def test_mixing_that_does_not_sum_to_one_is_said_to_be_proportions(data, tmp_path):
    cfg = config(data)
    cfg.data.mixing = [0.7, 0.2, 0.5]
    t = Trainer(cfg, tmp_path / "run")
    assert any("data.mixing=[0.7, 0.2, 0.5] sums to 1.4: taken as proportions, pairs 0.50" in n for n in t.notes)
    assert not any("sums to" in n for n in Trainer(config(data), tmp_path / "other").notes)


def test_a_cpu_run_in_float32_on_an_amx_cpu_is_told_of_bf16_once(data, tmp_path, monkeypatch):
    import flava.train.trainer as trainer

    said = "--set precision=bf16 ran the small preset's step 1.9x faster"
    monkeypatch.setattr(trainer, "_SAID", set())
    monkeypatch.setattr(trainer, "_cpu_multiplies_bf16", lambda: False)
    assert not any(said in n for n in Trainer(config(data), tmp_path / "a").notes)
    monkeypatch.setattr(trainer, "_cpu_multiplies_bf16", lambda: True)
    assert not any(said in n for n in Trainer(config(data, precision="bf16"), tmp_path / "b").notes)
    assert any(said in n for n in Trainer(config(data), tmp_path / "c").notes)
    assert not any(said in n for n in Trainer(config(data), tmp_path / "d").notes)  # once a process

"""`flava pretrain` as separate processes: two processes (under torchrun, or forked as it
starts them) train like one process with the global batch; a run killed with SIGKILL and resumed
repeats the uninterrupted run; a failed checkpoint write leaves the previous checkpoint usable;
the precision and memory options."""

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import flava
from conftest import narrow_args, pretrain_args, tiny_run
from zygote import Process, Ranks
from flava.train.config import TrainConfig
from flava.train.trainer import Trainer

# Seed 5 trains pairs, images, text, pairs in its first four steps.
OPTS = ["--set", "seed=5", "--set", "optim.warmup_steps=1"]


def run(args: list[str], torchrun: int = 0, plain: bool = False, ranks: int = 0) -> Process | Ranks:
    """`flava ARGS`: one process, `torchrun` processes under torchrun, or `ranks` processes of one
    group forked with the environment torchrun would give them (no launcher to start)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if ranks:
        return Ranks(["-m", "flava.cli", *args], ranks, env)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    return Process(launcher + ["-m", "flava.cli", *args], env, merge=True, plain=plain)


def finish(p: Process | Ranks) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


def train_config(data, pairs: str, **over) -> TrainConfig:
    return tiny_run(data, pairs, tensorboard=False, **over)


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode,contrastive", [("ddp", "softmax"), ("fsdp", "softmax"), ("ddp", "sigmoid"),
                                              ("fsdp", "sigmoid")])
@pytest.mark.distributed
def test_two_processes_train_like_one_process_with_the_global_batch(train_data, tmp_path, mode, contrastive):
    # AdamW with eps 1e-8 is blind to the gradient's scale and turns rounding noise in near-zero
    # gradients into whole steps of lr; eps 1e-4 makes small updates follow the gradient, so
    # the parameters check the gradients the processes averaged.
    steps = ["--max-steps", "4", *OPTS, "--set", "optim.eps=1e-4", "--set", f"objectives.contrastive={contrastive}",
             *narrow_args()]
    # torchrun itself starts a DDP and an FSDP run, whose processes each draw their own hash seed,
    # not the one-process run's (forked); the others' ranks are forked as it would start them
    # (zygote.Ranks).
    launched = (mode, contrastive) in {("ddp", "softmax"), ("fsdp", "sigmoid")}
    two = run(pretrain_args(train_data, tmp_path / "two", "pairs_clean.csv", batch_size=4) + steps
              + ["--set", f"distributed={mode}"], **(dict(torchrun=2) if launched else dict(ranks=2)))
    one = run(pretrain_args(train_data, tmp_path / "one", "pairs_clean.csv", batch_size=8) + steps)
    out = finish(two)
    finish(one)
    assert f"x 2 processes ({mode})" in out
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["kind"] for r in a] == [r["kind"] for r in b] == ["pairs", "images", "text", "pairs"]
    for x, y in zip(a, b):
        assert x["samples"] == y["samples"] == 8
        assert x["losses"].keys() == y["losses"].keys()
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)
        for name in x["losses"]:
            assert x["losses"][name] == pytest.approx(y["losses"][name], abs=1e-5), name
    wa = load_file(tmp_path / "two" / "checkpoints" / "step_00000004" / "model.safetensors")
    wb = load_file(tmp_path / "one" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert ("heads.sigmoid_contrastive.logit_bias" in wa) == (contrastive == "sigmoid")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


@pytest.mark.distributed
def test_a_process_killed_under_torchrun_leaves_the_other_one_line_naming_the_checkpoint(train_data, tmp_path):
    # The survivor's collective failed with the backend's traceback (gloo: "Connection reset by
    # peer"), which named neither the checkpoint kept nor --resume.
    ranks = run(pretrain_args(train_data, tmp_path / "r", "pairs_clean.csv", batch_size=4)
                + ["--max-steps", "400", "--save-every", "2", *OPTS], ranks=2)
    pointer = tmp_path / "r" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not pointer.is_file():
        time.sleep(0.05)
    assert pointer.is_file(), ranks.communicate(timeout=60)[0]
    ranks.children[1].send_signal(signal.SIGKILL)
    survivor = ranks.children[0]
    assert survivor.wait(timeout=120) == 2
    said = survivor.output()[0]
    assert "another process of this run ended during step" in said and "continue from it" in said, said
    assert "Traceback" not in said and "--resume" in said


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_resumes_step_for_step(train_data, tmp_path):
    steps = ["--max-steps", "8", "--save-every", "3", *OPTS]
    whole = run(pretrain_args(train_data, tmp_path / "whole") + steps, plain=True)
    cut_args = pretrain_args(train_data, tmp_path / "cut") + steps
    victim = run(cut_args)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it after step 5 (its last checkpoint is step 3)
        if log.is_file() and any(json.loads(x)["step"] >= 5 for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip())
    assert 5 <= killed_at < 8
    out = finish(run(cut_args + ["--resume"]))
    assert "resumed from step 3" in out or "resumed from step 6" in out, out
    finish(whole)
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 9))  # no step logged twice
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)
        # The same stream positions: no sample seen twice, none skipped.
        assert x["data_draws"] == y["data_draws"]


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_one(train_data, tmp_path, monkeypatch):
    cfg = train_config(train_data, "pairs.csv", save_every=2, max_steps=6)
    trainer = Trainer(cfg, tmp_path)
    trainer.fit(max_steps=2)
    real_save = torch.save

    def disk_full(obj, path, *a, **k):
        real_save(obj, path, *a, **k)  # part of the file reaches the disk, then the device is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(flava.CheckpointError, match="No space left on device.*step_00000002 is intact"):
        trainer.fit(max_steps=4)
    monkeypatch.undo()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step_00000002"]  # no half-written directory left behind
    resumed = Trainer(cfg, tmp_path)
    assert resumed.resume() and resumed.step == 2
    assert flava.load(tmp_path / "checkpoints" / "step_00000002", pretraining=True).codebook is not None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_activation_checkpointing_and_compile(train_data, tmp_path, precision):
    def cfg_with(**over):
        return train_config(train_data, "pairs_clean.csv", max_steps=3, seed=5, **over)

    plain = Trainer(cfg_with(), tmp_path / "plain").fit()
    # Recomputing activations in the backward pass changes nothing numerically.
    ckpt = Trainer(cfg_with(activation_checkpointing=True), tmp_path / "ckpt").fit()
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in ckpt], abs=1e-6)
    mixed = Trainer(cfg_with(precision=precision, compile=True, compile_backend="eager"), tmp_path / "mixed")
    rows = mixed.fit()
    for p, m in zip(plain, rows):  # close to float32, not equal
        assert m["loss"] == pytest.approx(p["loss"], rel=0.05), (p, m)
    assert (tmp_path / "mixed" / "loss_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_encoders_layer_norms_run_in_float32_under_autocast(train_data, tmp_path):
    trainer = Trainer(train_config(train_data, "pairs_clean.csv", precision="bf16"), tmp_path)
    seen = []
    for name, m in trainer.model.model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].dtype, out.dtype)))
    batch = trainer.streams["pairs"].next_batch().to(trainer.device)  # uint8 pixels become the model's inputs
    with trainer.autocast():
        out = trainer.model(batch, torch.Generator().manual_seed(0))
    # The residual stream stays float32 (float32 + bfloat16 sums), so every norm reads and writes float32.
    assert seen and all(i == o == torch.float32 for _, i, o in seen), [x for x in seen if x[1] != torch.float32]
    assert {n.split(".")[0] for n, _, _ in seen} == {"image_encoder", "text_encoder", "multimodal_encoder"}
    assert out.losses.total.dtype == torch.float32

"""`flava pretrain --recipe paper`: text-mlm, image-dino, then joint from both, in one directory."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import pretrain_args

import flava
from flava.cli import main as cli


@pytest.mark.slow
def test_the_paper_recipe_runs_its_stages_and_continues_where_it_stopped(train_data, tmp_path, capsys):
    out = tmp_path / "recipe"
    args = pretrain_args(train_data, out, pairs="pairs_clean.csv") + [
        "--recipe", "paper", "--max-steps", "2", "--stage-steps", "text-mlm=3", "--stage-steps", "image-dino=2",
        "--set", "dino.out_dim=64", "--set", "dino.head_hidden_dim=32", "--set", "dino.head_bottleneck_dim=16",
        "--set", "dino.local_crops=2"]
    assert cli(args) == 0
    text = capsys.readouterr().out
    steps = {}
    for stage in ("text-mlm", "image-dino", "joint"):
        pointer = json.loads((out / stage / "checkpoints" / "latest.json").read_text())
        steps[stage] = pointer["step"]
        settings = json.loads((out / stage / "train_config.json").read_text())
        assert settings["stage"] == stage
    assert steps == {"text-mlm": 3, "image-dino": 2, "joint": 2}
    joint = json.loads((out / "joint" / "train_config.json").read_text())
    assert joint["init_text"] == str(out / "text-mlm") and joint["init_image"] == str(out / "image-dino")
    # The joint stage names where its encoders come from (however the console wraps the line).
    assert "image encoder of its DINO teacher" in " ".join(text.split())
    rows = [json.loads(line) for line in (out / "image-dino" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]["losses"]) == {"dino"}
    assert {"teacher_entropy", "kl_teacher_student", "dims_in_use", "teacher_temp"} <= set(rows[-1]["metrics"])
    # The recipe's directory names its model: the last stage's newest checkpoint.
    from flava.io.runs import resolve

    assert resolve(out) == resolve(out / "joint") == out / "joint" / "checkpoints" / "step_00000002"
    record = json.loads((out / "recipe.json").read_text())
    assert [s["stage"] for s in record["finished"]] == ["text-mlm", "image-dino", "joint"]

    # The same command again: every stage is done, nothing is trained or rewritten.
    stamp = {s: (out / s / "checkpoints" / "latest.json").stat().st_mtime_ns for s in steps}
    assert cli(args) == 0
    assert capsys.readouterr().out.count("already finished") == 3
    assert stamp == {s: (out / s / "checkpoints" / "latest.json").stat().st_mtime_ns for s in steps}

    # A stage that later stages started from keeps its steps: they were trained from its end.
    assert cli([a if a != "text-mlm=3" else "text-mlm=4" for a in args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "other stages, steps or stage settings (stage 1: text-mlm 3 steps -> text-mlm 4 steps)" in err
    assert "a stage may be given more steps while no later stage has started" in err
    # The last stage may be lengthened: it continues from where it finished.
    longer = [a if a != "2" or args[i - 1] != "--max-steps" else "3" for i, a in enumerate(args)]
    assert cli(longer) == 0
    out_text = " ".join(capsys.readouterr().out.split())
    assert "note: stage joint lengthened from 2 to 3 steps" in out_text and out_text.count("already finished") == 2
    assert json.loads((out / "joint" / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert [s["steps"] for s in json.loads((out / "recipe.json").read_text())["finished"]] == [3, 2, 3]
    # Fewer steps than it trained: refused.
    assert cli(args) == 2
    assert "(stage 3: joint 3 steps -> joint 2 steps)" in " ".join(capsys.readouterr().err.split())
    args = longer
    assert cli(args + ["--stage-set", "text-mlm:optim.lr=1e-3"]) == 2
    assert "stage 1: text-mlm 3 steps -> text-mlm 3 steps (optim.lr=1e-3)" in " ".join(capsys.readouterr().err.split())
    # A setting every stage shares, changed after some stages trained with it: refused, named.
    assert cli(args + ["--set", "data.batch_size=3"]) == 2
    assert "started with other settings (data.batch_size: 4 -> 3)" in " ".join(capsys.readouterr().err.split())
    assert cli(args + ["--set", "log_every=2"]) == 0  # what a resume may change, it may change here
    assert cli(args[:-2] + ["--stage-steps", "video=2"]) == 2
    assert "has no stage 'video'" in capsys.readouterr().err
    # --stage-steps joint=N beside another --max-steps (both the joint stage's): the first had won unsaid.
    assert cli(args + ["--stage-steps", "joint=5"]) == 2
    assert "--stage-steps joint=5 and --max-steps 3 both give the joint stage's steps: give one" in \
        capsys.readouterr().err
    # --resume of the recipe's folder had said it "holds no run to continue".
    assert cli(["pretrain", "--output", str(out), "--resume"]) == 2
    assert "holds a recipe's stages, each a run of its own; a recipe continues by itself" in capsys.readouterr().err


def test_paper_mim_and_stage_settings(tmp_path):
    from flava.errors import ConfigError
    from flava.train.presets import demo_config
    from flava.recipes.recipe import plan

    stages = plan("paper-mim", demo_config(), tmp_path, {"image-mim": 7}, {"text-mlm": ["optim.lr=1e-3"]})
    assert [s.name for s in stages] == ["text-mlm", "image-mim", "joint"]
    text, image, joint = (s.config for s in stages)
    assert text.optim.lr == 1e-3 and image.optim.lr == joint.optim.lr == demo_config().optim.lr
    assert image.max_steps == 7 and joint.init_image == str(tmp_path / "image-mim")
    with pytest.raises(ConfigError, match="sets init_text of stage joint itself"):
        plan("paper", demo_config(), tmp_path, {}, {"joint": ["init_text=x"]})
    with pytest.raises(ConfigError, match="has no stage 'image-dino'"):
        plan("paper-mim", demo_config(), tmp_path, {}, {"image-dino": ["optim.lr=1"]})


def test_the_demo_recipes_stages_ask_the_demo_codebook_for_their_own_model_before_any_stage_trains(tmp_path,
                                                                                                  monkeypatch):
    # The joint stage starts from the image stage's output (init_image), which is not there until
    # that stage has trained: following it as a public tower ended `flava demo` at its start.
    from rich.console import Console

    from flava.recipes.recipe import DEMO_RECIPE, DEMO_STAGE_SETTINGS, DEMO_STAGE_STEPS, demo_recipe_config, plan
    from flava.train import run as run_module

    asked = []
    monkeypatch.setattr(run_module, "train_demo_codebook", lambda model, *args, **kwargs: asked.append(model))
    out = tmp_path / "run"
    stages = plan(DEMO_RECIPE, demo_recipe_config(0), out, DEMO_STAGE_STEPS, DEMO_STAGE_SETTINGS)
    assert any(s.config.init_image for s in stages)
    for stage in stages:
        run_module.ensure_demo_codebook(stage.config, out / "codebook", Console(), 0)
    assert asked and all(m.codebook_image_size == asked[0].codebook_image_size for m in asked)


@pytest.mark.slow
def test_a_recipe_guards_its_folder_checks_every_stage_first_and_continues_where_it_was_moved(train_data, tmp_path,
                                                                                              capsys):
    import shutil

    def args(out, *extra, codebook=None):
        a = pretrain_args(train_data, out) + ["--recipe", "paper-mim", "--max-steps", "2", "--stage-steps",
                                              "text-mlm=1", "--stage-steps", "image-mim=1", *extra]
        return a + (["--set", f"codebook={codebook}"] if codebook else [])

    def said(code):
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return " ".join(err.split())

    # A folder of other files is not taken over: the stages' folders would mix with them.
    out = tmp_path / "r"
    out.mkdir()
    (out / "a.txt").write_text("mine")
    assert "already holds other files (e.g. a.txt) and no recipe" in said(cli(args(out)))
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    # A setting a later stage refuses is said before the first stage trains (text-mlm had trained,
    # then the refused record kept the corrected command out).
    dino = pretrain_args(train_data, tmp_path / "d") + ["--recipe", "paper", "--stage-steps", "text-mlm=1",
                                                        "--set", "optim.contrastive_chunks=2"]
    assert "stage image-dino computes its loss over the whole batch" in said(cli(dino))
    assert not (tmp_path / "d").exists()
    # A stage that fails at its start (its data missing) before any trained: the corrected command runs.
    out = tmp_path / "s"
    assert cli(args(out, "--set", f'data.text=["{tmp_path / "gone.txt"}"]')) == 2
    capsys.readouterr()
    assert cli(args(out)) == 0
    assert "no stage of the recipe in" in " ".join(capsys.readouterr().out.split())
    # Moved, with its codebook moved too: it continues (the joint stage named its encoders' and
    # codebook's old places, which a resume does not read).
    codebook = tmp_path / "cb"
    shutil.copytree(train_data / "codebook", codebook)
    assert cli(args(tmp_path / "m", codebook=codebook)) == 0
    shutil.move(tmp_path / "m", tmp_path / "moved")
    shutil.move(codebook, tmp_path / "cb2")
    # Named anew, it must be the codebook the started stages trained with (their checkpoints hold it).
    from flava.config import preset, to_dict
    from flava.io.checkpoint import save_checkpoint

    cfg = preset("tiny")
    cfg.image.vocab_size = cfg.codebook.vocab_size = 64
    cfg.codebook.hidden_size = 8
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "other", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    capsys.readouterr()
    assert f"codebook={tmp_path / 'other'} is not the codebook stage image-mim trained with" in said(
        cli(args(tmp_path / "moved", codebook=tmp_path / "other")))
    longer = args(tmp_path / "moved", codebook=tmp_path / "cb2")
    longer[longer.index("--max-steps") + 1] = "3"
    assert cli(longer) == 0, capsys.readouterr().err
    said_out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"note: the codebook is no longer at \S+; the stages still to train read \S+cb2, the codebook "
                     r"stages image-mim and joint trained with \([0-9a-f]{16}\)", said_out), said_out
    assert json.loads((tmp_path / "moved" / "joint" / "checkpoints" / "latest.json").read_text())["step"] == 3
    # A finished stage removed (to free the disk) once the joint stage started from it is not trained again.
    shutil.rmtree(tmp_path / "moved" / "text-mlm")
    longer[longer.index("--max-steps") + 1] = "4"
    assert cli(longer) == 0
    assert "text-mlm: not there, and not needed: stage joint has started from it" in " ".join(
        capsys.readouterr().out.split())
    assert not (tmp_path / "moved" / "text-mlm").exists()
    # Stage settings name where they were given; a stage's steps are given once.
    assert "stage text-mlm's settings: unknown config key 'optim.lrr'" in said(cli(longer + [
        "--stage-set", "text-mlm:optim.lrr=3"]))
    assert "--stage-steps names stage text-mlm twice (1 and 5)" in said(cli(longer + ["--stage-steps", "text-mlm=5"]))


def test_a_copied_recipe_folder_named_relatively_keeps_the_places_its_stages_started_from(tmp_path, monkeypatch):
    import os

    from flava.config import to_dict
    from flava.io.files import write_json_atomic
    from flava.recipes.recipe import Stage, _moved_with_recipe
    from flava.train.presets import demo_config

    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "a", tmp_path / "b"
    (old / "codebook").mkdir(parents=True)  # a copy: the original is still there
    saved = demo_config()
    saved.codebook, saved.init_text = str(old / "codebook"), str(old / "text-mlm")
    (new / "joint").mkdir(parents=True)
    write_json_atomic(new / "joint" / "train_config.json", to_dict(saved))
    # As the recipe names them for `--output b`: the demo codebook absolute, the stages relative.
    now = demo_config()
    now.codebook, now.init_text = os.path.abspath("b/codebook"), "b/text-mlm"
    stage = Stage("joint", Path("b") / "joint", now)
    _moved_with_recipe(stage, Path("b"))
    assert (stage.config.codebook, stage.config.init_text) == (str(old / "codebook"), str(old / "text-mlm"))
    # Another codebook named while the one it started with is there is not taken for a move.
    stage.config.codebook = str(tmp_path / "other")
    _moved_with_recipe(stage, Path("b"))
    assert stage.config.codebook == str(tmp_path / "other")

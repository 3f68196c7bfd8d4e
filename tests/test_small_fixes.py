"""Small defects a user walkthrough found: a closed stdout, a missing GPU, configs by path or mistyped
preset, `--set model.*`, a task model's message, mistyped template sets, the confusion picture's counts,
`flava finetune --model`'s help, the end of a run without tensorboard."""

import json
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from torch import nn

import flava
from flava.cli import BROKEN_PIPE_EXIT, main
from flava.config import to_dict
from flava.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_index(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    (root / "t.txt").write_text("\n".join(f"a blue circle number {i}" for i in range(30)) + "\n")
    assert main(["embed", "--model", str(tiny_checkpoint), "--texts", str(root / "t.txt"), "--output",
                 str(root / "emb"), "--device", "cpu"]) == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(root / "idx")]) == 0
    return root / "idx"


@pytest.mark.parametrize("buffering", [1, -1], ids=["line-buffered", "block-buffered"])
@pytest.mark.parametrize("command", ["search --json", "config show"])  # a plain print(), rich's console
def test_a_closed_stdout_ends_the_command_quietly(tiny_index, monkeypatch, capsys, buffering, command):
    # `flava ... | head -c 10`: the reader is gone before the output is written (line-buffered) or flushed at
    # the end (block-buffered).
    argv = (["search", "--index", str(tiny_index), "--text", "a blue circle", "-k", "100", "--json"]
            if command == "search --json" else ["config", "show", "--config", "tiny"])
    capsys.readouterr()
    read, write = os.pipe()
    os.close(read)
    stdout = open(write, "w", buffering=buffering)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main(argv) == BROKEN_PIPE_EXIT == 141
    finally:
        monkeypatch.undo()
        stdout.close()  # stdout now points at devnull: what was left buffered goes nowhere, without an error
    assert capsys.readouterr().err == ""
    assert main(["config", "show", "--config", "tiny"]) == 0  # the console still prints to the next stdout
    assert "model.projection_dim = 128" in capsys.readouterr().out


def test_a_broken_pipe_other_than_stdout_is_not_hidden(monkeypatch):
    from flava.cli import config

    def broken(args, console):
        raise BrokenPipeError(32, "Broken pipe")  # as a data loader's worker pipe would

    monkeypatch.setattr(config, "run", broken)
    with pytest.raises(BrokenPipeError):
        main(["config", "show"])


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
@pytest.mark.parametrize("pretraining", [False, True])
def test_load_on_a_missing_gpu_says_so_in_one_line(tiny_checkpoint, monkeypatch, device, pretraining):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda(:0)?' was asked for but CUDA is not available; "
                                          r"use device='cpu'$"):
        flava.load(tiny_checkpoint, device=device, pretraining=pretraining)
    with pytest.raises(ConfigError, match=r"CUDA is not available; use device='cpu'$"):  # before the folder is read
        flava.load_task(tiny_checkpoint, device=device)
    with pytest.raises(ConfigError, match=r"device='nope' is no device"):
        flava.load(tiny_checkpoint, device="nope")
    assert flava.load(tiny_checkpoint, device="cpu").device == torch.device("cpu")


def test_flava_model_from_a_json_config_or_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = flava.preset("tiny")
    want.projection_dim = 48
    (tmp_path / "my-model").mkdir()
    path = tmp_path / "my-model" / "config.json"
    path.write_text(json.dumps(to_dict(want)))
    for spec in (str(path), path, "my-model/config.json"):
        assert flava.FlavaModel(spec).config == want
    assert flava.FlavaModel("tiny").config == flava.preset("tiny")
    with pytest.raises(ConfigError, match=r"^FlavaModel takes a FlavaConfig, a preset name \(tiny, small, base\) or "
                                          r"the path of a JSON config; got dict$"):
        flava.FlavaModel(to_dict(want))
    with pytest.raises(ConfigError, match=r"^config tiyn is neither a preset \(tiny, small, base\) nor a config file; "
                                          r"did you mean 'tiny'\?$"):
        flava.FlavaModel("tiyn")
    with pytest.raises(ConfigError, match=r"config file .*nope\.json does not exist"):
        flava.FlavaModel(tmp_path / "nope.json")


def test_init_takes_settings_as_config_show_names_them(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["init", "--config", "tiny", "--set", "model.projection_dim=64", "--set", "text.num_layers=1",
                 "--output", str(out)]) == 0
    cfg = flava.load_config(out / "config.json")
    assert (cfg.projection_dim, cfg.text.num_layers) == (64, 1)
    capsys.readouterr()
    for key in ("model.projection_dimm", "modell.projection_dim"):
        assert main(["init", "--config", "tiny", "--set", f"{key}=64", "--output", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flava init: error: unknown config key") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "other").exists()


def test_a_mistyped_preset_is_named_as_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for config, said in [
        ("tiyn", "--config tiyn is neither a preset (tiny, small, base) nor a config file; did you mean 'tiny'?"),
        ("huge", "--config huge is neither a preset (tiny, small, base) nor a config file\n"),
        ("configs/tiny", "config file configs/tiny does not exist"),
        ("tiyn.json", "config file tiyn.json does not exist"),
    ]:
        assert main(["init", "--config", config, "--output", "out"]) == 2
        assert f"flava init: error: {said}" in capsys.readouterr().err
    (tmp_path / "mine").write_text(json.dumps(to_dict(flava.preset("tiny"))))  # a file without a suffix is read
    assert main(["init", "--config", "mine", "--output", "out"]) == 0


def test_task_model_messages_take_the_right_article():
    from flava.finetune.taskmodel import TaskModel

    tm = TaskModel("image-classification", nn.Linear(2, 2), ["a", "b"], image_size=32)
    with pytest.raises(InputError, match="^an image-classification model needs images$"):
        tm.predict(texts=["a cat"])
    with pytest.raises(InputError, match="^an image-classification model takes images, not texts$"):
        tm.predict(texts=["a cat"], images=[np.zeros((32, 32, 3), np.uint8)])


def test_a_mistyped_template_set_gets_a_did_you_mean():
    from flava.evaluate.zero_shot import SHORT_TEMPLATES, parse_templates
    from flava.retrieval.classify import templates_from

    for value, near in [("shrot", "short"), ("Clp", "clip"), (" nnoe ", "none")]:
        for parse in (parse_templates, templates_from):
            with pytest.raises(ConfigError, match=rf"^template set '{value.strip()}' is unknown; did you mean "
                                                  rf"'{near}'\?"):
                parse(value)
    assert templates_from("Short") == SHORT_TEMPLATES
    assert parse_templates("a shrot {}|{}") == ("a shrot {}", "{}")  # templates given literally stay templates
    for far in ("photo", "shrot story"):  # neither near a set nor one word: a template missing its {}
        with pytest.raises(ConfigError, match="must contain exactly one {}"):
            parse_templates(far)


def test_confusion_counts_are_white_on_dark_cells(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from flava.cli.classify import _confusion_png

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its texts
    _confusion_png(np.array([[9, 1], [4, 5]]), ["cat", "dog"], tmp_path / "o_confusion.png", 0.7)
    assert (tmp_path / "o_confusion.png").is_file()
    colours = {t.get_text(): to_rgb(t.get_color()) for t in figures[0].axes[0].texts}
    white, black = (1, 1, 1), (0, 0, 0)
    assert colours == {"9": white, "5": white, "4": black, "1": black}


def test_every_commands_model_help_names_every_kind_of_model(capsys):
    # finetune's named recipes, evaluate's no hub id, embed's and classify's no recipe (all take them).
    for command in ("finetune", "evaluate", "embed", "classify", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helped = " ".join(capsys.readouterr().out.split())
        assert "--model MODEL a checkpoint directory (ours or transformers'), a run or recipe directory (its newest " \
               "checkpoint), or a Hugging Face hub id" in helped, command


def test_resizing_a_model_leaves_the_callers_config_and_other_models_alone():
    cfg = flava.preset("tiny")
    a, b = flava.FlavaModel(cfg), flava.FlavaModel(cfg)
    a.resize_image(128)
    assert a.config.image.image_size == 128 and b.config.image.image_size == cfg.image.image_size == 64
    assert tuple(b.image_encoder.pos_embed.shape) == (1, 65, 128)


def test_the_python_api_names_inputs_it_cannot_take():
    from PIL import Image

    from flava.data.processor import ImageError

    model = flava.FlavaModel("tiny").eval()
    raw = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)  # torchvision's read_image, say
    with pytest.raises(InputError, match=r"pixel_values must be a float tensor of normalised pixels; got "
                                         r"torch.uint8 values"):
        model.encode_image(raw)
    with pytest.raises(InputError, match="pixel_values must be a float tensor"):
        model(pixel_values=[Image.new("RGB", (8, 8))])
    with pytest.raises(InputError, match="attention_mask must be a tensor; got list"):
        model.encode_text(torch.tensor([[101, 2000, 102]]), [[1, 1, 1]])
    for bad, said in ((np.zeros((3, 64, 64), np.float32), r"shape \[3, 64, 64\]: .* channels last"),
                      (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
                      (np.zeros((0, 0, 3), np.uint8), r"shape \[0, 0, 3\]")):
        with pytest.raises(ImageError, match=said):
            model.encode_image(bad)
    for bad in (5, b"\x89PNG"):
        with pytest.raises(InputError, match=f"got {type(bad).__name__}"):
            model.encode_image(bad)
    codebook = flava.FlavaImageCodebook(model.config.codebook)
    for call in (codebook.token_ids, codebook):
        with pytest.raises(InputError, match="the codebook takes a .* tensor .*map_pixels; got Image"):
            call(Image.new("RGB", (64, 64)))
    # Settings that raw inputs would silently ignore (the processor makes their sizes and masks).
    with pytest.raises(InputError, match="interpolate_pos_encoding applies to a pixel tensor .* resized to the "
                                         f"model's {model.config.image.image_size} px"):
        model.encode_image(Image.new("RGB", (320, 320)), interpolate_pos_encoding=True)
    for given in (dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), dict(token_type_ids=torch.zeros(1, 3))):
        with pytest.raises(InputError, match="attention_mask and token_type_ids go with input_ids given as a tensor"):
            model.encode_text("a cat", **given)
    grey = np.zeros((64, 64, 1), np.uint8)
    assert torch.equal(model.processor.images(grey), model.processor.images(grey[..., 0]))
    # 16-bit greyscale keeps its range as an array, as it does as a PIL image (it was clipped white).
    deep = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    assert torch.equal(model.processor.images(deep), model.processor.images(Image.fromarray(deep)))


def test_processor_settings_are_checked_and_its_text_length_follows_max_length():
    processor = flava.Processor()
    processor.texts("x")
    processor.max_length = 5  # the tokenizer made for the first texts kept truncating at the old length
    assert processor.texts("one two three four five six seven eight").input_ids.shape == (1, 5)
    for settings, said in ((dict(image_size=0), "image_size must be a whole number of at least 1"),
                           (dict(image_size="224"), "image_size must be"),
                           (dict(max_length=1), "max_length must be a whole number of at least 2"),
                           (dict(image_mean=(0.5,), image_std=(0.5,)), "image_mean must be three numbers"),
                           (dict(image_std=(0.5, 0.0, 0.5)), "image_std must be three numbers, one a channel, each "
                                                             "above 0")):
        with pytest.raises(ConfigError, match=said):
            flava.Processor(**settings)


def test_a_folder_a_task_file_and_a_bad_input_are_named_by_what_they_are(tmp_path):
    from flava.finetune.heads import TextClassifier, TextHead
    from flava.finetune.taskmodel import save_task_model

    flava.FlavaModel("tiny").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt is a folder: name its config file \(.*ckpt/config.json\)"):
        flava.FlavaModel(tmp_path / "ckpt")
    from flava.errors import CheckpointError

    with pytest.raises(CheckpointError, match="flava.load takes a checkpoint or run directory, or a hub id; got "
                                              "NoneType"):
        flava.load(None)
    model = flava.FlavaModel("tiny")
    save_task_model(TextClassifier(model.text_tower(), TextHead(model.config.text.hidden_size, 2, 0.0)),
                    tmp_path / "task", tokenizer=model.processor.tokenizer, label_names=["a", "b"], max_text_length=16)
    task = flava.load_task(tmp_path / "task" / "task.json")  # a file in it, as flava.load takes one
    for bad, said in ((5, "texts must be a string or a list of them; got int"),
                      (b"hello", "texts must be a string or a list of them; got bytes")):
        with pytest.raises(InputError, match=said):
            task.predict(texts=bad)


def test_progress_written_to_a_log_is_plain_lines_every_so_often(monkeypatch):
    import io

    from rich.console import Console

    from flava import progress

    log = io.StringIO()
    console = Console(file=log, width=40, force_terminal=False)  # a log: rich drew one bar at its end, cut to fit
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    with progress.progress_bar(console) as bar:
        task = bar.add_task("steps", total=400, info="")
        for step in range(1, 301):
            bar.update(task, completed=step, info=f"loss {1 / step:.3f} (512 samples/s)")
    # Nothing until the end within the interval, then one whole line (not wrapped at 40 columns).
    assert log.getvalue().splitlines() == [log.getvalue().rstrip("\n")]
    assert re.fullmatch(r"steps 300/400, loss 0\.003 \(512 samples/s\), 0:00:0\d elapsed, about 0:00:0\d left\n",
                        log.getvalue()), log.getvalue()
    log.seek(0), log.truncate()
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line at every change, none repeated at the end
    with progress.progress_bar(console) as bar:
        task = bar.add_task("features", total=None, info="")
        for n in (8, 16):
            bar.update(task, completed=n)
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == ["features 8/?", "features 16/?"]
    log.seek(0), log.truncate()
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    with progress.progress_bar(console) as bar:  # one block, tasks in turn (evaluate's suite)
        first = bar.add_task("task a", total=2, info="")
        bar.update(first, completed=2)
        said_then = log.getvalue()
        bar.update(bar.add_task("task b", total=2, info=""), completed=1)
    assert said_then.startswith("task a 2/2, ")  # as it finished, not when the block ended
    assert log.getvalue().splitlines()[1].startswith("task b 1/2, ")


def test_a_run_names_its_tensorboard_folder_only_when_it_wrote_one(train_data, tmp_path, capsys):
    from conftest import pretrain_args

    for board in (False, True):
        out = tmp_path / f"run-{board}"
        assert main(pretrain_args(train_data, out, "pairs_clean.csv") + [
            "--max-steps", "1", "--set", f"tensorboard={str(board).lower()}", "--set", "save_every=1"]) == 0
        said = "".join(capsys.readouterr().out.split())  # rich folds long paths: every space and break taken out
        assert (out / "tensorboard").is_dir() == board
        assert str(out / "loss_curves.png") in said and (str(out / "tensorboard") in said) == board


@pytest.mark.parametrize("command, said", [
    ("prepare", "SIGINT: stopping: the units finished are kept, and a rerun finishes the rest; send it again"),
    ("embed", "SIGINT: stopping after the batch in progress: the parts finished are kept, and a rerun finishes"),
    ("train-codebook", "SIGINT: stopping at the next step, after saving; send it again (Ctrl-C) to stop at once"),
    ("ablate", "SIGINT: stopping at the next training step, or once the evaluation in progress ends, after saving"),
])
def test_a_stop_is_acknowledged_in_the_commands_own_words(command, said, monkeypatch, capfd):
    """prepare works in units and embed in parts: "stopping at the next step or part" fitted neither."""
    import importlib
    import signal

    from flava import stopping
    from flava.cli import main

    def run(args, console):  # the command's work: a stop request arrives, the command stops where it says
        os.kill(os.getpid(), signal.SIGINT)
        while not stopping.requested():
            time.sleep(0.01)
        raise stopping.Stopped(signal.SIGINT, "stopped by SIGINT")

    module = {"prepare": "prepare", "embed": "embed", "train-codebook": "codebook", "ablate": "ablate"}[command]
    monkeypatch.setattr(importlib.import_module(f"flava.cli.{module}"), "run", run)
    args = {"prepare": ["--pairs", "x.csv", "--output", "o"], "train-codebook": ["--images", "i", "--output", "o"],
            "embed": ["--model", "m", "--images", "i", "--output", "o"], "ablate": ["--output", "o"]}[command]
    assert main([command, *args]) == 130
    out = capfd.readouterr().out
    assert said in " ".join(out.split()) and "step or part" not in out


def test_signals_during_a_long_operation_are_taken_as_they_come(capfd):
    # Python runs a handler only once the main thread is back in Python: a stop sent during a step's
    # long operation was acknowledged when it ended, and a second signal 1.5 s later in the same
    # operation was lost. Here the long operation is libc's system(), which holds the main thread.
    import ctypes
    import signal
    import threading

    from flava import stopping

    seen = {}

    def send(at: float, look: bool) -> None:
        time.sleep(at)
        os.kill(os.getpid(), signal.SIGTERM)
        if look:  # while the operation runs (until 3 s): the request is known and said
            deadline = time.monotonic() + 1.2
            while not stopping.requested() and time.monotonic() < deadline:
                time.sleep(0.02)
            seen["requested"] = stopping.requested()
            os.write(1, b"MARK\n")

    with stopping.handling():
        threads = [threading.Thread(target=send, args=(0.3, True)), threading.Thread(target=send, args=(1.8, False))]
        for t in threads:
            t.start()
        began = time.monotonic()
        with pytest.raises(stopping.Interrupted) as e:
            ctypes.CDLL(None).system(b"sleep 3")
            for _ in range(100):  # the handler runs at the next bytecode: nothing here is reached
                time.sleep(0.01)
        took = time.monotonic() - began
        for t in threads:
            t.join()
    out = capfd.readouterr().out
    assert seen["requested"] == signal.SIGTERM and took >= 2.9
    assert out.index("SIGTERM: stopping at the next step") < out.index("MARK"), out
    assert e.value.signum == signal.SIGTERM and 1.2 < e.value.after < 2.0, e.value.after


def test_a_flag_and_a_set_of_one_setting_that_disagree_and_a_config_folder_are_one_line(tmp_path, capsys):
    # `--max-steps 3 --set max_steps=5` trained 3 steps, the --set dropped unsaid; `--config DIR` (a
    # folder that exists) was "settings file DIR does not exist".
    out = str(tmp_path / "run")
    for flag, key in (("--max-steps", "max_steps"), ("--save-every", "save_every")):
        code = main(["pretrain", "--output", out, flag, "3", "--set", f"{key}=5"])
        err = capsys.readouterr().err
        assert code == 2 and err.strip() == f"flava pretrain: error: {flag} 3 and --set {key}=5 disagree: give one " \
                                            "of them", err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_config.json").write_text("{}")
    code = main(["pretrain", "--output", out, "--config", str(tmp_path / "old")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" not in err, err
    assert f"--config {tmp_path / 'old'} is a directory: name a preset (tiny, small, base) or a JSON settings file " \
           f"(a run's: --config {tmp_path / 'old' / 'train_config.json'} starts a new run with them" in err, err
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path):
    # Ctrl-C in a command's first seconds (torch importing) printed a KeyboardInterrupt traceback
    # through the imports. Here the interrupt comes as `import torch` begins, as the flava script.
    import subprocess
    from pathlib import Path

    src = str(Path(flava.__file__).parents[1])
    code = "\n".join(["import sys", "sys.argv[0] = '/venv/bin/flava'", "class Ctrl_C:",
                      "    def find_spec(self, name, *rest):", "        if name == 'torch':",
                      "            raise KeyboardInterrupt", "sys.meta_path.insert(0, Ctrl_C())",
                      "from flava.cli import main"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.returncode in (130, -2) and done.stderr == "flava: interrupted while starting\n", done.stderr


@pytest.mark.slow  # two CLI processes
def test_sigterm_to_a_command_without_stopping_points_ends_it_in_one_line():
    # `flava evaluate` (or index, search...) had ended under SIGTERM without a word, exit 143 from
    # Python's default; Ctrl-C said "interrupted". It is not raised as an exception: one raised in a
    # callback from C++ (matplotlib drawing the report) came out as a TypeError traceback.
    import subprocess
    from pathlib import Path

    script = ("import os, signal, sys, time\nimport flava.cli.evaluate as ev\nfrom flava.cli import main\n"
              "def run(args, console):\n    print('working', flush=True)\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(1)\n    print('not stopped')\n"
              "ev.run = run\nsys.exit(main(['evaluate', '--model', 'm', '--suite', 'demo', '--output', 'o']))")
    src = str(Path(flava.__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 143 and done.stdout == "working\n", (done.returncode, done.stdout, done.stderr)
    assert re.fullmatch(r"flava evaluate: stopped by SIGTERM after \d+ s\n", done.stderr), done.stderr
    # A program that calls main with a SIGTERM handler of its own keeps it (it had been replaced by one
    # that ends the process, the program's clean-up never run).
    script = script.replace("ev.run = run", "signal.signal(signal.SIGTERM, lambda *_: print('own handler', flush=True))"
                                            "\nev.run = run").replace("print('not stopped')", "print('went on')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"})
    assert done.stdout == "working\nown handler\nwent on\n", (done.returncode, done.stdout, done.stderr)


@pytest.mark.slow  # a run and its resume
def test_a_run_names_its_loss_curves_only_when_it_drew_them(train_data, tmp_path, capsys):
    # A run stopped before its first logged step, then ended where it stopped (--resume --max-steps
    # at its step), had named a loss_curves.png that nothing drew: its log held no row.
    from conftest import pretrain_args

    out = tmp_path / "run"
    args = pretrain_args(train_data, out, "pairs_clean.csv") + ["--set", "log_every=1000", "--set", "save_every=2"]
    assert main(args + ["--max-steps", "3"]) == 0
    shutil.rmtree(out / "checkpoints" / "step_00000003")  # as a stop at step 2 leaves it, unlogged
    (out / "checkpoints" / "latest.json").unlink()
    (out / "metrics.jsonl").write_text("")
    (out / "loss_curves.png").unlink()
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["pretrain", "--output", str(out), "--resume", "--max-steps", "2"]) == 0
    said = "".join(capsys.readouterr().out.split())
    assert f"metricsin{out / 'metrics.jsonl'}" in said and "loss_curves.png" not in said, said
    assert not (out / "loss_curves.png").exists()


def test_a_resumes_batch_note_never_says_zero_processes():
    # A train_config.json whose batch was edited by hand to 8 against a recorded global batch of 4
    # had been said as "it was 8 on 0".
    from flava.train.run import _was

    assert _was(8, 4) == "the run's settings say 8 per process, which no number of processes makes 4"
    assert (_was(4, 4), _was(4, 8)) == ("it was 4 on 1 process", "it was 4 on 2 processes")


def test_a_lost_peers_reason_is_cut_at_a_word():
    # gloo's words had been cut mid-word: "This is typically caused by a rem)".
    from types import SimpleNamespace

    from flava.train.trainer import Trainer

    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:39822: Connection reset by "
            "peer. This is typically caused by a remote peer exiting, which may be due to an error on that side")
    owner = SimpleNamespace(run=SimpleNamespace(intact_pointer=lambda: None))
    said = str(Trainer._peer_lost(owner, RuntimeError(gloo), 10))
    reason = said.split("(", 1)[1].rsplit(")", 1)[0]
    assert reason.endswith("...") and gloo.startswith(reason[:-3]) and gloo[len(reason) - 3] in " ,.;:", said
    assert said.endswith(", before any checkpoint: run the same command again")

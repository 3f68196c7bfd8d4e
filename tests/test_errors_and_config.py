"""Configs round-trip and are strict; every bad input ends in one clear FlavaError."""

import json
import re

import pytest
import torch

import flava
from flava.cli import main as cli
from flava.config import apply_overrides, from_dict, load_config, preset, to_dict
from flava.errors import CheckpointError, ConfigError, InputError
from flava.loading import load_codebook


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.text.vocab_size = 100
    return flava.FlavaModel(cfg).eval()


@pytest.fixture
def saved(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_presets_roundtrip_through_json(name, tmp_path):
    cfg = preset(name)
    (tmp_path / "c.json").write_text(json.dumps(to_dict(cfg)))
    assert load_config(tmp_path / "c.json") == cfg


def test_base_preset_is_the_papers_model():
    cfg = preset("base")
    for enc, layers in ((cfg.image, 12), (cfg.text, 12), (cfg.multimodal, 6)):
        assert (enc.hidden_size, enc.num_heads, enc.mlp_size, enc.num_layers) == (768, 12, 3072, layers)
    assert (cfg.image.image_size, cfg.image.patch_size, cfg.codebook.vocab_size) == (224, 16, 8192)
    assert cfg.codebook_image_size == 112 and cfg.projection_dim == 768
    assert abs(cfg.logit_scale_init - 2.6592) < 1e-4


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = to_dict(preset("tiny"))
    data["image"]["hiden_size"] = 64
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown config key 'image\.hiden_size'; did you mean 'image\.hidden_size'"):
        load_config(tmp_path / "c.json")  # the whole key, as the file nests it


def test_wrong_type_and_bad_relations_are_named():
    with pytest.raises(ConfigError, match=r"text\.num_layers: expected an integer"):
        from_dict(flava.FlavaConfig, {"text": {"num_layers": "six"}})
    with pytest.raises(ConfigError, match=r"divisible"):
        flava.FlavaModel(apply_overrides(preset("tiny"), ["image.num_heads=3"]))
    with pytest.raises(ConfigError, match=r"activation"):
        flava.FlavaModel(apply_overrides(preset("tiny"), ["text.activation=swoosh"]))


def test_overrides():
    cfg = apply_overrides(preset("tiny"), ["image.image_size=96", "multimodal.use_cls_token=false",
                                           "--text.activation=gelu_tanh"])
    assert cfg.image.image_size == 96 and cfg.multimodal.use_cls_token is False
    assert cfg.text.activation == "gelu_tanh"
    with pytest.raises(ConfigError, match=r"unknown config key 'image\.patch'.*patch_size"):
        apply_overrides(cfg, ["image.patch=8"])
    with pytest.raises(ConfigError, match=r"key=value"):
        apply_overrides(cfg, ["image.patch_size"])
    with pytest.raises(ConfigError, match=r"unknown config key 'image\.patch'; did you mean 'image\.patch_size'"):
        apply_overrides(cfg, ["image.patch=8"])  # the whole key, as --set takes it
    # A key under another section than the one named: pretraining's codebook is a path, the model's a section.
    from flava.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"codebook is a value, not a section; did you mean "
                                          r"'model\.codebook\.vocab_size'"):
        apply_overrides(TrainConfig(), ["codebook.vocab_size=1024"])


def test_a_list_with_broken_json_is_named_as_such():
    from flava.train.presets import train_config

    for bad in ('data.pairs=["x.csv",', "data.mixing=[0.7,0.2"):
        with pytest.raises(ConfigError, match=r"not valid JSON .*write a list as"):
            apply_overrides(train_config("tiny"), [bad])
    assert apply_overrides(train_config("tiny"), ["data.pairs=x.csv"]).data.pairs == ["x.csv"]
    # A weighted source's mistakes are named as the source's fields, not as fitting no option.
    with pytest.raises(ConfigError, match=r"unknown config key 'data.pairs\[0\].wieght'; did you mean "
                                          r"'data\.pairs\[0\]\.weight'"):
        apply_overrides(train_config("tiny"), ['data.pairs=[{"path": "x.csv", "wieght": 1}]'])
    with pytest.raises(ConfigError, match=r"data.pairs\[0\].weight must lie in \(0, inf\)"):
        apply_overrides(train_config("tiny"), ['data.pairs=[{"path": "x.csv", "weight": -1}]'])
    # Infinity too (it became NaN once the weights were normalised: a traceback at the start), and
    # any unbounded setting's; weights near the float range's end are drawn by their proportions.
    for bad in ('data.pairs=[{"path": "x.csv", "weight": Infinity}]', "optim.lr=Infinity",
                "optim.weight_decay=Infinity"):
        with pytest.raises(ConfigError, match=r"must lie in .*inf\); got inf"):
            apply_overrides(train_config("tiny"), [bad])
    from flava.data.pipeline import KindStream

    assert KindStream("pairs", [object(), object()], [1e308, 1e308], seed=0).weights.tolist() == [0.5, 0.5]


def test_bad_images(tiny):
    s = tiny.config.image.image_size
    with pytest.raises(InputError, match=r"50x50 but the model expects 64x64"):
        tiny.encode_image(torch.randn(1, 3, 50, 50))
    with pytest.raises(InputError, match=r"4 channels.*expects 3"):
        tiny.encode_image(torch.randn(1, 4, s, s))
    with pytest.raises(InputError, match=r"\[batch, 3, H, W\]"):
        tiny.encode_image(torch.randn(3, s, s))
    with pytest.raises(InputError, match=r"not a multiple of the patch size"):
        tiny.encode_image(torch.randn(1, 3, 60, 60), interpolate_pos_encoding=True)
    assert tiny.encode_image(torch.randn(2, 3, 96, 96), interpolate_pos_encoding=True).shape == (2, 128)


def test_bad_token_ids(tiny):
    with pytest.raises(InputError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
        tiny.encode_text(torch.tensor([[1, 100, 2]]))
    with pytest.raises(InputError, match=r"token id -1"):
        tiny.encode_text(torch.tensor([[1, -1, 2]]))
    with pytest.raises(InputError, match=r"at most 64"):
        tiny.encode_text(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match=r"empty"):
        tiny.encode_text(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match=r"as many images as texts"):
        tiny.encode_multimodal(torch.randn(2, 3, 64, 64), torch.ones(3, 4, dtype=torch.long))


def test_missing_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        flava.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint"):
        flava.load(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text("{}")  # a run started, before its first save
    with pytest.raises(CheckpointError, match=r"run is a run with no checkpoint yet .*: wait for its first"):
        flava.load(tmp_path / "run")
    # A file outside any checkpoint (a table given as the codebook) is named, not its folder.
    (tmp_path / "pairs.csv").write_text("image,caption\n")
    for load in (flava.load, load_codebook):
        with pytest.raises(CheckpointError, match=r"pairs.csv is a file outside any checkpoint"):
            load(tmp_path / "pairs.csv")


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights"):
        flava.load(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        flava.load(saved)


def test_weights_unlike_their_checksums_are_refused(saved):
    # Bytes overwritten in place: the file still reads as weights (garbage ones). A checkpoint that
    # recorded its files' SHA-256 (training checkpoints do) says it is not what was written.
    from flava.io.checkpoint import write_checksums

    write_checksums(saved)
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\x7f" * 4096
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not the file that was written"):
        flava.load(saved)
    (saved / "checksums.json").unlink()  # changed on purpose: it loads (as the message says)
    flava.load(saved)


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"),
                    reason="torch before 2.5 always writes the CRC")
def test_training_state_is_written_without_the_zips_crc_its_checksum_covers_it(tmp_path, monkeypatch):
    import zipfile

    import flava.io.checkpoint as storage
    from flava.io.checkpoint import damage, save_state, write_checksums

    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.randn(4096)}}}}
    save_state(state, tmp_path / "state.pt")
    assert torch.serialization.get_crc32_options()  # the process's own setting is left as it was
    with monkeypatch.context() as m:  # and after a failed write too
        m.setattr(storage.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
        with pytest.raises(OSError):
            save_state(state, tmp_path / "other.pt")
    assert torch.serialization.get_crc32_options()
    with zipfile.ZipFile(tmp_path / "state.pt") as z:
        assert {i.CRC for i in z.infolist()} == {0}  # torch computed none
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    write_checksums(tmp_path)
    assert damage(tmp_path) is None
    data = bytearray((tmp_path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit of a tensor's bytes: the file still loads
    (tmp_path / "state.pt").write_bytes(bytes(data))
    torch.load(tmp_path / "state.pt", weights_only=True)
    assert "state.pt is not the file that was written" in damage(tmp_path)


def test_truncated_bin_file(tiny, tmp_path):
    import transformers

    from flava.interop.transformers import config_to_hf, state_dict_to_hf

    cfg = config_to_hf(tiny.config, with_codebook=False)
    transformers.FlavaConfig(**cfg).save_pretrained(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict_to_hf(tiny.state_dict(), {}, None), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin could not be read"):
        flava.load(tmp_path)


def test_shapes_disagree_with_config(saved, tiny, capsys):
    assert cli(["info", str(saved)]) == 0
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in capsys.readouterr().out.splitlines()
            if line.count("│") > 2}
    # Every tensor in a row: the projections and the temperature too, and the whole.
    assert rows["total"] == f"{sum(p.numel() for p in tiny.parameters()) / 1e6:.2f} M", rows
    data = json.loads((saved / "config.json").read_text())
    data["model"]["image"]["image_size"] = 32
    (saved / "config.json").write_text(json.dumps(data))
    wrong = r"wrong shape, e.g. image_encoder.pos_embed: checkpoint \[1, 65, 128\]"
    with pytest.raises(CheckpointError, match=wrong):
        flava.load(saved)
    capsys.readouterr()
    # `info` describes it, then says what every loader would.
    assert cli(["info", str(saved)]) == 2
    out, err = capsys.readouterr()
    assert "image 32 px" in out and err.startswith("flava info: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(wrong, err) and "Every command that loads it refuses it" in err


def test_info_says_a_codebook_or_heads_its_config_does_not_build(tmp_path, capsys):
    from flava.io.checkpoint import save_checkpoint
    from flava.objectives.pretraining import PretrainingModel

    cfg = preset("tiny")
    save_checkpoint(tmp_path / "cb", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook)).save_pretrained(tmp_path / "pm")
    assert cli(["info", str(tmp_path / "cb")]) == 0 and cli(["info", str(tmp_path / "pm")]) == 0
    for name, key, value in (("cb", "codebook", {"hidden_size": 8}), ("pm", "image", {"vocab_size": 64}),
                             ("pm", "codebook", {"hidden_size": 8})):
        data = json.loads((tmp_path / name / "config.json").read_text())
        data["model"][key].update(value)
        (tmp_path / name / "config.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert cli(["info", str(tmp_path / "cb")]) == 2
    assert "the codebook weights do not match the config" in capsys.readouterr().err
    # Heads only pretraining reads: a note (embed, classify and the rest load the model alone).
    assert cli(["info", str(tmp_path / "pm")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"note: .*the (mim|mmm_image) head weights do not match the config: .* wrong shape", out)
    assert re.search(r"note: .*the codebook weights do not match the config: .* wrong shape", out)  # each part
    assert "Pretraining from it (init=, codebook=, load(pretraining=True), export-hf --as pretraining) " \
           "refuses it" in out
    flava.load(tmp_path / "pm")


def test_config_with_unknown_key_in_checkpoint(saved):
    data = json.loads((saved / "config.json").read_text())
    data["model"]["text"]["num_layer"] = 2
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"text\.num_layer.*num_layers"):
        flava.load(saved)


def test_cli_reports_one_line_not_a_traceback(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flava info: error: checkpoint") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_failed_save_keeps_the_previous_checkpoint(tiny, saved, monkeypatch):
    import flava.io.checkpoint as storage

    before = (saved / "model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "save_file", disk_full)
    with pytest.raises(OSError):
        tiny.save_pretrained(saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]
    flava.load(saved)


def test_int8_embeddings_stay_close(saved):
    fp32, int8 = flava.load(saved), flava.load(saved, quantize="int8")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 64, 64, generator=g)
    ids = torch.randint(1, 100, (4, 9), generator=g)
    with torch.no_grad():
        assert (fp32.encode_image(pixels) * int8.encode_image(pixels)).sum(-1).min() > 0.995
        assert (fp32.encode_text(ids) * int8.encode_text(ids)).sum(-1).min() > 0.995
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    with pytest.raises(ConfigError, match=r"int4"):
        flava.load(saved, quantize="int4")


def test_saving_never_overwrites_a_directory_of_other_files(tiny, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        tiny.save_pretrained(tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"
    tiny.save_pretrained(tmp_path / "ckpt")
    tiny.save_pretrained(tmp_path / "ckpt")  # replacing an earlier checkpoint is fine


def test_an_int8_model_says_it_cannot_be_saved(tmp_path, capsys):
    from flava.model.quantize import quantize_int8

    with pytest.raises(InputError, match="quantized to int8, which is for inference and cannot be saved"):
        quantize_int8(flava.FlavaModel(preset("tiny"))).save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"flava {flava.__version__}"


def test_the_progress_bar_says_an_unknown_total_as_unknown():
    import io

    from rich.console import Console

    from flava.progress import progress_bar

    for terminal, said in ((True, " 3/? "), (False, "computing features 3/?, ")):  # a bar; a log's lines
        console = Console(file=io.StringIO(), width=100, force_terminal=terminal, color_system=None)
        with progress_bar(console) as bar:
            task = bar.add_task("computing features", total=None, info="")
            bar.update(task, completed=3)
        assert said in console.file.getvalue() and "None" not in console.file.getvalue()


def test_resize_image_refuses_sizes_that_are_no_positive_multiple_of_the_patch():
    model = flava.FlavaModel(preset("tiny"))
    before = model.image_encoder.pos_embed.shape
    for bad in (0, -8, 4, 100, 64.0, True):
        with pytest.raises(InputError, match=r"image size .*(positive multiple|not a multiple) of the patch size 8"):
            model.resize_image(bad)
    assert model.image_encoder.pos_embed.shape == before and model.config.image.image_size == 64
    model.resize_image(96)
    assert model.config.image.image_size == 96


def test_a_public_tower_named_as_a_model_is_said_to_be_one_with_how_to_start_from_it(tmp_path, capsys):
    from conftest import require

    transformers = require("transformers")
    enc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(transformers.ViTConfig(**enc, image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    transformers.BertModel(transformers.BertConfig(**enc)).save_pretrained(tmp_path / "bert")
    (tmp_path / "t.csv").write_text("text,label\na match,sport\na song,music\na goal,sport\nan album,music\n")
    capsys.readouterr()  # transformers' progress bars
    vit, bert = tmp_path / "vit", tmp_path / "bert"
    with pytest.raises(CheckpointError, match=rf"{vit} is a ViT image tower .*not a FLAVA model: .* init_image={vit}$"):
        flava.load(vit)
    with pytest.raises(CheckpointError, match=rf"{bert} is a bert text tower .*BERT-like.* --set init_text={bert}$"):
        flava.load(bert)
    for args in (["info", str(vit)], ["evaluate", "--model", str(vit), "--suite", "demo", "--output", f"{tmp_path}/e"],
                 ["finetune", "--model", str(vit), "--task", "text-classification", "--train", f"{tmp_path}/t.csv",
                  "--output", str(tmp_path / "f")]):
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert "ViT image tower" in err and f"init_image={vit}" in err and len(err.strip().splitlines()) == 1, err
    # A folder that is no checkpoint at all: a tower is named as what pretraining starts from, not as a model.
    (tmp_path / "notes").mkdir()
    assert cli(["info", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert "a transformers FLAVA directory or a hub id (pretraining's init_image and init_text also take" in err, err


def test_init_image_size_without_init_image_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "iis"
    code = cli(["pretrain", "--output", str(out), "--set", "init_image_size=96", "--set", "stage=text-mlm",
                "--max-steps", "1", "--set", "data.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "init_image_size=96 applies to init_image" in err and "set init_image, or drop init_image_size" in err
    assert not out.exists()


def test_a_demo_codebook_of_another_vocabulary_than_the_heads_is_refused_before_any_work(tmp_path, capsys):
    # Its training had changed model.image.vocab_size to the codebook's, unsaid; then it was
    # refused only after minutes of codebook training.
    # A recipe and an ablation likewise, before they record their settings (a corrected command was
    # then refused as one with other settings).
    out = tmp_path / "vocab"
    for command in (["pretrain", "--config", "tiny", "--max-steps", "1"], ["pretrain", "--recipe", "paper"],
                    ["ablate", "--steps", "1", "--rows", "mim"]):
        code = cli([*command, "--output", str(out), "--set", "model.codebook.vocab_size=64"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "model.image.vocab_size=512 but model.codebook.vocab_size=64: the MIM/MMM heads predict the " \
               "codebook's tokens; set both alike" in err
        assert not out.exists()


def test_a_new_run_given_a_codebook_of_fewer_tokens_is_told_to_size_its_heads(tmp_path, capsys):
    # A checkpoint's heads may predict more classes than its codebook has (transformers takes it);
    # a new model's are sized to the codebook instead of leaving classes no token names.
    from flava.io.checkpoint import save_checkpoint

    cfg = preset("tiny")
    cfg.codebook.vocab_size = 64
    save_checkpoint(tmp_path / "cb", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    out = tmp_path / "run"
    code = cli(["pretrain", "--config", "tiny", "--max-steps", "1", "--output", str(out), "--set",
                f"codebook={tmp_path / 'cb'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the image codebook has 64 tokens but the MIM/MMM heads would predict image.vocab_size=512; set " \
           "model.image.vocab_size=64" in err, err


def test_a_mixing_the_stage_refuses_is_refused_before_the_demo_codebook_trains(tmp_path, capsys, monkeypatch):
    # Said only after minutes of demo codebook training, leaving the codebook and a lock behind.
    from flava.train import run as run_module

    def trained(*args, **kwargs):
        raise AssertionError("the demo codebook was trained first")

    monkeypatch.setattr(run_module, "train_demo_codebook", trained)
    out = tmp_path / "mix"
    code = cli(["pretrain", "--output", str(out), "--set", "data.mixing=[0,0,0]", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.mixing gives the pairs, images, text data of stage joint no weight" in err
    assert not out.exists()


def test_config_show_refuses_what_pretrain_refuses_of_the_settings_alone(capsys):
    # It listed them, exit 0, where every other command refuses them.
    for setting, said in (("model.image.num_heads=3", "image.hidden_size (128) must be divisible by image.num_heads"),
                          ("data.mixing=[0.5,0.5]", "data.mixing needs three non-negative probabilities"),
                          ("data.mixing=[0,0,0]", "gives the pairs, images, text data of stage joint no weight")):
        code = cli(["config", "show", "--set", setting])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, (setting, err)


def test_a_weighted_source_without_its_path_is_one_line(tmp_path, capsys):
    # A TypeError traceback ("missing 1 required positional argument: 'path'"), and a list's wrong
    # item was said to fit none of "<class 'flava.train.config.SourceSpec'>".
    for setting, said in (('data.pairs=[{"weight":2}]', 'data.pairs[0]: {"weight": 2} has no \'path\', which it needs'),
                          ("data.pairs=[5]", "data.pairs[0]: 5 fits none of a string, an object of path, weight")):
        code = cli(["config", "show", "--set", setting])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, (setting, err)
    (tmp_path / "c.json").write_text('{"preset": "tiny", "data": {"images": [{"weight": 1}]}}')
    code = cli(["pretrain", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and 'data.images[0]: {"weight": 1} has no \'path\'' in err and not (tmp_path / "run").exists()


def test_a_hub_id_without_its_owner_is_looked_up_as_one(tmp_path, monkeypatch, capsys):
    import shutil

    from conftest import require

    from flava.train.init import resolve_source, text_source

    transformers = require("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # Not in the cache: said as a missing directory and as a hub id (the offline cache's message).
    with pytest.raises(CheckpointError, match=r"^checkpoint directory tiny-bert does not exist; as a hub id: model "
                                              r"'tiny-bert' is not in .* HF_HUB_OFFLINE is set"):
        resolve_source("tiny-bert")
    assert cli(["pretrain", "--output", "typo", "--set", "init_text=nope"]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist; as a hub id: model 'nope'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "typo").exists()
    # In the cache (huggingface_hub's layout for an id without owner): found there, as owner/name ids are.
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32)).save_pretrained(tmp_path / "bert")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tmp_path / "bert", repo / "snapshots" / commit)
    assert resolve_source("tiny-bert") == repo / "snapshots" / commit
    assert text_source("tiny-bert").tower == "bert"


def test_the_resume_help_names_every_setting_a_resume_may_change():
    # The help had named 8 of the 12 (keep_every and the data cache and outage settings were missing).
    from flava.cli.pretrain import RESUMABLE_HELP
    from flava.train.run import RESUMABLE

    assert set(RESUMABLE_HELP.split(", ")) == RESUMABLE


def test_pretrains_settings_file_names_the_model_for_train_codebook_prepare_and_init(tmp_path, capsys):
    # `{"preset": ..., "model": {...}}` had been refused ("unknown config key 'preset'") by these commands.
    from flava.config import config_from, to_dict
    from flava.train.presets import model_settings, train_config

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"preset": "tiny", "model": {"codebook": {"vocab_size": 128}}, "seed": 3}))
    model = model_settings(str(settings))
    assert model.codebook.vocab_size == 128 and to_dict(model) == to_dict(train_config(str(settings)).model)
    (tmp_path / "model.json").write_text(json.dumps(to_dict(config_from("tiny"))))
    assert to_dict(model_settings(str(tmp_path / "model.json"))) == to_dict(config_from("tiny"))
    assert cli(["init", "--config", str(settings), "--output", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["codebook"]["vocab_size"] == 128
    capsys.readouterr()
    assert cli(["train-codebook", "--config", str(settings), "--output", str(tmp_path / "cb"), "--images",
                str(tmp_path / "none")]) == 2
    assert "none does not exist" in capsys.readouterr().err  # past --config: the settings were read


def test_load_refuses_arguments_it_would_ignore(tmp_path):
    # device= was dropped under quantize="int8" (a CPU model came back), and codebook= without
    # pretraining=True was read by nothing.
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"quantize='int8' is for CPU inference; it cannot run on meta"):
        flava.load(tmp_path / "m", quantize="int8", device="meta")
    with pytest.raises(ConfigError, match=r"codebook= names the image codebook of a model to pretrain: it needs "
                                          r"pretraining=True"):
        flava.load(tmp_path / "m", codebook=tmp_path / "nowhere")
    assert flava.load(tmp_path / "m", quantize="int8", device="cpu") is not None


def test_pixels_in_the_wrong_form_are_refused_saying_which_form_is_taken():
    # uint8 codebook pixels (a batch not moved with .to) gave other image tokens without a word, and
    # float64 ones a dtype RuntimeError; channels-last pixels were said to have 64 channels.
    codebook = flava.FlavaImageCodebook(flava.preset("tiny").codebook).eval()
    u8 = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    for call in (codebook, codebook.token_ids):
        with pytest.raises(InputError, match=r"float tensor of pixels in \[0, 1\] mapped by .*map_pixels; got "
                                             r"torch.uint8 values \(a data batch's uint8 codebook pixels are mapped by "
                                             r"batch.to\(device\)\)"):
            call(u8)
    from flava.data.transforms import map_pixels

    x = map_pixels(u8.float() / 255)
    assert torch.equal(codebook.token_ids(x.double()), codebook.token_ids(x))
    model = flava.FlavaModel(flava.preset("tiny")).eval()
    size = model.config.image.image_size
    with pytest.raises(InputError, match=r"pixel_values are \[batch, H, W, 3\] \(channels last\); "
                                         r".*permute\(0, 3, 1, 2\)"):
        model.encode_image(torch.randn(2, size, size, 3))


def test_python_callers_inputs_in_another_form_are_taken_or_refused_in_one_line(tmp_path, monkeypatch):
    # Each had ended in a torch traceback, been iterated element by element, or been refused as
    # the wrong kind of thing.
    from PIL import Image

    from flava.objectives.pretraining import PretrainingModel
    from flava.retrieval.classify import ZeroShotClassifier

    model = flava.FlavaModel(flava.preset("tiny")).eval()
    size = model.config.image.image_size
    with pytest.raises(InputError, match=r"pixel_values holds no image \(a batch of 0\)"):
        model.encode_image(torch.randn(0, 3, size, size))
    with pytest.raises(InputError, match=r"input_ids holds no text \(a batch of 0\)"):
        model.encode_text(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"input_ids must be integer token ids as torch.long \(or int32\); got "
                                         r"torch.uint8: input_ids.long\(\)"):
        model.encode_text(torch.ones(1, 5, dtype=torch.uint8))
    import numpy as np

    assert torch.equal(model.encode_text(np.array(["a cat", "a dog"])), model.encode_text(["a cat", "a dog"]))
    assert isinstance(PretrainingModel("tiny").model, flava.FlavaModel)
    model.save_pretrained(tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config ck is a folder: name its config file"):
        flava.FlavaModel("ck")
    with pytest.raises(InputError, match=r"classes must be a list of class names; got the string 'cat,dog'"):
        ZeroShotClassifier(model, "cat,dog")
    image = Image.new("RGB", (40, 40), (200, 0, 0))
    [one] = ZeroShotClassifier(model, ["cat", "dog"]).predict(image)
    assert one.error is None and len(one.top) == 2

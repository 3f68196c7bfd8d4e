"""Loading every transformers FLAVA layout, and our export loading back into transformers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_config, randomize_, require
from PIL import Image

import flava
from flava.cli import main as cli
from flava.objectives.pretraining import PretrainingHeads
from flava.config import to_dict
from flava.errors import CheckpointError
from flava.loading import read_checkpoint
from flava.io.checkpoint import save_checkpoint

transformers = require("transformers")


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def sample(cfg: flava.FlavaConfig, batch=2, length=7):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g)
    ids = torch.randint(1, cfg.text.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    return pixels, ids, mask


@pytest.mark.parametrize("layout", ["FlavaModel", "FlavaForPreTraining", "bin", "sharded"])
def test_load_every_transformers_layout(layout, tmp_path):
    cfg = hf_config()
    if layout == "FlavaModel":
        ref = randomize_(transformers.FlavaModel(cfg))
        ref.save_pretrained(tmp_path)
    else:
        full = randomize_(transformers.FlavaForPreTraining(cfg))
        if layout == "bin":
            full.config.save_pretrained(tmp_path)
            torch.save(full.state_dict(), tmp_path / "pytorch_model.bin")
        else:
            full.save_pretrained(tmp_path, max_shard_size="50KB" if layout == "sharded" else "5GB")
        ref = full.flava
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = flava.load(tmp_path)
    pixels, ids, mask = sample(ours.config)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).multimodal_embeddings
        close(ours(pixels, ids, mask).multimodal.last_hidden_state, want)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.source == "transformers"
    if layout != "FlavaModel":
        assert len(ckpt.parts["heads"]) == len(PretrainingHeads(ckpt.config).state_dict())
        assert ckpt.parts["codebook"]


@pytest.mark.slow
def test_export_roundtrip_loads_in_transformers_with_no_missing_keys(tmp_path):
    cfg = flava.preset("tiny")
    cfg.text.vocab_size = 200
    cfg.image.vocab_size = cfg.codebook.vocab_size = 64
    torch.manual_seed(0)
    model = randomize_(flava.FlavaModel(cfg), seed=5)
    heads = randomize_(PretrainingHeads(cfg), seed=6)
    codebook = randomize_(flava.FlavaImageCodebook(cfg.codebook), seed=7)
    save_checkpoint(tmp_path / "ours", to_dict(cfg),
                    {"model": model.state_dict(), "heads": heads.state_dict(), "codebook": codebook.state_dict()},
                    extra={"objectives": {"mlm_weight": 0.5, "itm_weight": 2.0}})
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0

    ref, info = transformers.FlavaForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # The objectives' weights travel: transformers' loss is the total the checkpoint trained on.
    assert ref.config.mlm_weight == 0.5 and ref.config.itm_weight == 2.0 and ref.config.mim_weight == 1.0
    ref.eval()
    pixels, ids, mask = sample(cfg, batch=3)
    with torch.no_grad():
        r = ref.flava(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        o = model(pixels, ids, mask)
        close(o.multimodal.last_hidden_state, r.multimodal_embeddings)
        close(o.image.last_hidden_state, r.image_embeddings)
        close(o.text_embeddings, F.normalize(ref.flava.text_projection(r.text_embeddings[:, 0]), dim=-1))
        close(heads.mlm(o.text.last_hidden_state), ref.mlm_head(r.text_embeddings))
        close(heads.mmm_image(o.multimodal.image_patches), ref.mmm_image_head(r.multimodal_embeddings[:, 2 : 2 + cfg.image.num_patches]))
        close(heads.itm(o.multimodal.cls), ref.itm_head(r.multimodal_embeddings))
        x = torch.rand(2, 3, cfg.codebook_image_size, cfg.codebook_image_size)
        assert torch.equal(codebook.token_ids(x), ref.image_codebook.get_codebook_indices(x).flatten(1))

    # Its processor makes the masks and codebook views of this model's grid (transformers' defaults
    # are a 224-px model's: 14 x 14 masks and 112-px views, which its forward refused).
    proc = transformers.FlavaProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    inputs = proc(images=[image, image], text=["a red square", "two dogs"], return_tensors="pt", padding=True,
                  return_image_mask=True, return_codebook_pixels=True)
    grid = cfg.image.grid_size
    assert inputs["bool_masked_pos"].shape == (2, grid, grid) and 0 < int(inputs["bool_masked_pos"][0].sum()) <= \
        round(75 / 196 * grid * grid)
    assert inputs["codebook_pixel_values"].shape[-1] == cfg.codebook_image_size
    inputs["input_ids"] = inputs["input_ids"] % cfg.text.vocab_size  # this model's 200-token vocabulary
    with torch.no_grad():
        assert torch.isfinite(ref(**inputs, return_loss=True).loss)

    # ...and back: the exported directory loads into our model unchanged.
    back = flava.load(tmp_path / "hf")
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_export_without_heads_or_codebook(tmp_path, capsys):
    cfg = flava.preset("tiny")
    cfg.text.vocab_size = 120
    flava.FlavaModel(cfg).save_pretrained(tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--as", "pretraining"]) == 0
    assert "newly initialised" in capsys.readouterr().out
    _, info = transformers.FlavaForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # An earlier export is replaced; another model's folder, or the checkpoint itself, is not.
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32)).save_pretrained(vit)
    (vit / "NOTES.md").write_text("mine")
    before = sorted(p.name for p in vit.iterdir())
    capsys.readouterr()
    for target in (vit, tmp_path / "ours"):
        assert cli(["export-hf", str(tmp_path / "ours"), str(target)]) == 2
        err = capsys.readouterr().err
        assert "choose another output directory" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in vit.iterdir()) == before
    assert flava.load(tmp_path / "ours") is not None
    assert cli(["init", "--config", "tiny", "--output", str(vit)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds another model's config.json"):  # the library call's guard
        flava.FlavaModel(flava.preset("tiny")).save_pretrained(vit)
    weights = (tmp_path / "ours" / "model.safetensors").read_bytes()
    assert cli(["init", "--config", "tiny", "--seed", "5", "--output", str(tmp_path / "ours")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err  # ours too: it may be trained
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == weights


def test_export_replaces_an_earlier_export_and_nothing_else(tmp_path, capsys):
    """A model card added to an export, a transformers model saved by transformers, or one
    fine-tuned from the export and saved over it: refused in one line, each file left as it was
    (the folder was replaced whole with exit 0)."""
    cfg = flava.preset("tiny")
    cfg.text.vocab_size = 120
    flava.FlavaModel(cfg).save_pretrained(tmp_path / "ours")
    out = tmp_path / "hf"
    assert cli(["export-hf", str(tmp_path / "ours"), str(out)]) == 0
    assert cli(["export-hf", str(tmp_path / "ours"), str(out)]) == 0  # an earlier export alone is replaced

    def refused(target, *words):
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        capsys.readouterr()
        assert cli(["export-hf", str(tmp_path / "ours"), str(target)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    (out / "README.md").write_text("# my model card")
    refused(out, "does not write (README.md)", "move them out, export again and move them back")
    (out / "README.md").unlink()
    theirs = tmp_path / "theirs"
    transformers.FlavaModel(hf_config()).save_pretrained(theirs)
    refused(theirs, "export-hf did not write", "export to a new directory")
    transformers.FlavaModel.from_pretrained(out).save_pretrained(out)  # "fine-tuned" and saved over the export
    refused(out, "export-hf did not write")


def test_export_of_a_sigmoid_contrastive_model_carries_no_softmax_contrastive_weight(tmp_path, capsys):
    import json

    from flava.config import ObjectivesConfig

    cfg = flava.preset("tiny")
    objectives = ObjectivesConfig(contrastive="sigmoid", global_contrastive_weight=1.0)
    save_checkpoint(tmp_path / "ours", to_dict(cfg), {"model": flava.FlavaModel(cfg).state_dict(),
                                                      "heads": PretrainingHeads(cfg, objectives).state_dict()},
                    extra={"objectives": to_dict(objectives)})
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "softmax contrastive weight is exported as 0" in " ".join(capsys.readouterr().out.split())
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["global_contrastive_weight"] == 0.0 and exported["itm_weight"] == 1.0


@pytest.mark.slow
def test_export_of_encoders_loads_as_flava_model_with_its_processor(tmp_path, capsys):
    """Without heads the export is a FlavaModel: no report of unused weights, and transformers'
    FlavaProcessor reads its processor and tokenizer files and gives the same embeddings."""
    import logging

    cfg = flava.preset("tiny")
    ours = randomize_(flava.FlavaModel(cfg), seed=3)
    ours.save_pretrained(tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "FlavaModel" in capsys.readouterr().out
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        ref, info = transformers.FlavaModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any(info.values()), info
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    proc = transformers.FlavaProcessor.from_pretrained(tmp_path / "hf")
    texts = ["a red square", "two small dogs on the grass"]
    inputs = proc(text=texts, return_tensors="pt", padding=True)
    ref.eval()
    with torch.no_grad():
        theirs = F.normalize(ref.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs["attention_mask"]).pooler_output[:, 0], dim=-1)
    mine = flava.load(tmp_path / "hf").encode_text(texts)
    close(mine, theirs)
    square = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    pixels = proc(images=[square], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output[:, 0], dim=-1)
    close(flava.load(tmp_path / "hf").encode_image(square), theirs)


@pytest.mark.slow  # end to end: commands run one after another
def test_an_exports_processor_resizes_non_square_images_as_flava_does(tmp_path):
    """transformers' processor of an export resizes the shorter side and crops the centre, as flava
    does: the same pixels and embeddings on images that are not square (it squashed them to a
    square; 64 * 95 / 70 = 86.9 px, where rounding to nearest had also differed)."""
    cfg = flava.preset("tiny")
    randomize_(flava.FlavaModel(cfg), seed=3).save_pretrained(tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    proc = transformers.FlavaProcessor.from_pretrained(tmp_path / "hf")
    ref = transformers.FlavaModel.from_pretrained(tmp_path / "hf").eval()
    ours = flava.load(tmp_path / "hf")
    rng = np.random.default_rng(0)
    for h, w in ((70, 95), (95, 70), (120, 64)):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
        close(pixels, ours.processor.images([image]))
        with torch.no_grad():
            theirs = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output[:, 0], dim=-1)
        close(ours.encode_image(image), theirs)


def test_encoders_of_other_widths_export_and_the_pretraining_layout_is_refused(tmp_path, capsys):
    # transformers' FlavaModel sizes each projection by its own encoder: such a model (one started
    # from a narrower tower) had been refused whatever the layout asked for.
    cfg = flava.preset("tiny")
    cfg.text.hidden_size = 64
    cfg.text.num_heads = 2
    ours = randomize_(flava.FlavaModel(cfg), seed=3)
    ours.save_pretrained(tmp_path / "ours")
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--as", "pretraining"]) == 2
    assert "export the encoders alone (--as model), which transformers' FlavaModel holds" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert cli(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    ref = transformers.FlavaModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[101, 7, 8, 9, 102]])
    pixels = torch.randn(1, 3, cfg.image.image_size, cfg.image.image_size)
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=pixels)
        mine = ours.eval()(input_ids=ids, pixel_values=pixels)
    close(mine.text.last_hidden_state, theirs.text_embeddings)
    close(mine.multimodal.last_hidden_state, theirs.multimodal_embeddings)
    # What it cannot hold is named as a setting, not blamed on a tower the model never came from.
    for setting, said in (("image.patch_bias", "this model's image encoder has no patch bias, which transformers'"),
                          ("text.position_offset", "this model's text encoder numbers positions from 2 while")):
        cfg = flava.preset("tiny")
        part, key = setting.split(".")
        setattr(getattr(cfg, part), key, False if key == "patch_bias" else 2)
        flava.FlavaModel(cfg).save_pretrained(tmp_path / key)
        assert cli(["export-hf", str(tmp_path / key), str(tmp_path / f"hf-{key}")]) == 2
        err = capsys.readouterr().err
        assert said in err and "tower" not in err, err


def test_load_codebook_from_every_source(tmp_path):
    cfg = hf_config(codebook=dict(hidden_size=12, num_groups=2))
    full = randomize_(transformers.FlavaForPreTraining(cfg))
    full.save_pretrained(tmp_path / "pretraining")
    full.image_codebook.save_pretrained(tmp_path / "codebook")
    x = torch.rand(2, 3, 32, 32)
    want = full.image_codebook.get_codebook_indices(x).flatten(1)
    for src in ("pretraining", "codebook"):
        cb = flava.load_codebook(tmp_path / src)
        assert cb.cfg.num_groups == 2 and not any(p.requires_grad for p in cb.parameters())
        assert torch.equal(cb.token_ids(x), want), src
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "no-codebook")
    with pytest.raises(flava.CheckpointError, match="no image codebook"):
        flava.load_codebook(tmp_path / "no-codebook")


def test_export_refuses_weights_that_do_not_match_their_config(tmp_path, capsys):
    """As `flava info` and every loader refuse them, before anything is written: transformers fails
    on such an export too."""
    tiny = flava.preset("tiny")
    weights = flava.FlavaModel(tiny).state_dict()
    out = tmp_path / "hf"
    for name, edit in (("projection", lambda c: c.update(projection_dim=64)),
                       ("mlp", lambda c: c["image"].update(mlp_size=256))):
        cfg = to_dict(tiny)
        edit(cfg)
        save_checkpoint(tmp_path / name, cfg, {"model": weights})
        for layout in ("model", "pretraining"):
            assert cli(["export-hf", str(tmp_path / name), str(out), "--as", layout]) == 2
            err = capsys.readouterr().err
            assert "the model weights do not match the config" in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()
    # Heads another config built: refused where the export carries them, not where it leaves them out.
    other = flava.preset("tiny")
    other.text.vocab_size = 120
    save_checkpoint(tmp_path / "heads", to_dict(tiny),
                    {"model": weights, "heads": PretrainingHeads(other).state_dict()})
    assert cli(["export-hf", str(tmp_path / "heads"), str(out)]) == 2
    assert "mlm head weights do not match the config" in capsys.readouterr().err and not out.exists()
    assert cli(["export-hf", str(tmp_path / "heads"), str(out), "--as", "model"]) == 0
    # Weights a loader refuses as damaged.
    bad = dict(weights, logit_scale=torch.tensor(float("nan")))
    save_checkpoint(tmp_path / "nan", to_dict(tiny), {"model": bad})
    assert cli(["export-hf", str(tmp_path / "nan"), str(tmp_path / "hf-nan")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "hf-nan").exists()


def test_a_checkpoints_pixel_settings_are_one_for_every_path_and_survive_a_save(tmp_path):
    # A transformers checkpoint's preprocessor (mean and std 0.5, resized to a square: its `size` a
    # height and width) had been read in part: the processor took its statistics and cropped where
    # transformers squashes, evaluation took the config's, and transformers 5's processor_config.json
    # was not read; a save dropped a processor's statistics set in Python.
    import dataclasses
    import shutil
    import warnings

    transformers = require("transformers")
    from flava.evaluate.features import image_embeddings

    warnings.filterwarnings("ignore")
    enc = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1)
    cfg = transformers.FlavaConfig(image_config=dict(enc, image_size=32, patch_size=8),
                                   text_config=dict(enc, max_position_embeddings=40), multimodal_config=enc,
                                   projection_dim=48, hidden_size=64)
    transformers.FlavaModel(cfg).save_pretrained(tmp_path / "hf")
    ip = transformers.FlavaImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.save_pretrained(tmp_path / "hf")
    image = Image.fromarray((np.random.default_rng(0).random((40, 90, 3)) * 255).astype("uint8"))
    m = flava.load(tmp_path / "hf")
    assert m.processor.image_mean == (0.5,) * 3 and m.config.image.image_mean == [0.5] * 3
    assert torch.equal(m.processor.images([image]), ip(images=[image], return_tensors="pt")["pixel_values"])
    assert np.array_equal(m.encode_image([image]).numpy(), image_embeddings(m, [image]))
    # transformers 5 keeps the image processor inside processor_config.json.
    shutil.copytree(tmp_path / "hf", tmp_path / "hf5", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    (tmp_path / "hf5" / "processor_config.json").write_text(json.dumps({"image_processor": ip.to_dict()}))
    assert flava.Processor.from_pretrained(tmp_path / "hf5") == m.processor
    # A save keeps what the processor does; loaded again, the same embeddings.
    m.save_pretrained(tmp_path / "ours")
    again = flava.load(tmp_path / "ours")
    assert dataclasses.replace(again.processor, tokenizer_file=None) == m.processor  # the tokenizer saved beside
    assert torch.equal(again.encode_image([image]), m.encode_image([image]))
    tiny = flava.FlavaModel("tiny").eval()
    tiny.processor = flava.Processor(image_size=64, max_length=64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert tiny.config.image.image_mean == [0.5] * 3  # the config follows: every path normalises alike
    tiny.save_pretrained(tmp_path / "tiny")
    assert torch.equal(flava.load(tmp_path / "tiny").encode_image([image]), tiny.encode_image([image]))

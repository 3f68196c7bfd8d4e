"""Encoders started from other checkpoints (our stages, transformers FLAVA, transformers ViT), and
parquet / `datasets.save_to_disk` directories as data sources."""

import dataclasses
import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from conftest import hf_config, randomize_
from PIL import Image

import flava
from flava.config import FlavaConfig
from flava.data.arrow import arrow_images, arrow_pairs, arrow_text, is_arrow_spec
from flava.data.pipeline import BatchStream
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.decode import open_image
from flava.data.members import BadSample
from flava.data.sources import ImageRecord, PairRecord
from flava.errors import CheckpointError, DataError
from flava.interop.transformers import config_from_hf
from flava.interop.vit import image_config_from_vit, load_vit, read_vit
from flava.model.encoders import ImageEncoder
from flava.objectives.pretraining import PretrainingModel
from flava.config import to_dict
from flava.loading import read_checkpoint
from flava.io.checkpoint import save_checkpoint
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
    save_checkpoint(run / "checkpoints" / "step_00000010", to_dict(stage.config),
                    {"model": stage.model.state_dict(), "heads": stage.heads.state_dict()},
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


# --------------------------------------------------------------------------- parquet / save_to_disk data

SPEC = SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pair_table(n: int = 10) -> tuple[pa.Table, list]:
    """n good rows, then a corrupt image, an empty caption and a null caption."""
    images = [{"bytes": png(i), "path": f"{i}.png"} for i in range(n)]
    captions = [f"a picture number {i}" for i in range(n)]
    images += [{"bytes": png(99)[:50], "path": "cut.png"}, {"bytes": png(100), "path": None},
               {"bytes": png(101), "path": None}]
    captions += ["truncated image", "   ", None]
    return pa.table({"jpg": pa.array(images, IMAGE_TYPE), "txt": pa.array(captions, pa.string()),
                     "id": list(range(len(captions)))}), images


def test_parquet_pairs_records_decoding_and_bad_samples(tmp_path):
    table, images = pair_table()
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=4)  # 4 row groups
    src = arrow_pairs(str(tmp_path / "pairs.parquet"))
    assert src.kind == "pairs" and len(src) == 13 and not src.rejected
    assert all(isinstance(r, PairRecord) for r in src.records)
    assert [r.caption for r in src.records[9:]] == ["a picture number 9", "truncated image", "   ", ""]
    for i in np.random.default_rng(0).permutation(10):  # random access across row groups
        assert np.array_equal(np.asarray(open_image(src.records[i].image)), pixels(images[i]["bytes"])), i
    with pytest.raises(BadSample, match="unreadable image"):
        open_image(src.records[10].image)

    records = pickle.loads(pickle.dumps(src.records))  # loader workers receive records this way
    assert np.array_equal(np.asarray(open_image(records[3].image)), pixels(images[3]["bytes"]))

    s = BatchStream("pairs", src, SampleMaker(SPEC, seed=0), batch_size=4, seed=1)
    batches = [s.next_batch() for _ in range(5)]  # 20 samples: more than an epoch of 13 records
    assert all(len(b) == 4 for b in batches)
    # Every record was met; each bad one counted once as a record, each draw of it as a skip.
    assert {k: len(v) for k, v in s.bad.items()} == {"unreadable image": 1, "empty caption": 2}
    assert s.skipped["unreadable image"] >= 1 and s.skipped["empty caption"] >= 2


def test_parquet_directories_globs_column_options_and_errors(tmp_path):
    table, _ = pair_table()
    (tmp_path / "dir").mkdir()
    pq.write_table(table.slice(0, 6), tmp_path / "dir" / "train-0.parquet")
    pq.write_table(table.slice(6), tmp_path / "dir" / "train-1.parquet")
    renamed = table.rename_columns(["picture", "words", "id"])
    pq.write_table(renamed, tmp_path / "renamed.parquet")

    assert len(arrow_pairs(str(tmp_path / "dir"))) == 13
    glob_src = arrow_pairs(str(tmp_path / "dir" / "train-?.parquet"))
    assert [r.caption for r in glob_src.records] == [r.caption for r in arrow_pairs(str(tmp_path / "dir")).records]
    by_query = arrow_pairs(str(tmp_path / "renamed.parquet") + "?image=picture&caption=words")
    by_keyword = arrow_pairs(str(tmp_path / "renamed.parquet"), image_column="picture", caption_column="words")
    assert [r.caption for r in by_query.records] == [r.caption for r in by_keyword.records] == \
        [r.caption for r in glob_src.records]
    # Image data names its column the same way (its "?" is no glob), through the registry as pretraining reads it.
    from flava.data.registry import image_sources

    (images,) = image_sources([str(tmp_path / "renamed.parquet?image=picture")])
    assert len(images) == 13
    texts = arrow_text(str(tmp_path / "renamed.parquet?text=words"))
    assert texts.records[:2] == ["a picture number 0", "a picture number 1"] and texts.records[-1] == ""

    with pytest.raises(DataError, match=r"no image column \(image / img / jpg / png\); its columns are "
                                        r"picture, words, id: name one with \?image=COLUMN"):
        arrow_pairs(str(tmp_path / "renamed.parquet"))
    with pytest.raises(DataError, match="has no column 'photo'; its columns are picture, words, id"):
        arrow_pairs(str(tmp_path / "renamed.parquet?image=photo&caption=words"))
    with pytest.raises(DataError, match="column 'id' holds int64; the caption must be a string"):
        arrow_pairs(str(tmp_path / "renamed.parquet?image=picture&caption=id"))
    with pytest.raises(DataError, match="'label' is not a column option for pairs"):
        arrow_pairs(str(tmp_path / "renamed.parquet?label=id"))
    with pytest.raises(DataError, match="no parquet files or datasets directory match"):
        arrow_pairs(str(tmp_path / "nothing-*.parquet"))
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="holds no rows"):
        arrow_pairs(str(tmp_path / "empty.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="could not be read as a parquet file"):
        arrow_pairs(str(tmp_path / "fake.parquet"))
    # A missing path that names its columns is said to be missing (it was "no tar shards match PATH?image=jpg").
    from flava.data.registry import open_source

    with pytest.raises(DataError, match=r"hfds does not exist \(named by .*hfds\?image=jpg&caption=txt"):
        open_source("pairs", f"{tmp_path / 'hfds'}?image=jpg&caption=txt")


def write_save_to_disk(directory, table: pa.Table, features: dict, files: int = 2, batch: int = 2) -> None:
    """The layout `Dataset.save_to_disk` writes: Arrow stream shards, state.json, dataset_info.json."""
    directory.mkdir(parents=True)
    step = -(-table.num_rows // files)
    names = []
    for i in range(files):
        name = f"data-{i:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * step, step), max_chunksize=batch)
        names.append(name)
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": directory.name}))
    (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "",
                                                             "features": features, "homepage": "", "license": ""}))


def test_save_to_disk_dataset_dict_images_paths_and_text(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "0.png").write_bytes(png(0))
    images = [{"bytes": png(i), "path": None} for i in range(7)]
    images[2] = {"bytes": None, "path": "../../files/0.png"}  # relative to the split directory
    images[3] = {"bytes": None, "path": "nowhere.png"}
    images[4] = None
    labels = [0, 1, 2, 0, 1, None, 2]
    table = pa.table({"image": pa.array(images, IMAGE_TYPE), "label": pa.array(labels, pa.int64()),
                      "text": [f"sentence {i}" for i in range(6)] + [None]})
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "fish"], "_type": "ClassLabel"},
                "text": {"dtype": "string", "_type": "Value"}}
    root = tmp_path / "ds"
    write_save_to_disk(root / "train", table, features)
    write_save_to_disk(root / "test", table.slice(0, 3), features, files=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))

    assert all(is_arrow_spec(s) for s in (str(root), f"{root}:train", f"{root}:train?image=image", str(root / "train"),
                                       "x/*.parquet", "x.parquet?caption=txt"))
    assert not any(is_arrow_spec(s) for s in ("pairs.csv", "shards/*.tar", str(tmp_path / "files")))
    with pytest.raises(DataError, match=r"holds the splits train, test; name one, e.g. .*ds:train"):
        arrow_images(str(root))
    with pytest.raises(DataError, match="has no split 'valid'; it holds train, test"):
        arrow_images(f"{root}:valid")

    src = arrow_images(f"{root}:train")
    assert len(src) == 7 and src.classes == ["cat", "dog", "fish"]
    assert all(isinstance(r, ImageRecord) for r in src.records)
    assert [r.label for r in src.records] == [0, 1, 2, 0, 1, -1, 2]
    assert np.array_equal(np.asarray(open_image(src.records[6].image)), pixels(png(6)))
    assert np.array_equal(np.asarray(open_image(src.records[2].image)), pixels(png(0)))
    # A path to no file is a missing file; a null cell no image at all (it was said to be a missing file).
    for bad, why in ((3, "missing image file"), (4, "row without an image")):
        with pytest.raises(BadSample, match=why):
            open_image(src.records[bad].image)
    assert len(arrow_images(f"{root}:test")) == 3

    s = BatchStream("images", src, SampleMaker(SPEC, seed=0), batch_size=2, seed=1)
    for _ in range(5):
        assert s.next_batch().pixel_values.shape == (2, 3, 32, 32)
    assert set(s.skipped) == {"missing image file", "row without an image"}

    text = arrow_text(f"{root}:train")
    assert text.records == [f"sentence {i}" for i in range(6)] + [""]
    t = BatchStream("text", text, SampleMaker(SPEC, seed=0), batch_size=3, seed=1)
    for _ in range(3):
        t.next_batch()
    assert set(t.skipped) == {"empty text"}

    (root / "train" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DataError, match="data file 'data-00001-of-00002.arrow' listed in state.json is missing"):
        arrow_images(f"{root}:train")

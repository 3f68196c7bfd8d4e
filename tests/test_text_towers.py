"""`init_text` from public text towers (BERT, RoBERTa, DistilBERT, MiniLM): random-weight checkpoints
written by transformers give the text encoder transformers computes, the model takes the tower's
settings and tokenizer (special ids included) and keeps them through training, saving and loading;
the packaged MiniLM is one such tower."""

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import pretrain_args, randomize_
from PIL import Image

import flava
from flava.data.batch import IGNORE_INDEX
from flava.data.masking import TextMasking
from flava.data.samples import SampleMaker, SampleSpec
from flava.data.tokenizer import TextTokenizer
from flava.errors import CheckpointError, ConfigError
from flava.evaluate.run import untrained_like
from flava.interop.text_towers import packaged_minilm, read_tower, tower_text_state
from flava.model.encoders import TextEncoder
from flava.train.config import TrainConfig
from flava.train.init import initialise_encoders, text_source
from flava.train.pretraining import PretrainingStage
from flava.train.presets import demo_config
from flava.train.trainer import Trainer

TEXTS = ["a photo of two dogs playing in the snow", "a cat", "the quick brown fox jumps over the lazy dog ."]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "two", "dog", "##s", "play", "##ing",
         "in", "the", "snow", "cat", "quick", "brown", "fox", "jump", "over", "lazy", "."]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A WordPiece vocabulary (BERT's layout, other ids) and a byte-level BPE (RoBERTa's <s>=0,
    <pad>=1, </s>=2, <unk>=3, <mask> last), as transformers writes them."""
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    (root / "wordpiece").mkdir()
    (root / "wordpiece" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 10 + ["playing dogs and cats in a photo"] * 5, vocab_size=290, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    (root / "bpe").mkdir()
    bpe.save_model(str(root / "bpe"))
    return {"wordpiece": transformers.BertTokenizer.from_pretrained(root / "wordpiece"),
            "bpe": transformers.RobertaTokenizer.from_pretrained(root / "bpe")}


def _families(tok):
    v, vr = len(tok["wordpiece"]), len(tok["bpe"])
    return {
        # With its MLM and next-sentence heads, as bert-base-uncased is stored.
        "bert": (transformers.BertForPreTraining(transformers.BertConfig(vocab_size=v, max_position_embeddings=40,
                                                                         **SMALL)), "wordpiece", "bert"),
        "roberta": (transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=vr, max_position_embeddings=42, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, hidden_act="gelu_new", **SMALL)), "bpe", None),
        "distilbert": (transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=v, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
            sinusoidal_pos_embds=True)), "wordpiece", "distilbert"),
        # all-MiniLM-L6-v2's sizes: a BertModel 6 x 384 with 12 heads.
        "minilm": (transformers.BertModel(transformers.BertConfig(
            vocab_size=v, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            max_position_embeddings=64)), "wordpiece", None),
    }


@pytest.fixture(scope="module")
def towers(tokenizers, tmp_path_factory):
    """family -> (directory, transformers model, its tokenizer), written lazily."""
    root = tmp_path_factory.mktemp("towers")
    made = {}

    def make(family):
        if family not in made:
            torch.manual_seed(0)
            model, tok, body = _families(tokenizers)[family]
            randomize_(model, seed=1)
            model.save_pretrained(root / family)
            tokenizers[tok].save_pretrained(root / family)
            made[family] = (root / family, model, tokenizers[tok], body)
        return made[family]
    return make


def stage_from(init_text, preset="tiny", **over) -> PretrainingStage:
    """A pretraining stage's model built as `flava pretrain --set init_text=...` builds it."""
    cfg = TrainConfig(model=flava.preset(preset), init_text=str(init_text))
    for k, v in over.items():
        setattr(cfg, k, v)
    stage = PretrainingStage(cfg)
    stage.build()
    return stage


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "minilm"])
def test_a_tower_gives_the_text_encoder_transformers_computes(towers, family):
    path, ref, hf_tok, body = towers(family)
    stage = stage_from(path)
    model, text = stage.model.model, stage.cfg.model.text
    assert text.norm_placement == "post" and stage.cfg.model.multimodal.hidden_size == 128  # the preset's
    assert (model.text_projection.in_features, model.text_to_mm_projection.in_features) == (text.hidden_size,) * 2
    assert (model.text_projection.out_features, model.text_to_mm_projection.out_features) == (128, 128)
    assert text.position_offset == (2 if family == "roberta" else 0)
    # The tokenizer is the checkpoint's: the same ids, padded with its own padding id.
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    ours = model.processor.texts(TEXTS)
    assert torch.equal(ours.input_ids, batch["input_ids"]) and torch.equal(ours.attention_mask, batch["attention_mask"])
    encoder = getattr(ref, body) if body else ref
    with torch.no_grad():
        theirs = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        out = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    assert len(out.hidden_states) == len(theirs.hidden_states) == ref.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, theirs.hidden_states):
        assert (a[real] - b[real]).abs().max() < 1e-5
    assert (out.last_hidden_state[real] - theirs.last_hidden_state[real]).abs().max() < 1e-5
    # Post-norm: no final LayerNorm; fusion and the contrastive CLS read the last block's output.
    assert out.pre_norm_hidden_state is out.last_hidden_state
    with torch.no_grad():  # the shortcuts (real tokens only; CLS only) compute the same
        packed = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"], skip_padding=True)
        assert (packed.last_hidden_state[real] - out.last_hidden_state[real]).abs().max() < 1e-5
        assert torch.allclose(model.encode_text(batch["input_ids"], batch["attention_mask"]),
                              model.text_embedding(out), atol=1e-6)
    assert not any(k.startswith("text_encoder.norm.") for k in model.state_dict())
    described = stage.initialised["text"]
    assert str(path) in described and "fresh: text_projection" in described
    if family in ("bert", "distilbert"):  # stored with an MLM head: it becomes FLAVA's
        assert "and MLM head taken" in described
        with torch.no_grad():
            logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = logits.prediction_logits if family == "bert" else logits.logits
            mine = stage.model.heads.mlm(out.last_hidden_state)
        assert (mine[real] - logits[real]).abs().max() < 1e-4
    else:
        assert "MLM head (it has none)" in described
    if family == "bert":
        assert "not loaded: its cls.seq_relationship" in described
    if family == "distilbert":
        assert "fresh: text_projection, pooler" in described and torch.equal(model.text_encoder.token_type_embeddings.weight,
                                                     torch.zeros(2, text.hidden_size))


def test_the_tokenizer_gives_padding_and_masking_their_ids(towers):
    path, _, hf_tok, _ = towers("roberta")
    tok = TextTokenizer(path, max_length=24)
    s = tok.special
    assert (s.cls, s.pad, s.sep, s.unk, s.mask) == (0, 1, 2, 3, hf_tok.mask_token_id) != (101, 0, 102, 100, 103)
    assert set(hf_tok.all_special_ids) <= set(s.all)
    masking = TextMasking.from_tokenizer(tok, probability=0.5)
    ordinary = set(tok.ordinary_ids().tolist())
    assert ordinary == set(range(len(hf_tok))) - set(s.all)
    ids = np.array(tok.encode_one(TEXTS[0]))
    rng = np.random.default_rng(0)
    seen_mask = seen_random = 0
    for _ in range(200):
        masked, labels = masking(ids, rng)
        chosen = labels != IGNORE_INDEX
        assert not chosen[[0, -1]].any() and (labels[chosen] == ids[chosen]).all()  # <s> and </s> never chosen
        changed = chosen & (masked != ids)
        seen_mask += int((masked[changed] == s.mask).sum())
        seen_random += int((masked[changed] != s.mask).sum())
        assert all(int(t) in ordinary for t in masked[changed & (masked != s.mask)])
    assert seen_mask > 4 * seen_random > 0
    # The training data pads with <pad> (1), not BERT's 0.
    maker = SampleMaker(SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=24,
                                   tokenizer_file=str(path)), seed=0)
    maker = pickle.loads(pickle.dumps(maker))  # as loader workers receive it
    batch = maker.collate("text", [maker("text", t, (i,)) for i, t in enumerate(TEXTS)])
    pads = batch.attention_mask == 0
    assert pads.any() and (batch.masked_input_ids[pads] == 1).all() and (batch.mlm_labels[pads] == IGNORE_INDEX).all()
    assert (batch.masked_input_ids[:, 0] == 0).all()


def test_a_tower_with_vocabulary_files_only_is_tokenised_through_transformers(towers, tokenizers, tmp_path):
    path, _, _, _ = towers("bert")
    shutil.copytree(path, tmp_path / "bert", ignore=shutil.ignore_patterns("tokenizer*"))
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(WORDS) + "\n")  # as bert-base-uncased ships it
    tok = TextTokenizer(tmp_path / "bert", max_length=24)
    assert tok(TEXTS).input_ids.tolist() == tokenizers["wordpiece"](TEXTS, padding=True)["input_ids"]
    assert (tok.special.cls, tok.special.mask) == (2, 4)
    # Weights without tokenizer files: transformers builds a vocabulary of special tokens alone
    # (every word [UNK]); refused, naming the files to copy.
    (tmp_path / "bert" / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="bert has no tokenizer files .*: copy the checkpoint's tokenizer"):
        stage_from(tmp_path / "bert")


def test_a_model_from_a_roberta_tower_trains_saves_and_loads_with_its_tokenizer(towers, train_data, tmp_path):
    path, _, hf_tok, _ = towers("roberta")
    cfg = demo_config()
    cfg.stage, cfg.init_text = "text-mlm", str(path)
    cfg.data.text, cfg.data.batch_size, cfg.data.num_workers = [str(train_data / "text.txt")], 4, 0
    cfg.data.max_text_length = 24
    cfg.max_steps = cfg.save_every = 2
    Trainer(cfg, tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (ckpt / "tokenizer.json").is_file()
    assert json.loads((ckpt / "special_tokens_map.json").read_text())["mask_token"] == "<mask>"
    model = flava.load(tmp_path / "run")
    assert (model.config.text.norm_placement, model.config.text.position_offset, model.config.text.vocab_size) == (
        "post", 2, len(hf_tok))
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    for proc in (model.processor, flava.Processor.from_pretrained(tmp_path / "run")):
        assert torch.equal(proc.texts(TEXTS).input_ids, batch["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(TEXTS), model.encode_text(batch["input_ids"], batch["attention_mask"]))
    # The untrained baseline of `evaluate --compare-untrained` reads texts as the model does (it had
    # read them as BERT uncased: ids past this vocabulary, or silently other ids in a larger one).
    fresh = untrained_like(model)
    assert torch.equal(fresh.processor.texts(TEXTS).input_ids, batch["input_ids"])
    assert not torch.equal(fresh.text_encoder.word_embeddings.weight,
                           model.text_encoder.word_embeddings.weight)
    # A joint stage started from that run takes its text encoder, its settings and its tokenizer.
    joint = stage_from(tmp_path / "run")
    assert joint.cfg.model.text == model.config.text and joint.tokenizer == str(ckpt / "tokenizer.json")
    assert "step_00000002" in joint.initialised["text"]


def test_the_packaged_minilm_is_a_text_tower():
    path = packaged_minilm()
    stage = stage_from("minilm")
    text = stage.cfg.model.text
    assert (text.hidden_size, text.num_layers, text.num_heads, text.mlp_size, text.vocab_size) == (384, 6, 12, 1536,
                                                                                                    30522)
    ref = transformers.BertModel.from_pretrained(path).eval()
    hf_tok = transformers.BertTokenizer.from_pretrained(path)
    texts = ["A man is playing a guitar on the street.", "Two dogs run through the snow", "a red square"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(stage.model.model.processor.texts(texts).input_ids, batch["input_ids"])
    with torch.no_grad():
        theirs = ref(**batch).last_hidden_state
        ours = stage.model.model.encode_text_tokens(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-5

    # A model of another vocabulary is told the setting that differs, not to download a healthy tower again.
    other = dataclasses.replace(text, vocab_size=text.vocab_size + 8)
    with pytest.raises(CheckpointError, match=r"its vocab_size is 30522, this model's is 30530; set "
                                              r"model.text.vocab_size=30522") as e:
        tower_text_state(read_tower(path), other, TextEncoder(other).state_dict())
    assert "download" not in str(e.value)

def test_what_a_text_tower_cannot_give_is_refused_in_one_line(towers, tmp_path, monkeypatch):
    electra = transformers.ElectraModel(transformers.ElectraConfig(vocab_size=30, embedding_size=16, **SMALL))
    electra.save_pretrained(tmp_path / "electra")
    with pytest.raises(CheckpointError, match=r"embeddings \(16 wide\) are projected to its 32-wide blocks"):
        text_source(str(tmp_path / "electra"))
    cfg = json.loads((towers("bert")[0] / "config.json").read_text())
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "config.json").write_text(json.dumps(dict(cfg, position_embedding_type="relative_key")))
    with pytest.raises(CheckpointError, match="position_embedding_type is 'relative_key'"):
        stage_from(tmp_path / "relative")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="'nobody/no-such-bert' is not in .* HF_HUB_OFFLINE is set"):
        stage_from("nobody/no-such-bert")
    with pytest.raises(CheckpointError, match="image encoder from .*: a bert checkpoint holds a text encoder only"):
        initialise_encoders(stage_from(towers("bert")[0]).model, image=str(towers("bert")[0]))
    # A model whose text encoder differs from init_text's cannot be kept with init.
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ConfigError, match="has another text encoder .* than init="):
        stage_from(towers("bert")[0], init=str(tmp_path / "tiny"))
    # transformers' FLAVA is pre-norm: a model from a tower cannot be exported to it.
    stage = stage_from(towers("bert")[0])
    stage.model.save_pretrained(tmp_path / "from-bert")
    from flava.interop.export import export_hf
    from flava.loading import read_checkpoint

    with pytest.raises(CheckpointError, match="post-norm .* cannot be expressed"):
        export_hf(read_checkpoint(tmp_path / "from-bert"), tmp_path / "hf")


def test_a_tower_of_fewer_positions_than_the_texts_take_is_refused_with_the_setting(towers):
    """A 40-position tower under data.max_text_length 64: refused naming the setting that fits, and
    before a start's first work (a demo codebook of minutes), not after it."""
    from flava.train.init import find_sources

    cfg = TrainConfig(model=flava.preset("tiny"), init_text=str(towers("bert")[0]))
    assert cfg.data.max_text_length == 64
    with pytest.raises(ConfigError, match=r"data.max_text_length \(64\) exceeds the 40 tokens the init_text=.*bert's "
                                          r"text encoder takes: add --set data.max_text_length=40$"):
        find_sources(cfg)
    cfg.data.max_text_length = 40
    find_sources(cfg)


def test_a_multimodal_encoder_of_another_text_width_keeps_its_text_projection_fresh(towers, tmp_path):
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "tiny")
    stage = stage_from(towers("bert")[0], init_multimodal=str(tmp_path / "tiny"))
    described = stage.initialised["multimodal"]
    assert "text_to_mm_projection keeps its initialisation (it reads 128 features there, 32 here)" in described
    theirs = flava.load(tmp_path / "tiny")
    assert torch.equal(stage.model.model.image_to_mm_projection.weight, theirs.image_to_mm_projection.weight)
    assert torch.equal(stage.model.model.multimodal_encoder.cls_token, theirs.multimodal_encoder.cls_token)


def test_a_hub_id_resolves_through_the_offline_cache(towers, tmp_path, monkeypatch):
    path, _, hf_tok, _ = towers("bert")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    stage = stage_from("acme/tiny-bert")
    assert "acme--tiny-bert" in stage.initialised["text"] and stage.cfg.model.text.hidden_size == 32
    assert torch.equal(stage.model.model.processor.texts(TEXTS).input_ids, hf_tok(TEXTS, padding=True,
                                                                                 return_tensors="pt")["input_ids"])


@pytest.mark.slow
def test_pretrain_from_the_packaged_minilm_then_evaluate_and_finetune(train_data, tmp_path, capsys):
    from flava.cli import main as cli

    run = tmp_path / "run"
    assert cli(pretrain_args(train_data, run) + ["--set", "init_text=minilm", "--max-steps", "3",
                                                 "--save-every", "3"]) == 0
    printed = capsys.readouterr().out
    assert "text encoder from the bert checkpoint" in printed and "model.text follows it" in printed
    model = flava.load(run)
    assert (model.config.text.hidden_size, model.config.text.norm_placement) == (384, "post")
    assert (run / "checkpoints" / "step_00000003" / "tokenizer.json").is_file()
    # A small suite of every text-reading kind, and a fine-tuned task model, from that checkpoint.
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "colours" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), rgb, dtype=np.uint8)).save(tmp_path / "colours" / name / f"{i}.png")
    words = {"sport": "match goal team", "music": "song band album"}
    for split, n in (("train", 12), ("test", 6)):
        lines = ["text,label"] + [f"the {words[c].split()[i % 3]} story {i},{c}" for c in words for i in range(n)]
        (tmp_path / f"text_{split}.csv").write_text("\n".join(lines) + "\n")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "t", "tasks": [
        {"kind": "zero-shot", "name": "colours", "folder": str(tmp_path / "colours"), "templates": "short"},
        {"kind": "linear-probe", "name": "topic probe", "modality": "text", "train": str(tmp_path / "text_train.csv"),
         "test": str(tmp_path / "text_test.csv")}]}))
    assert cli(["evaluate", "--model", str(run), "--suite", str(suite), "--output", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["results"][0]["tasks"]
    assert cli(["finetune", "--model", str(run), "--task", "text-classification", "--train",
                str(tmp_path / "text_train.csv"), "--output", str(tmp_path / "task"), "--epochs", "1"]) == 0
    task = flava.load_task(tmp_path / "task")
    assert task.tokenizer.vocab_size == 30522 and len(task.predict(texts=["a goal for the team"])) == 1


@pytest.mark.slow
def test_the_demo_towers_columns_are_the_joint_stage_from_minilm_and_the_same_towers_untrained(
        train_data, tmp_path, monkeypatch):
    import shutil

    from rich.console import Console
    from safetensors.torch import load_file

    import flava.recipes.recipe as recipe
    from flava.cli.demo import tower_models
    from flava.train.presets import demo_config
    from flava.train.run import run_pretrain

    def tiny(seed=0):
        c = demo_config(seed=seed)
        c.model.image.vocab_size = c.model.codebook.vocab_size = 64
        c.model.codebook.hidden_size = 8
        c.data.pairs, c.data.images = [str(train_data / "pairs_clean.csv")], [str(train_data / "img")]
        c.data.text = [str(train_data / "text.txt")]
        c.data.batch_size, c.data.num_workers, c.max_steps, c.tensorboard = 4, 0, 2, False
        c.optim.init_lr_scale, c.optim.init_lr_scaled = 0.1, ["text"]
        return c

    run_dir, console = tmp_path / "demo" / "pretrain", Console(file=open(tmp_path / "log.txt", "w"))
    shutil.copytree(train_data / "codebook", run_dir / "codebook")
    image = tiny()
    image.stage, image.max_steps, image.codebook = "image-mim", 1, str(run_dir / "codebook")
    run_pretrain(image, run_dir / "image-mim", resume=False, console=console)
    monkeypatch.setattr(recipe, "demo_recipe_config", tiny)
    (label_joint, joint, _), (label_alone, alone, _) = tower_models(tmp_path / "demo", run_dir, 0, console)
    assert (label_joint, label_alone) == ("from MiniLM", "towers alone")
    for m in (joint, alone):
        assert (m.config.text.hidden_size, m.config.text.num_layers, m.config.text.norm_placement) == (384, 6, "post")
    # The towers alone hold MiniLM's text encoder and the image stage's image encoder as they were
    # taken; the joint stage trained them.
    bert = transformers.BertModel.from_pretrained(packaged_minilm()).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        want = bert(input_ids=ids).last_hidden_state
        got = alone.text_encoder(ids, torch.ones_like(ids)).last_hidden_state
        trained = joint.text_encoder(ids, torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(trained, want, atol=1e-5)
    stage_weights = load_file(next((run_dir / "image-mim" / "checkpoints").glob("step_*")) / "model.safetensors")
    key = "model.image_encoder.patch_embed.weight"
    assert torch.equal(alone.state_dict()[key.removeprefix("model.")], stage_weights[key])
    assert (tmp_path / "demo" / "pretrain-minilm" / "checkpoints" / "latest.json").is_file()

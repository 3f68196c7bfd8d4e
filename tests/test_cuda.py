"""The CUDA lane: what must hold on a GPU host. Each test is skipped, with the reason, where CUDA
is absent (the CPU machines this project is built on); `benchmarks/gpu.py` measures the speed."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

import flava
from conftest import free_port, pretrain_args
from flava.cli import main as cli

pytestmark = pytest.mark.cuda  # conftest skips the lane, with the reason, where CUDA is absent


def small_pairs(batch: int = 4):
    from flava.data.batch import PairBatch
    from flava.data.masking import BlockMasking, TextMasking, mask_texts

    cfg = flava.preset("tiny")
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    ids = torch.randint(1000, 30000, (batch, 12), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    masked, labels = mask_texts(TextMasking(), ids, rng)
    blocks = BlockMasking.for_grid(cfg.image.grid_size)
    patch_mask = torch.from_numpy(np.stack([blocks(rng).reshape(-1) for _ in range(batch)]))
    pixels = torch.randint(0, 256, (batch, 3, cfg.image.image_size, cfg.image.image_size), dtype=torch.uint8)
    return cfg, PairBatch(pixels, ids, mask, patch_mask, masked, labels, codebook_pixels=pixels)


def test_a_bf16_step_on_cuda_is_close_to_fp32():
    from flava.objectives.pretraining import PretrainingModel

    cfg, host = small_pairs()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook)).cuda().train()
    batch = host.to("cuda")
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = pm(batch, torch.Generator("cuda").manual_seed(1))
        out.losses.total.backward()
        grad = torch.cat([p.grad.flatten().float() for p in pm.parameters() if p.grad is not None])
        losses[precision] = ({k: float(v.detach()) for k, v in out.losses.named().items()}, grad)
        pm.zero_grad(set_to_none=True)
    (fp32, g32), (bf16, g16) = losses["fp32"], losses["bf16"]
    assert fp32.keys() == bf16.keys() and len(fp32) >= 4
    for name in fp32:
        assert abs(fp32[name] - bf16[name]) <= 0.03 * abs(fp32[name]) + 0.02, (name, fp32[name], bf16[name])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98


def test_the_loader_feeds_cuda_through_pinned_memory(train_data):
    from flava.data.pipeline import BatchStream
    from flava.data.samples import SampleMaker, SampleSpec
    from flava.data.sources import csv_pairs

    spec = SampleSpec(image_size=32, codebook_image_size=32, grid=4, max_text_length=16)
    stream = BatchStream("pairs", csv_pairs(str(train_data / "pairs_clean.csv")), SampleMaker(spec, 0), 4, seed=0,
                         num_workers=1)
    host = stream.next_batch()
    pinned = host.pin_memory()
    assert pinned.pixel_values.is_pinned() and pinned.codebook_pixels is pinned.pixel_values  # one copy
    on_gpu, on_cpu = pinned.to("cuda", non_blocking=True), host.to("cpu")
    torch.cuda.synchronize()
    for name in ("pixel_values", "codebook_pixels", "input_ids", "mlm_labels", "patch_mask"):
        got, want = getattr(on_gpu, name), getattr(on_cpu, name)
        assert got.is_cuda and got.dtype == want.dtype and torch.allclose(got.cpu(), want, atol=1e-6), name
    # A codebook view smaller than the model's; channels-last pixels pinned and copied as they lie.
    smaller = BatchStream("pairs", csv_pairs(str(train_data / "pairs_clean.csv")),
                          SampleMaker(dataclasses.replace(spec, codebook_image_size=16), 0), 4, seed=0, num_workers=1)
    host = smaller.next_batch()
    pinned = host.pin_memory()
    assert pinned.pixel_values.stride() == host.pixel_values.stride() and pinned.codebook_pixels.is_pinned()
    on_gpu, on_cpu = pinned.to("cuda", non_blocking=True), host.to("cpu")
    torch.cuda.synchronize()
    for name in ("pixel_values", "codebook_pixels"):
        got, want = getattr(on_gpu, name), getattr(on_cpu, name)
        assert got.is_contiguous() and torch.allclose(got.cpu(), want, atol=1e-6), name


def test_a_run_on_cuda_shares_the_hosts_cores_among_its_loaders_by_default(train_data, tmp_path):
    from conftest import tiny_run
    from flava.data.pipeline import auto_workers
    from flava.train.trainer import Trainer

    cfg = tiny_run(train_data, "pairs_clean.csv", device="cuda", max_steps=2)
    cfg.data.num_workers = None
    trainer = Trainer(cfg, tmp_path / "run")
    want = auto_workers(dict(zip(trainer.kinds, trainer.probs_at(0))))
    assert {k: s.streams[0].num_workers for k, s in trainer.streams.items()} == want
    assert any(n.startswith("loader workers per process: pairs ") for n in trainer.notes), trainer.notes
    rows = trainer.fit(max_steps=2)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_pretraining_resumes_exactly_on_cuda(train_data, tmp_path, monkeypatch):
    # Deterministic cuDNN kernels, and an eps that keeps AdamW from turning rounding noise in
    # near-zero gradients into whole steps (as the multi-process tests do).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)

    def run(out, steps, resume=False):
        args = pretrain_args(train_data, out, "pairs_clean.csv") + ["--max-steps", str(steps), "--set", "device=cuda",
                                                                    "--set", "save_every=2", "--set", "optim.eps=1e-4"]
        assert cli(args + (["--resume"] if resume else [])) == 0
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", 4, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        assert a["kind"] == b["kind"] and abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)


def test_ddp_over_nccl_on_one_process_trains_as_the_bare_model():
    """DDP over an NCCL group of one process, the only group one GPU allows (torchrun with one
    process forms none): the pretraining model wrapped as the trainer wraps it (unused parameters
    found, the GPU's device_ids) gives the bare model's losses and gradients, step after step."""
    import copy

    import torch.distributed as dist

    from flava.distributed import data_parallel
    from flava.objectives.pretraining import PretrainingModel

    cfg, host = small_pairs()
    batch, device = host.to("cuda"), torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    bare = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook)).cuda().train()
    twin = copy.deepcopy(bare)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        wrapped = data_parallel(twin, device, find_unused_parameters=True)
        for step in range(2):
            losses = []
            for module in (bare, wrapped):
                out = module(batch, torch.Generator("cuda").manual_seed(step))
                out.losses.total.backward()
                losses.append(float(out.losses.total.detach()))
            assert losses[0] == pytest.approx(losses[1], rel=1e-5)
            for (name, p), q in zip(bare.named_parameters(), twin.parameters()):
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:
                    assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
            bare.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


def test_image_tokens_on_cuda_are_the_cpus_whatever_the_batch():
    """The targets a step computes are the ones `flava prepare` stored: float32 (no TF32) on the
    GPU, so batches of another size, and the CPU, give the same tokens but for rare exact ties."""
    torch.manual_seed(0)
    precision = torch.backends.cudnn.conv.fp32_precision
    codebook = flava.FlavaImageCodebook(flava.preset("tiny").codebook).eval()
    pixels = torch.rand(32, 3, 64, 64)
    on_cpu = codebook.token_ids(pixels)
    codebook.cuda()
    whole = codebook.token_ids(pixels.cuda()).cpu()
    parts = torch.cat([codebook.token_ids(chunk.cuda()).cpu() for chunk in pixels.split(4)])
    assert (whole == parts).float().mean() >= 0.999 and (whole == on_cpu).float().mean() >= 0.995
    assert torch.backends.cudnn.conv.fp32_precision == precision  # left as it was


def test_prepare_tokenises_on_cuda_in_its_own_process_as_on_the_cpu(train_data, tmp_path, capsys):
    """Worker processes read and crop; the command's process tokenises on the GPU (one context)."""
    import tarfile

    def members(out):
        found = {}
        for shard in sorted(out.glob("*.tar")):
            with tarfile.open(shard) as tar:
                found.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
        return found

    outs = {}
    for device, workers in (("cpu", "1"), ("cuda", "2")):
        outs[device] = tmp_path / device
        assert cli(["prepare", "--pairs", str(train_data / "pairs.csv"), "--output", str(outs[device]), "--codebook",
                    str(train_data / "codebook"), "--shard-size", "5", "--size", "24", "--workers", workers,
                    "--device", device]) == 0
    assert "image tokens from" in capsys.readouterr().out
    cpu, gpu = members(outs["cpu"]), members(outs["cuda"])
    assert cpu.keys() == gpu.keys() and any(k.endswith(".tokens.npy") for k in cpu)
    for name in cpu:
        if not name.endswith(".tokens.npy"):
            assert cpu[name] == gpu[name], name
    a, b = (np.concatenate([np.load(io.BytesIO(d[k])).ravel() for k in sorted(d) if k.endswith(".tokens.npy")])
            for d in (cpu, gpu))
    assert (a == b).mean() >= 0.99  # float32 on both; ties aside, the same ids


def test_train_codebook_and_embed_on_cuda(train_data, tmp_path, capsys):
    out = tmp_path / "cb"
    assert cli(["train-codebook", "--images", str(train_data / "img"), "--output", str(out), "--steps", "6",
                "--batch-size", "8", "--device", "cuda", "--set", "codebook.vocab_size=64",
                "--set", "codebook.hidden_size=8"]) == 0
    report = json.loads((out / "codebook_report.json").read_text())
    assert report["device"] == "cuda" and np.isfinite(report["end"]["reconstruction_mse"])
    model = tmp_path / "model"
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(model)
    emb = tmp_path / "emb"
    assert cli(["embed", "--model", str(model), "--images", str(train_data / "img"), "--output", str(emb),
                "--device", "cuda"]) == 0
    vectors = np.load(next((emb / "img_emb").glob("*.npy")))
    assert vectors.shape == (16, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


def test_a_task_model_predicts_on_cuda_as_on_the_cpu(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(np.array(colour) + rng.integers(-25, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / name / f"{i}.png")
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(tmp_path / "ckpt")
    task = tmp_path / "colours"
    assert cli(["finetune", "--model", str(tmp_path / "ckpt"), "--task", "image-classification", "--train",
                str(tmp_path / "img"), "--output", str(task), "--epochs", "1", "--batch-size", "8",
                "--head-only"]) == 0
    rows = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"{device}.jsonl"
        assert cli(["predict", "--model", str(task), "--input", str(tmp_path / "img"), "--device", device,
                    "--output", str(out)]) == 0
        rows[device] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prediction"] for r in rows["cuda"]] == [r["prediction"] for r in rows["cpu"]]
    assert np.allclose([r["score"] for r in rows["cuda"]], [r["score"] for r in rows["cpu"]], atol=1e-4)
    assert flava.load_task(task, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("train_encoders", [True, False])
def test_finetuning_trains_on_the_models_gpu_as_on_the_cpu(train_encoders):
    from flava.data.tokenizer import TextTokenizer
    from flava.finetune.examples import TextData, TextExample
    from flava.finetune.loop import finetune_text
    from flava.finetune.settings import FinetuneSettings

    def examples(n, seed):  # label 1 iff "banana" is among the words
        rng = np.random.default_rng(seed)
        words = [list(rng.choice(["red", "green", "house", "tree", "river", "cloud"], 5)) for _ in range(n)]
        for i in range(1, n, 2):
            words[i][rng.integers(0, 5)] = "banana"
        return [TextExample(" ".join(w), i % 2) for i, w in enumerate(words)]

    task = TextData("keyword", examples(32, 0), examples(16, 1), examples(16, 2), ["absent", "present"],
                    ("accuracy",))
    torch.manual_seed(0)
    model = flava.FlavaModel(flava.preset("tiny")).eval()
    # No dropout: the GPU's random draws are not the CPU's.
    settings = FinetuneSettings(lr=1e-3, epochs=2, batch_size=8, head_dropout=0.0, train_encoders=train_encoders)
    tokenizer = TextTokenizer(max_length=16)
    cpu = finetune_text(model, task, settings, tokenizer)
    gpu = finetune_text(model.cuda(), task, settings, tokenizer)
    assert next(gpu.model.parameters()).device.type == "cuda" and model.device.type == "cuda"
    np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=1e-3, atol=1e-4)
    assert gpu.eval_steps == cpu.eval_steps and gpu.best_step == cpu.best_step


def stopped_and_resumed_finetune(device, tmp_path, monkeypatch):
    """(uninterrupted, stopped at step 5 then resumed) results of one fine-tuning with dropout on
    `device`: a resume restores the random state of the device's dropout too."""
    from flava import stopping
    from flava.data.tokenizer import TextTokenizer
    from flava.finetune import loop
    from flava.finetune.examples import TextData, TextExample
    from flava.finetune.settings import FinetuneSettings, Resumable

    examples = [TextExample(f"{'good' if i % 2 else 'bad'} thing {i}", i % 2) for i in range(48)]
    task = TextData("t", examples[:32], examples[32:40], examples[40:], ["bad", "good"], ("accuracy",))
    torch.manual_seed(0)
    model = flava.FlavaModel(flava.preset("tiny")).to(device).eval()
    settings = FinetuneSettings(lr=1e-3, epochs=2, batch_size=4, head_dropout=0.3)
    tokenizer = TextTokenizer(max_length=16)
    whole = loop.finetune_text(model, task, settings, tokenizer)
    resumable = Resumable(tmp_path / "training", {"task": "t"})
    monkeypatch.setattr(stopping, "requested", lambda: 15 if steps and steps[-1] == 5 else 0)
    steps = []
    with pytest.raises(stopping.Stopped):
        loop.finetune_text(model, task, settings, tokenizer, on_step=lambda step, *_: steps.append(step),
                           resumable=resumable)
    steps.clear()
    return whole, loop.finetune_text(model, task, settings, tokenizer, resumable=resumable)


def test_a_finetuning_stopped_on_the_gpu_resumes_with_the_gpus_dropout(tmp_path, monkeypatch):
    whole, resumed = stopped_and_resumed_finetune("cuda", tmp_path, monkeypatch)
    assert resumed.train_loss == whole.train_loss and resumed.test_metrics == whole.test_metrics


@pytest.mark.parametrize("negatives,balancing", [("swap", "fixed"), ("hard", "fixed"), ("swap", "dwa"),
                                                ("swap", "uncertainty")])
def test_a_pretraining_step_makes_no_host_device_sync(train_data, tmp_path, negatives, balancing):
    """Once every kind has run a step (the first steps create the optimizer's state and sync by
    design), a step of each kind runs with torch.cuda.set_sync_debug_mode("error"): anything that
    makes the host wait for the device (a read of a device value, a data-dependent shape, a
    blocking copy) raises."""
    from flava.train.presets import demo_config
    from flava.train.trainer import Trainer

    cfg = demo_config(device="cuda", max_steps=100, log_every=100, save_every=100)
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.model.codebook.hidden_size = 8
    cfg.data.pairs, cfg.data.images = [str(train_data / "pairs_clean.csv")], [str(train_data / "img")]
    cfg.data.text, cfg.data.batch_size, cfg.data.num_workers = [str(train_data / "text.txt")], 4, 0
    cfg.codebook, cfg.objectives.itm_negatives = str(train_data / "codebook"), negatives
    cfg.objectives.balancing, cfg.objectives.dwa_window = balancing, 2
    trainer = Trainer(cfg, tmp_path / "run")
    kinds = {"pairs", "images", "text"}

    def steps(sync: bool) -> None:
        seen = set()
        for _ in range(60):
            seen.add(trainer.train_step(sync=sync)["kind"])
            if seen == kinds:
                return
        pytest.fail(f"60 steps drew only {sorted(seen)}")

    steps(sync=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(sync=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows = trainer._settle()
    assert rows and all(np.isfinite(r["loss"]) and not r["update_skipped"] for r in rows)


def test_dino_crops_are_coloured_on_cuda_as_in_the_workers_without_a_host_device_sync():
    import skimage.data

    from flava.data.multicrop import MultiCropSpec, collate_multicrop, multi_crop

    spec = MultiCropSpec(global_size=64, local_size=32, local_crops=4)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    raw = collate_multicrop([multi_crop(p, spec, np.random.default_rng([1, i]), coloured=False)
                             for i, p in enumerate(photos)])
    want = collate_multicrop([multi_crop(p, spec, np.random.default_rng([1, i])) for i, p in enumerate(photos)])
    pinned = raw.pin_memory()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the trainer's copy: pinned, without waiting for the device
    try:
        got = pinned.to("cuda", non_blocking=True, mean=spec.mean, std=spec.std)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.global_crops.is_cuda and got.global_colour is None
    assert torch.allclose(got.global_crops.cpu(), want.global_crops, atol=1e-4)
    assert torch.allclose(got.local_crops.cpu(), want.local_crops, atol=1e-4)


def test_the_dino_stage_on_cuda_colours_its_crops_there(tmp_path):
    from test_dino_stage import dino_config

    from flava.train.trainer import Trainer

    cfg = dino_config(device="cuda", max_steps=3, save_every=3)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.stage.sample_maker().colour_on_device
    rows = trainer.fit()
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)

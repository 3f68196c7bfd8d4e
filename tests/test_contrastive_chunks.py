"""optim.contrastive_chunks (GradCache): a batch encoded and back-propagated in chunks gives the
unchunked step's gradient and logged losses within 1e-5 where the objectives are
chunk-separable, softmax and sigmoid, on one process and on two (DDP and FSDP); it reads nothing
back under sync_free; dropout replays alike; chunked runs train, resume step for step, and refuse
what they cannot take in one line."""

import contextlib
import copy

import pytest
import torch

import flava
from conftest import free_port, gloo_group
from zygote import Results, spawn
from test_objectives import pair_batch, tiny_config
from test_syncs import HostReads
from test_syncs import batches as syncs_batches
from test_syncs import tiny_config as syncs_config
from flava.config import ObjectivesConfig
from flava.objectives.chunks import plan_chunks
from flava.objectives.pretraining import PretrainingModel
from flava.syncs import sync_free
from flava.train.backward import micro_step
from flava.train.config import TrainConfig
from flava.train.presets import demo_config
from flava.train.trainer import Trainer

# (batch per process, chunks): any batch that is a multiple of its chunk count.
CASES = [(6, 3), (8, 4), (8, 8)]
TOL = 1e-5
# Every pair objective, ITM without negatives (nothing couples a chunk's rows to another's).
SEPARABLE = {"objectives__itm_negative_probability": 0.0}


def config(data, batch: int, chunks: int, contrastive="softmax", **over) -> TrainConfig:
    cfg = demo_config(seed=3, max_steps=8, save_every=3, log_every=1, tensorboard=False)
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.model.codebook.hidden_size = 8
    cfg.data.pairs, cfg.data.images, cfg.data.text = ([str(data / "pairs_clean.csv")], [str(data / "img")],
                                                     [str(data / "text.txt")])
    cfg.data.batch_size, cfg.data.num_workers = batch, 0
    cfg.codebook, cfg.optim.contrastive_chunks, cfg.optim.warmup_steps = str(data / "codebook"), chunks, 2
    cfg.objectives.contrastive = contrastive
    for k, v in over.items():  # "model__image__dropout": cfg.model.image.dropout
        *path, key = k.split("__")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, key, v)
    return cfg


@pytest.fixture(scope="module")
def trainer(train_data, tmp_path_factory):
    """Trainers by settings, built once for the module (the steps below never update them); each
    holds the first batch of each kind its streams drew (16 rows) in `batches`."""
    made = {}

    def get(**over) -> Trainer:
        key = tuple(sorted(over.items()))
        if key not in made:
            t = made[key] = Trainer(config(train_data, 16, 1, **over), tmp_path_factory.mktemp("run"))
            t.batches = {kind: t._to_device(stream.next_batch()) for kind, stream in t.streams.items()}
        return made[key]
    return get


@contextlib.contextmanager
def objectives(t: Trainer, **settings):
    """`t`'s objectives set so for the block (the model reads the same config)."""
    before = {k: getattr(t.cfg.objectives, k) for k in settings}
    for k, v in settings.items():
        setattr(t.cfg.objectives, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(t.cfg.objectives, k, v)


def one_step(t: Trainer, batch, chunks: int, measure: bool = False):
    """One micro-batch's forward and backward as the loop runs it, in `chunks` chunks; its
    numbers by name, every parameter's gradient (whole, averaged over processes) and the
    gradient diagnostics."""
    t.optimizer.zero_grad(set_to_none=True)
    t.cfg.optim.contrastive_chunks = chunks
    values, (losses, metrics), report = micro_step(t, batch, torch.Generator().manual_seed(11), 0, 0, measure)
    t._sync_replicated()
    grads = {}
    for name, p in t.model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()
    return dict(zip(["loss", *losses, *metrics], values.tolist())), grads, report


def both(t: Trainer, kind: str, rows: int, chunks: int, measure: bool = False):
    """The first `rows` of `t`'s batch of `kind`: their step in `chunks` chunks, and whole."""
    batch = t.batches[kind].rows(slice(0, rows))
    return one_step(t, batch, chunks, measure), one_step(t, batch, 1, measure)


def assert_same_step(chunked, whole, tol=TOL):
    (va, ga, _), (vb, gb, _) = chunked, whole
    assert va.keys() == vb.keys()
    for k in vb:
        assert va[k] == pytest.approx(vb[k], abs=tol), k
    assert ga.keys() == gb.keys()
    worst = max((ga[k] - gb[k]).abs().max().item() for k in gb)
    assert worst < tol, worst
    assert max(g.abs().max().item() for g in gb.values()) > 100 * tol  # the gradients are not all ~0


@pytest.mark.parametrize("contrastive", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch,chunks", CASES)
def test_a_chunked_step_has_the_whole_batch_gradient(trainer, contrastive, batch, chunks):
    t = trainer(contrastive=contrastive, **SEPARABLE)
    a, b = both(t, "pairs", batch, chunks)
    name = "global_contrastive" if contrastive == "softmax" else "sigmoid_contrastive"
    assert set(a[0]) >= {name, "itm", "mmm_image", "mmm_text"}
    assert_same_step(a, b)


@pytest.mark.parametrize("negatives", ["swap", "hard"])
def test_the_contrastive_gradient_is_exact_beside_itm_negatives(trainer, negatives):
    # With negatives drawn per chunk ITM and MMM differ from the unchunked step by design; the
    # contrastive loss alone (the others' weights at 0) must not.
    t = trainer(**SEPARABLE)
    with objectives(t, itm_negatives=negatives, itm_negative_probability=0.5):
        values, grads, _ = one_step(t, t.batches["pairs"].rows(slice(0, 8)), 4)
        assert all(torch.isfinite(g).all() for g in grads.values()) and values["itm"] > 0
        with objectives(t, itm_weight=0.0, mmm_image_weight=0.0, mmm_text_weight=0.0):
            a, b = both(t, "pairs", 8, 4)
    assert_same_step(a, b)
    assert values["global_contrastive"] == pytest.approx(b[0]["global_contrastive"], abs=TOL)


@pytest.mark.parametrize("kind", ["images", "text"])
def test_image_and_text_steps_in_chunks_are_the_whole_steps(trainer, kind):
    # MIM and MLM divide each chunk by the batch's count of masked positions: exact.
    assert_same_step(*both(trainer(**SEPARABLE), kind, 8, 4))


@pytest.mark.parametrize("method", ["fixed", "pcgrad", pytest.param("uncertainty", marks=pytest.mark.slow),
                                    pytest.param("dwa", marks=pytest.mark.slow)])
def test_balancing_and_diagnostics_see_the_whole_batch(trainer, method):
    t = trainer(**SEPARABLE) if method == "fixed" else trainer(objectives__balancing=method, **SEPARABLE)
    a, b = both(t, "pairs", 4, 2, measure=method == "fixed")
    assert_same_step(a, b)
    # The diagnostics measure the whole micro-batch's gradients, chunked or not.
    for enc, report in (b[2] or {}).items():
        for name, norm in report["norm"].items():
            assert a[2][enc]["norm"][name] == pytest.approx(norm, rel=1e-4, abs=1e-6), (enc, name)
        for pair, cosine in report["cosine"].items():
            assert a[2][enc]["cosine"][pair] == pytest.approx(cosine, abs=1e-4), (enc, pair)
    assert (b[2] is not None) == (method == "fixed")


def test_dropout_replays_the_cached_pass():
    cfg = tiny_config()
    cfg.image.dropout = cfg.image.attention_dropout = cfg.text.dropout = 0.2
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig()).train()
    batch = pair_batch(cfg, B=6)
    batch.image_targets = torch.randint(0, cfg.image.vocab_size, batch.patch_mask.shape)
    seen = []
    hook = pm.model.image_projection.register_forward_hook(
        lambda m, i, out: seen.append((torch.is_grad_enabled(), out.detach().clone())))
    parts = [batch.rows(slice(2 * i, 2 * i + 2)) for i in range(3)]
    for part, chunk in zip(parts, plan_chunks(pm, parts, torch.Generator().manual_seed(0))):
        pm(part, torch.Generator().manual_seed(0), chunk).losses.total.backward()
    hook.remove()
    cached = [o for grad, o in seen if not grad]
    replayed = [o for grad, o in seen if grad]
    assert len(cached) == len(replayed) == 3
    for c, r in zip(cached, replayed):
        assert torch.equal(c, r)
    # Dropout is on: the same rows twice without the replay differ.
    part = batch.rows(slice(0, 2))
    with torch.no_grad():
        one, two = (pm.model.encode_image_tokens(part.pixel_values, cls_only=True).last_hidden_state for _ in "ab")
    assert not torch.equal(one, two)


@pytest.mark.parametrize("negatives,contrastive", [("swap", "softmax"), ("hard", "sigmoid")])
def test_a_chunked_step_reads_nothing_back_under_sync_free(negatives, contrastive):
    # As tests/test_syncs.py checks the whole step: what a GPU runs sync_free, recorded on the CPU.
    cfg = syncs_config()
    torch.manual_seed(0)
    o = ObjectivesConfig(itm_negatives=negatives, itm_negative_probability=0.5, contrastive=contrastive)
    pm = PretrainingModel(cfg, o, codebook=flava.FlavaImageCodebook(cfg.codebook))
    for kind, batch in syncs_batches(cfg).items():
        parts = [batch.rows(slice(2 * i, 2 * i + 2)).to("cpu") for i in range(3)]  # counts read per part
        results = {}
        for free in (False, True):
            pm.zero_grad(set_to_none=True)
            losses = {}
            with HostReads() as reads, sync_free(free):
                generator = torch.Generator().manual_seed(1)
                for part, chunk in zip(parts, plan_chunks(pm, parts, generator)):
                    out = pm(part, generator, chunk)
                    out.losses.total.backward()
                    losses = {k: losses.get(k, 0) + v.detach() for k, v in out.losses.named().items()}
            results[free] = losses, {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}, \
                reads.reads
        (losses, grads, _), (losses_f, grads_f, reads_f) = results[False], results[True]
        assert reads_f == [], (kind, reads_f)
        assert losses.keys() == losses_f.keys() and grads.keys() == grads_f.keys()
        for name in losses:
            torch.testing.assert_close(losses_f[name], losses[name], rtol=1e-6, atol=1e-6, msg=f"{kind} {name}")
        for name in grads:
            torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")


def test_settings_chunks_cannot_take_fail_in_one_line(train_data, tmp_path):
    with pytest.raises(flava.ConfigError, match=r"contrastive_chunks=3 must divide data.batch_size=8 .*1, 2, 4, 8"):
        Trainer(config(train_data, 8, 3), tmp_path / "a")
    with pytest.raises(flava.ConfigError, match="stage image-dino .*contrastive_chunks=1"):
        Trainer(config(train_data, 8, 2, stage="image-dino"), tmp_path / "b")


@pytest.mark.slow
def test_a_chunked_run_trains_and_resumes_step_for_step(train_data, tmp_path):
    over = dict(objectives__itm_negatives="hard", max_steps=6, seed=5)  # pairs, images, text, pairs, ...
    full = Trainer(config(train_data, 4, 2, **over), tmp_path / "full")
    before = copy.deepcopy(full.model.state_dict())
    rows = full.fit()
    assert {r["kind"] for r in rows} == {"pairs", "images", "text"}
    pairs = [r for r in rows if r["kind"] == "pairs"]
    assert pairs and set(pairs[0]["losses"]) == {"global_contrastive", "itm", "mmm_image", "mmm_text"}
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and not r["update_skipped"]
               for r in rows)
    moved = [k for k, v in full.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.image_encoder.") for k in moved) and "model.logit_scale" in moved
    Trainer(config(train_data, 4, 2, **over), tmp_path / "cut").fit(max_steps=4)  # last checkpoint: 3
    resumed = Trainer(config(train_data, 4, 2, **over), tmp_path / "cut")
    assert resumed.resume() and resumed.step == 3
    # Within float32 rounding: the image encoder's backward differs in the last bit from run to
    # run on this CPU, chunked or not.
    for a, b in zip(rows[3:], resumed.fit()):
        assert a["kind"] == b["kind"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)


# --------------------------------------------------------------------------- two processes


def _worker(rank, world, port, data, out, batch, chunks, contrastive, mode, results):
    with gloo_group(rank, world, port):
        cfg = config(data, batch, chunks, contrastive, distributed=mode, **SEPARABLE)
        trainer = Trainer(cfg, out / f"rank{rank}")
        results[rank] = one_step(trainer, trainer._to_device(trainer.streams["pairs"].next_batch()), chunks)[:2]


@pytest.mark.distributed
@pytest.mark.parametrize("contrastive,mode", [("softmax", "ddp"), ("sigmoid", "ddp"), ("softmax", "fsdp")])
@pytest.mark.parametrize("batch,chunks", [(4, 2), (6, 3)])
def test_two_processes_in_chunks_equal_one_process_with_the_whole_batch(train_data, tmp_path, contrastive, mode,
                                                                       batch, chunks):
    world = 2
    results = Results()
    spawn(_worker, (world, free_port(), train_data, tmp_path, batch, chunks, contrastive, mode, results), world)
    one = Trainer(config(train_data, world * batch, 1, contrastive, **SEPARABLE), tmp_path / "one")
    whole = one_step(one, one._to_device(one.streams["pairs"].next_batch()), 1)
    # Each process holds its own losses (their mean is the batch's) and the averaged gradient.
    values = {k: sum(results[r][0][k] for r in range(world)) / world for k in whole[0]}
    for r in range(world):
        assert_same_step((values, results[r][1], None), whole)

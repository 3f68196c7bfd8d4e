"""ITM negatives, zero weights, saving/loading a pretraining model, and the global contrastive
loss across two gloo processes."""

import math
import pytest
import torch
import torch.nn.functional as F

import flava
from conftest import free_port, gloo_group
from zygote import Results, spawn
from flava.config import ObjectivesConfig, preset
from flava.data.batch import ImageBatch, PairBatch, TextBatch
from flava.objectives.losses import global_contrastive_loss
from flava.objectives.negatives import hard_negatives, same_text, swap_negatives
from flava.objectives.pretraining import PretrainingModel


def tiny_config():
    cfg = preset("tiny")
    cfg.text.vocab_size = 300
    cfg.image.vocab_size = cfg.codebook.vocab_size = 64
    return cfg


def texts_with_duplicates(B=12, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[::3, 5:] = 0
    ids[mask == 0] = 0
    ids[1], mask[1] = ids[0], mask[0]  # the same caption twice
    ids[2, :5], mask[2] = ids[0, :5], mask[0]  # the same text again, with other ids under its padding
    ids[2, 5:] = 7
    return ids, mask


def test_swap_negatives_never_pair_a_caption_with_itself():
    ids, mask = texts_with_duplicates()
    same = same_text(ids, mask, ids, mask)
    assert same[0, 1] and same[0, 2] and not same[0, 3]
    g = torch.Generator().manual_seed(0)
    flipped = 0
    for _ in range(300):
        p = swap_negatives(ids, mask, 0.5, g)
        neg = p.labels == 0
        flipped += int(neg.sum())
        assert not same[p.image_index[neg], p.text_index[neg]].any()
        assert torch.equal(p.text_index[~neg], p.image_index[~neg])
    assert abs(flipped / (300 * 12) - 0.5) < 0.05
    rate = sum(int((swap_negatives(ids, mask, 0.1, g).labels == 0).sum()) for _ in range(500)) / (500 * 12)
    assert abs(rate - 0.1) < 0.02
    # a batch whose captions are all the same has no negative to offer
    same_ids = ids[:1].repeat(5, 1)
    assert (swap_negatives(same_ids, mask[:1].repeat(5, 1), 1.0, g).labels == 1).all()


def test_hard_negatives_follow_similarity_and_skip_true_captions():
    ids, mask = texts_with_duplicates()
    same = same_text(ids, mask, ids, mask)
    B = ids.shape[0]
    sim = torch.randn(B, B) * 3
    sim[:, 4] += 20  # text 4 is the hardest negative for every image (when allowed)
    t2i = torch.randn(B, B) * 3
    t2i[:, 4] += 20  # and image 4 the hardest for every text: the other direction's own draw
    p = hard_negatives(sim, t2i, same, generator=torch.Generator().manual_seed(0))
    assert p.labels[:B].eq(1).all() and p.labels[B:].eq(0).all()
    neg = p.labels == 0
    assert not same[p.image_index[neg], p.text_index[neg]].any()
    others = torch.arange(B) != 4
    i2t, t2i_drawn = p.text_index[B: 2 * B], p.image_index[2 * B:]
    assert (i2t[others] == 4).float().mean() > 0.9 and (t2i_drawn[others] == 4).float().mean() > 0.9


def test_hard_negatives_are_drawn_when_the_true_captions_dominate():
    # At a contrastive scale of 100 a true caption beats the others by hundreds of logits: a
    # softmax over all underflows to zero for every allowed one, and the row was dropped.
    B = 6
    sim = torch.zeros(B, B) + torch.arange(B) * 0.5
    sim[torch.arange(B), torch.arange(B)] = 400.0
    same = torch.eye(B, dtype=torch.bool)
    p = hard_negatives(sim, sim.T.clone(), same, generator=torch.Generator().manual_seed(0))
    assert p.labels[B:].eq(0).all() and not same[p.image_index[B:], p.text_index[B:]].any()


@pytest.mark.parametrize("contrastive", ["softmax", "sigmoid"])
def test_hard_negatives_weigh_similarities_at_the_contrastive_scale(monkeypatch, contrastive):
    import flava.objectives.pretraining as pretraining

    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig(itm_negatives="hard", contrastive=contrastive),
                          codebook=flava.FlavaImageCodebook(cfg.codebook))
    with torch.no_grad():
        pm.model.logit_scale.fill_(math.log(50.0))
        if contrastive == "sigmoid":
            pm.heads.sigmoid_contrastive.logit_scale.fill_(math.log(20.0))
    seen = []
    real = pretraining.hard_negatives
    monkeypatch.setattr(pretraining, "hard_negatives", lambda sim, *a, **k: seen.append(sim) or real(sim, *a, **k))
    states, _ = pm.states(pair_batch(cfg), torch.Generator().manual_seed(1))
    states.fused
    image, text = (e.detach() for e in states.embeddings)
    scale = 20.0 if contrastive == "sigmoid" else 50.0  # the scale, not its log (3.9 or 3.0)
    torch.testing.assert_close(seen[0], scale * image @ text.T, rtol=1e-5, atol=1e-4)
    # Under bf16 autocast the weights of the draws are float32 products, as the loss's logits are.
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, _ = pm.states(pair_batch(cfg), torch.Generator().manual_seed(1))
        states.fused
    image, text = (e.detach().float() for e in states.embeddings)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], scale * image @ text.T, rtol=1e-5, atol=1e-4)


def pair_batch(cfg, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image.image_size
    n = cfg.image.num_patches
    ids, mask = texts_with_duplicates(B, 8, seed)
    labels = torch.where(torch.rand(B, 8, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    return PairBatch(
        pixel_values=torch.randn(B, 3, s, s, generator=g), input_ids=ids, attention_mask=mask,
        patch_mask=torch.rand(B, n, generator=g) < 0.4, masked_input_ids=ids.masked_fill(labels != -100, 103),
        mlm_labels=labels, codebook_pixels=torch.rand(B, 3, cfg.codebook_image_size, cfg.codebook_image_size,
                                                       generator=g))


@pytest.mark.parametrize("negatives", ["swap", "hard"])
def test_pair_step_backpropagates_into_what_it_used(negatives):
    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig(itm_negatives=negatives, itm_negative_probability=0.5),
                          codebook=flava.FlavaImageCodebook(cfg.codebook))
    out = pm(pair_batch(cfg), torch.Generator().manual_seed(1))
    assert set(out.losses.named()) == {"global_contrastive", "itm", "mmm_image", "mmm_text"}
    assert torch.isfinite(out.losses.total)
    out.losses.total.backward()
    assert pm.model.logit_scale.grad is not None and pm.heads.itm.classifier.weight.grad.abs().sum() > 0
    assert pm.heads.mim.dense.weight.grad is None  # unimodal heads are not used by pairs
    assert all(p.grad is None for p in pm.codebook.parameters())
    assert 0 <= out.metrics["itm_accuracy"] <= 1


def test_a_pair_step_projects_its_images_once_for_both_image_passes(monkeypatch):
    """The masked and the whole image share one patch projection: the losses and gradients of the
    two passes made apart, once for each pass that is read."""
    from flava.objectives.pretraining import PairStates

    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig(itm_negative_probability=0.5),
                          codebook=flava.FlavaImageCodebook(cfg.codebook))
    b = pair_batch(cfg)
    calls = []
    pm.model.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))

    def step():
        calls.clear()
        pm.zero_grad()
        out = pm(b, torch.Generator().manual_seed(1))
        out.losses.total.backward()
        return out.losses.named(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    # The whole image is read for the contrastive loss, or for hard negatives; swapped negatives alone read
    # the masked one.
    for contrastive, negatives, reads_whole in ((1.0, "swap", True), (0.0, "hard", True), (0.0, "swap", False)):
        pm.objectives.global_contrastive_weight, pm.objectives.itm_negatives = contrastive, negatives
        with monkeypatch.context() as m:
            shared = step()
            assert len(calls) == 1, (contrastive, negatives)
            m.setattr(PairStates, "_image_passes", property(lambda self: None))
            apart = step()
            assert len(calls) == 1 + reads_whole, (contrastive, negatives)
        assert shared[0].keys() == apart[0].keys() and shared[1].keys() == apart[1].keys()
        for name in shared[0]:
            assert torch.equal(shared[0][name], apart[0][name]), name  # the same forward, to the bit
        for name in shared[1]:
            torch.testing.assert_close(shared[1][name], apart[1][name], rtol=1e-5, atol=1e-7, msg=name)
    # A chunk's plan reads the whole images' embeddings alone: no masked pass.
    from flava.objectives.chunks import plan_chunks

    pm.objectives.global_contrastive_weight, pm.objectives.itm_negatives = 1.0, "swap"
    passes = []
    pm.model.image_encoder.transformer.register_forward_hook(lambda m, args, kw, out: passes.append(kw["cls_only"]),
                                                             with_kwargs=True)
    plan_chunks(pm, [b.rows(slice(0, 3)), b.rows(slice(3, 6))], torch.Generator().manual_seed(1))
    assert passes == [True, True]


@pytest.mark.parametrize("negatives", ["swap", "hard"])
def test_itm_and_mmm_losses_read_the_drawn_pairs(negatives):
    """The step's ITM and MMM losses against the same computed by hand from the pairs it drew:
    a negative row fuses an image with another caption and is labelled 0; MMM scores the matched
    rows alone."""
    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig(itm_negatives=negatives, itm_negative_probability=0.5),
                          codebook=flava.FlavaImageCodebook(cfg.codebook)).eval()
    b = pair_batch(cfg)
    with torch.no_grad():
        out = pm(b, torch.Generator().manual_seed(1))
        p = pm.states(b, torch.Generator().manual_seed(1))[0].itm_pairs
        ids, mask = b.input_ids, b.attention_mask
        neg = p.labels == 0
        assert neg.sum() >= 2 and not same_text(ids, mask, ids, mask)[p.image_index[neg], p.text_index[neg]].any()
        m, heads = pm.model, pm.heads
        image = m.image_to_multimodal(m.encode_image_tokens(b.pixel_values, b.patch_mask))
        text = m.text_to_multimodal(m.encode_text_tokens(b.masked_input_ids, mask))
        fused = m.fuse_tokens(image[p.image_index], text[p.text_index], mask[p.text_index])
        matched = (p.labels == 1)[:, None]
        text_labels = torch.where(matched, b.mlm_labels[p.text_index], -100)
        targets = torch.where(b.patch_mask, pm.image_targets(b), -100)
        image_labels = torch.where(matched, targets[p.image_index], -100)
        ce = F.cross_entropy
        want = {"itm": ce(heads.itm(fused.cls), p.labels),
                "mmm_text": ce(heads.mmm_text(fused.text).flatten(0, 1), text_labels.flatten()),
                "mmm_image": ce(heads.mmm_image(fused.image_patches).flatten(0, 1), image_labels.flatten())}
    got = out.losses.named()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_zero_weights_skip_their_computation(monkeypatch):
    cfg = tiny_config()
    pm = PretrainingModel(cfg, ObjectivesConfig(itm_weight=0, mmm_image_weight=0, mmm_text_weight=0))
    calls = []
    monkeypatch.setattr(pm.model.multimodal_encoder, "forward", lambda *a, **k: calls.append(1))
    out = pm(pair_batch(cfg))  # no codebook needed either: nothing asks for image targets
    assert set(out.losses.named()) == {"global_contrastive"} and not calls
    pm.objectives.mim_weight = pm.objectives.mlm_weight = 0
    b = pair_batch(cfg)
    assert pm(ImageBatch(b.pixel_values, b.patch_mask)).losses.named() == {}
    assert pm(TextBatch(b.masked_input_ids, b.attention_mask, b.mlm_labels)).losses.named() == {}


def test_missing_codebook_is_a_clear_error():
    cfg = tiny_config()
    pm = PretrainingModel(cfg)
    b = pair_batch(cfg)
    with pytest.raises(flava.InputError, match="train-codebook"):
        pm(ImageBatch(b.pixel_values, b.patch_mask, codebook_pixels=b.codebook_pixels))
    with pytest.raises(flava.ConfigError, match="image.vocab_size"):  # tokens the heads cannot predict
        cfg2 = tiny_config()
        cfg2.codebook.vocab_size = cfg2.image.vocab_size * 2
        PretrainingModel(cfg2, codebook=flava.FlavaImageCodebook(cfg2.codebook))


def test_pretraining_checkpoint_roundtrip(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, ObjectivesConfig(mlm_weight=0.5), codebook=flava.FlavaImageCodebook(cfg.codebook))
    pm.save_pretrained(tmp_path / "ckpt")
    back = flava.load(tmp_path / "ckpt", pretraining=True)
    assert back.objectives.mlm_weight == 0.5
    b = pair_batch(cfg)
    pm.objectives.itm_negative_probability = back.objectives.itm_negative_probability = 0.0
    with torch.no_grad():
        a, c = pm.eval()(b).losses, back.eval()(b).losses
    for k, v in a.named().items():
        torch.testing.assert_close(v, getattr(c, k), atol=0, rtol=0)
    assert isinstance(flava.load(tmp_path / "ckpt"), flava.FlavaModel)
    with pytest.warns(UserWarning, match="no image codebook"):
        flava.FlavaModel(cfg).save_pretrained(tmp_path / "bare")
        flava.load(tmp_path / "bare", pretraining=True, codebook=None)


# --------------------------------------------------------------------------- two processes


def _contrastive_worker(rank, world, port, img, txt, scale, results, gather_features=True):
    import torch.distributed as dist

    with gloo_group(rank, world, port):
        B = img.shape[0] // world
        i = img[rank * B:(rank + 1) * B].clone().requires_grad_()
        t = txt[rank * B:(rank + 1) * B].clone().requires_grad_()
        s = scale.clone().requires_grad_()
        res = global_contrastive_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s, gather_features)
        res.loss.backward()
        # DDP averages gradients over processes: do the same for the shared logit scale.
        s_grad = s.grad.clone()
        dist.all_reduce(s_grad)
        results[rank] = (res.loss.detach(), i.grad, t.grad, s_grad / world, res.labels)


@pytest.mark.distributed
def test_global_contrastive_two_processes_equal_one_process():
    world, B, D = 2, 5, 16
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)
    scale = torch.tensor(2.0)
    results = Results()
    spawn(_contrastive_worker, (world, free_port(), img, txt, scale, results), world)

    i, t, s = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
    one = global_contrastive_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s)
    one.loss.backward()
    losses = torch.stack([results[r][0] for r in range(world)])
    torch.testing.assert_close(losses.mean(), one.loss, atol=1e-6, rtol=0)
    # Each process's loss is the mean over its rows: the one-process gradient is their average.
    torch.testing.assert_close(torch.cat([results[r][1] for r in range(world)]) / world, i.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([results[r][2] for r in range(world)]) / world, t.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][3], s.grad, atol=1e-6, rtol=0)
    assert torch.equal(results[1][4], torch.arange(B, 2 * B))


@pytest.mark.distributed
def test_local_contrastive_scores_every_column_but_back_propagates_to_its_own_rows():
    """gather_features=False (the paper's local contrastive loss): the same loss values as the
    global one, but each process's gradient is its own loss's gradient with the other processes'
    features held constant."""
    world, B, D = 2, 4, 8
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)
    scale = torch.tensor(2.0)
    results = Results()
    spawn(_contrastive_worker, (world, free_port(), img, txt, scale, results, False), world)
    for r in range(world):
        own = torch.zeros(world * B, dtype=torch.bool)
        own[r * B:(r + 1) * B] = True
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        # Other processes' rows as constants; the rows of process r alone in the loss.
        ii, tt = torch.where(own[:, None], i, i.detach()), torch.where(own[:, None], t, t.detach())
        ref = global_contrastive_loss(F.normalize(ii, dim=-1), F.normalize(tt, dim=-1), scale, rows=own)
        ref.loss.backward()
        torch.testing.assert_close(results[r][0], ref.loss.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(results[r][1], i.grad[own], atol=1e-6, rtol=0)
        torch.testing.assert_close(results[r][2], t.grad[own], atol=1e-6, rtol=0)
        assert not i.grad[~own].any()
    # The global loss would also move the other process's rows: the two differ.
    glob = Results()
    spawn(_contrastive_worker, (world, free_port(), img, txt, scale, glob, True), world)
    assert not torch.allclose(glob[0][1], results[0][1], atol=1e-6)


def _hard_negatives_worker(rank, world, port, results):
    with gloo_group(rank, world, port):
        cfg = tiny_config()
        torch.manual_seed(0)  # the same weights on both ranks
        pm = PretrainingModel(cfg, ObjectivesConfig(itm_negatives="hard"),
                              codebook=flava.FlavaImageCodebook(cfg.codebook))
        b = pair_batch(cfg, B=4, seed=rank)
        if rank == 1:  # texts of another length on this rank
            b = PairBatch(b.pixel_values, b.input_ids[:, :6], b.attention_mask[:, :6], b.patch_mask,
                          b.masked_input_ids[:, :6], b.mlm_labels[:, :6], b.codebook_pixels)
        out = pm(b, torch.Generator().manual_seed(rank))
        out.losses.total.backward()
        # The longest text is agreed on the host, never on the device (under NCCL a device reduction
        # read back is a host-device sync each step): a device it cannot use is never touched.
        import flava.distributed as distributed

        distributed.start_host_group()  # gloo's own group serves: nothing to start
        assert distributed.host_group() is None
        longest = distributed.max_over_processes(b.input_ids.shape[1], torch.device("meta"))
        nccl = torch.distributed.get_backend
        torch.distributed.get_backend = lambda *a: "nccl"  # as a GPU run joins its group
        try:
            distributed.start_host_group()
        finally:
            torch.distributed.get_backend = nccl
        assert distributed.host_group() is not None
        beside = distributed.max_over_processes(3 + rank, torch.device("meta"))
        distributed.end_host_group()
        results[rank] = (set(out.losses.named()), bool(torch.isfinite(out.losses.total)),
                         float(pm.model.text_encoder.word_embeddings.weight.grad.abs().sum()), longest, beside)


@pytest.mark.distributed
def test_hard_negatives_across_two_processes_with_different_text_lengths():
    results = Results()
    spawn(_hard_negatives_worker, (2, free_port(), results), 2)
    for rank in range(2):
        names, finite, grad, longest, beside = results[rank]
        assert names == {"global_contrastive", "itm", "mmm_image", "mmm_text"} and finite and grad > 0
        assert (longest, beside) == (8, 4)


def test_codebook_targets_are_the_same_under_autocast():
    cfg = tiny_config()
    torch.manual_seed(0)
    pm = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cfg.codebook))
    batch = pair_batch(cfg, B=8)
    want = pm.image_targets(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pm.image_targets(batch)
    assert torch.equal(got, want)


def test_a_codebook_of_another_size_says_what_to_set():
    from flava.errors import ConfigError

    cfg = preset("tiny")
    cb = preset("tiny").codebook
    cb.vocab_size = cfg.image.vocab_size * 2
    with pytest.raises(ConfigError, match=rf"the image codebook has {cb.vocab_size} tokens .* set "
                                          rf"model.image.vocab_size={cb.vocab_size}"):
        PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cb))
    # Fewer tokens than the heads predict are targets all the same, as transformers takes them: a
    # checkpoint's heads cannot be resized (a new run is told to size them: test_errors_and_config).
    cb.vocab_size = cfg.image.vocab_size // 2
    pm = PretrainingModel(cfg, codebook=flava.FlavaImageCodebook(cb))
    pixels = torch.rand(2, 3, cfg.image.image_size, cfg.image.image_size)
    assert int(pm.codebook.token_ids(pixels).max()) < cb.vocab_size


def test_a_zero_masking_rate_is_refused_where_an_objective_predicts_masked_positions():
    # At 0 nothing is masked: MIM/MMM-image (or MLM/MMM-text) measured nothing on every step, the
    # run ending with exit 0 and an empty losses table.
    from flava.config import ObjectivesConfig
    from flava.errors import ConfigError
    from flava.train.config import TrainConfig
    from flava.train.kinds import trained_kinds

    with pytest.raises(ConfigError, match=r"image_mask_ratio=0 masks nothing, so MIM and MMM-image would measure "
                                          r"nothing: .* or set objectives.mim_weight=0 and "
                                          r"objectives.mmm_image_weight=0"):
        trained_kinds(TrainConfig(objectives=ObjectivesConfig(image_mask_ratio=0)))
    with pytest.raises(ConfigError, match=r"text_mask_probability=0 masks nothing, so MLM would"):
        trained_kinds(TrainConfig(stage="text-mlm", objectives=ObjectivesConfig(text_mask_probability=0)))
    # A rate no trained objective reads is no matter: the text stage masks no image.
    assert trained_kinds(TrainConfig(stage="text-mlm", objectives=ObjectivesConfig(image_mask_ratio=0)))[0] == ("text",)
    off = ObjectivesConfig(image_mask_ratio=0, mim_weight=0, mmm_image_weight=0)
    assert trained_kinds(TrainConfig(objectives=off))[0] == ("pairs", "text")
    # Nor MIM's where no image data is given: it never runs.
    from flava.train.config import DataConfig

    pairs_only = TrainConfig(objectives=ObjectivesConfig(image_mask_ratio=0, mmm_image_weight=0),
                             data=DataConfig(pairs=["pairs.csv"]))
    assert trained_kinds(pairs_only)[0] == ("pairs",)


def test_a_stage_with_nothing_to_train_names_the_data_it_reads():
    from flava.errors import ConfigError
    from flava.train.config import DataConfig, TrainConfig
    from flava.train.kinds import trained_kinds

    with pytest.raises(ConfigError, match=r"stage text-mlm has nothing to train: it trains on text, but no text data "
                                          r"given \(data.text\).*Name data for it \(data.text\) or"):
        trained_kinds(TrainConfig(stage="text-mlm", data=DataConfig(pairs=["pairs.csv"])))


def test_rows_taken_twice_sum_their_gradients_in_the_same_order_every_time():
    # ITM's swapped captions take a text's row twice; indexing's backward added the repeats
    # atomically across threads on the CPU, so the gradient's bits changed from run to run.
    from flava.model.layers import take_rows as _rows

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        x, index, g = torch.randn(4, 256, requires_grad=True), torch.randint(0, 4, (20000,)), torch.randn(20000, 256)

        def grad():
            x.grad = None
            _rows(x, index).backward(g)
            return x.grad.clone()

        first = grad()
        assert all(torch.equal(grad(), first) for _ in range(10))
        assert torch.equal(first, torch.zeros(4, 256).index_add_(0, index, g))
    finally:
        torch.set_num_threads(threads)

"""DINO self-distillation: EMA teacher, centering, the loss, schedules, the head's last layer,
multi-crop augmentation, collapse metrics, and a short training run whose loss falls."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import free_port, gloo_group
from zygote import Results, spawn
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

import flava
from flava.config import from_dict
from flava.data import multicrop as mc
from flava.data.multicrop import (
    MultiCropSpec,
    collate_multicrop,
    multi_crop,
)
from flava.errors import ConfigError, InputError
from flava.objectives.dino import (
    DinoConfig,
    DinoHead,
    DinoLoss,
    DinoModel,
    collapse_metrics,
    momentum_schedule,
    update_teacher,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_image(image_size=32):
    return dataclasses.replace(flava.preset("tiny").image, image_size=image_size)


def small_dino(**over):
    base = {"out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 16, "local_crops": 2}
    return DinoConfig(**{**base, **over})


def random_crops(B=2, n_local=2, size=32, local=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * B, 3, size, size, generator=g), torch.randn(n_local * B, 3, local, local, generator=g)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- teacher


def test_teacher_follows_the_ema_rule_and_gets_no_gradient():
    torch.manual_seed(0)
    model = DinoModel(small_dino(), tiny_image())
    students, teachers = list(model.student.parameters()), list(model.teacher.parameters())
    assert all(torch.equal(s, t) for s, t in zip(students, teachers))  # the teacher starts as a copy
    assert not any(t.requires_grad for t in teachers)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    g, loc = random_crops()
    # The last two as a GPU run decides them, on the device: a finite step, then a skipped one.
    for momentum, finite in ((0.9, None), (0.99, None), (0.5, None), (0.7, torch.tensor(True)),
                             (0.7, torch.tensor(False))):
        out = model(g, loc, epoch=5)
        opt.zero_grad()
        out.loss.backward()
        assert all(t.grad is None for t in teachers)
        opt.step()
        before = [t.detach().double().clone() for t in teachers]
        model.step_teacher(momentum, finite)
        m = 1.0 if finite is not None and not finite else momentum
        for t0, s, t in zip(before, students, teachers):
            expected = m * t0 + (1 - m) * s.detach().double()
            torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-6)
    trained = [(s, t) for s, t in zip(students, teachers) if s.requires_grad]
    assert all(not torch.equal(s, t) for s, t in trained)
    # Parameters DINO never trains (mask token, pooler, the fixed row norms) stay equal.
    frozen = [(s, t) for s, t in zip(students, teachers) if not s.requires_grad]
    assert frozen and all(torch.allclose(s, t) for s, t in frozen)


def test_update_teacher_rejects_a_mismatched_teacher():
    with pytest.raises(InputError, match="copy of the student"):
        update_teacher(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3), 0.9)


def test_teacher_stays_in_eval_mode():
    model = DinoModel(small_dino(), tiny_image()).train()
    assert model.student.training and not model.teacher.training


# --------------------------------------------------------------------------- loss and center


def test_center_follows_the_ema_of_the_teacher_batch_mean():
    loss = DinoLoss(DinoConfig(out_dim=5, center_momentum=0.9))
    g = torch.Generator().manual_seed(1)
    center = torch.zeros(1, 5, dtype=torch.float64)
    for _ in range(3):
        teacher = torch.randn(4, 5, generator=g) * 3
        loss(torch.randn(8, 5, generator=g), teacher, 0)
        center = 0.9 * center + 0.1 * teacher.double().mean(0, keepdim=True)
        torch.testing.assert_close(loss.center.double(), center, rtol=0, atol=1e-7)


def test_a_warm_started_center_begins_at_the_first_batch_mean_and_a_set_one_is_kept():
    torch.manual_seed(0)
    cfg = small_dino(center_warm_start=True)
    model = DinoModel(cfg, tiny_image(32))
    crops = random_crops()
    with torch.no_grad():
        teacher, student = model.teacher(crops[0]), model.student(*crops)
    out = model(*crops, epoch=0)
    mean = teacher.mean(0, keepdim=True)
    # The first loss is measured against the batch's own mean, which the update then keeps.
    against_mean = DinoLoss(dataclasses.replace(cfg, center_warm_start=False))
    against_mean.center.copy_(mean)
    assert out.loss.item() == pytest.approx(against_mean(student, teacher, 0).item(), rel=1e-6)
    torch.testing.assert_close(model.loss.center, mean)
    # A resumed run's center is not replaced; the reference's (no warm start) starts at zero.
    resumed = DinoModel(cfg, tiny_image(32))
    resumed.load_state_dict(model.state_dict())
    plain = DinoModel(small_dino(), tiny_image(32))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "loss.center"}, strict=False)
    crops = random_crops(seed=1)
    with torch.no_grad():
        teacher = resumed.teacher(crops[0])
    resumed(*crops, epoch=0)
    plain(*crops, epoch=0)
    torch.testing.assert_close(resumed.loss.center, 0.9 * mean + 0.1 * teacher.mean(0, keepdim=True))
    torch.testing.assert_close(plain.loss.center, 0.1 * teacher.mean(0, keepdim=True))


def _center_worker(rank, world, port, teacher, results):
    with gloo_group(rank, world, port):
        loss = DinoLoss(DinoConfig(out_dim=teacher.shape[1], center_momentum=0.9))
        rows = teacher.shape[0] // world
        mine = teacher[rank * rows:(rank + 1) * rows]
        loss(torch.zeros(2 * rows, teacher.shape[1]), mine, 0)
        results[rank] = loss.center.clone()


@pytest.mark.distributed
def test_center_is_the_mean_over_every_process():
    world = 2
    teacher = torch.randn(world * 4, 5, generator=torch.Generator().manual_seed(5))
    results = Results()
    spawn(_center_worker, (world, free_port(), teacher, results), world)
    expected = 0.1 * teacher.mean(0, keepdim=True)
    for rank in range(world):
        torch.testing.assert_close(results[rank], expected, rtol=0, atol=1e-7)


def _dims_worker(rank, world, port, teacher, results):
    with gloo_group(rank, world, port):
        rows = teacher.shape[0] // world
        mine = teacher[rank * rows:(rank + 1) * rows]
        results[rank] = collapse_metrics(mine, mine.repeat(2, 1), torch.zeros(1, teacher.shape[1]), 0.04, 0.1)[
            "dims_in_use"].item()


@pytest.mark.distributed
def test_dims_in_use_counts_every_processs_batch():
    # Counted on each process's batch and averaged, it had made 2 processes look more collapsed than 1
    # process of their whole batch.
    world, K = 2, 64
    teacher = torch.randn(world * 8, K, generator=torch.Generator().manual_seed(6)) * 2
    results = Results()
    spawn(_dims_worker, (world, free_port(), teacher, results), world)
    whole = len(torch.unique(teacher.argmax(-1))) / K
    assert results[0] == results[1] == pytest.approx(whole)


def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_equals_hand_computed_cross_entropy():
    K, B, V = 5, 2, 4  # 2 global + 2 local crops
    cfg = DinoConfig(out_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                     student_temp=0.1)
    loss_fn = DinoLoss(cfg)
    g = torch.Generator().manual_seed(2)
    center = torch.randn(1, K, generator=g) * 0.1
    loss_fn.center.copy_(center)
    teacher, student = torch.randn(2 * B, K, generator=g), torch.randn(V * B, K, generator=g)
    loss = loss_fn(student, teacher, epoch=1)  # warm-up midpoint: teacher temperature 0.055

    t, s, c = teacher.double().tolist(), student.double().tolist(), center.double()[0].tolist()
    total, pairs = 0.0, 0
    for q in range(2):
        for v in range(V):
            if v == q:
                continue
            ce = 0.0
            for b in range(B):
                p = _softmax([(t[q * B + b][k] - c[k]) / 0.055 for k in range(K)])
                log_s = [math.log(x) for x in _softmax([s[v * B + b][k] / 0.1 for k in range(K)])]
                ce -= sum(p[k] * log_s[k] for k in range(K))
            total += ce / B
            pairs += 1
    assert pairs == 6
    assert loss.item() == pytest.approx(total / pairs, rel=1e-5)


def test_loss_rejects_misshaped_outputs():
    loss = DinoLoss(DinoConfig(out_dim=5))
    with pytest.raises(InputError, match="two global crops"):
        loss(torch.zeros(6, 5), torch.zeros(3, 5), 0)
    with pytest.raises(InputError, match="V >= 2"):
        loss(torch.zeros(2, 5), torch.zeros(4, 5), 0)


def test_teacher_temperature_schedule():
    loss = DinoLoss(DinoConfig(out_dim=5, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4))
    reference = np.concatenate([np.linspace(0.04, 0.07, 4), np.full(6, 0.07)])  # DINO's per-epoch table
    for epoch in range(10):
        assert loss.teacher_temperature(epoch) == pytest.approx(reference[epoch], abs=1e-12)
    assert loss.teacher_temperature(0.5) == pytest.approx(0.045)
    assert loss.teacher_temperature(3.5) == pytest.approx(0.07)
    assert DinoLoss(DinoConfig(out_dim=5, teacher_temp=0.05)).teacher_temperature(0) == 0.05


def test_momentum_schedule_is_a_cosine_from_base_to_one():
    steps = 101
    m = momentum_schedule(0.996, 1.0, steps)
    assert m.shape == (steps,)
    assert m[0] == 0.996 and m[-1] == 1.0
    assert m[50] == pytest.approx(0.998, abs=1e-12)
    assert m[25] == pytest.approx(1 - 0.002 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert np.all(np.diff(m) > 0)
    assert momentum_schedule(0.9, 1.0, 1).tolist() == [0.9]
    with pytest.raises(ConfigError):
        momentum_schedule(0.9, 1.0, 0)


# --------------------------------------------------------------------------- head


def test_head_shapes_and_normalised_last_layer():
    head = DinoHead(32, 10, hidden_dim=24, bottleneck_dim=8, layers=3)
    assert head(torch.randn(7, 32)).shape == (7, 10)
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.equal(magnitude, torch.ones(10, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))
    assert head.last_layer.bias is None
    free = DinoHead(32, 10, hidden_dim=24, bottleneck_dim=8, layers=1, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert len(free.mlp) == 1


def test_last_layer_keeps_unit_norm_and_is_frozen_in_the_first_epochs():
    torch.manual_seed(3)
    model = DinoModel(small_dino(freeze_last_layer=2), tiny_image())
    last = model.student.head.last_layer
    direction = last.parametrizations.weight.original1
    opt = torch.optim.AdamW(trainable(model), lr=0.05, weight_decay=0.04)
    g, loc = random_crops()
    for epoch in (0, 1.5, 2, 3):
        out = model(g, loc, epoch=epoch)
        opt.zero_grad()
        out.loss.backward()
        assert direction.grad is not None and direction.grad.abs().sum() > 0
        before = direction.detach().clone()
        model.cancel_last_layer_grad(epoch)
        frozen = epoch < 2
        assert (direction.grad is None) == frozen
        opt.step()
        assert torch.equal(direction, before) == frozen
        torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(64))
        assert torch.equal(last.parametrizations.weight.original0, torch.ones(64, 1))


# --------------------------------------------------------------------------- config


def test_config_reads_strictly_and_sizes_local_crops():
    cfg = from_dict(DinoConfig, {"out_dim": 128, "local_crop_size": None, "local_crops": 4})
    assert cfg.out_dim == 128 and cfg.local_crop_size is None
    base = flava.preset("base").image
    assert cfg.local_size(base) == 96  # DINO's 96 px at 224
    assert cfg.local_size(tiny_image(64)) == 24
    spec = cfg.crop_spec(base)
    assert (spec.global_size, spec.local_size, spec.local_crops) == (224, 96, 4)
    assert spec.global_scale == (0.4, 1.0) and spec.local_scale == (0.05, 0.4)
    with pytest.raises(ConfigError, match="out_dm"):
        from_dict(DinoConfig, {"out_dm": 3})
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        DinoConfig(local_crop_size=20).validate(base)
    with pytest.raises(ConfigError, match="local_crop_scale_min"):
        DinoConfig(local_crop_scale_min=0.5).validate(base)
    # One output trained nothing (its loss 0 at every step), and a "local" crop above the global size
    # had been taken without a word.
    with pytest.raises(ConfigError, match=r"dino.out_dim \(1\) must be at least 2"):
        DinoConfig(out_dim=1).validate(base)
    with pytest.raises(ConfigError, match=r"dino.local_crop_size \(256\) is larger than the global crops' "
                                          r"model.image.image_size \(224\)"):
        DinoConfig(local_crop_size=256).validate(base)


# --------------------------------------------------------------------------- multi-crop


def _photo(seed=0, w=80, h=60):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_multi_crop_shapes_and_determinism():
    spec = MultiCropSpec(global_size=32, local_size=16, local_crops=3)
    image = _photo()
    a = multi_crop(image, spec, np.random.default_rng([7, 5]))
    assert a.global_crops.shape == (2, 3, 32, 32) and a.global_crops.dtype == torch.float32
    assert a.local_crops.shape == (3, 3, 16, 16) and a.local_crops.dtype == torch.float32
    # CLIP-normalised pixels of [0, 1] images.
    assert a.global_crops.min() >= (0 - 0.49) / 0.26 and a.global_crops.max() <= (1 - 0.40) / 0.26
    same = multi_crop(image, spec, np.random.default_rng([7, 5]))
    assert torch.equal(a.global_crops, same.global_crops) and torch.equal(a.local_crops, same.local_crops)
    for key in ([7, 6], [8, 5]):
        other = multi_crop(image, spec, np.random.default_rng(key))
        assert not torch.equal(a.global_crops[0], other.global_crops[0])
        assert not torch.equal(a.global_crops[1], other.global_crops[1])
        assert not torch.equal(a.local_crops, other.local_crops)
    assert not torch.equal(a.global_crops[0], a.global_crops[1])
    assert not torch.equal(a.local_crops[0], a.local_crops[1])

    batch = collate_multicrop([a, other])
    assert batch.global_crops.shape == (4, 3, 32, 32) and batch.local_crops.shape == (6, 3, 16, 16)
    # Crop-major: crop k of every image, then crop k + 1.
    assert torch.equal(batch.global_crops[1], other.global_crops[0])
    assert torch.equal(batch.global_crops[2], a.global_crops[1])
    assert torch.equal(batch.local_crops[5], other.local_crops[2])
    none = multi_crop(np.asarray(image), dataclasses.replace(spec, local_crops=0), np.random.default_rng(0))
    assert collate_multicrop([none]).local_crops is None


def _pil_hue(image, turn):
    """DINO's hue step in PIL's 8-bit HSV (torchvision's ColorJitter on a PIL image)."""
    h, s, v = image.convert("HSV").split()
    hue = ((np.asarray(h, dtype=np.int16) + round(turn * 255) % 256) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


# DINO's photometric steps as its PIL pipeline runs them, by `colour`'s step numbers.
PIL_STEPS = {0: lambda im, f: ImageEnhance.Brightness(im).enhance(f),
             1: lambda im, f: ImageEnhance.Contrast(im).enhance(f),
             2: lambda im, f: ImageEnhance.Color(im).enhance(f), 3: _pil_hue,
             4: lambda im, f: im.convert("L").convert("RGB"), 5: lambda im, f: im.filter(ImageFilter.GaussianBlur(f)),
             6: lambda im, f: ImageOps.solarize(im, mc.SOLARIZE_THRESHOLD)}


def _pil_colour(crop: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A [H, W, 3] uint8 crop through DINO's PIL steps with the choices in its colour row."""
    im = Image.fromarray(crop)
    if row[mc.JITTER]:
        for step in row[mc.ORDER].astype(int):
            im = PIL_STEPS[step](im, float(row[mc.FACTORS][step]))
    if row[mc.GREY]:
        im = PIL_STEPS[4](im, 0)
    if row[mc.SIGMA]:
        im = PIL_STEPS[5](im, float(row[mc.SIGMA]))
    if row[mc.SOLARIZE]:
        im = PIL_STEPS[6](im, 0)
    return np.asarray(im, dtype=np.float32)


def _levels(crops: torch.Tensor) -> np.ndarray:
    """`colour`'s output at mean 0 and std 1/255: [n, 3, H, W] -> [n, H, W, 3] pixel levels."""
    return crops.permute(0, 2, 3, 1).numpy()


def _photos():
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


LEVELS = ((0.0,) * 3, (1 / 255,) * 3)


@pytest.mark.parametrize("step,factor,worst", [(0, 0.6, 1.5), (0, 1.4, 1.5), (1, 0.6, 1.5), (1, 1.4, 1.5),
                                               (2, 0.8, 1.5), (2, 1.2, 1.5), (3, -0.1, 6), (3, 0.07, 6), (4, 0, 1),
                                               (5, 0.1, 4), (5, 1.0, 6), (5, 2.0, 16), (6, 0, 0.01)])
def test_each_colour_step_is_dinos_pil_step(step, factor, worst):
    # Floating point against 8 bits: within rounding on average (solarization: exactly, at its
    # threshold too). Hue's largest gaps come from PIL's 8-bit hue, the blur's from PIL's box
    # approximation of the Gaussian.
    for photo in _photos():
        crop = np.ascontiguousarray(photo[:224, :224])
        row = np.zeros(mc.COLOUR_ROW, np.float32)
        if step < 4:
            row[mc.JITTER], row[mc.ORDER] = 1, [step] + [s for s in range(4) if s != step]
            row[mc.FACTORS] = [1.0, 1.0, 1.0, 0.0]
            row[mc.FACTORS.start + step] = factor
        else:
            row[{4: mc.GREY, 5: mc.SIGMA, 6: mc.SOLARIZE}[step]] = factor or 1
        pixels = torch.from_numpy(crop).permute(2, 0, 1)[None]
        ours = _levels(mc.colour(pixels, torch.from_numpy(row[None]), *LEVELS))[0]
        gap = np.abs(ours - np.asarray(PIL_STEPS[step](Image.fromarray(crop), factor), dtype=np.float32))
        assert gap.mean() < 0.6 and gap.max() <= worst, (step, factor, gap.mean(), gap.max())
        if step not in (4, 6) and factor not in (0.1,):  # the step did something
            assert np.abs(ours - crop).mean() > 2, (step, factor)


def _one_crop(crop: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """A [3, H, W] uint8 crop through `colour`'s steps one at a time, in its row's order -> levels."""
    y = crop[None].float() / 255
    if row[mc.JITTER]:
        for step in row[mc.ORDER].int().tolist():
            y = mc._JITTER_STEPS[step](y, row[mc.FACTORS][step].view(1, 1, 1, 1))
    if row[mc.GREY]:
        y = mc._grey(y).expand(-1, 3, -1, -1)
    if row[mc.SIGMA]:
        y = mc._blur(y, row[mc.SIGMA].view(1), math.ceil(3 * float(row[mc.SIGMA])))
    if row[mc.SOLARIZE]:
        y = torch.where(y >= mc.SOLARIZE_THRESHOLD / 255, 1 - y, y)
    return y[0].permute(1, 2, 0).numpy() * 255


def test_the_colour_steps_of_every_crop_follow_its_drawn_choices_and_order():
    """Whole multi-crops, uint8 with their colour rows, coloured as a batch: each crop as if it
    were coloured alone, step by step in its own order; and, up to 8-bit rounding, the pictures
    DINO's PIL steps make with the same choices."""
    spec = MultiCropSpec(global_size=64, local_size=32, local_crops=4)
    pil_gaps, moved, seen = [], [], set()
    for i, photo in enumerate(_photos()):
        views = multi_crop(photo, spec, np.random.default_rng([3, i]), coloured=False)
        for crops, rows in ((views.global_crops, views.global_colour), (views.local_crops, views.local_colour)):
            ours = _levels(mc.colour(crops, rows, *LEVELS))
            for k in range(len(crops)):
                np.testing.assert_allclose(ours[k], _one_crop(crops[k], rows[k]), atol=2e-3)
                want = _pil_colour(crops[k].permute(1, 2, 0).numpy(), rows[k].numpy())
                pil_gaps.append(np.abs(ours[k] - want).mean())
                moved.append(np.abs(want - crops[k].permute(1, 2, 0).numpy()).mean())
                seen.update(s for s, col in ((4, mc.GREY), (5, mc.SIGMA), (6, mc.SOLARIZE)) if rows[k, col])
                seen.add(tuple(rows[k, mc.ORDER].int().tolist()) if rows[k, mc.JITTER] else "no jitter")
    assert {4, 5, "no jitter"} <= seen and len(seen) > 10, seen  # many orders and every step met
    assert np.mean(pil_gaps) < 2 and max(pil_gaps) < 4, pil_gaps
    assert np.mean(moved) > 8  # the steps changed the pictures far more than the two versions differ


def test_a_crops_blur_does_not_depend_on_the_crops_beside_it():
    # Each kernel is cut at its own 3 sigma: a crop blurred beside one of a wider blur (a longer
    # kernel for the batch) comes out as it does alone, up to the order of the additions.
    y = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    alone = mc._blur(y[:1], torch.tensor([1.0]), 3)
    beside = mc._blur(y, torch.tensor([1.0, 2.0]), 6)[:1]
    assert torch.allclose(alone, beside, atol=1e-6, rtol=0), (alone - beside).abs().max()


def test_crops_coloured_on_their_way_to_the_device_are_the_workers_crops():
    spec = MultiCropSpec(global_size=32, local_size=16, local_crops=3)
    image = _photo()
    done = [multi_crop(image, spec, np.random.default_rng([5, i])) for i in range(3)]
    raw = [multi_crop(image, spec, np.random.default_rng([5, i]), coloured=False) for i in range(3)]
    assert raw[0].global_crops.dtype == torch.uint8 and raw[0].global_colour.shape == (2, mc.COLOUR_ROW)
    batch = collate_multicrop(raw)
    moved = batch.pin_memory() if torch.cuda.is_available() else batch
    on = moved.to("cpu", mean=spec.mean, std=spec.std)
    want = collate_multicrop(done)
    assert on.global_colour is None and torch.allclose(on.global_crops, want.global_crops, atol=1e-5)
    assert torch.allclose(on.local_crops, want.local_crops, atol=1e-5)


def test_multi_crops_of_a_stored_jpeg_decode_it_at_the_scale_its_crops_need():
    # A stored image is decoded by the loader's JPEG path: at full scale where a crop needs it (the
    # very pixels of the image decoded whole), at the smallest fast reduced DCT scale that still gives
    # every crop its size in pixels (a web-sized photograph), and by PIL where libjpeg-turbo refuses
    # the file, with the same choices each way.
    import io as _io

    import skimage.data

    from flava.data import decode
    from flava.data.members import Blob

    for side, reduced, spec in ((96, False, MultiCropSpec(64, 32, local_crops=3)),
                                (768, True, MultiCropSpec(224, 96, local_crops=3))):
        im = Image.fromarray(skimage.data.astronaut()).resize((side * 4 // 3, side), Image.BICUBIC)
        buf = _io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        data = buf.getvalue()
        cut = data.index(b"\xff\xda")
        refused = data[:cut] + b"\0\0\0" + data[cut:]  # bytes before a marker: libjpeg-turbo (strict) refuses
        whole = multi_crop(np.array(Image.open(_io.BytesIO(data)).convert("RGB")), spec,
                           np.random.default_rng([2, side]), coloured=False)
        asked, decoded = [], []
        real = decode.decode_rgb

        def spy(ref, draft=None, memo=None):
            out = real(ref, lambda w, h: asked.append(((w, h), draft(w, h))) or asked[-1][1], memo)
            decoded.append(out.shape[:2])
            return out
        try:
            decode.decode_rgb = spy
            got = multi_crop(Blob(data, ".jpg"), spec, np.random.default_rng([2, side]), coloured=False)
            by_pil = multi_crop(Blob(refused, ".jpg"), spec, np.random.default_rng([2, side]), coloured=False)
        finally:
            decode.decode_rgb = real
        (stored, least), (height, width) = asked[0], decoded[0]
        assert width >= least[0] and height >= least[1]  # every crop keeps its size ...
        k = round(8 * width / stored[0])  # ... at the smallest fast scale (1/8, 1/4, 1/2, whole) that does
        assert k in (1, 2, 4, 8), k
        assert k == 1 or -(-stored[0] * (k // 2) // 8) < least[0] or -(-stored[1] * (k // 2) // 8) < least[1]
        assert (k < 8) == reduced, (side, k)
        for view in (got, by_pil):
            assert torch.equal(view.global_colour, whole.global_colour)
            assert torch.equal(view.local_colour, whole.local_colour)
        gap = (got.global_crops.float() - whole.global_crops.float()).abs().mean()
        local = (got.local_crops.float() - whole.local_crops.float()).abs().mean()
        # The same picture, up to boxes rounded to the scaled decode's whole pixels (an edge moves
        # by up to half a decoded pixel) and the scaled decode itself: 2.3 levels here.
        assert (gap == 0 and local == 0) if not reduced else (0 < gap < 4 and local < 4), (side, gap, local)


def test_a_crop_box_that_is_no_box_is_a_bad_sample():
    # A prepared crop read from a damaged .npy (zero width, NaN): counted and skipped by the
    # loader, not a crash of the decoder (simplejpeg's OverflowError, ValueError).
    import io as _io

    from flava.data.decode import decode_crop
    from flava.data.members import BadSample, Blob

    buf = _io.BytesIO()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(buf, "JPEG")
    for box in ((10, 10, 10, 50), (40, 10, 20, 50), (0, 0, float("nan"), 30), (0, 0, float("inf"), 30)):
        with pytest.raises(BadSample, match="unusable crop box"):
            decode_crop(Blob(buf.getvalue(), ".jpg"), lambda w, h: box, 32)
    (crop,) = decode_crop(Blob(buf.getvalue(), ".jpg"), lambda w, h: (10, 10, 10.5, 50), 32)  # half a pixel wide
    assert crop.shape == (3, 32, 32)


def test_hue_turned_by_half_a_turn_turns_red_to_cyan():
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    row = torch.zeros(1, mc.COLOUR_ROW)
    row[0, mc.JITTER], row[0, mc.ORDER], row[0, mc.FACTORS] = 1, torch.tensor([3.0, 0, 1, 2]), torch.tensor(
        [1.0, 1, 1, 0.5])
    r, g, b = _levels(mc.colour(red, row, *LEVELS))[0, 0, 0]
    assert r < 1 and g > 254 and b > 254


# --------------------------------------------------------------------------- collapse metrics


def test_collapse_metrics_tell_a_collapsed_batch_from_a_spread_one():
    K, B = 64, 16
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, K, generator=g)
    collapsed = row.repeat(2 * B, 1)
    # The center has caught up with the constant output: the teacher is uniform.
    c = collapse_metrics(collapsed, collapsed.repeat(2, 1), row, 0.04, 0.1)
    assert c["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-5)
    assert c["dims_in_use"].item() == pytest.approx(1 / K)

    spread = torch.randn(2 * B, K, generator=g) * 2
    s = collapse_metrics(spread, spread.repeat(2, 1), torch.zeros(1, K), 0.04, 0.1)
    assert s["teacher_entropy"].item() < 0.25 * math.log(K)
    distinct = len(torch.unique(spread.argmax(-1)))
    assert distinct > 10 and s["dims_in_use"].item() == pytest.approx(distinct / K)
    # A student that disagrees with the teacher is far from it; one that agrees is not.
    other = torch.randn(4 * B, K, generator=g) * 2
    assert collapse_metrics(spread, other, torch.zeros(1, K), 0.04, 0.1)["kl_teacher_student"].item() > 1.0
    same = collapse_metrics(spread, spread, torch.zeros(1, K), 0.1, 0.1)
    assert same["kl_teacher_student"].item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------- training


def _pattern_images(n, size=48, seed=0):
    """Four kinds of synthetic picture (stripes either way, rings, checks) in random colours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(n):
        f = rng.uniform(3, 6)
        kind = i % 4
        wave = [np.sin(2 * np.pi * f * x), np.sin(2 * np.pi * f * y),
                np.sin(2 * np.pi * f * np.hypot(x - 0.5, y - 0.5)),
                np.sign(np.sin(2 * np.pi * f * x) * np.sin(2 * np.pi * f * y))][kind]
        colour = rng.uniform(0, 255, 3)
        arr = 127 + wave[..., None] * (colour - 127) + rng.normal(0, 8, (size, size, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return images


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    image_cfg = tiny_image(32)
    cfg = DinoConfig(out_dim=256, head_hidden_dim=128, head_bottleneck_dim=32, local_crops=4, freeze_last_layer=1)
    model = DinoModel(cfg, image_cfg).train()
    spec = cfg.crop_spec(image_cfg)
    assert (spec.global_size, spec.local_size) == (32, 16)
    images, B, steps, seed = _pattern_images(32), 8, 30, 11

    def batch(step):
        return collate_multicrop([multi_crop(images[p % len(images)], spec, np.random.default_rng([seed, p]))
                                  for p in range(step * B, (step + 1) * B)])

    # The center settles before the student moves, as it does during DINO's learning-rate
    # warm-up (a step at learning rate 0 changes nothing else); otherwise the first losses are
    # measured against a center of zeros and the curve shows the center converging, not learning.
    with torch.no_grad():
        for step in range(steps, steps + 40):
            model.loss.update_center(model.teacher(batch(step).global_crops))
    momentum = momentum_schedule(cfg.momentum_teacher, 1.0, steps)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3, weight_decay=0.04)
    per_epoch = len(images) // B
    losses = []
    for step in range(steps):
        crops, epoch = batch(step), step / per_epoch
        out = model(crops.global_crops, crops.local_crops, epoch=epoch)
        opt.zero_grad()
        out.loss.backward()
        model.cancel_last_layer_grad(epoch)
        opt.step()
        model.step_teacher(float(momentum[step]))
        losses.append(out.loss.item())
        assert all(math.isfinite(v.item()) for v in out.metrics.values())
        # A cross-entropy is never below the entropy of its target (Gibbs).
        assert out.loss.item() >= out.metrics["teacher_entropy"].item() - 1e-4
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.3, (first, last, losses)

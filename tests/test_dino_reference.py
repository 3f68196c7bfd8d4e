"""The `image-dino` stage's steps against DINO's reference rules (tests/dino_reference.py, written
from facebookresearch/dino, not from our code), term by term on the same weights and batches:
teacher and student logits, loss, teacher temperature, center, clipped and cancelled gradients,
learning rate, weight decay, the parameter groups, the student's update and the teacher's EMA.

Where our stage differs from the reference on purpose, the test says so and checks our rule:
- the cosine schedules (teacher momentum, weight decay) end on their final value at the last step;
  the reference's stop one step short (its `cosine_scheduler` divides by the step count);
- the CLS and position tokens are not decayed (FLAVA's rule, as timm's `no_weight_decay`); the
  reference decays every parameter of more than one dimension but biases;
- the teacher temperature is interpolated per step between epochs (equal at each epoch's start).
"""

import copy

import numpy as np
import pytest
import torch
from dino_reference import (
    RefHead,
    RefNetwork,
    cancel_gradients_last_layer,
    clip_gradients,
    cosine_scheduler,
    dino_loss,
    ema,
    params_groups,
    teacher_temp_schedule,
    updated_center,
)

from flava.objectives.dino import DinoConfig, DinoLoss, momentum_schedule
from flava.train.presets import demo_config
from flava.train.trainer import Trainer

B, STEPS, LOCAL = 4, 4, 2
LR, EPS = 1e-3, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def stage_config():
    """A tiny DINO stage in which every rule shows within four steps: an epoch per step, the last
    layer frozen for two, the teacher temperature warmed up over three, a fast teacher, a
    gradient clip that bites and a weight decay large enough to see."""
    cfg = demo_config(stage="image-dino", max_steps=STEPS, save_every=STEPS, log_every=1, tensorboard=False)
    cfg.model.image.image_size = 32
    cfg.data.batch_size, cfg.data.num_workers = B, 0
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 0, 0.0
    # Adam divides by |gradient| + eps: with eps far below some gradients' rounding (the CLS-only
    # path rounds differently from the full pass) it would magnify 1e-9 differences to 1e-5.
    cfg.optim.eps = EPS
    d = cfg.dino
    d.out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_layers, d.local_crops = 64, 32, 16, 3, LOCAL
    d.steps_per_epoch, d.freeze_last_layer = 1, 2
    d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs = 0.04, 0.07, 3
    d.student_temp, d.center_momentum, d.momentum_teacher = 0.1, 0.9, 0.9
    d.center_warm_start = False  # the reference's center starts at 0
    d.lr = LR * 256 / B  # DINO's linear rule gives LR at this batch
    d.weight_decay, d.weight_decay_end, d.clip_grad = 0.5, 4.0, 0.05
    return cfg


def reference_network(ours) -> RefNetwork:
    """The reference head with our head's weights, on a copy of our backbone."""
    d_in = ours.head.mlp[0].in_features
    linears = [m for m in ours.head.mlp if isinstance(m, torch.nn.Linear)]
    head = RefHead(d_in, ours.head.last_layer.out_features, linears[0].out_features, linears[-1].out_features,
                   len(linears))
    for ref, our in zip([m for m in head.mlp if isinstance(m, torch.nn.Linear)], linears):
        ref.load_state_dict(our.state_dict())
    w = ours.head.last_layer.parametrizations.weight
    with torch.no_grad():
        head.weight_v.copy_(w.original1)
        head.weight_g.copy_(w.original0)
    return RefNetwork(copy.deepcopy(ours.backbone), head)


def our_named(ours) -> dict[str, torch.nn.Parameter]:
    """Our network's parameters under the reference network's names."""
    out = {}
    for name, p in ours.named_parameters():
        name = name.replace("head.last_layer.parametrizations.weight.original0", "head.weight_g")
        out[name.replace("head.last_layer.parametrizations.weight.original1", "head.weight_v")] = p
    return out


def test_a_stage_step_follows_the_reference_rules_term_by_term(tmp_path):
    cfg = stage_config()
    trainer = Trainer(cfg, tmp_path)
    dino = trainer.model.dino
    ref_student, ref_teacher = reference_network(dino.student), reference_network(dino.teacher)
    ref_teacher.requires_grad_(False)
    center = torch.zeros(1, cfg.dino.out_dim)

    # The parameter groups: the reference's, but for the tokens FLAVA never decays.
    regularized, plain = params_groups(ref_student)
    named = our_named(dino.student)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    ours_regularized = [n for n in named if id(named[n]) in decayed]
    assert set(regularized) - set(ours_regularized) == {"backbone.cls_token", "backbone.pos_embed"}
    assert set(ours_regularized) <= set(regularized)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {n for n in named if id(named[n]) in trained} == set(regularized) | set(plain)
    ref_params = dict(ref_student.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [ref_params[n] for n in ours_regularized]},
                                   {"params": [ref_params[n] for n in plain + ["backbone.cls_token",
                                                                               "backbone.pos_embed"]],
                                    "weight_decay": 0.0}], eps=EPS)

    # The reference's schedules for a run of STEPS epochs of one step each.
    d = cfg.dino
    lr = cosine_scheduler(d.lr * B / 256, 0.0, STEPS, 1)
    # Ours end on the final value (one step later than the reference's would).
    wd = np.append(cosine_scheduler(d.weight_decay, d.weight_decay_end, STEPS - 1, 1), d.weight_decay_end)
    momentum = np.append(cosine_scheduler(d.momentum_teacher, 1.0, STEPS - 1, 1), 1.0)
    temps = teacher_temp_schedule(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, STEPS)

    # What our step saw and did: its batches, logits, the gradients and weight decay the optimizer got.
    seen = {}
    stream = trainer.streams["images"]
    draw = stream.next_batch

    def next_batch():
        seen["batch"] = draw()
        return seen["batch"]

    stream.next_batch = next_batch
    dino.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", o.detach().clone()))
    dino.student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", o.detach().clone()))
    before = trainer.stage.before_update

    def snapshot(step):
        before(step)
        seen["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in named.items()}

    trainer.stage.before_update = snapshot
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.__setitem__("wd", [g["weight_decay"] for g in opt.param_groups]))

    for step in range(STEPS):
        row = trainer.train_step()
        batch = seen["batch"]
        crops = [batch.global_crops, batch.local_crops]
        # The reference's step on the same batch.
        for group in optimizer.param_groups:
            group["lr"] = lr[step]
        optimizer.param_groups[0]["weight_decay"] = wd[step]
        t_out = ref_teacher(crops[:1])
        s_out = ref_student(crops)
        torch.testing.assert_close(seen["teacher"], t_out, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(seen["student"], s_out.detach(), rtol=1e-4, atol=1e-6)
        loss = dino_loss(s_out, t_out, center, 2 + LOCAL, temps[step])
        center = updated_center(center, t_out)
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(ref_student, d.clip_grad)
        cancel_gradients_last_layer(step, ref_student, d.freeze_last_layer)
        optimizer.step()
        ema(ref_student, ref_teacher, momentum[step])

        assert row["metrics"]["teacher_temp"] == pytest.approx(temps[step])
        assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(dino.loss.center, center, rtol=1e-4, atol=1e-6)
        assert row["lr"] == pytest.approx(lr[step])
        assert max(seen["wd"]) == pytest.approx(wd[step]) and min(seen["wd"]) == 0.0
        assert row["metrics"]["teacher_momentum"] == pytest.approx(momentum[step])
        for name, p in ref_student.named_parameters():
            ours = seen["grads"][name]
            assert (ours is None) == (p.grad is None), (step, name)
            if ours is not None:
                torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-7, msg=f"gradient of {name}, step {step}")
        frozen = step < d.freeze_last_layer
        assert (seen["grads"]["head.weight_v"] is None) == frozen
        for name, p in ref_student.named_parameters():
            torch.testing.assert_close(named[name].detach(), p.detach(), rtol=1e-4, atol=1e-6,
                                       msg=f"student {name} after step {step}")
        teacher = our_named(dino.teacher)
        for name, p in ref_teacher.named_parameters():
            torch.testing.assert_close(teacher[name], p, rtol=1e-4, atol=1e-6, msg=f"teacher {name} after step {step}")
    assert row["grad_norm"] > d.clip_grad  # the clip bit


def test_our_schedules_end_on_their_final_value_and_otherwise_are_the_references():
    ours = momentum_schedule(0.04, 0.4, 10)
    assert ours[-1] == pytest.approx(0.4)
    np.testing.assert_allclose(ours[:-1], cosine_scheduler(0.04, 0.4, 9, 1), rtol=1e-12)
    # Per step between epochs, the reference's value at each epoch's start.
    loss = DinoLoss(DinoConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30))
    ref = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert [loss.teacher_temperature(e) for e in range(100)] == pytest.approx(list(ref))
    assert loss.teacher_temperature(2.5) == pytest.approx((ref[2] + ref[3]) / 2)

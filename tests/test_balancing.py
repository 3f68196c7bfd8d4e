"""Balancing the objectives (`objectives.balancing`) and the gradient diagnostics: each method
moves its weights as its paper says on hand-made losses; an adaptive run resumed midway repeats
the uninterrupted one; two processes hold the state one process holds; diagnostics are in the
logged rows only."""

import json
import math

import pytest
import torch
from conftest import narrow, narrow_args, tiny_run

from flava.config import ObjectivesConfig
from flava.errors import ConfigError
from flava.train.balancing import METHODS, project_conflicting
from flava.train.balancing.diagnostics import gradient_report
from flava.train.config import TrainConfig
from flava.train.trainer import Trainer

CPU = torch.device("cpu")
NAMES = ["global_contrastive", "itm", "mim", "mlm"]
YES = torch.tensor(True)


def balancer(method: str, **over):
    o = ObjectivesConfig(balancing=method, **over)
    return METHODS[method](NAMES, o, CPU)


def losses(**values) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(float(v)) for k, v in values.items()}


def test_fixed_sums_the_weighted_losses():
    b = balancer("fixed")
    assert b.total(losses(itm=2.0, global_contrastive=3.0)).item() == 5.0
    b.observe(0, losses(itm=2.0), YES)
    assert b.state_dict() == {}


def test_uncertainty_weights_by_exp_minus_s_and_adds_s():
    b = balancer("uncertainty", uncertainty_lr=0.1)
    b.log_var[NAMES.index("itm")] = math.log(2.0)
    ls = losses(itm=4.0, global_contrastive=3.0)
    # exp(-s) L + s for each of the step's objectives.
    assert b.total(ls).item() == pytest.approx(0.5 * 4.0 + math.log(2.0) + 3.0)
    # d/ds = 1 - exp(-s) L: a loss above exp(s) raises s (less weight), below lowers it.
    b.observe(0, losses(itm=4.0, global_contrastive=0.5), YES)
    s = b.log_var
    assert s[NAMES.index("itm")] > math.log(2.0) and s[NAMES.index("global_contrastive")] < 0
    assert s[NAMES.index("mim")] == 0 and b.t[NAMES.index("mim")] == 0  # not on this step: untouched
    # Adam's first step moves by lr.
    assert s[NAMES.index("itm")].item() == pytest.approx(math.log(2.0) + 0.1, abs=1e-5)
    before = b.state_dict()
    b.observe(1, losses(itm=float("nan")), torch.tensor(False))  # a skipped update changes nothing
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items() if k not in ("method", "names"))
    for _ in range(3000):  # the optimum: exp(s) = L
        b.observe(0, losses(itm=4.0), YES)
    assert b.log_var[NAMES.index("itm")].item() == pytest.approx(math.log(4.0), abs=0.02)


def test_dwa_weights_follow_the_ratio_of_the_last_two_periods():
    b = balancer("dwa", dwa_window=2, dwa_temperature=2.0)
    period = lambda step, g, i, m, t: [b.observe(step + k, losses(global_contrastive=g, itm=i, mim=m, mlm=t), YES)
                                       for k in range(2)]
    period(0, 4.0, 4.0, 4.0, 4.0)
    assert torch.equal(b.weights, torch.ones(4))  # the first two periods: 1
    period(2, 2.0, 4.0, 1.0, 4.0)
    r = torch.tensor([0.5, 1.0, 0.25, 1.0])
    expected = 4 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert torch.allclose(b.weights, expected)
    assert b.weights.sum().item() == pytest.approx(4.0)
    # The slowest-falling objectives gain weight.
    assert b.weights[1] > b.weights[0] > b.weights[2]
    # A period in which an objective had no step keeps its average: ratio 1.
    for k in range(2):
        b.observe(4 + k, losses(global_contrastive=1.0), YES)
    r = torch.tensor([0.5, 1.0, 1.0, 1.0])
    assert torch.allclose(b.weights, 4 * torch.softmax(r / 2, 0))
    fresh = balancer("dwa", dwa_window=2)
    fresh.load_state_dict(b.state_dict())
    assert torch.equal(fresh.weights, b.weights) and torch.equal(fresh.last, b.last)


def test_dwa_weights_the_objectives_it_has_measured_and_leaves_the_others_at_1():
    # Only pair data: MIM and MLM never train. They weighed 1 and held every weight at 1 for good.
    b = balancer("dwa", dwa_window=2, dwa_temperature=2.0)
    for step, (g, i) in enumerate([(4.0, 4.0)] * 2 + [(2.0, 4.0)] * 2):
        b.observe(step, losses(global_contrastive=g, itm=i), YES)
    r = torch.tensor([0.5, 1.0])
    assert torch.allclose(b.weights[:2], 2 * torch.softmax(r / 2, 0)) and b.weights[:2].sum().item() == pytest.approx(2)
    assert b.weights[2:].tolist() == [1.0, 1.0]
    # A loss that measured nothing (no token masked) is no loss of 0: the period's mean leaves it out.
    b = balancer("dwa", dwa_window=2, dwa_temperature=2.0)
    measured = torch.tensor([True, False])
    for step, (g, i) in enumerate([(4.0, 4.0), (4.0, 0.0), (2.0, 0.0), (2.0, 4.0)]):
        b.observe(step, losses(global_contrastive=g, itm=i), YES, measured if i == 0 else None)
    assert b.last[1].item() == 4.0 and b.before[1].item() == 4.0
    assert torch.allclose(b.weights[:2], 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2, 0))


def test_dwa_at_any_temperature_gives_finite_weights_and_weights_driven_out_of_use_are_named():
    # A temperature float32 holds as 0 (1e-50) made every weight NaN for good (0 / 0 in the softmax).
    for temperature, expected in ((1e-50, [0.0, 4.0, 0.0, 0.0]), (1e300, [1.0] * 4)):
        b = balancer("dwa", dwa_window=1, dwa_temperature=temperature)
        for step, values in enumerate([(4.0, 4.0, 4.0, 4.0), (2.0, 4.0, 1.0, 3.0)]):
            b.observe(step, losses(**dict(zip(NAMES, values))), YES)
        assert b.weights.tolist() == pytest.approx(expected), temperature
        assert b.unusable() is None
    # Uncertainty's log-variances driven far by a huge rate weigh objectives by inf or 0: a run that
    # then diverges had been told to lower optim.lr, which changes nothing.
    b = balancer("uncertainty", uncertainty_lr=1e6)
    b.observe(0, losses(global_contrastive=0.1, itm=5.0), YES)
    said = b.unusable()
    assert said == ("objectives.balancing='uncertainty' weighs objectives by factors no longer usable "
                    "(global_contrastive inf): lower objectives.uncertainty_lr (now 1e+06)"), said
    assert balancer("uncertainty").unusable() is None and balancer("fixed").unusable() is None


def test_uncertainty_takes_no_step_on_a_loss_that_measured_nothing():
    b = balancer("uncertainty", uncertainty_lr=0.1)
    b.observe(0, losses(itm=0.0, global_contrastive=3.0), YES, torch.tensor([False, True]))
    itm, contrastive = NAMES.index("itm"), NAMES.index("global_contrastive")
    assert b.log_var[itm] == 0 and b.t[itm] == 0 and b.m[itm] == 0 and b.v[itm] == 0
    assert b.log_var[contrastive] > 0 and b.t[contrastive] == 1


def test_the_trainer_reads_which_losses_measured_anything_from_their_target_counts():
    from types import SimpleNamespace

    from flava.objectives.pretraining import TARGETS

    names = (["global_contrastive", "mmm_image", "mmm_text"],
             ["accuracy", f"{TARGETS}mmm_image", f"{TARGETS}mmm_text"])
    # [total, losses..., metrics..., grad norm, finite, updated]
    numbers = torch.tensor([5.0, 2.0, 3.0, 0.0, 0.7, 12.0, 0.0, 1.0, 1.0, 1.0])
    holder = SimpleNamespace(_targets_at={})
    assert Trainer._measured(holder, numbers, names).tolist() == [True, True, False]
    assert len(holder._targets_at) == 1  # the index is made once per kind
    assert Trainer._measured(holder, numbers, names).tolist() == [True, True, False]


def test_a_method_starts_afresh_from_the_state_of_another():
    # A run resumed with another method (--override) had read the other's state as its own: a KeyError.
    for saved, resumed in (("dwa", "uncertainty"), ("uncertainty", "dwa")):
        b = balancer(saved, dwa_window=1, uncertainty_lr=0.5)
        for step in range(1, 4):
            b.observe(step, losses(mim=1.0 / step, mlm=2.0), YES)
        state = b.state_dict()
        fresh = balancer(resumed)
        for old in (state, {k: v for k, v in state.items() if k != "method"}):  # a checkpoint from before "method"
            other = balancer(resumed)
            other.load_state_dict(old)
            assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in other.state_dict().items()
                       if k not in ("method", "names"))
            again = balancer(saved)
            again.load_state_dict(old)
            assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items() if k not in ("method", "names"))


def test_pcgrad_removes_the_conflicting_component():
    g1, g2, g3 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 2.0])
    order = torch.Generator().manual_seed(0)
    p1, p2, p3 = project_conflicting([g1, g2, g3], order)
    # g1 and g2 conflict (cosine < 0): each loses its component along the other.
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p2, torch.tensor([0.0, 1.0]))
    assert p1 @ g2 >= -1e-7 and p2 @ g1 >= -1e-7
    assert torch.equal(p3, g3)  # g3 conflicts with none: unchanged
    # Random pairs of conflicting gradients: after projection, cosine >= 0 with the other's.
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
        b = b - 2 * torch.clamp(a @ b, min=0) / (a @ a) * a  # make them conflict
        assert a @ b < 0
        pa, pb = project_conflicting([a, b], gen)
        assert pa @ b >= -1e-5 and pb @ a >= -1e-5
    b = balancer("pcgrad")
    assert torch.allclose(b.combine_gradients([g1, g2], order), p1 + p2)


def test_gradient_report_names_norms_and_cosines():
    grads = {"a": {"image": torch.tensor([3.0, 4.0]), "text": torch.tensor([1.0])},
             "b": {"image": torch.tensor([-3.0, -4.0])}}
    r = gradient_report(grads, unit=0.5)
    assert r["image"]["norm"] == {"a": pytest.approx(10.0), "b": pytest.approx(10.0)}
    assert r["image"]["cosine"] == {"a|b": pytest.approx(-1.0)}
    assert r["text"] == {"norm": {"a": pytest.approx(2.0)}, "cosine": {}}


def test_bad_balancing_settings_fail_in_one_line():
    from flava.config import check

    with pytest.raises(ConfigError, match="objectives.balancing 'gradnorm' is not valid"):
        check(TrainConfig(objectives=ObjectivesConfig(balancing="gradnorm")))
    with pytest.raises(ConfigError, match="objectives.dwa_temperature must lie in"):
        check(TrainConfig(objectives=ObjectivesConfig(dwa_temperature=0.0)))


def test_settings_of_a_method_the_run_does_not_use_and_methods_that_cannot_act_are_said():
    from flava.config import ObjectivesConfig
    from flava.train.config import DataConfig
    from flava.train.trainer import unread_settings

    said = unread_settings(TrainConfig(objectives=ObjectivesConfig(dwa_temperature=5, uncertainty_lr=1,
                                                                   itm_negatives="hard", itm_negative_probability=0.5),
                                       data=DataConfig(mixing_window=3)), ("pairs", "images", "text"))
    assert said == ["objectives.dwa_temperature=5 is read by objectives.balancing='dwa' alone: it does nothing in "
                    "this run",
                    "objectives.uncertainty_lr=1 is read by objectives.balancing='uncertainty' alone: it does nothing "
                    "in this run",
                    "objectives.itm_negative_probability=0.5 is read by objectives.itm_negatives='swap' alone: it does "
                    "nothing in this run",
                    "data.mixing_window=3 is read by data.mixing_schedule='adaptive' alone: it does nothing in this "
                    "run"]
    dwa = ObjectivesConfig(balancing="dwa", dwa_temperature=5)
    assert unread_settings(TrainConfig(objectives=dwa, max_steps=500), ("pairs", "images", "text")) == []
    (said,) = unread_settings(TrainConfig(objectives=ObjectivesConfig(balancing="dwa"), max_steps=100), ("pairs",))
    assert "keeps every weight at 1 for two windows of dwa_window=50 steps, to the end of this 100-step run" in said
    (said,) = unread_settings(TrainConfig(stage="image-mim", objectives=ObjectivesConfig(balancing="pcgrad"),
                                          max_steps=500), ("images",))
    assert said == ("objectives.balancing='pcgrad' has one objective (mim) to balance in this run: it trains as "
                    "'fixed' does")
    (said,) = unread_settings(TrainConfig(data=DataConfig(mixing_schedule="adaptive"), max_steps=500), ("text",))
    assert "has one data kind to mix: it trains as 'constant' does" in said
    # The demo recipe's slower rate for initialised encoders reaches the ablation's rows that start
    # from none: nothing said where the user set nothing.
    from flava.recipes.ablate import row_config
    from flava.recipes.recipe import demo_recipe_config

    for row in ("flava-c", "flava-mm", "flava-no-init"):
        assert unread_settings(row_config(row, demo_recipe_config(), 10_000), ("pairs",)) == []


def config(data, **over) -> TrainConfig:
    # The narrow model: what these runs check (a resume, the state kept, what is logged) holds for any.
    cfg = narrow(tiny_run(data, "pairs_clean.csv", max_steps=8, save_every=4, log_every=2, seed=5, tensorboard=False))
    cfg.optim.warmup_steps = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def test_diagnostics_are_in_the_logged_rows_only(train_data, tmp_path):
    rows = Trainer(config(train_data, diagnose_every=2), tmp_path / "run").fit()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    assert all("gradients" in r for r in logged)
    assert not any("gradients" in r for r in rows if r["step"] % 2)
    pair = next(r for r in logged if r["kind"] == "pairs")["gradients"]
    # Contrastive reaches the unimodal encoders; ITM and MMM reach all three.
    assert set(pair) == {"image", "text", "multimodal"}
    assert "global_contrastive" not in pair["multimodal"]["norm"]
    assert set(pair["image"]["norm"]) == {"global_contrastive", "itm", "mmm_image", "mmm_text"}
    assert all(-1 <= c <= 1 for c in pair["image"]["cosine"].values())
    assert len(pair["image"]["cosine"]) == 6
    # The measurement leaves the update alone: the same run without diagnostics trains alike.
    quiet = Trainer(config(train_data, diagnose_every=0), tmp_path / "quiet").fit()
    assert [r["loss"] for r in quiet] == pytest.approx([r["loss"] for r in rows], abs=1e-6)
    assert not any("gradients" in r for r in quiet)


def test_diagnostics_keep_their_own_cadence(train_data, tmp_path):
    # Logged every 2 steps, measured at or after every 3rd and at the last: steps 4 (past 3), 6, 8.
    Trainer(config(train_data, diagnose_every=3), tmp_path / "run").fit()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "gradients" in r] == [4, 6, 8]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uncertainty", "dwa", "pcgrad"])
def test_an_adaptive_run_resumed_midway_repeats_the_uninterrupted_one(train_data, tmp_path, method):
    over = ObjectivesConfig(balancing=method, dwa_window=2, uncertainty_lr=0.1)
    full_t = Trainer(config(train_data, objectives=over), tmp_path / "full")
    full = full_t.fit()
    Trainer(config(train_data, objectives=over), tmp_path / "cut").fit(max_steps=5)  # saved at 4
    resumed = Trainer(config(train_data, objectives=over), tmp_path / "cut")
    assert resumed.resume() and resumed.step == 4
    rest = resumed.fit()
    for a, b in zip(full[4:], rest):
        assert a["kind"] == b["kind"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    for k, v in full_t.balancer.state_dict().items():
        if k not in ("method", "names"):
            assert torch.allclose(v, resumed.balancer.state_dict()[k], atol=1e-6), k
    if method != "pcgrad":  # the weights moved and were logged
        assert any(abs(v - 1) > 1e-4 for r in full for k, v in r["metrics"].items() if k.startswith("balancing_"))


@pytest.mark.distributed
@pytest.mark.parametrize("method,mode", [("pcgrad", "ddp"), ("uncertainty", "fsdp"), ("dwa", "ddp")])
def test_two_processes_hold_the_balancing_state_of_one(train_data, tmp_path, method, mode):
    from conftest import pretrain_args
    from test_pretrain_processes import OPTS, finish, metrics, run

    steps = ["--max-steps", "4", *OPTS, "--set", "optim.eps=1e-4", "--set", f"objectives.balancing={method}",
             "--set", "objectives.dwa_window=1", "--set", "objectives.uncertainty_lr=0.1",
             "--set", "diagnose_every=1", *narrow_args()]
    two = run(pretrain_args(train_data, tmp_path / "two", "pairs_clean.csv", batch_size=4) + steps
              + ["--set", f"distributed={mode}"], ranks=2)  # torchrun's launch is test_pretrain_processes's
    one = run(pretrain_args(train_data, tmp_path / "one", "pairs_clean.csv", batch_size=8) + steps)
    finish(two)
    finish(one)
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)
        assert x["metrics"] == pytest.approx(y["metrics"], abs=1e-5)
        if mode == "ddp":  # FSDP shards the gradients the diagnostics measure
            for enc, d in y["gradients"].items():
                assert x["gradients"][enc]["norm"] == pytest.approx(d["norm"], rel=1e-3, abs=1e-6)
                assert x["gradients"][enc]["cosine"] == pytest.approx(d["cosine"], abs=1e-3)
    ckpt = "checkpoints/step_00000004/trainer_state.pt"
    sa = torch.load(tmp_path / "two" / ckpt, weights_only=True)["balancing"]
    sb = torch.load(tmp_path / "one" / ckpt, weights_only=True)["balancing"]
    assert sa.keys() == sb.keys() and sa.get("method") == sb.get("method")
    for k in sa:
        if k not in ("method", "names"):
            assert torch.allclose(sa[k], sb[k], atol=1e-5), k


def test_a_linear_mixing_schedule_moves_from_mixing_to_mixing_end(train_data, tmp_path):
    cfg = config(train_data, max_steps=1001)
    cfg.data.mixing, cfg.data.mixing_end, cfg.data.mixing_schedule = [0.2, 0.4, 0.4], [0.8, 0.1, 0.1], "linear"
    t = Trainer(cfg, tmp_path / "run")
    assert t.probs_at(0) == pytest.approx([0.2, 0.4, 0.4])
    assert t.probs_at(500) == pytest.approx([0.5, 0.25, 0.25])
    assert t.probs_at(1000) == pytest.approx([0.8, 0.1, 0.1])
    from flava.train.kinds import step_kind

    early = [step_kind(0, s, t.kinds, t.probs_at(s)) for s in range(200)]
    late = [step_kind(0, s, t.kinds, t.probs_at(s)) for s in range(800, 1000)]
    assert early.count("pairs") < late.count("pairs")
    cfg.data.mixing_end = []
    with pytest.raises(ConfigError, match="needs data.mixing_end"):
        Trainer(cfg, tmp_path / "bad")
    cfg.data.mixing_end = [1.0, 0.0]  # set, but the schedule left constant: refused, not ignored
    cfg.data.mixing_schedule = "constant"
    with pytest.raises(ConfigError, match="mixing_end is read by data.mixing_schedule='linear' alone"):
        Trainer(cfg, tmp_path / "bad")


KINDS3 = ("pairs", "images", "text")


def mixing(temperature=0.5, start=(0.5, 0.25, 0.25)):
    """An adaptive mix of three kinds over windows of 3 steps, starting from `start`."""
    from types import SimpleNamespace

    import numpy as np
    from flava.train.balancing.mixing import KindMixing

    data = SimpleNamespace(mixing_schedule="adaptive", mixing_window=3, mixing_temperature=temperature)
    start = np.array(start)
    return KindMixing(KINDS3, start, start, data, 100, CPU)


def feed(m, first_step: int, window: dict[str, float]) -> None:
    """One window: a step of each kind, in order, with the given losses."""
    for i, (kind, v) in enumerate(window.items()):
        m.observe(first_step + i, kind, torch.tensor(v), YES)


def test_an_adaptive_mix_follows_each_kinds_loss_progress():
    m = mixing()
    feed(m, 0, {"pairs": 4.0, "images": 2.0, "text": 8.0})
    assert m.probs_at(0) == pytest.approx([0.5, 0.25, 0.25])  # one window behind: the start mix
    feed(m, 3, {"pairs": 2.0, "images": 2.0, "text": 6.0})
    r = {"pairs": 0.5, "images": 1.0, "text": 0.75}  # pairs' loss halved, images' stalled
    want = [p * math.exp(r[k] / 0.5) for k, p in zip(KINDS3, (0.5, 0.25, 0.25))]
    assert m.probs_at(0) == pytest.approx([w / sum(want) for w in want])
    assert m.probs_at(0)[1] > 0.25 and m.probs_at(0)[0] < 0.5  # the stalled kind gained, the fast one lost
    m.observe(6, "pairs", torch.tensor(1.0), torch.tensor(False))  # a skipped update counts for nothing
    assert m.count.sum() == 0
    state = m.state_dict()
    again = mixing()
    again.load_state_dict(state)
    assert again.probs_at(7) == pytest.approx(m.probs_at(7))
    other = mixing()
    other.kinds = ("pairs", "text", "images")
    with pytest.raises(Exception, match="resume with the data it was started with"):
        other.load_state_dict(state)


def test_every_kind_progressing_alike_keeps_the_mix():
    m = mixing()
    feed(m, 0, {"pairs": 3.0, "images": 6.0, "text": 9.0})
    feed(m, 3, {"pairs": 1.5, "images": 3.0, "text": 4.5})
    assert m.probs_at(0) == pytest.approx([0.5, 0.25, 0.25])


def test_the_kinds_given_a_share_adapt_among_themselves_and_a_zero_share_stays_0():
    # The text kind never trains, so its mean loss stays 0: that held the whole mix at its start.
    m = mixing(start=(0.7, 0.3, 0.0))
    for step, (kind, loss) in enumerate([("pairs", 4.0), ("images", 2.0), ("pairs", 4.0),
                                         ("pairs", 2.0), ("images", 2.0), ("pairs", 2.0)]):
        m.observe(step, kind, torch.tensor(loss), YES)
    r = {"pairs": 0.5, "images": 1.0}
    want = [0.7 * math.exp(r["pairs"] / 0.5), 0.3 * math.exp(r["images"] / 0.5)]
    assert m.probs_at(0) == pytest.approx([*(w / sum(want) for w in want), 0.0])
    again = mixing(start=(0.7, 0.3, 0.0))
    again.load_state_dict(m.state_dict())
    assert again.probs_at(6) == pytest.approx(m.probs_at(6))


def test_an_adaptive_mix_with_one_kind_given_a_share_is_said():
    from flava.train.config import DataConfig
    from flava.train.trainer import unread_settings

    data = DataConfig(mixing_schedule="adaptive", mixing=[1.0, 0.0, 0.0])
    (said,) = unread_settings(TrainConfig(data=data, max_steps=500), KINDS3)
    assert said.startswith("data.mixing_schedule='adaptive' has one data kind that data.mixing gives a share (pairs)")
    data.mixing = [0.7, 0.3, 0.0]
    assert unread_settings(TrainConfig(data=data, max_steps=500), KINDS3) == []


@pytest.mark.slow
@pytest.mark.parametrize("start", [[0.7, 0.15, 0.15], [0.7, 0.3, 0.0]])
def test_an_adaptive_mix_resumed_midway_repeats_the_uninterrupted_one(train_data, tmp_path, start):
    def cfg():
        c = config(train_data, max_steps=12)
        c.data.mixing_schedule, c.data.mixing_window, c.data.mixing_temperature = "adaptive", 2, 0.05
        c.data.mixing = start
        return c

    full_t = Trainer(cfg(), tmp_path / "full")
    full = full_t.fit()
    Trainer(cfg(), tmp_path / "cut").fit(max_steps=7)  # saved at 4: mid-way through the third window
    resumed = Trainer(cfg(), tmp_path / "cut")
    assert resumed.resume() and resumed.step == 4
    rest = resumed.fit()
    assert [r["kind"] for r in full[4:]] == [r["kind"] for r in rest]
    assert [r["loss"] for r in full[4:]] == pytest.approx([r["loss"] for r in rest], abs=1e-6)
    assert [r["mixing"] for r in full[4:]] == [r["mixing"] for r in rest]
    assert full_t.mixing.probs_at(0) == pytest.approx(resumed.mixing.probs_at(0), abs=1e-9)
    assert full[-1]["mixing"] != full[0]["mixing"]  # it adapted
    assert all(r["mixing"]["text"] == 0 for r in full) or start[2] > 0  # a kind given no share keeps none


def test_an_adaptive_mix_leaves_out_a_step_with_a_loss_that_measured_nothing(train_data, tmp_path, monkeypatch):
    # Its kind's sum lacks that loss: the step read as progress and took that kind's share down.
    c = config(train_data, max_steps=4)
    c.data.mixing_schedule, c.data.mixing_window = "adaptive", 100
    t = Trainer(c, tmp_path / "run")
    t.train_step()
    assert t.mixing.count.sum().item() == 1
    monkeypatch.setattr(Trainer, "_measured", lambda self, numbers, names: torch.zeros(len(names[0]), dtype=torch.bool))
    t.step += 1
    t.train_step()
    assert t.mixing.count.sum().item() == 1


def test_micro_batch_seeds_are_distinct_for_any_accumulation():
    # ITM negatives and PCGrad's order are seeded per (step, micro-batch): with 32 or more
    # micro-batches, step * 31 + micro made step s's micro 31 repeat step s + 1's micro 0.
    from flava.train.backward import micro_seed

    for accum in (1, 8, 31, 32, 100):
        seeds = [micro_seed(5, step, m, accum) for step in range(50) for m in range(accum)]
        assert len(set(seeds)) == len(seeds), accum
    assert micro_seed(5, 7, 3, 8) == 5 * 1_000_003 + 7 * 31 + 3  # what runs of up to 31 always drew

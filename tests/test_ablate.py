"""`flava ablate`: every row of the paper's Table 3 trained and evaluated at a tiny budget into one
report; finished rows are not run again; C.1's local contrastive row under torchrun."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import narrow_args, pretrain_args
from zygote import Ranks

from flava.recipes.ablate import PAPER, ROWS, averages, row_config
from flava.cli import main as cli
from flava.train.presets import demo_config


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One small task per domain."""
    root = tmp_path_factory.mktemp("ablate-suite")
    rows = ["image,caption"]
    for split, n in (("train", 8), ("test", 4)):
        for name, rgb in {"red": (220, 30, 30), "blue": (30, 30, 220)}.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.full((40, 40, 3), rgb, dtype=np.uint8)
                arr[i: i + 8, 5:13] = 255
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
                if split == "test":
                    rows.append(f"test/{name}/{i}.png,a {name} square number {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    words = {"sport": "match goal team", "music": "song band album"}
    for split, n in (("train", 10), ("test", 6)):
        lines = ["text,label"] + [f"the {words[c].split()[i % 3]} story {i},{c}" for c in words for i in range(n)]
        (root / f"text_{split}.csv").write_text("\n".join(lines) + "\n")
    tasks = [
        {"kind": "linear-probe", "name": "colour probe", "modality": "image", "train": "train", "test": "test"},
        {"kind": "linear-probe", "name": "topic probe", "modality": "text", "train": "text_train.csv",
         "test": "text_test.csv"},
        {"kind": "retrieval", "name": "pairs retrieval", "csv": "pairs.csv"},
    ]
    (root / "suite.json").write_text(json.dumps({"name": "small", "tasks": tasks}))
    return root / "suite.json"


def ablate_args(train_data, suite, out, *extra):
    # pretrain_args' settings (tiny data, the test codebook), less the subcommand and its --output;
    # the narrow model (what these tests check holds for any).
    settings = pretrain_args(train_data, out, pairs="pairs_clean.csv")[3:] + narrow_args()
    return ["ablate", "--output", str(out), "--suite", str(suite), "--steps", "2", "--unimodal-steps", "2",
            "--image-stage", "mim", *settings, *extra]


@pytest.mark.slow
def test_rows_are_trained_evaluated_and_reported_once(train_data, suite, tmp_path, capsys):
    out = tmp_path / "ablation"
    # The other rows differ only in their settings (test_row_settings_train_what_the_paper_trains).
    args = ablate_args(train_data, suite, out, "--rows", "mim,mlm,flava-c,flava,untrained")
    assert cli(args) == 0
    text = capsys.readouterr().out
    record = json.loads((out / "ablation.json").read_text())
    rows = record["rows"]
    assert list(rows) == ["mim", "mlm", "flava-c", "flava", "untrained"]
    for key, scores in rows.items():
        domains = {t["domain"] for t in scores["tasks"].values()}
        assert domains == set(ROWS[key].domains)
        for domain, value in scores["domain_averages"].items():
            expected = np.mean([v for t in scores["tasks"].values() if t["domain"] == domain
                                for v in t["scores"].values()])
            assert value == pytest.approx(expected)
        if key != "untrained":
            pointer = json.loads(((out / "rows" / key / ("joint" if key == "flava" else "")) / "checkpoints" /
                                  "latest.json").read_text())
            assert pointer["step"] == 2
    assert averages(rows["mim"])[3] == pytest.approx(rows["mim"]["domain_averages"]["vision"] / 3)

    # The runs were trained with their rows' settings.
    settings = {k: json.loads((out / "rows" / k / ("joint" if k == "flava" else "") / "train_config.json").read_text())
                for k in ("mim", "mlm", "flava-c", "flava")}
    assert settings["mim"]["stage"] == "image-mim" and settings["mlm"]["stage"] == "text-mlm"
    assert settings["flava-c"]["objectives"]["itm_weight"] == 0 and settings["flava-c"]["data"]["mixing"] == [1, 0, 0]
    assert settings["flava"]["init_text"] == str(out / "rows" / "flava" / "text-mlm")
    assert settings["flava"]["init_image"] == str(out / "rows" / "flava" / "image-mim")

    report = (out / "ablation.md").read_text()
    for key in ("flava-c", "flava"):
        assert f"| {ROWS[key].label} | {ROWS[key].paper_row} |" in report
        assert " | ".join(f"{v:.2f}" for v in PAPER[key]) in report
    assert "The paper's claims, checked here" in report and "full FLAVA has the best macro average" in report
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ablation: averages" in text

    # Again: nothing is trained or evaluated; the report is rewritten from the saved scores.
    stamps = {k: (out / "rows" / k / "scores.json").stat().st_mtime_ns for k in rows}
    assert cli(args) == 0
    assert capsys.readouterr().out.count("already trained and evaluated") == len(rows)
    assert stamps == {k: (out / "rows" / k / "scores.json").stat().st_mtime_ns for k in rows}

    # Another budget in the same directory is refused; the local row needs processes.
    other = [a if a != "2" or args[i - 1] != "--steps" else "3" for i, a in enumerate(args)]
    assert cli(other) == 2
    assert "other steps" in capsys.readouterr().err
    # Rows may be added to a finished ablation: only they run, and the report keeps the earlier ones.
    assert cli(args[:-1] + ["mlm,flava-no-init"]) == 0
    assert capsys.readouterr().out.count("already trained and evaluated") == 1
    assert list(json.loads((out / "ablation.json").read_text())["rows"]) == [
        k for k in ROWS if k in ("mim", "mlm", "flava-c", "flava", "untrained", "flava-no-init")]
    assert cli(ablate_args(train_data, suite, tmp_path / "b", "--rows", "flava-c-local")) == 2
    assert "needs --processes 2" in capsys.readouterr().err
    assert cli(ablate_args(train_data, suite, tmp_path / "c", "--rows", "flava-x")) == 2
    assert "has no row 'flava-x'" in capsys.readouterr().err


@pytest.mark.distributed
def test_local_and_global_contrastive_rows_under_torchrun(train_data, suite, tmp_path, capsys, monkeypatch):
    import subprocess
    import types

    from flava.recipes import ablate

    # The first row (the local one) starts torchrun as `flava ablate` does; the second's ranks are
    # forked with the environment torchrun gives them (zygote.Ranks): the same launch command made
    # again, without its three interpreter starts (about 15 s of CPU).
    launched = []

    def run(command, env=None, **kwargs):
        launched.append(command)
        if len(launched) == 1:
            return subprocess.run(command, env=env, **kwargs)
        assert command[1:3] == ["-m", "torch.distributed.run"], command
        start = command.index("flava.cli") - 1
        nproc = next(int(a.split("=")[1]) for a in command[:start] if a.startswith("--nproc_per_node="))
        ranks = Ranks(command[start:], nproc, env)
        output, _ = ranks.communicate(300)
        assert ranks.returncode == 0, output
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(ablate, "subprocess", types.SimpleNamespace(run=run))
    out = tmp_path / "ablation"
    assert cli(ablate_args(train_data, suite, out, "--rows", "flava-c-local,flava-c", "--processes", "2")) == 0
    assert len(launched) == 2 and str(out / "rows" / "flava-c-local") in launched[0]
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert list(rows) == ["flava-c-local", "flava-c"]
    local = json.loads((out / "rows" / "flava-c-local" / "train_config.json").read_text())
    assert local["objectives"]["gather_with_grad"] is False
    for key in rows:
        metrics = [json.loads(line) for line in (out / "rows" / key / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2 and metrics[-1]["samples"] == 2 * 4  # two processes of batch 4
    # The two losses differ in their gradients only: the first step's loss is the same.
    first = {k: json.loads((out / "rows" / k / "metrics.jsonl").read_text().splitlines()[0])["loss"] for k in rows}
    assert first["flava-c-local"] == pytest.approx(first["flava-c"], rel=1e-5)
    assert "global contrastive beats local" in (out / "ablation.md").read_text()


def test_seeds_without_balancing_are_refused(tmp_path, capsys):
    assert cli(["ablate", "--output", str(tmp_path / "a"), "--rows", "mlm", "--seeds", "0,1"]) == 2
    assert "--seeds applies with --balancing" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_balancing_rows_are_checked_before_any_trains():
    from flava.errors import ConfigError
    from flava.recipes.balancing import BalancingPlan, check_plan, method_config, mixing_note

    plan = BalancingPlan(["fixed", "mixing-adaptive"], [0, 1], "demo")
    # A linear schedule given to the comparison is replaced by the adaptive row's own mix, whole, and said.
    cfg = demo_config()
    assert mixing_note(cfg, plan) is None
    cfg.data.mixing_schedule, cfg.data.mixing_end = "linear", [0.8, 0.1, 0.1]
    check_plan(cfg, plan)
    assert mixing_note(cfg, plan) == ("mixing-adaptive adapts the data mix itself, in place of "
                                      "data.mixing_schedule=linear, which the other methods follow")
    assert mixing_note(cfg, BalancingPlan(["fixed", "dwa"], [0, 1], "demo")) is None
    adaptive = method_config(cfg, "mixing-adaptive")
    assert adaptive.data.mixing_schedule == "adaptive" and adaptive.data.mixing_end == []
    assert method_config(cfg, "fixed").data.mixing_end == [0.8, 0.1, 0.1]
    # A setting no row can train with is refused with the plan, not after earlier rows trained.
    cfg.data.mixing_schedule = "constant"
    with pytest.raises(ConfigError, match="mixing_end is read by data.mixing_schedule='linear' alone"):
        check_plan(cfg, plan)


def test_the_demo_codebook_is_trained_only_for_rows_that_read_image_tokens():
    from flava.recipes.ablate import Plan, rows_needing_demo_codebook

    cfg = demo_config()
    plan = Plan(list(ROWS), 2, 2, "mim", 1, "demo")
    assert rows_needing_demo_codebook(cfg, plan) == {"mim", "flava-mm", "flava-no-init", "flava"}
    plan.rows = ["mlm", "flava-c", "untrained"]  # about two minutes of codebook training saved
    assert rows_needing_demo_codebook(cfg, plan) == set()
    cfg.codebook, plan.rows = "my-codebook", list(ROWS)
    assert rows_needing_demo_codebook(cfg, plan) == set()


def test_rows_without_image_tokens_build_before_the_shared_codebook_exists(tmp_path):
    from flava.errors import CheckpointError
    from flava.train.kinds import STAGES

    cfg = demo_config()
    cfg.codebook = str(tmp_path / "codebook")  # the plan names it; the first row that reads tokens trains it
    for key in ("mlm", "flava-c"):
        c = row_config(key, cfg, 2)
        STAGES[c.stage](c).build()
    c = row_config("mim", cfg, 2)
    with pytest.raises(CheckpointError, match="codebook does not exist"):
        STAGES[c.stage](c).build()


def test_row_settings_train_what_the_paper_trains():
    cfg = demo_config()
    rows = {k: row_config(k, cfg, 5) for k in ("mim", "mlm", "flava-c-local", "flava-c", "flava-mm", "flava-no-init")}
    assert rows["mim"].stage == "image-mim" and rows["mlm"].stage == "text-mlm"
    weights = lambda c: {k for k, v in vars(c.objectives).items() if k.endswith("_weight") and v > 0}  # noqa: E731
    assert weights(rows["flava-c"]) == weights(rows["flava-c-local"]) == {"global_contrastive_weight"}
    assert weights(rows["flava-mm"]) == {"global_contrastive_weight", "itm_weight", "mmm_image_weight",
                                         "mmm_text_weight"}
    assert weights(rows["flava-no-init"]) == weights(cfg) and len(weights(cfg)) == 6
    for k in ("flava-c-local", "flava-c", "flava-mm"):
        assert rows[k].data.mixing == [1.0, 0.0, 0.0]  # rows 3-4 of Table 3: multimodal data only
    assert rows["flava-no-init"].data.mixing == cfg.data.mixing
    assert rows["flava-c"].objectives.gather_with_grad and not rows["flava-c-local"].objectives.gather_with_grad
    assert all(c.max_steps == 5 and not c.init_text for c in rows.values())
    # The base settings are left alone.
    assert cfg.objectives.gather_with_grad is True and cfg.objectives.itm_weight == 1.0


def _scores(vision=None, language=None, multimodal=None):
    d = {k: v for k, v in (("vision", vision), ("language", language), ("multimodal", multimodal)) if v is not None}
    return {"tasks": {}, "domain_averages": d}


def test_the_paper_claims_are_checked_both_ways():
    from flava.recipes.ablate import claims

    results = {"mim": _scores(vision=50), "flava-c": _scores(60, 50, 40), "flava-mm": _scores(61, 52, 45),
               "flava-no-init": _scores(62, 55, 44), "flava": _scores(63, 54, 46), "untrained": _scores(55, 50, 10)}
    lines = claims(results)
    text = "\n".join(lines)
    assert "full FLAVA has the best macro average: holds here (best: FLAVA 54.33" in text
    assert "the multimodal objectives help multimodal tasks (FLAVA_MM over FLAVA_C): holds here" in text
    assert "(multimodal average: FLAVA_MM 45.00 vs FLAVA_C 40.00, +5.00; paper +2.86)" in text
    assert "unimodal initialisation helps language (FLAVA over FLAVA w/o init): does not hold here" in text
    assert "unimodal initialisation helps vision (FLAVA over FLAVA w/o init): holds here" in text
    # Rows at or below the untrained model are named with their domains.
    assert "FLAVA_C is not above the untrained model on: language" in text
    assert "MIM is not above the untrained model on: vision" in text
    assert not any("global contrastive" in line for line in lines)  # no local row: not checked
    # MIM's macro counts the domains it was not evaluated on as 0, as the paper's Table 3 does.
    assert averages(results["mim"]) == (50, None, None, pytest.approx(50 / 3))


@pytest.mark.slow
def test_the_balancing_comparison_shares_unimodal_stages_and_reports_the_spread(train_data, suite, tmp_path,
                                                                                 capsys):
    from flava.recipes.balancing import summary, verdicts

    out = tmp_path / "balancing"
    settings = pretrain_args(train_data, out, pairs="pairs_clean.csv")[3:]
    args = ["ablate", "--output", str(out), "--suite", str(suite), "--balancing", "fixed,mixing-adaptive",
            "--seeds", "3,4", "--unimodal-steps", "2", "--set", "max_steps=2", "--set", "data.mixing_window=1",
            *settings]
    assert cli(args) == 0
    printed = " ".join(capsys.readouterr().out.split())
    record = json.loads((out / "balancing.json").read_text())
    results = record["results"]
    assert list(results) == ["fixed", "mixing-adaptive"] and all(list(r) == ["3", "4"] for r in results.values())
    for seed in (3, 4):
        run = out / f"seed-{seed}"
        # One text MLM and one image MIM stage per seed; every method's joint stage starts from them.
        assert sorted(p.name for p in run.iterdir()) == ["fixed", "image-mim", "mixing-adaptive", "text-mlm"]
        for method in ("fixed", "mixing-adaptive"):
            joint = json.loads((run / method / "train_config.json").read_text())
            assert joint["seed"] == seed and joint["init_text"] == str(run / "text-mlm")
            assert joint["objectives"]["balancing"] == "fixed"
            assert joint["data"]["mixing_schedule"] == ("adaptive" if method == "mixing-adaptive" else "constant")
            assert json.loads((run / method / "checkpoints" / "latest.json").read_text())["step"] == 2
    # The summary is the mean and the spread of what each run scored.
    by = {m: {int(s): v for s, v in r.items()} for m, r in results.items()}
    s = summary(by)
    macros = [averages(by["mixing-adaptive"][seed])[3] for seed in (3, 4)]
    assert s["mixing-adaptive"]["macro"] == pytest.approx((np.mean(macros), max(macros) - min(macros)))
    report = (out / "balancing.md").read_text()
    assert "| mixing-adaptive |" in report and len(verdicts(by)) == 1
    for line in verdicts(by):
        assert line in report and " ".join(line.split()) in printed
    # Run again: nothing is trained or evaluated twice.
    scores = out / "seed-3" / "mixing-adaptive" / "scores.json"
    mtime = scores.stat().st_mtime_ns
    assert cli(args) == 0
    assert scores.stat().st_mtime_ns == mtime
    assert cli(args[:-len(settings)] + settings[:-2] + ["--set", "log_every=2"]) == 2  # other settings refused
    assert "holds a comparison with other settings" in capsys.readouterr().err


def test_claims_within_the_test_items_noise_neither_hold_nor_fail():
    from flava.recipes.ablate import claims

    def row(vision, items):
        return {"tasks": {"probe": {"domain": "vision", "scores": {"top-1": vision}, "examples": {"top-1": items}}},
                "domain_averages": {"vision": vision}}

    # One item in 8 apart: noise. The same gap over 10,000 items is not.
    small = claims({"flava": row(75.0, 8), "flava-no-init": row(87.5, 8), "untrained": row(75.0, 8)})
    text = "\n".join(small)
    assert "unimodal initialisation helps vision (FLAVA over FLAVA w/o init): within noise (±" in text
    assert "full FLAVA has the best macro average: within noise" in text
    assert "FLAVA is not above the untrained model on: vision (within noise)" in text
    large = "\n".join(claims({"flava": row(75.0, 10_000), "flava-no-init": row(87.5, 10_000)}))
    assert "helps vision (FLAVA over FLAVA w/o init): does not hold here" in large


# --------------------------------------------------------------------------- records and reports, no training


def _suite_file(suite, path, *names):
    """A copy of the `suite` fixture with only the named tasks (its paths made absolute)."""
    tasks = []
    for t in json.loads(suite.read_text())["tasks"]:
        if t["name"] in names:
            tasks.append({k: str(suite.parent / v) if k in ("train", "test", "csv") else v for k, v in t.items()})
    path.write_text(json.dumps({"name": "small", "tasks": tasks}))
    return path


# Made-up scores by domain (the balancing report's example: no language, vision 20, multimodal 15).
FAKE = {"vision": 20.0, "language": 30.0, "multimodal": 15.0}


def _fake_scores(tasks, seed=0):
    return {"tasks": {t.name: {"domain": t.domain, "scores": {"s": FAKE[t.domain] + seed}, "examples": {}}
                      for t in tasks},
            "domain_averages": {t.domain: FAKE[t.domain] + seed for t in tasks}}


@pytest.fixture
def no_training(monkeypatch):
    """`flava ablate` with training replaced by a record of what would train ((run, settings)) and
    evaluation by made-up scores of the suite's tasks."""
    import flava.recipes.ablate as ablate
    import flava.recipes.balancing as balancing
    import flava.train.run as run

    trained = []
    monkeypatch.setattr(run, "run_pretrain", lambda cfg, directory, **kw: trained.append((directory.name, cfg)))
    monkeypatch.setattr(run, "ensure_demo_codebook", lambda *a, **kw: None)
    monkeypatch.setattr(run, "train_demo_codebook", lambda *a, **kw: None)
    monkeypatch.setattr(ablate, "train_row", lambda key, cfg, *a: trained.append((key, cfg)))
    monkeypatch.setattr(ablate, "evaluate_row", lambda key, cfg, suite, *a: {
        "row": key, **_fake_scores([t for t in suite.tasks if t.domain in ROWS[key].domains])})
    monkeypatch.setattr(balancing, "_scores", lambda method, seed, directory, suite, console: {
        "method": method, "seed": seed, **_fake_scores(suite.tasks, seed)})
    return trained


def balancing_args(out, suite, methods="fixed,dwa", *extra):
    return ["ablate", "--output", str(out), "--suite", str(suite), "--balancing", methods, "--seeds", "0,1",
            "--unimodal-steps", "2", "--set", "max_steps=2", "--set", "codebook=cb", *extra]


def test_a_rerun_on_a_changed_suite_file_is_refused(no_training, suite, tmp_path, capsys, monkeypatch):
    from flava.recipes.ablate import suite_fingerprint

    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "topic probe", "pairs retrieval")
    out = tmp_path / "balancing"
    assert cli(balancing_args(out, file)) == 0
    # Another layout of the same JSON is the same suite; other tasks are not.
    file.write_text(json.dumps(json.loads(file.read_text()), indent=2))
    assert cli(balancing_args(out, file)) == 0
    _suite_file(suite, file, "colour probe", "pairs retrieval")
    capsys.readouterr()
    assert cli(balancing_args(out, file, "fixed,dwa,uncertainty")) == 2
    err = capsys.readouterr().err.strip()
    assert f"the suite {file} changed since {out}'s runs were scored on it" in err and "another --output" in err
    assert "\n" not in err and not (out / "seed-0" / "uncertainty").exists()
    assert "tasks.2.name: 'topic probe' -> 'pairs retrieval';" in err and "; and 3 more)" in err  # task by task
    # The same for Table 3's rows.
    table3 = tmp_path / "ablation"
    _suite_file(suite, file, "colour probe", "topic probe", "pairs retrieval")
    assert cli(["ablate", "--output", str(table3), "--suite", str(file), "--rows", "mlm", "--steps", "2"]) == 0
    _suite_file(suite, file, "topic probe")
    capsys.readouterr()
    assert cli(["ablate", "--output", str(table3), "--suite", str(file), "--rows", "mlm,flava-c", "--steps", "2"]) == 2
    assert f"the suite {file} changed since {table3}'s runs were scored on it" in capsys.readouterr().err
    # A record from before the fingerprint is not compared; the packaged suite is named by its name.
    record = json.loads((table3 / "ablation.json").read_text())
    del record["plan"]["suite_fingerprint"]
    (table3 / "ablation.json").write_text(json.dumps(record))
    assert cli(["ablate", "--output", str(table3), "--suite", str(file), "--rows", "mlm", "--steps", "2"]) == 0
    # The packaged suite by its tasks as this release defines them: a release that changes them is another suite.
    import flava.recipes.ablate as ablate

    demo = suite_fingerprint("demo")
    monkeypatch.setattr(ablate, "DEMO_SUITE", {**ablate.DEMO_SUITE, "tasks": ablate.DEMO_SUITE["tasks"][:-1]})
    assert suite_fingerprint("demo") != demo


def test_a_rerun_with_other_settings_names_them(no_training, suite, tmp_path, capsys):
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    out = tmp_path / "balancing"
    assert cli(balancing_args(out, file, "fixed,dwa", "--set", "optim.lr=5e-4")) == 0
    capsys.readouterr()
    assert cli(balancing_args(out, file, "fixed,dwa", "--set", "optim.lr=1e-3")) == 2
    err = capsys.readouterr().err
    assert "holds a comparison with other settings (settings.optim.lr: 0.0005 -> 0.001)" in err
    table3 = tmp_path / "ablation"
    args = ["ablate", "--output", str(table3), "--suite", str(file), "--rows", "flava-c", "--unimodal-steps", "2",
            "--steps", "2"]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(args[:-1] + ["3"]) == 2
    assert "holds an ablation with other steps (steps: 2 -> 3)" in capsys.readouterr().err


def test_balancing_runs_the_image_stage_it_names(no_training, suite, tmp_path, capsys):
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    assert cli(balancing_args(tmp_path / "a", file, "fixed,dwa", "--image-stage", "dino")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--balancing runs the demo's recipe, whose image stage is mim; drop --image-stage dino")
    assert not no_training and not (tmp_path / "a").exists()
    assert cli(balancing_args(tmp_path / "b", file, "fixed,dwa", "--image-stage", "mim")) == 0
    assert {name for name, _ in no_training} == {"text-mlm", "image-mim", "fixed", "dwa"}


def test_balancing_says_or_takes_the_unimodal_stages_learning_rate(no_training, suite, tmp_path, capsys):
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    assert cli(balancing_args(tmp_path / "a", file)) == 0
    lr = {name: c.optim.lr for name, c in no_training}
    assert lr["text-mlm"] == lr["image-mim"] == 1e-3 and lr["fixed"] == lr["dwa"] != 1e-3
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("note: text-mlm and image-mim train with optim.lr=1e-3, the demo recipe's unimodal "
                         f"settings (the joint stage: optim.lr={lr['fixed']}); --set optim.lr=X sets every "
                         "stage's") == 1
    # The user's rate reaches every stage, as it does the full FLAVA row of Table 3.
    no_training.clear()
    assert cli(balancing_args(tmp_path / "b", file, "fixed,dwa", "--set", "optim.lr=2e-4")) == 0
    assert {c.optim.lr for _, c in no_training} == {2e-4}
    assert "note: text-mlm" not in capsys.readouterr().out


def test_a_rerun_with_other_methods_or_seeds_reports_the_runs_finished_before(no_training, suite, tmp_path, capsys,
                                                                             monkeypatch):
    import flava.recipes.balancing as balancing

    def scores(method, seed, directory, suite, console):  # kept on disk, as the evaluation keeps them
        s = {"method": method, "seed": seed, **_fake_scores(suite.tasks, seed)}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "scores.json").write_text(json.dumps(s))
        return s

    monkeypatch.setattr(balancing, "_scores", scores)
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    out = tmp_path / "balancing"
    assert cli(balancing_args(out, file, "fixed,dwa")) == 0
    capsys.readouterr()
    no_training.clear()
    assert cli(balancing_args(out, file, "fixed,uncertainty")) == 0
    assert "dwa" not in {name for name, _ in no_training}  # reported, not run again
    printed = " ".join(capsys.readouterr().out.split())
    assert f"note: the report also covers the runs finished earlier in {out}: dwa (seeds 0, 1)" in printed
    results = json.loads((out / "balancing.json").read_text())["results"]
    assert list(results) == ["fixed", "uncertainty", "dwa"] and all(list(r) == ["0", "1"] for r in results.values())
    report = (out / "balancing.md").read_text()
    assert "| dwa | 0 |" in report and "- dwa vs fixed:" in report and "- uncertainty vs fixed:" in report
    # More seeds of some methods: every finished run is reported, and where seeds differ it is said.
    assert cli(balancing_args(out, file, "dwa,fixed", "--seeds", "2,3")) == 0
    results = json.loads((out / "balancing.json").read_text())["results"]
    assert list(results) == ["dwa", "fixed", "uncertainty"]
    assert list(results["fixed"]) == ["0", "1", "2", "3"] and list(results["uncertainty"]) == ["0", "1"]
    report = (out / "balancing.md").read_text()
    assert "seeds 0, 1, 2, 3;" in report
    assert "- uncertainty ran seeds 0, 1, fixed 0, 1, 2, 3: their averages are over different seeds" in report
    assert "dwa ran seeds" not in report


def test_objectives_balancing_given_to_the_comparison_is_refused(no_training, suite, tmp_path, capsys):
    # Each method's joint run sets its own: the setting reached the unimodal stages alone.
    from flava.errors import ConfigError
    from flava.recipes.balancing import BalancingPlan, check_plan

    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    for value, example in (("pcgrad", "fixed,pcgrad"), ("fixed", "fixed,dwa")):  # even the default, said
        out = tmp_path / value
        assert cli(balancing_args(out, file, "fixed,dwa", "--set", f"objectives.balancing={value}")) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.endswith(
            f"--balancing sets objectives.balancing itself, to each method it compares "
            f"(objectives.balancing={value} would reach the unimodal stages alone): drop it, and name the methods "
            f"with --balancing (e.g. --balancing {example})")
        assert not no_training and not out.exists()
    cfg = demo_config()  # as a --config file gives it
    cfg.objectives.balancing = "dwa"
    with pytest.raises(ConfigError, match=r"\(objectives.balancing=dwa would reach the unimodal stages alone\)"):
        check_plan(cfg, BalancingPlan(["fixed", "uncertainty"], [0, 1], "demo"))


def test_the_balancing_report_leaves_out_a_domain_the_suite_lacks(no_training, suite, tmp_path, capsys):
    from flava.evaluate.results import SuiteResult, TaskResult
    from flava.recipes.balancing import averages, summary, verdicts

    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    out = tmp_path / "balancing"
    assert cli(balancing_args(out, file)) == 0
    printed = capsys.readouterr().out
    report = (out / "balancing.md").read_text()
    assert "nan" not in report and "nan" not in printed
    results = {m: {int(s): v for s, v in r.items()} for m, r in json.loads((out / "balancing.json").read_text())[
        "results"].items()}
    # Seed 0 scores vision 20 and multimodal 15: the macro is flava evaluate's, over those two.
    macro = SuiteResult("", "", [TaskResult("a", "", "vision", {"s": 20.0}),
                                 TaskResult("b", "", "multimodal", {"s": 15.0})]).macro_average()
    assert averages(results["fixed"][0]) == (20.0, None, 15.0, macro) and macro == 17.5
    assert summary(results)["dwa"]["language"] is None
    assert summary(results)["dwa"]["macro"] == (pytest.approx(18.0), pytest.approx(1.0))
    assert "| fixed | 20.50 ± 0.50 | – | 15.50 ± 0.50 | 18.00 ± 0.50 |" in report
    assert "| fixed | 0 | 20.00 | – | 15.00 | 17.50 |" in report
    (line,) = verdicts(results)
    assert "language" not in line and "vision +0.00 (spread 1.00)" in line


def test_an_ablation_keeps_the_rows_earlier_runs_finished_and_refuses_a_folder_of_other_files(no_training, suite,
                                                                                               tmp_path, capsys):
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "topic probe", "pairs retrieval")
    out = tmp_path / "ablation"
    args = ["ablate", "--output", str(out), "--suite", str(file), "--steps", "2", "--rows"]
    assert cli(args + ["mlm,flava-c"]) == 0
    assert cli(args + ["mlm"]) == 0  # a rerun with fewer rows dropped the others from the report
    assert "the report also holds the rows earlier runs finished: flava-c" in " ".join(capsys.readouterr().out.split())
    assert list(json.loads((out / "ablation.json").read_text())["rows"]) == ["mlm", "flava-c"]
    report = (out / "ablation.md").read_text()
    assert all(f"| {ROWS[k].label} | {ROWS[k].paper_row} |" in report for k in ("mlm", "flava-c"))
    # A run's, a recipe's or another folder: the rows' folders would mix with its files.
    for command, what in ((args + ["mlm"], "ablation"), (balancing_args(tmp_path / "other", file), "balancing")):
        other = tmp_path / "other"
        other.mkdir(exist_ok=True)
        (other / "notes.txt").write_text("mine")
        command = [tmp_path / "other" if a == str(out) else a for a in command]
        assert cli([str(a) for a in command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{other} already holds other files (e.g. notes.txt) and no {what}" in err
        assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_balancing_comparison_stopped_before_its_first_method_finished_continues(no_training, suite, tmp_path,
                                                                                   monkeypatch):
    import flava.train.run as run

    file = _suite_file(suite, tmp_path / "suite.json", "colour probe", "pairs retrieval")
    out = tmp_path / "balancing"
    trained = list(no_training)

    def stopped(cfg, directory, **kw):
        directory.mkdir(parents=True)  # a stage's folder made, then the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_pretrain", stopped)
    assert cli(balancing_args(out, file)) == 130
    assert (out / "balancing.json").is_file()  # the folder is the comparison's: its rerun is not refused
    monkeypatch.setattr(run, "run_pretrain", lambda cfg, directory, **kw: trained.append(directory.name))
    assert cli(balancing_args(out, file)) == 0


def test_a_row_the_suite_cannot_score_and_rows_naming_none_are_refused_before_any_training(no_training, suite,
                                                                                              tmp_path, capsys):
    # The MLM row had trained whole, then been refused for want of a language task, and the suite
    # was then locked against the fix; --rows "" (an empty variable) ran every row, and "," none.
    file = _suite_file(suite, tmp_path / "suite.json", "colour probe")
    out = tmp_path / "ablation"
    assert cli(["ablate", "--output", str(out), "--suite", str(file), "--rows", "mlm", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the suite {file} has no language task for row mlm: add one, or leave the row out of --rows" in err
    assert no_training == [] and not out.exists()
    for rows in ("", ","):
        assert cli(["ablate", "--output", str(out), "--suite", str(file), "--rows", rows, "--steps", "2"]) == 2
        assert f"--rows {rows!r} names no row" in capsys.readouterr().err and no_training == []


def test_rows_beside_balancing_are_refused_with_their_own_hint(tmp_path, capsys):
    # The hint had been the one for --steps ("the joint stage's steps: --set max_steps=N").
    assert cli(["ablate", "--output", str(tmp_path / "a"), "--balancing", "fixed,dwa", "--rows", "flava"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("drop --rows (its rows are the --balancing methods, each run once per seed)")
    assert "max_steps" not in err
    assert not (tmp_path / "a").exists()


def test_a_row_or_a_stage_setting_named_twice_is_refused(tmp_path, capsys):
    # --rows mlm,mlm trained MLM twice; --stage-set twice for one key took the last unsaid, where
    # --stage-steps twice was refused.
    assert cli(["ablate", "--output", str(tmp_path / "a"), "--rows", "mlm,mlm"]) == 2
    assert capsys.readouterr().err.strip().endswith("--rows names mlm twice: name each row once")
    assert cli(["pretrain", "--recipe", "paper", "--output", str(tmp_path / "r"), "--stage-set",
                "text-mlm:optim.lr=1e-3", "--stage-set", "text-mlm:optim.lr=2e-3"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--stage-set sets optim.lr of stage text-mlm twice (1e-3 and 2e-3): give it once")
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()

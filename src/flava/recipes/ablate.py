"""`flava ablate`: the rows of the paper's Table 3 (and Table C.1's local vs global contrastive
comparison) trained at a chosen scale, each evaluated with one suite, in one report beside the
paper's numbers.

```
OUTPUT/
  ablation.json       the plan (rows, steps, settings) and every finished row's scores
  ablation.md         the Table-3-shaped table, ours beside the paper's, the paper's claims checked
  ablation.png        the domain averages of every row, ours and the paper's
  codebook/           the image codebook every row shares (demo data with no codebook named)
  settings/ROW.json   the training settings of each row
  rows/ROW/           a normal run directory (the full row: a recipe directory), and
  rows/ROW/scores.json  its evaluation (written last: a row with it is not run again)
```

Rows (the paper's data: rows 1-4 on PMD pairs, 5-6 also on unimodal images and text):

- `mim`: the image encoder alone by masked image modelling (vision tasks only);
- `mlm`: the text encoder alone by masked language modelling (language tasks only);
- `flava-c-local`: pairs only, the contrastive loss alone, back-propagated to each process's own
  features (C.1 column 3; needs two or more processes: on one they are the same loss);
- `flava-c`: pairs only, the global contrastive loss alone (FLAVA_C);
- `flava-mm`: pairs only, contrastive + ITM + masked multimodal modelling (FLAVA_MM);
- `flava-no-init`: every objective on pairs, images and text, from random initialisation;
- `flava`: the paper's recipe: text MLM and an image stage (DINO, or MIM), then every objective
  with both encoders initialised from them (full FLAVA);
- `untrained`: the newly initialised model, evaluated only (not in the paper; the floor at this scale).

Rows 1-2 train on the unimodal sources (`data.images`, `data.text`), not on the pairs' own images
and captions as the paper's do; the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import stopping
from ..config import check, differences, from_dict, said, to_dict
from ..errors import ConfigError, FlavaError
from ..evaluate.results import domain_noise, mean_error
from ..evaluate.suite import DEMO_SUITE, DOMAINS, Suite
from ..io.files import atomic_path, read_json, refuse_other_files, write_json_atomic, write_text_atomic
from ..train.config import TrainConfig
from .recipe import RECIPES, finished_step

# The paper's numbers: (vision, language, multimodal, macro) average. Rows from Table 3; its
# vision and language columns are read as Table C.1 labels them (MIM's 57.46 is a vision average,
# FLAVA's 78.19 a language one). The local contrastive row is C.1 column 3, its macro computed as
# Table 3 computes macros: the mean of the three domains, a missing domain counting 0.
PAPER: dict[str, tuple[float | None, float | None, float | None, float]] = {
    "mim": (57.46, None, None, 19.15),
    "mlm": (None, 71.55, None, 23.85),
    "flava-c-local": (76.12, 62.99, 66.42, 68.51),
    "flava-c": (79.14, 64.80, 66.25, 70.06),
    "flava-mm": (79.35, 74.22, 69.11, 74.23),
    "flava-no-init": (78.29, 75.55, 67.32, 73.72),
    "flava": (79.44, 78.19, 69.92, 75.85),
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    paper_row: str
    """Where the row is in the paper."""
    domains: tuple[str, ...] = DOMAINS
    """The domains it is evaluated on (the unimodal rows: their own only, as in the paper)."""


ROWS = {r.key: r for r in (
    Row("mim", "MIM", "Table 3 row 1", ("vision",)),
    Row("mlm", "MLM", "Table 3 row 2", ("language",)),
    Row("flava-c-local", "FLAVA_C, local contrastive", "Table C.1 column 3"),
    Row("flava-c", "FLAVA_C", "Table 3 row 3"),
    Row("flava-mm", "FLAVA_MM", "Table 3 row 4"),
    Row("flava-no-init", "FLAVA w/o unimodal init", "Table 3 row 5"),
    Row("flava", "FLAVA", "Table 3 row 6"),
    Row("untrained", "untrained (no pretraining)", "not in the paper"),
)}
# Without processes to keep features from, local and global contrastive are one loss.
NEEDS_PROCESSES = {"flava-c-local"}
SCORES = "scores.json"


@dataclass
class Plan:
    rows: list[str]
    steps: int
    unimodal_steps: int
    image_stage: str
    processes: int
    suite: str


def _copy(cfg: TrainConfig) -> TrainConfig:
    return from_dict(TrainConfig, to_dict(cfg))


def _pairs_only(c: TrainConfig, *objectives: str) -> None:
    """Train on pairs alone with only the named pair objectives."""
    c.data.mixing = [1.0, 0.0, 0.0]
    for name in ("global_contrastive", "itm", "mmm_image", "mmm_text", "mim", "mlm"):
        setattr(c.objectives, f"{name}_weight", getattr(c.objectives, f"{name}_weight") if name in objectives else 0.0)


def row_config(key: str, cfg: TrainConfig, steps: int) -> TrainConfig:
    """The training settings of row `key` made from `cfg` (a joint run's: data, model, optimizer)."""
    c = _copy(cfg)
    c.max_steps = steps
    if key == "mim":
        c.stage = "image-mim"
    elif key == "mlm":
        c.stage = "text-mlm"
    elif key in ("flava-c", "flava-c-local"):
        _pairs_only(c, "global_contrastive")
        c.objectives.gather_with_grad = key == "flava-c"
    elif key == "flava-mm":
        _pairs_only(c, "global_contrastive", "itm", "mmm_image", "mmm_text")
    return check(c)


def check_plan(cfg: TrainConfig, plan: Plan) -> None:
    if cfg.stage != "joint":
        raise ConfigError(f"flava ablate sets each row's stage itself; drop stage={cfg.stage}")
    if cfg.init or cfg.init_text or cfg.init_image or cfg.init_multimodal:
        raise ConfigError("flava ablate compares rows trained from scratch (and FLAVA from its own unimodal stages); "
                          "drop init, init_text, init_image and init_multimodal")
    unknown = [r for r in plan.rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"flava ablate has no row {unknown[0]!r}; its rows: {', '.join(ROWS)}")
    if plan.processes < 1:
        raise ConfigError(f"--processes must be at least 1; got {plan.processes}")
    for r in plan.rows:
        if r in NEEDS_PROCESSES and plan.processes < 2:
            raise ConfigError(f"row {r} needs --processes 2 or more: on one process local and global contrastive "
                              "are the same loss")
    if plan.image_stage not in ("dino", "mim"):
        raise ConfigError(f"--image-stage must be dino or mim; got {plan.image_stage!r}")
    if plan.steps < 1 or plan.unimodal_steps < 1:
        raise ConfigError("--steps and --unimodal-steps must be at least 1")


def default_rows(processes: int) -> list[str]:
    return [r for r in ROWS if processes > 1 or r not in NEEDS_PROCESSES]


# --------------------------------------------------------------------------- running rows


def _recipe(plan: Plan) -> str:
    return "paper" if plan.image_stage == "dino" else "paper-mim"


def row_model_dir(key: str, output: Path) -> Path:
    """The run directory whose newest checkpoint is the row's model."""
    directory = output / "rows" / key
    return directory / "joint" if key == "flava" else directory


def train_row(key: str, cfg: TrainConfig, plan: Plan, output: Path, console: Console) -> None:
    """Train row `key` (or continue it) into OUTPUT/rows/KEY, in this process or under torchrun."""
    from .recipe import run_recipe
    from ..train.run import SETTINGS, run_pretrain

    c = row_config(key, cfg, plan.steps) if key != "flava" else _copy(cfg)
    c.max_steps = plan.steps
    settings = output / "settings" / f"{key}.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings, to_dict(c))
    directory = output / "rows" / key
    image = RECIPES[_recipe(plan)][1]
    stage_steps = {"text-mlm": plan.unimodal_steps, image: plan.unimodal_steps}
    if plan.processes == 1:
        if key == "flava":
            run_recipe(_recipe(plan), c, directory, console, stage_steps)
        else:
            run_pretrain(c, directory, resume=(directory / SETTINGS).is_file(), console=console)
        return
    args = ["pretrain", "--config", str(settings), "--output", str(directory)]
    if key == "flava":
        args += ["--recipe", _recipe(plan), *(a for s, n in stage_steps.items() for a in ("--stage-steps", f"{s}={n}"))]
    elif (directory / SETTINGS).is_file():
        args.append("--resume")
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // plan.processes))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={plan.processes}",
                "-m", "flava.cli"]
    console.print(f"running: torchrun --nproc_per_node={plan.processes} -m flava.cli {' '.join(args)}")
    done = subprocess.run(launcher + args, env={**os.environ, "OMP_NUM_THREADS": threads})
    if done.returncode != 0 and (signum := stopping.requested()):  # Ctrl-C reached torchrun too: it saved
        at = f"at its step {finished_step(row_model_dir(key, output))}"
        raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)}", at)
    if done.returncode != 0:
        raise FlavaError(f"row {key}: its training under torchrun exited with {done.returncode} (its output is "
                         f"above); run the same command again to continue it")


def evaluate_row(key: str, cfg: TrainConfig, suite: Suite, output: Path, console: Console) -> dict:
    """Evaluate row `key` on the suite's tasks of its domains; its scores."""
    from ..evaluate.report import write_report
    from ..evaluate.run import evaluate_models, load_model, untrained_like
    from ..model import FlavaModel

    row = ROWS[key]
    tasks = Suite(suite.name, [t for t in suite.tasks if t.domain in row.domains], suite.max_text_length)
    if not tasks.tasks:
        raise ConfigError(f"the suite has no {'/'.join(row.domains)} task for row {key}")
    if key == "untrained":
        model, description = untrained_like(FlavaModel(cfg.model), seed=cfg.seed), "newly initialised"
    else:
        model, path = load_model(row_model_dir(key, output))
        description = str(path)
    result = evaluate_models([(row.label, model, description)], tasks, console)[0]
    write_report([result], output / "rows" / key / "evaluation", [row.label])
    return {"row": key, "model": description, **result.scores()}


def suite_spec(source: str):
    """A suite's JSON: the file's, or the packaged suite's as this release defines it."""
    return DEMO_SUITE if source == "demo" else read_json(Path(source), "suite file", ConfigError)


def suite_fingerprint(source: str) -> str:
    """What identifies a suite's tasks: a hash of its JSON (keys sorted: reformatting the file is
    no change). The data files a suite names are not read: change those and keep the suite file,
    and the scores compare other data."""
    return hashlib.sha256(json.dumps(suite_spec(source), sort_keys=True).encode()).hexdigest()[:16]


def refuse_changed_suite(old: dict, wanted: dict, output: Path) -> None:
    """Scores kept in OUTPUT were measured on the suite's tasks when they ran: refuse to add runs
    scored on other tasks beside them, naming what changed where the record keeps the suite (a
    record older than the fingerprint is not compared)."""
    was = old.get("suite_fingerprint")
    if was is not None and was != wanted["suite_fingerprint"]:
        def by_task(spec):  # task N's fields as tasks.N.key, numbered as the suite's messages number them
            tasks = spec.get("tasks") if isinstance(spec, dict) else None
            return {**spec, "tasks": {str(i): t for i, t in enumerate(tasks, 1)}} if isinstance(tasks, list) else spec

        what = ""
        if isinstance(old.get("suite_spec"), dict) and isinstance(wanted.get("suite_spec"), dict):
            diff = list(differences(by_task(old["suite_spec"]), by_task(wanted["suite_spec"])).items())
            what = f" ({said(dict(diff[:6]))}" + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "") + ")"
        raise ConfigError(f"the suite {wanted['suite']} changed since {output}'s runs were scored on it{what}; "
                          "restore the file, or choose another --output")


def rows_needing_demo_codebook(cfg: TrainConfig, plan: Plan) -> set[str]:
    """The rows of `plan` that train on the demo data with image-token objectives and no codebook
    named: those the shared demo codebook is trained for (the text-only and contrastive rows are not)."""
    from ..train.run import needs_demo_codebook

    return {k for k in plan.rows if k != "untrained" and
            needs_demo_codebook(_copy(cfg) if k == "flava" else row_config(k, cfg, plan.steps))}


def run_ablation(cfg: TrainConfig, plan: Plan, output: Path, console: Console) -> dict:
    """Train and evaluate every row not yet finished, then write the report."""
    check_plan(cfg, plan)
    from ..evaluate.run import read_suite
    from ..train.run import check_codebook_vocabulary, needs_demo_codebook, train_demo_codebook

    cfg = _copy(cfg)
    # One codebook for every row (demo data), trained before the first row that reads image tokens;
    # the plan names it either way, so later runs of the same command add rows that need it.
    needing = rows_needing_demo_codebook(cfg, plan)
    if needing:
        check_codebook_vocabulary(cfg.model)
    suite = read_suite(plan.suite, console)  # every data error before any training
    # A row with nothing to be scored on, said before any row trains (it was said after its training,
    # and the suite then locked against the fix).
    for key in plan.rows:
        domains = ROWS[key].domains
        if not any(t.domain in domains for t in suite.tasks):
            raise ConfigError(f"the suite {plan.suite} has no {'/'.join(domains)} task for row {key}: add one, or "
                              "leave the row out of --rows")
    record = output / "ablation.json"
    refuse_other_files(output, record, "ablation")
    output.mkdir(parents=True, exist_ok=True)
    if needs_demo_codebook(cfg):
        cfg.codebook = str(output / "codebook")
    wanted = {"rows": plan.rows, "steps": plan.steps, "unimodal_steps": plan.unimodal_steps,
              "image_stage": plan.image_stage, "processes": plan.processes, "suite": plan.suite,
              "suite_fingerprint": suite_fingerprint(plan.suite), "suite_spec": suite_spec(plan.suite),
              "settings": to_dict(cfg)}
    if record.is_file():
        old = read_json(record, "ablation record", ConfigError, expect=dict).get("plan", {})
        keys = ("steps", "unimodal_steps", "image_stage", "processes", "suite", "settings")
        changed = [k for k in keys if old.get(k) != wanted[k]]
        if changed:
            diff = differences({k: old.get(k) for k in changed}, {k: wanted[k] for k in changed})
            raise ConfigError(f"{output} holds an ablation with other {', '.join(changed)} ({said(diff)}); continue it "
                              "with the same command (other --rows are fine), or choose another --output")
        refuse_changed_suite(old, wanted, output)
    # Rows an earlier run of this ablation finished (the same steps and settings: others are
    # refused above) stay in the record and the report, in the table's order.
    earlier = [k for k in ROWS if k not in plan.rows and (output / "rows" / k / SCORES).is_file()]
    kept = {k: read_json(output / "rows" / k / SCORES, "row scores", expect=dict) for k in earlier}

    def in_order(results: dict[str, dict]) -> dict[str, dict]:
        both = {**kept, **results}
        return {k: both[k] for k in ROWS if k in both}

    write_json_atomic(record, {"plan": wanted, "rows": in_order({})})
    results: dict[str, dict] = {}
    for i, key in enumerate(plan.rows, 1):
        row = ROWS[key]
        scores_path = output / "rows" / key / SCORES
        console.rule(f"row {i} of {len(plan.rows)}: {row.label} ({row.paper_row})")
        if scores_path.is_file():
            console.print(f"{key}: already trained and evaluated ({scores_path})")
            results[key] = read_json(scores_path, "row scores", expect=dict)
            continue
        start = time.perf_counter()
        if key != "untrained" and finished_step(row_model_dir(key, output)) < plan.steps:
            try:
                if key in needing:
                    train_demo_codebook(cfg.model, output / "codebook", console)
                train_row(key, cfg, plan, output, console)
            except stopping.Stopped as e:
                saved = "" if e.at == stopping.BEFORE_FIRST_STEP else " (saved)"
                raise stopping.Stopped(e.signum, f"stopped by {stopping.name(e.signum)} in row {key} {e.at}{saved}: "
                                                 "run the same command again to continue", e.at) from None
        trained = time.perf_counter() - start
        results[key] = evaluate_row(key, cfg, suite, output, console)
        results[key]["minutes"] = {"train": round(trained / 60, 2),
                                   "evaluate": round((time.perf_counter() - start - trained) / 60, 2)}
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(scores_path, results[key])
        write_json_atomic(record, {"plan": wanted, "rows": in_order(results)})
        if (signum := stopping.requested()) and i < len(plan.rows):
            at = f"after row {key} ({i} of {len(plan.rows)})"
            raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at}; its scores are kept: run the "
                                           "same command again to continue", at)
    if earlier:
        console.print(f"the report also holds the rows earlier runs finished: {', '.join(earlier)}")
    results = in_order(results)
    write_json_atomic(record, {"plan": wanted, "rows": results})
    md = write_ablation_report(results, plan, output)
    console.print(ablation_table(results))
    for line in claims(results):
        console.print(f"- {line}")
    console.print(f"report: {md}, plot: {output / 'ablation.png'}")
    return results


# --------------------------------------------------------------------------- the report


def averages(scores: dict) -> tuple[float | None, float | None, float | None, float]:
    """(vision, language, multimodal, macro); the macro over the three domains, a domain not
    evaluated counting 0 as in the paper's Table 3."""
    d = scores["domain_averages"]
    values = tuple(d.get(k) for k in DOMAINS)
    return (*values, float(sum(v or 0.0 for v in values) / len(DOMAINS)))  # type: ignore[return-value]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def claims(results: dict[str, dict]) -> list[str]:
    """The paper's ordering claims, each checked on these rows (skipped when a row is missing): a
    difference within two standard errors of the test items' noise (binomial, where the rows
    recorded their items) is said to be within noise, neither holding nor failing."""
    avg = {k: averages(v) for k, v in results.items()}
    paper = PAPER
    out = []
    V, L, M, MACRO = range(4)

    def noise(a: str, b: str, i: int) -> float | None:
        per = domain_noise(results[a], results[b])
        if i != MACRO:
            return per[DOMAINS[i]]
        # The macro is over the three domains, one not evaluated counting 0 on both sides.
        return mean_error([per[d] for j, d in enumerate(DOMAINS) if avg[a][j] is not None or avg[b][j] is not None],
                          count=len(DOMAINS))

    def judged(diff: float, se: float | None) -> str:
        if se is not None and abs(diff) <= 2 * se:
            return f"within noise (±{2 * se:.2f})"
        return "holds" if diff > 0 else "does not hold"

    def cmp(name: str, a: str, b: str, i: int, what: str) -> None:
        if a not in avg or b not in avg or avg[a][i] is None or avg[b][i] is None:
            return
        ours = avg[a][i] - avg[b][i]
        p = (paper[a][i] or 0) - (paper[b][i] or 0) if a in paper and b in paper else None
        out.append(f"{name}: {judged(ours, noise(a, b, i))} here ({what}: {ROWS[a].label} {avg[a][i]:.2f} vs "
                   f"{ROWS[b].label} {avg[b][i]:.2f}, {ours:+.2f}" + (f"; paper {p:+.2f})" if p is not None else ")"))

    trained = [k for k in avg if k in PAPER]
    if "flava" in avg and len(trained) > 1:
        best = max(trained, key=lambda k: avg[k][MACRO])
        verdict = "holds" if best == "flava" else judged(avg["flava"][MACRO] - avg[best][MACRO],
                                                         noise("flava", best, MACRO))
        out.append(f"full FLAVA has the best macro average: {verdict} here "
                   f"(best: {ROWS[best].label} {avg[best][MACRO]:.2f}; FLAVA {avg['flava'][MACRO]:.2f}); "
                   "paper: holds")
    cmp("global contrastive beats local (macro average, Table C.1 columns 4 vs 3)", "flava-c", "flava-c-local",
        MACRO, "macro")
    cmp("the multimodal objectives help multimodal tasks (FLAVA_MM over FLAVA_C)", "flava-mm", "flava-c", M,
        "multimodal average")
    cmp("unimodal data helps language (FLAVA w/o init over FLAVA_MM)", "flava-no-init", "flava-mm", L,
        "language average")
    for i, domain in ((V, "vision"), (L, "language"), (M, "multimodal")):
        cmp(f"unimodal initialisation helps {domain} (FLAVA over FLAVA w/o init)", "flava", "flava-no-init", i,
            f"{domain} average")
    if "untrained" in avg:
        for k in trained:
            worse = []
            for i in range(3):
                if avg[k][i] is None or avg["untrained"][i] is None:
                    continue
                diff, se = avg[k][i] - avg["untrained"][i], noise(k, "untrained", i)
                if se is not None and abs(diff) <= 2 * se:
                    worse.append(f"{DOMAINS[i]} (within noise)")
                elif diff <= 0:
                    worse.append(DOMAINS[i])
            if worse:
                out.append(f"{ROWS[k].label} is not above the untrained model on: {', '.join(worse)}")
    return out


def ablation_table(results: dict[str, dict]) -> Table:
    table = Table(title="ablation: averages, ours (this run) beside the paper's (percent)")
    table.add_column("row")
    for col in ("vision", "language", "multimodal", "macro"):
        table.add_column(col, justify="right")
    for col in ("paper: vision", "language", "multimodal", "macro"):
        table.add_column(col, justify="right", style="dim")
    for key, scores in results.items():
        p = PAPER.get(key, (None, None, None, None))
        table.add_row(ROWS[key].label, *(_fmt(v) for v in averages(scores)), *(_fmt(v) for v in p))
    return table


def write_ablation_report(results: dict[str, dict], plan: Plan, output: Path) -> Path:
    lines = ["# Ablation: the paper's Table 3 at this scale", "",
             f"Suite `{plan.suite}`; every trained row {plan.steps} steps; the full FLAVA row first trains text "
             f"MLM and image {plan.image_stage.upper()} for {plan.unimodal_steps} steps each (the paper also spends "
             f"extra compute on its unimodal encoders); {plan.processes} process(es).", "",
             "| row | paper | vision | language | multimodal | macro | paper vision | paper language | "
             "paper multimodal | paper macro |", "|" + "---|" * 10]
    for key, scores in results.items():
        p = PAPER.get(key, (None, None, None, None))
        lines.append(f"| {ROWS[key].label} | {ROWS[key].paper_row} | " + " | ".join(_fmt(v) for v in averages(scores))
                     + " | " + " | ".join(_fmt(v) for v in p) + " |")
    lines += ["", "Macro averages are over the three domains with a domain not evaluated counting 0, as the "
              "paper's Table 3 computes them (MIM and MLM are evaluated on their own domain only). The paper's "
              "rows 1-4 train on PMD pairs (MIM and MLM on PMD's images and captions); here MIM and MLM train on "
              "the unimodal sources (`data.images`, `data.text`).", "", "## The paper's claims, checked here", ""]
    lines += [f"- {line}" for line in claims(results)]
    # Every (task, score) any row has, in suite order (the full rows have them all).
    tasks = list(dict.fromkeys((name, metric) for scores in results.values()
                               for name, t in scores["tasks"].items() for metric in t["scores"]))
    lines += ["", "## Every task", "", "| task | score | " + " | ".join(ROWS[k].label for k in results) + " |",
              "|" + "---|" * (len(results) + 2)]
    for name, metric in tasks:
        cells = [_fmt(results[k]["tasks"].get(name, {}).get("scores", {}).get(metric)) for k in results]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "![averages](ablation.png)", ""]
    plot(results, output / "ablation.png")
    md = output / "ablation.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md


def plot(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: each row's four averages, ours solid and the paper's hatched beside them."""
    from ..evaluate.pictures import pyplot as _plt

    plt = _plt()
    keys = list(results)
    groups = ("vision", "language", "multimodal", "macro")
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), sharey=True)
    x = np.arange(len(keys))
    for g, ax in enumerate(axes):
        ours = [averages(results[k])[g] for k in keys]
        paper = [PAPER.get(k, (None,) * 4)[g] for k in keys]
        ax.bar(x - 0.2, [v or 0 for v in ours], 0.4, label="this run", color="tab:blue")
        ax.bar(x + 0.2, [v or 0 for v in paper], 0.4, label="paper", color="white", edgecolor="tab:gray", hatch="//")
        ax.set_title(groups[g])
        ax.set_xticks(x, [ROWS[k].label.replace(" ", "\n", 1) for k in keys], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("percent")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


"""`flava ablate --balancing`: the full FLAVA row — the demo's recipe — under several ways of
balancing its objectives, over several seeds, in one table with the spread between seeds.

The balancing methods are `objectives.balancing`'s (fixed, uncertainty, dwa, pcgrad) and
`mixing-adaptive`: fixed balancing with the data kinds' mix adapted to their loss progress
(`data.mixing_schedule=adaptive`). The method changes only the joint stage, so each seed's text MLM
and image MIM stages are trained once and every method's joint stage starts from them. Those stages
train with the demo recipe's own settings (`DEMO_STAGE_SETTINGS`: its learning rate) unless --set
gives the same key, which then reaches every stage, as in Table 3's full FLAVA row.

```
OUTPUT/
  balancing.json                  the plan and every finished run's scores
  balancing.md                    the table: each method's domain averages over the seeds, their spread,
                                  and which methods beat fixed by more than the spread on which domains
  codebook/                       the image codebook every stage shares (demo data with no codebook named)
  seed-S/text-mlm, seed-S/image-mim   the unimodal stages of seed S
  seed-S/METHOD/                  the joint stage under METHOD (a run directory) and its scores.json
```

Running the same command again continues where it stopped: a finished run is not run again. Run
with other methods or seeds, it adds to the comparison: the report covers every run finished in
OUTPUT, those asked for first (the record refuses a rerun under other settings, so they share them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import stopping
from ..config import apply_overrides, check, differences, from_dict, said, settings, to_dict
from ..errors import ConfigError
from ..evaluate.results import SuiteResult, TaskResult
from ..evaluate.suite import DOMAINS, Suite
from ..io.files import read_json, refuse_other_files, write_json_atomic, write_text_atomic
from ..train.balancing import METHODS
from ..train.config import TrainConfig
from .ablate import refuse_changed_suite, suite_fingerprint, suite_spec
from .recipe import DEMO_RECIPE, DEMO_STAGE_SETTINGS, DEMO_STAGE_STEPS, finished_step, plan

ADAPTIVE_MIXING = "mixing-adaptive"
CHOICES = (*METHODS, ADAPTIVE_MIXING)
SCORES = "scores.json"
GROUPS = (*DOMAINS, "macro")


@dataclass
class BalancingPlan:
    methods: list[str]
    seeds: list[int]
    suite: str
    unimodal_steps: int | None = None
    """Steps of each unimodal stage (default: the demo's)."""
    stage_settings: dict[str, list[str]] = field(default_factory=lambda: stage_settings([]))
    """KEY=VALUE settings of the unimodal stages alone: the demo's, less those the user's --set gives."""

    @property
    def stage_steps(self) -> dict[str, int]:
        if self.unimodal_steps is None:
            return dict(DEMO_STAGE_STEPS)
        return {stage: self.unimodal_steps for stage in DEMO_STAGE_STEPS}


def stage_settings(user: list[str]) -> dict[str, list[str]]:
    """The demo recipe's settings of its unimodal stages, less any key the user's --set items give:
    those reach every stage, as Table 3's rows' do."""
    keys = [item.split("=", 1)[0].strip().lstrip("-") for item in user]

    def given(item: str) -> bool:
        key = item.split("=", 1)[0].strip()
        return any(key == k or key.startswith(k + ".") for k in keys)

    return {stage: [item for item in items if not given(item)] for stage, items in DEMO_STAGE_SETTINGS.items()}


def balancing_set(value: str) -> ConfigError:
    """objectives.balancing given to the comparison: each method's joint run sets its own, so the
    setting would reach the unimodal stages alone."""
    example = f"fixed,{value}" if value != "fixed" else "fixed,dwa"
    return ConfigError(f"--balancing sets objectives.balancing itself, to each method it compares "
                       f"(objectives.balancing={value} would reach the unimodal stages alone): drop it, and name the "
                       f"methods with --balancing (e.g. --balancing {example})")


def check_plan(cfg: TrainConfig, p: BalancingPlan) -> None:
    if cfg.stage != "joint":
        raise ConfigError(f"flava ablate --balancing trains the demo's recipe, whose stages it sets itself; drop "
                          f"stage={cfg.stage}")
    if cfg.objectives.balancing != "fixed":  # from --set or a --config file
        raise balancing_set(cfg.objectives.balancing)
    unknown = [m for m in p.methods if m not in CHOICES]
    if unknown:
        raise ConfigError(f"--balancing has no method {unknown[0]!r}; choose from {', '.join(CHOICES)}")
    if "fixed" not in p.methods:
        raise ConfigError("--balancing compares methods with fixed: include fixed in the list")
    if len(p.seeds) < 2 or len(set(p.seeds)) != len(p.seeds):
        raise ConfigError(f"--seeds needs two or more different seeds to measure the spread; got {p.seeds}")
    if p.unimodal_steps is not None and p.unimodal_steps < 1:
        raise ConfigError("--unimodal-steps must be at least 1")
    from ..train.trainer import check_mixing

    for method in p.methods:  # every row's settings before the first trains
        check_mixing(method_config(cfg, method))


def mixing_note(cfg: TrainConfig, p: BalancingPlan) -> str | None:
    """What the adaptive mix replaces, where it replaces a schedule the other methods follow: the
    comparison is then of two mixes as well as of the methods (it had been done without a word)."""
    if ADAPTIVE_MIXING not in p.methods or cfg.data.mixing_schedule == "constant":
        return None
    return (f"{ADAPTIVE_MIXING} adapts the data mix itself, in place of data.mixing_schedule="
            f"{cfg.data.mixing_schedule}, which the other methods follow")


def method_config(joint: TrainConfig, method: str) -> TrainConfig:
    c = from_dict(TrainConfig, to_dict(joint))
    if method == ADAPTIVE_MIXING:  # the adaptive mix replaces any other schedule the comparison was given
        c.objectives.balancing, c.data.mixing_schedule, c.data.mixing_end = "fixed", "adaptive", []
    else:
        c.objectives.balancing = method
    return check(c)


def run_balancing(cfg: TrainConfig, p: BalancingPlan, output: Path, console: Console) -> dict:
    """Train and evaluate every (seed, method) not yet finished, then write the report. `cfg` is
    the joint stage's settings (the demo recipe's, with the user's overrides)."""
    from ..evaluate.run import read_suite
    from ..train.run import SETTINGS, check_codebook_vocabulary, ensure_demo_codebook, needs_demo_codebook, \
        run_pretrain

    check_plan(cfg, p)
    if needs_demo_codebook(cfg):  # the stages' shared codebook: before the record names the settings
        check_codebook_vocabulary(cfg.model)
    suite = read_suite(p.suite, console)  # every data error before any training
    record = output / "balancing.json"
    refuse_other_files(output, record, "balancing comparison")
    output.mkdir(parents=True, exist_ok=True)
    wanted = {"methods": p.methods, "seeds": p.seeds, "suite": p.suite, "suite_fingerprint": suite_fingerprint(p.suite),
              "suite_spec": suite_spec(p.suite), "stage_steps": p.stage_steps, "stage_settings": p.stage_settings,
              "settings": to_dict(cfg)}
    if record.is_file():
        old = read_json(record, "balancing record", ConfigError, expect=dict).get("plan", {})
        keys = ("settings", "suite", "stage_steps", "stage_settings")
        # Records older than stage_settings ran the demo's, whatever --set said.
        was = {k: old.get(k, DEMO_STAGE_SETTINGS if k == "stage_settings" else None) for k in keys}
        diff = differences(was, {k: wanted[k] for k in keys})
        if diff:
            raise ConfigError(f"{output} holds a comparison with other settings ({said(diff)}); continue it with the "
                              "same command (other --balancing methods and --seeds are fine), or choose another "
                              "--output")
        refuse_changed_suite(old, wanted, output)
    earlier = earlier_runs(output, p) if record.is_file() else {}
    # Before anything is trained: the folder is then this comparison's, whatever stops it.
    write_json_atomic(record, {"plan": wanted, "results": _jsonable(earlier)})
    if earlier:
        console.print(f"note: the report also covers the runs finished earlier in {output}: " + "; ".join(
            f"{m} (seed{'s' * (len(by) > 1)} {', '.join(map(str, by))})" for m, by in earlier.items()))
    noted = list(dict.fromkeys(item for items in p.stage_settings.values() for item in items))
    if noted:
        joint = settings(cfg)
        keys = [item.split("=", 1)[0].strip() for item in noted]
        console.print(f"note: {' and '.join(s for s, items in p.stage_settings.items() if items)} train with "
                      f"{', '.join(noted)}, the demo recipe's unimodal settings (the joint stage: "
                      f"{', '.join(f'{k}={joint.get(k)}' for k in keys)}); --set {keys[0]}=X sets every stage's")
    if note := mixing_note(cfg, p):
        console.print(f"note: {note}")
    results: dict[str, dict[int, dict]] = {}
    total, done = len(p.methods) * len(p.seeds), 0
    for seed in p.seeds:
        seeded = apply_overrides(cfg, [f"seed={seed}"])
        stages = plan(DEMO_RECIPE, seeded, output / f"seed-{seed}", p.stage_steps, p.stage_settings)
        for stage in stages:
            ensure_demo_codebook(stage.config, output / "codebook", console)
        runs = [(stage.name, stage.config, stage.directory) for stage in stages[:-1]]
        runs += [(m, method_config(stages[-1].config, m), output / f"seed-{seed}" / m) for m in p.methods]
        for name, c, directory in runs:
            if finished_step(directory) < c.max_steps:
                console.rule(f"seed {seed}: {name}" + (" (joint stage)" if name in CHOICES else ""))
                try:
                    run_pretrain(c, directory, resume=(directory / SETTINGS).is_file(), console=console)
                except stopping.Stopped as e:
                    saved = "" if e.at == stopping.BEFORE_FIRST_STEP else " (saved)"
                    raise stopping.Stopped(e.signum, f"stopped by {stopping.name(e.signum)} in seed {seed}, {name} "
                                                     f"{e.at}{saved}: run the same command again to continue",
                                           e.at) from None
            if name not in CHOICES:
                continue
            results.setdefault(name, {})[seed] = _scores(name, seed, directory, suite, console)
            done += 1
            write_json_atomic(record, {"plan": wanted, "results": _jsonable(merged(results, earlier))})
            if (signum := stopping.requested()) and done < total:
                at = f"after seed {seed}, {name}"
                raise stopping.Stopped(signum, f"stopped by {stopping.name(signum)} {at}; its scores are kept: run "
                                               "the same command again to continue", at)
    results = merged(results, earlier)
    md = write_report(results, p, output)
    console.print(table(results))
    for line in verdicts(results) + seed_notes(results):
        console.print(f"- {line}")
    console.print(f"report: {md}")
    return results


def earlier_runs(output: Path, p: BalancingPlan) -> dict[str, dict[int, dict]]:
    """The scores of the runs finished in OUTPUT that this command does not ask for (other methods,
    or other seeds), by method (this command's first) and seed. A run's scores.json is written once
    it is trained and evaluated, as for the runs asked for."""
    found: dict[str, dict[int, dict]] = {}
    for path in output.glob(f"seed-*/*/{SCORES}"):
        method, name = path.parent.name, path.parent.parent.name.removeprefix("seed-")
        try:
            seed = int(name)
        except ValueError:
            continue
        if method in CHOICES and not (method in p.methods and seed in p.seeds):
            found.setdefault(method, {})[seed] = read_json(path, "run scores", expect=dict)
    order = [m for m in p.methods if m in found] + [m for m in CHOICES if m in found and m not in p.methods]
    return {m: found[m] for m in order}


def merged(results: dict[str, dict[int, dict]], earlier: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """This command's methods, then those only finished earlier; each method's seeds in order."""
    return {m: dict(sorted({**results.get(m, {}), **earlier.get(m, {})}.items()))
            for m in dict.fromkeys([*results, *earlier])}


def _scores(method: str, seed: int, directory: Path, suite: Suite, console: Console) -> dict:
    """The run's evaluation on the suite (kept in DIRECTORY/scores.json: not evaluated twice)."""
    path = directory / SCORES
    if path.is_file():
        return read_json(path, "run scores", expect=dict)
    from ..evaluate.run import evaluate_models, load_model

    model, where = load_model(directory)
    result = evaluate_models([(f"{method}, seed {seed}", model, str(where))], suite, console)[0]
    scores = {"method": method, "seed": seed, "model": str(where), **result.scores()}
    write_json_atomic(path, scores)
    return scores


def _jsonable(results: dict[str, dict[int, dict]]) -> dict:
    return {m: {str(s): v for s, v in by_seed.items()} for m, by_seed in results.items()}


# --------------------------------------------------------------------------- the report


def averages(scores: dict) -> tuple[float | None, float | None, float | None, float]:
    """(vision, language, multimodal, macro) of one run as `flava evaluate` reports them: a domain
    the suite has no task of is None, and the macro averages the domains it has."""
    tasks = [TaskResult(name, "", t["domain"], t["scores"]) for name, t in scores["tasks"].items()]
    result = SuiteResult("", "", tasks)
    domains = result.domain_averages()
    return (*(domains.get(d) for d in DOMAINS), result.macro_average())  # type: ignore[return-value]


def summary(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """Per method and group (the domains and the macro average): (mean over seeds, spread = max - min),
    None for a domain the suite has no task of."""
    out: dict[str, dict[str, tuple[float, float] | None]] = {}
    for method, by_seed in results.items():
        runs = [averages(s) for s in by_seed.values()]
        out[method] = {}
        for i, g in enumerate(GROUPS):
            values = [r[i] for r in runs]
            out[method][g] = None if any(v is None for v in values) else (
                float(np.mean(values)), float(max(values) - min(values)))  # type: ignore[type-var]
    return out


def verdicts(results: dict[str, dict[int, dict]]) -> list[str]:
    """For each method but fixed: the groups where it beats or trails fixed by more than the spread
    (the larger of the two methods' spreads over seeds); the rest are within it. A domain the
    suite lacks is no group."""
    s = summary(results)
    if "fixed" not in s:
        return []
    lines = []
    for method in [m for m in s if m != "fixed"]:
        beats, trails, within = [], [], []
        for g in GROUPS:
            if s[method][g] is None or s["fixed"][g] is None:
                continue
            (a, sa), (b, sb) = s[method][g], s["fixed"][g]  # type: ignore[misc]
            margin, spread = a - b, max(sa, sb)
            (beats if margin > spread else trails if -margin > spread else within).append(
                f"{g} {margin:+.2f} (spread {spread:.2f})")
        lines.append(f"{method} vs fixed: " + "; ".join(
            f"{label}: {', '.join(v)}" for label, v in (("beats beyond the spread", beats),
                                                        ("trails beyond the spread", trails),
                                                        ("within the spread", within)) if v))
    return lines


def seed_notes(results: dict[str, dict[int, dict]]) -> list[str]:
    """The methods whose seeds are not fixed's (runs finished under another --seeds): their
    averages and spreads are over other seeds, which the margins against fixed do not correct."""
    if "fixed" not in results:
        return []
    base = sorted(results["fixed"])
    return [f"{m} ran seeds {', '.join(map(str, sorted(by)))}, fixed {', '.join(map(str, base))}: their averages are "
            "over different seeds" for m, by in results.items() if sorted(by) != base]


def _cell(mean_spread: tuple[float, float] | None) -> str:
    if mean_spread is None:
        return "–"
    mean, spread = mean_spread
    return f"{mean:.2f} ± {spread / 2:.2f}"


def table(results: dict[str, dict[int, dict]]) -> Table:
    s = summary(results)
    t = Table(title="Balancing the objectives: the full FLAVA row (the demo's recipe), mean ± half the seed spread")
    t.add_column("method")
    t.add_column("seeds", justify="right")
    for g in GROUPS:
        t.add_column(g, justify="right")
    for method, groups in s.items():
        t.add_row(method, str(len(results[method])), *(_cell(groups[g]) for g in GROUPS))
    return t


def write_report(results: dict[str, dict[int, dict]], p: BalancingPlan, output: Path) -> Path:
    s = summary(results)
    seeds = ", ".join(str(x) for x in sorted({x for by in results.values() for x in by}))
    steps = p.stage_steps
    lines = ["# Balancing the objectives: the full FLAVA row under each method", "",
             f"The demo's recipe (text MLM {steps['text-mlm']} steps, image MIM {steps['image-mim']} steps, then "
             f"the joint stage of every objective) on suite `{p.suite}`, "
             f"seeds {seeds}; the method changes the joint stage only, and each seed's unimodal stages are shared by "
             "every method. Percent; mean over the seeds ± half their spread (max - min); the macro average is "
             "`flava evaluate`'s: the mean of the domains the suite has tasks in (– marks one it has none in).", "",
             "| method | " + " | ".join(GROUPS) + " |", "|" + "---|" * (len(GROUPS) + 1)]
    for method, groups in s.items():
        lines.append(f"| {method} | " + " | ".join(_cell(groups[g]) for g in GROUPS) + " |")
    lines += ["", "## Against fixed", "", "A margin counts only beyond the larger of the two methods' seed spreads.",
              ""]
    lines += [f"- {line}" for line in verdicts(results) + seed_notes(results)]
    lines += ["", "## Every run", "", "| method | seed | " + " | ".join(GROUPS) + " |",
              "|" + "---|" * (len(GROUPS) + 2)]
    for method, by_seed in results.items():
        for seed, scores in by_seed.items():
            lines.append(f"| {method} | {seed} | " + " | ".join(f"{v:.2f}" if v is not None else "–"
                                                               for v in averages(scores)) + " |")
    md = output / "balancing.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return md

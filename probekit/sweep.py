"""`sweep`: expand an experiment grid into run configs, with the references TEff needs.

A grid file names a base config and the fields to vary::

    base = "clone_90_10.toml"          # relative to the grid file
    [grid]
    "data.p" = [0.5, 0.1]               # any dotted config field
    seed = [0, 1]
    budget = [1.0]                      # multipliers of train.tokens
    [[runs]]                            # extra single runs (schedules, ...)
    name = "sched_0.1_0.9"
    set = { "data.schedule" = "0.1_0.9", "data.p" = 0.5 }
    [references]
    fractions = [0.1, 0.2, 0.3, 0.5, 1.0]   # monolingual runs at these fractions of the budget
    controls = true                          # update-matched monolingual controls

Monolingual references are added for every corpus language, preset and budget
of the grid; an update-matched control gets the minority language's token count
with the multilingual run's number of optimiser steps (its batch scaled by the
language's share, so each of its steps sees as many of that language's tokens
as the multilingual run's step does on average).
"""

from __future__ import annotations

import copy
import itertools
import os
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from probekit.config import (
    DataConfig,
    RunConfig,
    apply_overrides,
    dump_config,
    load_config,
    read_toml,
    toml_value,
)
from probekit.errors import ConfigError, ProbekitError


@dataclass
class PlannedRun:
    name: str
    raw: dict  # unresolved config: derived budgets (warm-up, intervals) re-resolve per run
    kind: str  # run | reference | control

    @property
    def resolved(self) -> RunConfig:
        return load_config(self.raw)


def _short(key: str) -> str:
    return {
        "data.p": "p",
        "data.schedule": "sched",
        "data.clones": "k",
        "data.frac_clone": "fc",
        "tokenizer.vocab_mode": "",
        "seed": "s",
        "model.preset": "",
        "data.mode": "",
    }.get(key, key.split(".")[-1])


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _set(raw: dict, key: str, value) -> dict:
    return apply_overrides(raw, [f"{key}={toml_value(value)}"])


def expand_grid(grid_path: Path) -> list[PlannedRun]:
    """Every run of the grid: multilingual runs, monolingual references and controls."""
    grid_path = Path(grid_path)
    spec = read_toml(grid_path)
    _known_keys(grid_path, "", spec, ("name", "base", "grid", "runs", "references", "analysis"))
    if not isinstance(spec.get("runs", []), list):
        raise ConfigError(f"{grid_path}: runs: expected [[runs]] tables")
    for i, extra in enumerate(spec.get("runs", [])):
        if not isinstance(extra, dict):
            raise ConfigError(f"{grid_path}: runs[{i}]: expected a table")
        _known_keys(grid_path, f"runs[{i}]", extra, ("name", "set"))
    _known_keys(grid_path, "references", spec.get("references", {}), REFERENCE_KEYS)
    _known_keys(grid_path, "analysis", spec.get("analysis", {}), tuple(ANALYSIS_DEFAULTS))
    if "base" not in spec:
        raise ConfigError(f"{grid_path}: base: the grid needs a base config")
    base_path = (grid_path.parent / spec["base"]) if isinstance(spec["base"], str) else None
    base = read_toml(base_path) if base_path else dict(spec["base"])
    axes = dict(spec.get("grid", {}))
    budgets = axes.pop("budget", [1.0])
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{grid_path}: grid.{key}: expected a non-empty list of values")
    runs: list[PlannedRun] = []
    prefix = str(spec.get("name") or base.get("name") or "run")
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys), budgets):
        raw = copy.deepcopy(base)
        parts = []
        for key, value in zip(keys, combo[:-1], strict=True):
            raw = _set(raw, key, value)
            if len(axes[key]) > 1:  # single-valued axes stay out of the names
                parts.append(f"{_short(key)}{_fmt(value)}")
        raw = _scale_budget(raw, combo[-1])
        if len(budgets) > 1:
            parts.append(f"x{_fmt(combo[-1])}")
        runs.append(PlannedRun("_".join([prefix] + parts), raw, "run"))
    for extra in spec.get("runs", []):
        if "name" not in extra:
            raise ConfigError(f"{grid_path}: every [[runs]] entry needs a name")
        raw = copy.deepcopy(base)
        for key, value in extra.get("set", {}).items():
            raw = _set(raw, key, value)
        seeds = axes.get("seed", [raw.get("seed", 0)])
        for seed in seeds:
            name = extra["name"] + (f"_s{seed}" if len(seeds) > 1 else "")
            runs.append(PlannedRun(name, _set(raw, "seed", seed), "run"))
    for run in runs:
        run.raw["name"] = run.name
        _ = run.resolved  # validate now: a bad grid fails before anything trains
    refs = spec.get("references", {})
    runs += _references(runs, refs)
    names = [r.name for r in runs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{grid_path}: runs with the same name: {sorted(dupes)}")
    return runs


REFERENCE_KEYS = ("fractions", "seeds", "controls")


def _known_keys(grid: Path, section: str, table: object, known: tuple[str, ...]) -> None:
    """Refuse a key a grid section does not read (it would be ignored, silently), naming the
    close match; before anything is written or trained."""
    import difflib

    where = f"{grid}: {section + '.' if section else ''}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where.rstrip('. ')}: expected a table")
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}{key}: unknown key ({hint}known: {', '.join(known)})")


def _scale_budget(raw: dict, mult: float) -> dict:
    if mult == 1.0:
        return raw
    tokens = load_config(raw).train.tokens
    raw = copy.deepcopy(raw)
    raw.setdefault("train", {}).pop("steps", None)
    raw["train"]["tokens"] = int(tokens * mult)
    return raw


def _mono(raw: dict, lang: str) -> dict:
    mono = copy.deepcopy(raw)
    d = mono.setdefault("data", {})
    for key in ("p", "weights", "schedule", "clones", "frac_clone", "languages", "parallel"):
        d.pop(key, None)
    d["mode"], d["base"] = "mono", lang
    # only this language's sources: references of clone and pair runs are then one config
    d["sources"] = {lang: d.get("sources", {}).get(lang, DataConfig().sources.get(lang, []))}
    if lang in d.get("test_sources", {}):
        d["test_sources"] = {lang: d["test_sources"][lang]}
    mono.get("tokenizer", {}).pop("vocab_mode", None)
    mono.setdefault("train", {}).pop("steps", None)
    return mono


def _references(runs: list[PlannedRun], refs: dict) -> list[PlannedRun]:
    fractions = refs.get("fractions", [0.1, 0.2, 0.3, 0.5, 1.0])
    ref_seeds = refs.get("seeds")
    out: dict[str, PlannedRun] = {}
    for run in runs:
        cfg = run.resolved
        if cfg.data.mode == "mono":
            continue
        budget = cfg.train.tokens
        preset = cfg.model.preset
        for lang in cfg.data.corpus_languages:
            for seed in ref_seeds if ref_seeds is not None else [cfg.seed]:
                for frac in fractions:
                    mono = _mono(run.raw, lang)
                    mono["seed"] = seed
                    mono["train"]["tokens"] = int(round(frac * budget))
                    name = f"ref_{lang}_{preset}_{_fmt(float(frac))}_T{budget / 1e6:g}M_s{seed}"
                    mono["name"] = name
                    out.setdefault(name, PlannedRun(name, mono, "reference"))
        if refs.get("controls", False):
            control = _control(run, cfg)
            if control is not None:
                out.setdefault(control.name, control)
    return list(out.values())


def _control(run: PlannedRun, cfg: RunConfig) -> PlannedRun | None:
    """Mono run on the minority language's tokens with the multilingual run's step count."""
    from probekit.data.mixture import Schedule

    d, t = cfg.data, cfg.train
    share = Schedule(*d.schedule_spec).mean_share
    k = len(d.languages) if d.mode == "pair" else d.clones + 1
    names = list(d.languages) if d.mode == "pair" else [d.base] * k
    if d.weights:  # the least-weighted language
        lang = names[min(range(k), key=lambda i: d.weights[i])]
        share = min(d.weights)
    else:  # the first language keeps 1 - share; the k - 1 others split share equally
        per_other = share / (k - 1)
        lang = names[0] if 1 - share <= per_other else names[1]
        share = min(per_other, 1 - share)
    batch = max(1, round(t.batch_size * share))
    if abs(batch - t.batch_size * share) > 1e-9:
        warnings.warn(
            f"{run.name}: control batch {batch} is not exactly {share:.3g} of {t.batch_size}; "
            f"its token count is off by {batch / (t.batch_size * share) - 1:+.0%}",
            stacklevel=2,
        )
    mono = _mono(run.raw, lang)
    mono["train"].pop("tokens", None)
    mono["train"]["steps"] = t.steps
    mono["train"]["batch_size"] = batch
    mono["train"]["grad_accum"] = 1
    name = f"ctrl_{run.name}"
    mono["name"] = name
    return PlannedRun(name, mono, "control")


def run_sweep(
    grid: str | Path,
    out: str | Path,
    launch_list: str | Path | None = None,
    analyse: bool = True,
    device: str | None = None,
    progress: bool = True,
    scheduler: str | None = None,
    workers: int = 0,
    verbose: bool = False,
) -> str:
    """Train every run of the grid not yet finished (then evaluate, align and tabulate TEff).

    With `scheduler` (a dask.distributed address, or $PROBEKIT_DASK_SCHEDULER) each run is
    one task on that cluster, its training and then its analysis; the sweep waits for them.
    The workers must see `out` at the same path (a shared filesystem). `workers` > 0 starts
    that many one-thread local workers instead. Finished work is skipped either way (training
    resumes, stored checkpoints are kept).
    """
    from probekit.engine import SCHEDULER_ENV, local_cluster
    from probekit.training import train

    out = Path(out)
    planned = expand_grid(Path(grid))  # a bad grid fails here, before anything is written
    cfg_dir = out / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for run in planned:
        (cfg_dir / f"{run.name}.toml").write_text(dump_config(run.raw))
    if launch_list:
        lines = [f"probekit train {cfg_dir / r.name}.toml --out {out / r.name}" for r in planned]
        Path(launch_list).write_text("\n".join(lines) + "\n")
        return (
            f"{len(planned)} runs planned; one `probekit train` command per line in {launch_list} "
            f'(e.g. a job array: sed -n "${{SLURM_ARRAY_TASK_ID}}p" {launch_list} | sh)'
        )
    options = analysis_options(Path(grid)) if analyse else None
    scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if scheduler or workers:
        # one task per run, training then its analysis, so a worker that finishes a run goes
        # on to its analysis while the others train; the longest tasks start first
        order = sorted(planned, key=_expected_cost, reverse=True)
        tasks = [
            (_train_and_analyse, cfg_dir / f"{r.name}.toml", out / r.name, device, r.kind, options)
            for r in order
        ]
        with nullcontext() if scheduler else local_cluster(workers) as cluster:
            address = scheduler or cluster.scheduler_address
            if progress:
                what = "training and analysing" if analyse else "training"
                where = f" on {address}" if verbose else ""
                print(
                    f"{len(order)} runs: {what}{where}, each run one task (log: "
                    f"{out / 'progress.log'})"
                )
            _on_cluster(address, tasks, [r.name for r in order], progress, out / "progress.log")
    else:
        for i, run in enumerate(planned, 1):
            if progress:
                print(f"[{i}/{len(planned)}] {run.kind} {run.name}")
            train(cfg_dir / f"{run.name}.toml", out / run.name, device=device, progress=progress)
        if analyse:
            analyse_sweep(planned, out, progress=progress, options=options)
    if not analyse:
        return f"{len(planned)} runs trained in {out}"
    return teff_summary(planned, out)


def _expected_cost(run: PlannedRun) -> float:
    """Sequences trained plus a per-step overhead worth two; a multilingual run's analysis
    (every checkpoint) puts it first."""
    train = run.resolved.train
    return train.steps * (train.batch_size + 2) * (10 if run.kind == "run" else 1)


ANALYSIS_DEFAULTS = {"metrics": "all", "n_pairs": 64, "seq_len": None, "eval_max_tokens": None}


def analysis_options(grid: Path) -> dict:
    """The grid's optional [analysis] table: what align and eval do after training."""
    given = read_toml(Path(grid)).get("analysis", {})
    unknown = set(given) - set(ANALYSIS_DEFAULTS)
    if unknown:
        raise ConfigError(f"{grid}: analysis: unknown field(s) {sorted(unknown)}")
    return ANALYSIS_DEFAULTS | given


def _train_run(config: Path, out: Path, device: str | None) -> None:
    """One run's training as a cluster task (finished runs return at once)."""
    from probekit.training import train

    train(config, out, device=device, progress=False)


def _train_and_analyse(
    config: Path, out: Path, device: str | None, kind: str, options: dict | None
) -> None:
    """One run of a sweep as a cluster task: its training, then (unless `options` is None)
    its analysis; finished work is skipped by both."""
    _train_run(config, out, device)
    if options is not None:
        analyse_run(out, kind, options)


def analyse_run(path: Path, kind: str, options: dict, progress: bool = False) -> None:
    """One run's analysis, in any process: a run is evaluated and aligned at every
    checkpoint; a reference or control is evaluated at its final checkpoint (TEff reads it).
    Always serial here: on a dask worker the cluster already spreads the runs."""
    from probekit.analysis import AlignOptions, align
    from probekit.checkpoints import list_checkpoints
    from probekit.engine import SCHEDULER_ENV
    from probekit.evaluation import evaluate

    os.environ.pop(SCHEDULER_ENV, None)  # never resubmit from inside a task
    opts = ANALYSIS_DEFAULTS | options
    if kind == "run":
        align_opts = AlignOptions(n_pairs=opts["n_pairs"], seq_len=opts["seq_len"])
        evaluate(path, max_tokens=opts["eval_max_tokens"], progress=progress)
        align(path, metrics=opts["metrics"], options=align_opts, progress=progress)
    else:
        evaluate(path, steps=[list_checkpoints(path)[-1].step], progress=progress)


def _on_cluster(
    scheduler: str,
    tasks: list[tuple],
    names: list[str],
    progress: bool,
    log: Path | None = None,
) -> None:
    """Run (function, *args) tasks on a dask scheduler and wait; the first failure raises.
    Each finished run prints (and appends to `log`) runs done of total, the time so far and
    an estimate of the time left (the mean time per finished run times the runs left)."""
    import time

    from dask.distributed import Client, as_completed

    start = time.monotonic()

    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise ProbekitError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    try:
        futures = {  # priority: in the order given
            client.submit(
                fn, *args, pure=False, key=f"{name}-{uuid.uuid4().hex[:8]}", priority=-i
            ): name
            for i, ((fn, *args), name) in enumerate(zip(tasks, names, strict=True))
        }
        for k, fut in enumerate(as_completed(futures), 1):
            fut.result()  # re-raises a task's error here
            line = _progress_line(k, len(futures), futures[fut], time.monotonic() - start)
            if log is not None:
                with open(log, "a") as fh:
                    fh.write(time.strftime("%H:%M:%S ") + line + "\n")
            if progress:
                print(line, flush=True)
    finally:
        client.close()


def _progress_line(done: int, total: int, name: str, elapsed: float) -> str:
    left = "" if done >= total else f", about {elapsed / done * (total - done) / 60:.1f} min left"
    return f"[{done}/{total} runs done] {name} finished; {elapsed / 60:.1f} min so far{left}"


def analyse_sweep(
    planned: list[PlannedRun],
    out: Path,
    progress: bool = True,
    options: dict | None = None,
) -> None:
    """Evaluate and align the sweep's runs here, one after another (references and controls:
    their final checkpoint only)."""
    opts = ANALYSIS_DEFAULTS | (options or {})
    # runs first (the long ones), then references and controls
    order = [r for r in planned if r.kind == "run"] + [r for r in planned if r.kind != "run"]
    for r in order:
        analyse_run(out / r.name, r.kind, opts, progress=progress)


def teff_summary(planned: list[PlannedRun], out: Path) -> str:
    """The sweep's TEff table from its analysed runs: written to `out`/teff.csv (and
    teff_seeds.csv with several seeds) and returned as text."""
    from probekit.evaluation import seed_summary, teff_table

    runs = [out / r.name for r in planned if r.kind == "run"]
    refs = [out / r.name for r in planned if r.kind == "reference"]
    ctrls = [out / r.name for r in planned if r.kind == "control"]
    lines = []
    try:
        table = teff_table(runs, refs, controls=ctrls)
    except ProbekitError as exc:
        return f"trained and analysed {len(planned)} runs; TEff not computed: {exc}"
    table.to_csv(out / "teff.csv", index=False)
    lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if table["seed"].nunique() > 1:
        summ = seed_summary(table)
        summ.to_csv(out / "teff_seeds.csv", index=False)
        lines.append(
            "\nacross seeds:\n" + summ.to_string(index=False, float_format=lambda v: f"{v:.3f}")
        )
    lines.append(f"\ntable written to {out / 'teff.csv'}")
    return "\n".join(lines)

"""The `probekit` command: a thin click layer over the Python API.

Every command calls the same function a notebook would; user errors
(`ProbekitError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import wraps
from pathlib import Path

import click

from probekit.errors import ProbekitError

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _friendly(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ProbekitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished checkpoints and stored results are kept", err=True)
            sys.exit(130)

    return wrapper


def _cluster_options(fn):
    """--workers and --scheduler: where the driver computes checkpoints."""
    fn = click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="An existing dask.distributed scheduler (e.g. tcp://host:8786) to compute "
        "checkpoints on; default $PROBEKIT_DASK_SCHEDULER. Workers must see the run folder.",
    )(fn)
    return click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=0,
        help="Spread checkpoints over this many local dask workers.",
    )(fn)


def _dtype_option(fn):
    """--dtype: the precision of the analysis' forwards and backwards."""
    return click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        default="float32",
        show_default=True,
        help="Precision of the forwards and backwards (accumulators stay float32/float64); "
        "bfloat16 halves the weights' memory, see docs/align.md for how far it moves numbers.",
    )(fn)
_FEATURE_FLAGS = (  # align --metrics features: (option, type, help)
    ("layers", str, "Layers to train the dictionary on, comma-separated (default: middle, last)."),
    ("size", int, "Latents per dictionary (default: 4 x d_model)."),
    ("k", int, "Active latents per token (TopK; default 8)."),
    ("tokens", int, "Held-out training tokens per language (default 8192)."),
    ("steps", int, "Adam steps per checkpoint and layer (default 400)."),
    ("fire", float, "Activation above which a latent fires (default 0)."),
    ("specific", float, "Mass share on the other language below which: specific (default 0.1)."),
    ("top", int, "Top features per kind measured causally, and as many random (default 4)."),
    ("seed", int, "Seed of the dictionary training (default 0)."),
)


def _features_options(fn):
    """--features-*: the options of the features family (unset: AnalysisOptions' defaults)."""
    for name, kind, text in reversed(_FEATURE_FLAGS):
        fn = click.option(f"--features-{name}", f"features_{name}", type=kind, help=text)(fn)
    return fn


def _features_kwargs(flags: dict) -> dict:
    out = {k: v for k, v in flags.items() if k.startswith("features_") and v is not None}
    if "features_layers" in out:
        try:
            out["features_layers"] = tuple(int(x) for x in out["features_layers"].split(","))
        except ValueError:
            raise click.BadParameter(
                f"expected layers such as 1,2, got {out['features_layers']!r}",
                param_hint="--features-layers",
            ) from None
    return out


def _foreign_options(fn):
    """--tokenizer, --model and --revisions: where any HF checkpoint series comes from."""
    fn = click.option(
        "--revisions",
        default=None,
        metavar="REV,REV",
        help="A hub cache: revisions to analyse, comma-separated, e.g. step1000,step2000 "
        "(default: every cached revision whose name holds a step; the step is read from it). "
        "Any series: a sample, every:N (every Nth, plus the last), log:K (K log-spaced "
        "steps), range:A:B[:S] (steps A..B, every S).",
    )(fn)
    fn = click.option(
        "--model",
        default=None,
        metavar="ORG/NAME",
        help="A local Hugging Face hub cache: the cached model to analyse (nothing is fetched).",
    )(fn)
    return click.option(
        "--tokenizer",
        default=None,
        help="Any HF checkpoint series: tokenizer folder (default: first checkpoint's).",
    )(fn)


def _series_dir(run_dir: Path, model: str | None) -> Path:
    """A hub cache's model folder (models--ORG--NAME), where its cube is stored; else RUN_DIR."""
    from probekit.checkpoints import hub_model_dir

    hub = hub_model_dir(run_dir, model) if Path(run_dir).is_dir() else None
    return hub if hub is not None else run_dir


def _revisions(value: str | None) -> tuple[str, ...] | None:
    from probekit.revisions import is_sample

    if not value or value.strip() == "all" or is_sample(value):
        return None  # a sample selects steps: _steps(steps, revisions)
    return tuple(r.strip() for r in value.split(",") if r.strip())


def _tests(values: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    out = []
    for v in values:
        lang, sep, file = v.partition("=")
        if not sep or not lang or not file:
            raise click.BadParameter(f"expected LANG=FILE, got {v!r}", param_hint="--test")
        out.append((lang, file))
    return tuple(out) or None


def _steps(value: str | None, revisions: str | None = None):
    """--steps, or a sampled --revisions (every:N, log:K, range:A:B[:S]): None, a list of
    step numbers or a probekit.revisions.Sample."""
    from probekit.options import OptionError
    from probekit.revisions import is_sample, parse_sample, parse_steps

    if revisions and is_sample(revisions):
        if value:
            raise OptionError("--revisions: a sample selects the steps; leave out --steps")
        return parse_sample(revisions, "--revisions")
    return parse_steps(value, "--steps")


class _MetricsOption(click.Option):
    """--metrics, whose help lists the registry's families when it is shown (importing the
    metrics at every start would make `probekit --help` pay for torch)."""

    def __init__(self, *args, command: str = "align", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    def get_help_record(self, ctx: click.Context):  # noqa: ANN201 - click's own type
        from probekit.metrics import describe

        self.help = (
            "Comma-separated families, or variable names that select their family: "
            f"{describe(self.command)}; or all (these). Computed only when named: "
            f"{describe('causal')}."
        )
        return super().get_help_record(ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="probekit")
def cli() -> None:
    """Probe how language models come to share computation across languages,
    checkpoint by checkpoint (after Schäfer et al. 2024, arXiv 2404.07982)."""
    # every command works offline: a mistaken hub lookup fails fast instead of hanging
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory to write."
)
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Stop after this many steps (the schedule still spans the full budget).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where to train (default: config's train.device).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field, e.g. --set data.p=0.1 (repeatable).",
)
@click.option(
    "--force", is_flag=True, help="Overwrite a run directory that holds a different config."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_friendly
def train(config: Path, out: Path, max_steps, device, overrides, force, quiet) -> None:
    """Train a GPT on a language mixture and write its checkpoint series to OUT.

    Rerunning on an interrupted OUT resumes from the newest complete checkpoint;
    a finished run is not retrained."""
    from probekit.training import train as train_run

    path = train_run(
        config,
        out,
        max_steps=max_steps,
        device=device,
        overrides=list(overrides),
        force=force,
        progress=not quiet,
    )
    click.echo(f"run written to {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--metrics", cls=_MetricsOption, command="align", default="all", show_default=True)
@click.option(
    "--steps",
    default=None,
    help="Only these checkpoint steps, comma-separated, or a sample: every:N, log:K, "
    "range:A:B[:S] (as --revisions).",
)
@click.option("--recompute", is_flag=True, help="Recompute checkpoints already stored.")
@click.option(
    "--pair", default=None, help="Languages to compare, e.g. EN1,EN3 (default: the first two)."
)
@click.option(
    "--pairs",
    "n_pairs",
    type=int,
    default=64,
    show_default=True,
    help="Parallel sequence pairs per checkpoint.",
)
@click.option(
    "--seq-len", type=int, default=None, help="Tokens per sequence (default: min(context, 128))."
)
@click.option(
    "--batch-size", type=int, default=16, show_default=True, help="Pairs per forward batch."
)
@click.option(
    "--grad-pairs",
    type=int,
    default=16,
    show_default=True,
    help="Pairs used for gradient alignment.",
)
@click.option(
    "--ci",
    type=float,
    default=None,
    help="Bootstrap interval level for similarity metrics, e.g. 0.95.",
)
@click.option(
    "--null-permutations",
    type=int,
    default=100,
    show_default=True,
    help="calibrated: permutations of the null.",
)
@click.option(
    "--null-sample",
    type=int,
    default=512,
    show_default=True,
    help="calibrated: rows (tokens, or pooled sequences) of the sample.",
)
@click.option(
    "--knn-k", type=int, default=10, show_default=True, help="calibrated: k of mutual k-NN, CKNNA."
)
@_cluster_options
@click.option(
    "--parallel",
    "parallel_files",
    nargs=2,
    default=None,
    help="Any HF checkpoint series: two line-aligned text files (L1 L2), or the shipped "
    "held-out Bible books in two languages, e.g. bible:en bible:fr (probes get book labels).",
)
@click.option(
    "--text",
    "clone_text",
    default=None,
    metavar="FILE",
    help="With --clone-offset: the one text both id ranges read (instead of --parallel).",
)
@click.option(
    "--clone-offset",
    type=int,
    default=None,
    metavar="V",
    help="Any HF series trained on id-shifted clones: L2's id of a token is L1's + V.",
)
@click.option(
    "--test",
    "tests",
    multiple=True,
    metavar="LANG=FILE",
    help="Any HF checkpoint series: a language's held-out text (repeatable); the tuned "
    "lens trains on it.",
)
@click.option(
    "--lens-tokens",
    type=int,
    default=4096,
    show_default=True,
    help="tuned_lens: held-out training tokens per language.",
)
@_foreign_options
@_features_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@_dtype_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_friendly
def align(
    run_dir,
    metrics,
    steps,
    recompute,
    pair,
    n_pairs,
    seq_len,
    batch_size,
    grad_pairs,
    ci,
    null_permutations,
    null_sample,
    knn_k,
    workers,
    scheduler,
    parallel_files,
    clone_text,
    clone_offset,
    tests,
    lens_tokens,
    tokenizer,
    model,
    revisions,
    device,
    dtype,
    quiet,
    **feature_flags,
) -> None:
    """Per-layer cross-language similarity (and shared machinery) over training time,
    appended to RUN_DIR/analysis.zarr.

    RUN_DIR is a probekit run; or any series of Hugging Face checkpoints (a folder of
    checkpoint-N/, step_N/, global_stepN/ folders, or a local hub cache with --model and
    --revisions) when --parallel gives the text to compare."""
    from probekit.analysis import align as run_align
    from probekit.options import AnalysisOptions

    run_dir = _series_dir(run_dir, model)

    opts = AnalysisOptions(
        pair=tuple(pair.split(",")) if pair else None,
        n_pairs=n_pairs,
        seq_len=seq_len,
        batch_size=batch_size,
        n_grad_pairs=grad_pairs,
        ci=ci,
        null_permutations=null_permutations,
        null_sample=null_sample,
        knn_k=knn_k,
        device=device,
        dtype=dtype,
        parallel_files=(clone_text,) if clone_text else _parallel(parallel_files),
        tokenizer=tokenizer,
        hub_model=model,
        revisions=_revisions(revisions),
        clone_offset=clone_offset,
        test_files=_tests(tests),
        lens_tokens=lens_tokens,
        **_features_kwargs(feature_flags),
    )
    cube = run_align(
        run_dir,
        metrics=metrics,
        steps=_steps(steps, revisions),
        recompute=recompute,
        options=opts,
        workers=workers,
        scheduler=scheduler,
        progress=not quiet,
    )
    _print_final(cube, ["hidden_cos", "cka", "linmap_r2", "neuron_overlap"])
    click.echo(f"cube: {Path(run_dir) / 'analysis.zarr'}")


def _parallel(files: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return tuple(files) if files else None


def _print_final(cube, names: list[str]) -> None:
    last = cube.isel(step=-1)
    for name in names:
        if name in cube and "layer" in cube[name].dims and cube[name].ndim == 2:
            da = last[name].dropna("layer")  # neurons exist for blocks only, not layer 0
            vals = " ".join(
                f"{int(la)}:{v:.3f}" for la, v in zip(da["layer"].values, da.values, strict=True)
            )
            click.echo(f"{name:>14} @ step {int(last['step'])}, per layer {vals}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--steps",
    default=None,
    help="Only these checkpoint steps, comma-separated, or a sample: every:N, log:K, "
    "range:A:B[:S] (as --revisions).",
)
@click.option("--stride", type=int, default=None, help="Window stride (default: context/4).")
@click.option(
    "--tail",
    type=int,
    default=None,
    help="Scored tokens at the end of each window (default: stride).",
)
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Test tokens per language (default 65,536; 0 scores the whole split).",
)
@click.option("--recompute", is_flag=True, help="Recompute checkpoints already stored.")
@_cluster_options
@click.option(
    "--test",
    "tests",
    multiple=True,
    metavar="LANG=FILE",
    help="Any HF checkpoint series: a language's held-out text (repeatable), e.g. "
    "--test en=en.txt --test fr=fr.txt.",
)
@_foreign_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@_dtype_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_friendly
def eval_cmd(
    run_dir,
    steps,
    stride,
    tail,
    max_tokens,
    recompute,
    workers,
    scheduler,
    tests,
    tokenizer,
    model,
    revisions,
    device,
    dtype,
    quiet,
) -> None:
    """Test perplexity per language for every checkpoint (sliding window), stored as `ppl`.

    RUN_DIR is a probekit run (its held-out test split), or any series of Hugging Face
    checkpoints (as for align) with --test LANG=FILE per language."""
    from probekit.evaluation import evaluate
    from probekit.options import AnalysisOptions

    run_dir = _series_dir(run_dir, model)
    options = AnalysisOptions(
        stride=stride,
        tail=tail,
        max_tokens=max_tokens,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        hub_model=model,
        revisions=_revisions(revisions),
        test_files=_tests(tests),
    )
    cube = evaluate(
        run_dir,
        steps=_steps(steps, revisions),
        recompute=recompute,
        options=options,
        workers=workers,
        scheduler=scheduler,
        progress=not quiet,
    )
    last = cube.isel(step=-1)
    for lang in cube["language"].values:
        ppl, ppl_char = (float(last[v].sel(language=lang)) for v in ("ppl", "ppl_char"))
        click.echo(f"{lang}: ppl {ppl:.3f} (per char {ppl_char:.3f}) at step {int(last['step'])}")


@cli.command()
@click.argument("series", type=click.Path(path_type=Path))
@click.option("--model", default=None, metavar="ORG/NAME", help="A hub cache: the cached model.")
@click.option(
    "--revisions",
    default=None,
    metavar="REV,REV",
    help="A hub cache: only these revisions, or a sample (every:N, log:K, range:A:B[:S]).",
)
@click.option("--steps", default=None, help="Only these steps, or a sample (as --revisions).")
@click.option(
    "--full", is_flag=True, help="Hash every byte of the weights (default: a fixed sample)."
)
@_friendly
def check(series, model, revisions, steps, full) -> None:
    """Flag faulty revisions of a series, one line each: weights equal to another revision's,
    steps out of order, missing or unreadable revisions. Exit status 0: clean; 1: problems
    found; 2: bad input. `align` runs the same check first, as a one-line warning."""
    from probekit.series_check import check_series

    problems = check_series(
        series,
        model=model,
        revisions=_revisions(revisions),
        steps=_steps(steps, revisions),
        full=full,
    )
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {series}", err=True)
        sys.exit(1)
    click.echo(f"{series}: no problems found")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--reference",
    "references",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Monolingual reference run (repeatable; several budget fractions per language).",
)
@click.option(
    "--control",
    "controls",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Update-matched monolingual control run(s) (repeatable).",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "fit", "interp"]),
    default="auto",
    show_default=True,
    help="Scaling reference: power-law fit, log-log interpolation, or auto.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the table as CSV here.",
)
@_friendly
def teff(run_dirs, references, controls, method, csv_path) -> None:
    """Token efficiency (MLPE, MLTE, TEff) per language, like the paper's Table 1."""
    from probekit.evaluation import teff_table

    table = teff_table(list(run_dirs), list(references), controls=list(controls), method=method)
    click.echo(table.to_string(index=False))
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"table written to {csv_path}")


@cli.command()
@click.argument("grid", type=click.Path(path_type=Path))
@click.option(
    "--out", "out", required=True, type=click.Path(path_type=Path), help="Folder for the runs."
)
@click.option(
    "--launch-list",
    type=click.Path(path_type=Path),
    default=None,
    help="Write one `probekit train` command per run to this file instead of running them.",
)
@click.option(
    "--analyse/--no-analyse",
    default=True,
    show_default=True,
    help="Run align and eval after training.",
)
@click.option("--device", default=None, help="Training device.")
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="A dask.distributed scheduler (e.g. tcp://host:8786; default "
    "$PROBEKIT_DASK_SCHEDULER): each run's training, then its analysis, is one task there; "
    "the sweep waits. The workers must see --out at the same path (a shared filesystem).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="Train and analyse the runs on this many one-thread local dask workers at once.",
)
@click.option("--quiet", is_flag=True)
@click.option("--verbose", is_flag=True, help="Also print the dask scheduler's address.")
@_friendly
def sweep(grid, out, launch_list, analyse, device, scheduler, workers, quiet, verbose) -> None:
    """Expand a grid (p, schedules, clones, vocab mode, seeds, budgets) into runs and
    their monolingual references; train the ones not finished, one after another (or on
    local workers with --workers, or on a dask cluster with --scheduler)."""
    from probekit.sweep import run_sweep

    summary = run_sweep(
        grid,
        out,
        launch_list=launch_list,
        analyse=analyse,
        device=device,
        progress=not quiet,
        scheduler=scheduler,
        workers=workers,
        verbose=verbose,
    )
    click.echo(summary)


@cli.command()
@click.argument(
    "run_dirs",
    nargs=-1,
    required=True,
    metavar="RUN_DIR... | SWEEP_DIR",
    type=click.Path(path_type=Path),
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for index.html, report.json and the PNGs.",
)
@click.option("--title", default="probekit report", show_default=True)
@click.option(
    "--sweep-table",
    type=click.Path(path_type=Path),
    default=None,
    help="teff.csv from `probekit sweep` or `probekit teff --csv`: TEff controls and transfer "
    "in the findings and the TEff-vs-p chart (a sweep folder's own teff.csv is read without it).",
)
@_friendly
def report(run_dirs, out, title, sweep_table) -> None:
    """Self-contained HTML report from run folders (findings first, sections by question, a
    PNG per chart), or from ONE sweep folder (`probekit sweep --out DIR`: run folders with
    config.toml and a teff.csv) as one page for the grid."""
    from probekit.report import make_report

    path = make_report(list(run_dirs), out, title=title, sweep_table=sweep_table)
    click.echo(f"report: {path}")


@cli.command()
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("demo_runs"),
    show_default=True,
    help="Folder for the demo's runs and report.",
)
@click.option(
    "--full",
    is_flag=True,
    help="The CPU grid that shows the token-efficiency effect (~75 min on 2 cores).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="One-thread local workers that train and analyse the runs at once "
    "[default: the CPUs this process may use, at most one per run].",
)
@_friendly
def demo(out, full, workers) -> None:
    """Train cloned 50/50 and 90/10 runs plus monolingual references, analyse them,
    and write the report. Finished work is reused."""
    from probekit.demos import run_demo

    run_demo(out, full=full, workers=workers)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    warnings.showwarning = _one_line_warning  # users see the message, not our source lines
    cli(prog_name="probekit")


if __name__ == "__main__":
    main()

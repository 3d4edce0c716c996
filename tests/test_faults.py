"""Faults in data a long analysis meets: a diverged (NaN) checkpoint in the middle of a series,
and language names spelled as the config spells them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from probekit import store
from probekit.analysis import align
from probekit.checkpoints import list_checkpoints
from probekit.errors import MetricError
from probekit.options import AnalysisOptions
from probekit.series import Series


def _poison(run: Path, step: int) -> None:
    """Write NaN into one weight of a checkpoint, as a diverged run leaves it."""
    info = next(c for c in list_checkpoints(run) if c.step == step)
    file = Path(info.path) / "model.safetensors"
    tensors = load_file(str(file))
    name = next(k for k in tensors if tensors[k].ndim == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("workers", [0, 2])
def test_nan_checkpoint_in_the_middle_is_skipped(tiny_run: Path, tmp_path: Path, workers, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("analysis.zarr"))
    steps = [c.step for c in list_checkpoints(run)]
    bad = steps[len(steps) // 2]
    _poison(run, bad)
    cube = align(run, metrics="similarity", options=AnalysisOptions(n_pairs=8), workers=workers)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "non-finite" in ln]
    assert len(lines) == 1 and f"step {bad} " in lines[0] and "skipped" in lines[0]
    assert sorted(int(s) for s in cube["step"].values) == [s for s in steps if s != bad]
    assert np.isfinite(cube["cka"].values).all()
    # a rerun skips what is stored and reports the bad checkpoint again, storing nothing
    before = store.read_family(run, "similarity")
    align(run, metrics="similarity", options=AnalysisOptions(n_pairs=8), progress=False)
    assert store.read_family(run, "similarity").identical(before)


class _ThreeLanguages(Series):
    """A series of three languages named as a pair run names them (EN, FR, ES)."""

    def __init__(self, run_dir: Path, pair: tuple[str, str]):
        self.run_dir, self.options = run_dir, AnalysisOptions(pair=pair)

    @property
    def languages(self) -> list[str]:
        return ["EN", "FR", "ES"]


def test_pair_in_the_config_spelling(tmp_path: Path):
    assert _ThreeLanguages(tmp_path, ("es", "fr")).pair == ("ES", "FR")
    assert _ThreeLanguages(tmp_path, ("EN", "es")).pair == ("EN", "ES")
    with pytest.raises(MetricError, match="unknown language 'de'"):
        _ = _ThreeLanguages(tmp_path, ("es", "de")).pair
    with pytest.raises(MetricError, match="two different languages"):
        _ = _ThreeLanguages(tmp_path, ("es", "ES")).pair


GRID = """name = "g"
base = "base.toml"
{top}
[grid]
"data.p" = [0.5]
{grid}
[[runs]]
name = "extra"
set = {{ "data.p" = 0.3 }}
{runs}
[references]
fractions = [1.0]
{references}
[analysis]
n_pairs = 8
{analysis}
"""


@pytest.mark.parametrize(
    "section, line, named",
    [
        ("top", 'bsae = "x.toml"', "bsae: unknown key (did you mean 'base'?"),
        ("grid", '"data.pp" = [0.1]', "data.pp"),
        ("grid", '"modle.preset" = ["nano"]', "modle"),
        ("runs", "sett = 1", "runs[0].sett: unknown key (did you mean 'set'?"),
        ("references", "control = true", "references.control: unknown key (did you mean"),
        ("analysis", "n_pair = 4", "analysis.n_pair: unknown key (did you mean 'n_pairs'?"),
    ],
)
def test_unknown_grid_key_is_one_line_before_anything_is_written(
    tmp_path: Path, section: str, line: str, named: str
):
    from click.testing import CliRunner
    from conftest import tiny_cfg

    from probekit.cli.main import cli
    from probekit.config import dump_config

    (tmp_path / "base.toml").write_text(dump_config(tiny_cfg()))
    parts = {k: "" for k in ("top", "grid", "runs", "references", "analysis")} | {section: line}
    (tmp_path / "grid.toml").write_text(GRID.format(**parts))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["sweep", str(tmp_path / "grid.toml"), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and named in res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize(
    "section, key, named",
    [
        ("", "sead", "sead: unknown config section"),
        ("data", "pp", "data.pp: unknown field (did you mean 'p'?"),
        ("tokenizer", "vocab_sise", "tokenizer.vocab_sise: unknown field (did you mean"),
        ("model", "n_layers", "model.n_layers: unknown field (did you mean 'n_layer'?"),
        ("train", "step", "train.step: unknown field (did you mean 'steps'?"),
        ("checkpoints", "evry", "checkpoints.evry: unknown field (did you mean 'every'?"),
        ("eval", "intervall", "eval.intervall: unknown field (did you mean 'interval'?"),
    ],
)
def test_unknown_run_config_key_is_one_line_before_training(
    tmp_path: Path, section: str, key: str, named: str
):
    from click.testing import CliRunner
    from conftest import tiny_cfg

    from probekit.cli.main import cli
    from probekit.config import dump_config

    raw = tiny_cfg()
    (raw[section] if section else raw)[key] = 1
    (tmp_path / "run.toml").write_text(dump_config(raw))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "run.toml"), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and named in res.output
    assert "Traceback" not in res.output and not out.exists()


FAMILY_GROUPS = ["similarity", "neurons", "gradients", "embeddings", "probes", "perplexity"]


@pytest.fixture(scope="module")
def analysed(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run with every align family and perplexity stored (two checkpoints)."""
    from probekit.evaluation import evaluate

    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("analysis.zarr"))
    opts = AnalysisOptions(n_pairs=8, n_grad_pairs=2, max_tokens=256)
    align(run, steps=[20, 40], options=opts, progress=False)
    evaluate(run, steps=[20, 40], options=opts, progress=False)
    return run


def _group_bytes(run: Path, family: str) -> dict[str, bytes]:
    root = store.store_path(run) / family
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("family", FAMILY_GROUPS)
def test_truncated_chunk_names_the_family_and_recompute_rebuilds_it(
    analysed: Path, tmp_path: Path, family: str
):
    from click.testing import CliRunner

    from probekit.cli.main import cli

    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    others = {f: _group_bytes(run, f) for f in store.families(run) if f != family}
    assert family in store.families(run) and others
    chunks = [p for p in (store.store_path(run) / family).rglob("c/*") if p.is_file()]
    chunk = max(chunks, key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])

    with pytest.raises(store.DamagedFamily, match=f"stored {family} results are damaged"):
        store.open_cube(run)
    res = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and family in res.output
    cmd = "eval" if family == "perplexity" else "align"
    assert f"probekit {cmd} {run}" in res.output and "--recompute" in res.output
    # a recompute of some steps only cannot rebuild it: the same one line, nothing changed
    args = [cmd, str(run), "--steps", "40", "--recompute", "--quiet"]
    if cmd == "align":
        args += ["--metrics", family, "--pairs", "8", "--grad-pairs", "2"]
    else:
        args += ["--max-tokens", "256"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    # the whole series recomputed rebuilds it, the other families untouched
    del args[2:4]  # no --steps: every checkpoint
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    every = [c.step for c in list_checkpoints(run)]
    assert sorted(int(s) for s in store.read_family(run, family)["step"].values) == every
    assert {f: _group_bytes(run, f) for f in others} == others


def test_clone_offset_reads_one_text(tmp_path: Path):
    from test_architectures import FAST, cli_run, save_series, tokenizer

    v = len(tokenizer())
    series = save_series(tmp_path / "clone", "gpt2", vocab_size=2 * v, steps=(3,))
    args = ["--clone-offset", str(v), "--metrics", "similarity", *FAST]
    res = cli_run("align", series, "--text", "bible:en", *args)
    assert res.exit_code == 0, res.output
    assert np.isfinite(store.open_cube(series)["hidden_cos"]).all()
    res = cli_run("align", series, "--parallel", "bible:en", "bible:fr", *args)
    assert res.exit_code == 2 and "--text FILE" in res.output
    assert len(res.output.strip().splitlines()) == 1

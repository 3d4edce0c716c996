"""The analysis engine: one family protocol, one registry, one driver, options checked once.

The example family below is all it takes to add a metric: it appears in the cube, the CLI
help and the report without any other module being edited.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import probekit
from probekit import metrics, store
from probekit.cli.main import cli
from probekit.errors import MetricError
from probekit.metrics import CheckpointContext, Family, Needs, PairBatch, Variable
from probekit.options import AnalysisOptions, OptionError

ROOT = Path(__file__).resolve().parents[1]
OPTS = AnalysisOptions(n_pairs=12, seq_len=32, batch_size=6, n_grad_pairs=4)


class _ResidNormRun:
    def __init__(self, ctx: CheckpointContext):
        self.langs = ctx.series.pair
        self.sums = np.zeros((2, ctx.view.n_layers + 1))
        self.count = np.zeros(2)

    def update(self, batch: PairBatch) -> None:
        for i, act in enumerate((batch.l1, batch.l2)):
            norms = act.resid.norm(dim=-1)[:, act.mask]  # [L + 1, real tokens]
            self.sums[i] += norms.sum(1).double().numpy()
            self.count[i] += norms.shape[1]

    def result(self) -> xr.Dataset:
        mean = (self.sums / self.count[:, None]).T
        ds = xr.Dataset(
            {"resid_norm": (("layer", "language"), mean)},
            coords={"layer": np.arange(mean.shape[0]), "language": list(self.langs)},
        )
        ds["resid_norm"].attrs["definition"] = "mean L2 norm of the residual stream per token"
        return ds


class ResidNorm(Family):
    """Mean residual-stream norm per layer and language (the example of a new family)."""

    name = "resid_norm_family"
    variables = (Variable("resid_norm", "residual-stream norm"),)
    needs = Needs(activations=frozenset({"resid"}))

    def start(self, ctx: CheckpointContext) -> _ResidNormRun:
        return _ResidNormRun(ctx)


@pytest.fixture
def resid_norm():
    family = metrics.register(ResidNorm())
    yield family
    del metrics.FAMILIES[family.name]


@pytest.fixture(scope="module")
def run(tiny_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    return out


def test_every_registered_family_has_the_protocol():
    for fam in metrics.FAMILIES.values():
        assert fam.name.isidentifier() and fam.variables, fam
        assert isinstance(fam.needs, Needs)
        assert fam.command in ("align", "eval", "teff", "causal")
    names = [v.name for f in metrics.FAMILIES.values() for v in f.variables]
    assert "hidden_cos" in names and "ppl" in names and "grad_cos" in names
    assert metrics.family_of("hidden_cos_baseline").name == "similarity"
    assert metrics.family_of("cka_lo").name == "similarity"
    assert [f.name for f in metrics.resolve("all", "eval")] == ["perplexity"]
    with pytest.raises(MetricError, match="unknown metric 'colour'"):
        metrics.resolve("colour", "align")


def test_a_new_family_reaches_cube_cli_help_and_report(run: Path, resid_norm, tmp_path: Path):
    final = probekit.list_checkpoints(run)[-1].step
    cube = probekit.align(run, metrics="resid_norm", steps=[final], options=OPTS, progress=False)
    da = cube["resid_norm"].sel(step=final)
    assert da.dims == ("layer", "language") and np.all(np.isfinite(da.values))
    assert np.all(da.values > 0) and list(da["layer"].values) == [0, 1, 2]
    assert "resid_norm_family" in store.families(run)
    help_text = CliRunner().invoke(cli, ["align", "--help"], terminal_width=400).output
    assert "resid_norm_family (resid_norm)" in " ".join(help_text.split())
    page = probekit.make_report([run], tmp_path / "report")
    assert "resid_norm" in page.read_text()


def test_the_example_family_is_computed_in_the_shared_forward(run: Path, resid_norm, monkeypatch):
    """Similarity and the new family together: one forward per language and batch, not one
    per family; the different-text baseline reuses the L2 forwards (no third one)."""
    import probekit.engine as engine

    calls = []
    real = engine._activation_runner

    def counting(*a, **k):
        forward = real(*a, **k)
        return lambda seqs: calls.append(1) or forward(seqs)

    monkeypatch.setattr(engine, "_activation_runner", counting)
    final = probekit.list_checkpoints(run)[-1].step
    probekit.align(
        run,
        metrics="similarity,resid_norm",
        steps=[final],
        recompute=True,
        options=OPTS,
        progress=False,
    )
    batches = -(-OPTS.n_pairs // OPTS.batch_size)
    assert len(calls) == 2 * batches  # L1, L2; the baseline reuses L2 of pair i + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["align", "{run}", "--pairs", "-5"], "--pairs: expected an integer >= 4, got -5"),
        (["align", "{run}", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
        (["align", "{run}", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["align", "{run}", "--ci", "1.5"], "--ci: expected a level in (0, 1)"),
        (["align", "{run}", "--seq-len", "1"], "--seq-len: expected an integer >= 2"),
        (["eval", "{run}", "--max-tokens", "-1"], "--max-tokens: expected an integer >= 0"),
        (["eval", "{run}", "--stride", "0"], "--stride: expected an integer >= 1"),
        (["eval", "{run}", "--device", "gpu"], "--device: expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_options_are_one_line_errors_and_write_nothing(run: Path, tmp_path, args, message):
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("analysis.zarr"))
    res = CliRunner().invoke(cli, [a.format(run=fresh) for a in args])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not (fresh / "analysis.zarr").exists()


def test_too_long_seq_len_is_clamped_with_a_note(run: Path):
    res = CliRunner().invoke(
        cli,
        ["align", str(run), "--metrics", "hidden_cos", "--seq-len", "100000", "--pairs", "8"]
        + ["--steps", "0", "--quiet", "--recompute"],
    )
    assert res.exit_code == 0, res.output
    assert "--seq-len 100000 exceeds the model's context; using 64" in res.output


def test_options_validate_in_python_too():
    with pytest.raises(OptionError, match="--pairs"):
        AnalysisOptions(n_pairs=2).validated()
    with pytest.raises(OptionError, match="neuron_top_frac"):
        AnalysisOptions(neuron_top_frac=0).validated()
    assert AnalysisOptions().validated() == AnalysisOptions()


def test_teff_never_evaluates_behind_the_users_back(run: Path, tmp_path: Path):
    from conftest import tiny_cfg

    ref = probekit.train(tiny_cfg(mode="mono", name="ref"), tmp_path / "ref", progress=False)
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("analysis.zarr"))
    with pytest.raises(MetricError, match=r"no perplexity stored; run `probekit eval .*fresh`"):
        probekit.token_efficiency(fresh, [ref])
    probekit.evaluate(fresh, max_tokens=512, progress=False)
    final = probekit.list_checkpoints(ref)[-1].step
    with pytest.raises(MetricError, match=rf"run `probekit eval .*ref --steps {final}`"):
        probekit.token_efficiency(fresh, [ref])
    assert "perplexity" not in store.families(ref)


def test_eval_and_align_share_the_driver(run: Path, monkeypatch):
    import probekit.engine as engine

    seen = []
    real = engine.compute_checkpoint
    monkeypatch.setattr(
        engine, "compute_checkpoint", lambda p, s, n, o: seen.append(n) or real(p, s, n, o)
    )
    probekit.evaluate(run, steps=[0], max_tokens=512, progress=False)
    assert seen == [["perplexity"]]
    ppl = store.read_family(run, "perplexity")
    assert ppl["ppl"].sel(step=0).shape == (2,) and np.isfinite(ppl["ppl"]).all()


def test_compare_cubes_script(run: Path, tmp_path: Path):
    """scripts/compare_cubes.py: equal copies pass, a changed number is named and fails."""
    final = probekit.list_checkpoints(run)[-1].step
    a, b = tmp_path / "a", tmp_path / "b"
    for copy in (a, b):
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("analysis.zarr"))
        probekit.align(copy, metrics="similarity", steps=[final], options=OPTS, progress=False)
    script = [sys.executable, str(ROOT / "scripts" / "compare_cubes.py"), str(a), str(b)]
    same = subprocess.run(script, capture_output=True, text=True)
    assert same.returncode == 0 and "similarity: equal" in same.stdout, same.stdout + same.stderr
    ds = store.read_family(b, "similarity")
    ds["cka"][...] = ds["cka"].values + 1e-4
    store.write_steps(b, "similarity", ds)
    diff = subprocess.run(script, capture_output=True, text=True)
    assert diff.returncode == 1 and "cka: max |diff| 0.0001" in diff.stdout, diff.stdout

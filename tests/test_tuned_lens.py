"""The tuned lens (issue 27): planted ground truths the translators must recover, the warm start,
determinism, bad input, and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probekit
from probekit import store
from probekit.analysis import align
from probekit.artifacts import artifact_path, load_artifact, save_artifact, stored_artifact_steps
from probekit.checkpoints import list_checkpoints, load_checkpoint
from probekit.cli.main import cli
from probekit.errors import MetricError, RunDirError
from probekit.metrics import FAMILIES, families_for, resolve
from probekit.metrics.lens import next_token_targets
from probekit.metrics.tuned_lens import LensBudget, Translators, heldout_kl, train_translators
from probekit.options import AnalysisOptions, OptionError
from probekit.series import open_series

OPTS = AnalysisOptions(n_pairs=8, seq_len=32, batch_size=8, lens_tokens=1024)
FAMILY = "tuned_lens"


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("analysis.zarr", "artifacts"))
    return dst


def test_registered_as_causal():
    assert FAMILY not in {f.name for f in families_for("align")}
    assert [f.name for f in resolve("lens,tuned_lens", "align")] == ["lens", FAMILY]
    assert [f.name for f in resolve("tuned_latent_layer", "align")] == [FAMILY]
    assert all(v.definition for v in FAMILIES[FAMILY].variables)


# --- the trainer on planted ground truths -------------------------------------------------


def _planted(n: int = 3000, d: int = 12, v: int = 40, seed: int = 0):
    """States of a 3-layer 'model' whose final state h_L is Gaussian and whose earlier layers
    hold the same information in a rotated basis: h_l = R_l h_L (R_l orthogonal), decoded by a
    fixed linear unembedding."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 1.5
    rots = [torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(2)]
    states = torch.stack([h @ r.T for r in rots] + [h])  # [3, n, d]
    unembed = torch.randn(v, d, generator=g)
    return states, (lambda x: x @ unembed.T)


def test_rotated_basis_fools_the_logit_lens_not_the_tuned_lens():
    states, decode = _planted()
    train, val = states[:, :2400], states[:, 2400:]
    budget = LensBudget(max_steps=600, lr=3e-2, tol=0.01, patience=3, batch=512)
    tr, record = train_translators(train, val, decode, budget)
    logit = heldout_kl(Translators.identity(2, states.shape[2]), val, decode)
    tuned = heldout_kl(tr, val, decode)
    assert logit[2] == 0 and tuned[2] == 0  # the last layer: the model's own reading
    assert np.all(logit[:2] > 1.0)  # the rotation makes the logit lens read garbage
    assert np.all(tuned[:2] < 0.05 * logit[:2])  # the translators undo it
    assert record["final_kl"] < 0.05 * record["initial_kl"]
    # the recovered translator is (close to) the inverse rotation on the states' span
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3000, 12, generator=g)
    rot0 = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    err = (tr.apply(0, h @ rot0.T) - h).norm() / h.norm()
    assert err < 0.2


def test_training_is_deterministic_given_the_seed():
    states, decode = _planted(n=800)
    budget = LensBudget(max_steps=40, lr=3e-2, batch=128)
    a, ra = train_translators(states[:, :600], states[:, 600:], decode, budget)
    b, rb = train_translators(states[:, :600], states[:, 600:], decode, budget)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and ra == rb
    c, _ = train_translators(
        states[:, :600], states[:, 600:], decode, LensBudget(max_steps=40, lr=3e-2, seed=1)
    )
    assert not torch.equal(a.weight, c.weight)


def test_identity_states_stay_identity():
    """A model whose blocks are identity maps: every layer holds the final state, the
    initial KL is already 0 and the stopping rule stops at once."""
    states, decode = _planted(n=600)
    same = states[-1:].expand(3, -1, -1).clone()
    tr, record = train_translators(same[:, :500], same[:, 500:], decode, LensBudget())
    assert record["initial_kl"] < 1e-9 and record["steps"] <= 2 * EVAL_STEPS
    eye = Translators.identity(2, same.shape[2])
    torch.testing.assert_close(tr.weight, eye.weight, atol=1e-5, rtol=0)


EVAL_STEPS = LensBudget().eval_every


# --- a trained tiny series -------------------------------------------------------------------


def _own_ce(run: Path, step: int, options: AnalysisOptions) -> np.ndarray:
    """The model's own next-token CE on the parallel pairs, per language (plain HF forward)."""
    series = open_series(run, options.validated())
    model = load_checkpoint(next(c for c in list_checkpoints(run) if c.step == step))
    out = []
    for seqs in (series.parallel.ids1, series.parallel.ids2):
        ids, valid = next_token_targets(list(seqs))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
        nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
        out.append(float(nll[valid].mean()))
    return np.asarray(out)


@pytest.fixture(scope="module")
def series_run(tiny_run: Path, tmp_path_factory) -> Path:
    """Steps 20 and 40 of the tiny run through both lenses (40 warm-started from 20)."""
    run = _copy(tiny_run, tmp_path_factory.mktemp("tuned") / "run")
    align(run, metrics="lens,tuned_lens", steps=[20, 40], options=OPTS, progress=False)
    return run


def test_last_layer_is_identity_and_reads_the_model(series_run: Path):
    cube = probekit.open_cube(series_run).sel(step=40)
    n_layers = int(cube["layer"].max())
    tensors, record = load_artifact(series_run, FAMILY, 40)
    d = tensors["weight"].shape[-1]
    assert torch.equal(tensors["weight"][-1], torch.eye(d))
    assert torch.equal(tensors["bias"][-1], torch.zeros(d))
    assert tensors["weight"].shape == (n_layers + 1, d, d)
    own = _own_ce(series_run, 40, OPTS)
    ce = cube["tuned_ce"].sel(layer=n_layers)
    np.testing.assert_allclose(ce.sel(lens="tuned"), own, atol=1e-4)
    np.testing.assert_allclose(ce.sel(lens="logit"), own, atol=1e-4)
    np.testing.assert_allclose(cube["lens_ce"].sel(layer=n_layers), own, atol=1e-4)
    # the logit lens side equals the lens family at every layer
    np.testing.assert_allclose(cube["tuned_ce"].sel(lens="logit"), cube["lens_ce"], atol=1e-6)
    np.testing.assert_allclose(cube["tuned_mass"].sel(lens="logit"), cube["lens_mass"], atol=1e-6)
    np.testing.assert_allclose(cube["tuned_kl"].sel(layer=n_layers), 0.0, atol=1e-6)
    np.testing.assert_allclose(cube["tuned_disagreement"].sel(layer=n_layers), 0.0, atol=1e-6)
    # where the logit lens is far from the final distribution the tuned lens is closer
    kl = cube["tuned_kl"].sel(layer=0)
    assert np.all(kl.sel(lens="tuned").values < kl.sel(lens="logit").values)
    np.testing.assert_allclose(cube["tuned_mass"].sum("vocab_language"), 1.0, atol=1e-6)
    lat = cube["tuned_latent_layer"].values
    assert np.all(np.isnan(lat) | ((lat >= 0) & (lat <= n_layers)))
    assert cube["tuned_dominant_mass"].attrs["rare_language"] == "EN2"
    np.testing.assert_allclose(
        cube["tuned_dominant_mass"],
        cube["tuned_mass"].sel(language="EN2", vocab_language="EN1"),
    )
    assert record["warm_start_step"] == 20 and int(cube["tuned_warm_start"]) == 20
    assert record["tokens_per_language"] == 1024 and record["languages"] == ["EN1", "EN2"]
    assert int(cube["tuned_fit_steps"]) == record["steps"]


def test_warm_start_stops_sooner_than_cold_and_is_deterministic(series_run: Path, tmp_path):
    _, warm = load_artifact(series_run, FAMILY, 40)
    cold_run = _copy(series_run, tmp_path / "cold")
    align(cold_run, metrics=FAMILY, steps=[40], options=OPTS, progress=False)
    cold_t, cold = load_artifact(cold_run, FAMILY, 40)
    assert cold["warm_start_step"] is None and warm["warm_start_step"] == 20
    assert warm["initial_kl"] < cold["initial_kl"]
    assert warm["steps"] < cold["steps"], (warm["steps"], cold["steps"])
    assert warm["final_kl"] <= cold["final_kl"] * 1.1
    # the same checkpoint, the same seed: the same translators, bit for bit
    align(cold_run, metrics=FAMILY, steps=[40], options=OPTS, progress=False, recompute=True)
    again_t, again = load_artifact(cold_run, FAMILY, 40)
    assert torch.equal(again_t["weight"], cold_t["weight"]) and again == cold


# --- bad input: one line, nothing stored ----------------------------------------------------


def test_zero_token_budget_is_one_line(tiny_run: Path, tmp_path):
    run = _copy(tiny_run, tmp_path / "r")
    with pytest.raises(OptionError, match="lens-tokens: expected an integer >= 1, got 0") as e:
        align(run, metrics=FAMILY, options=OPTS.updated(lens_tokens=0), progress=False)
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(cli, ["align", str(run), "--metrics", FAMILY, "--lens-tokens", "0"])
    assert res.exit_code != 0 and "--lens-tokens: expected an integer >= 1" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (run / "analysis.zarr").exists() and not (run / "artifacts").exists()


def test_stored_translator_of_the_wrong_shape_is_one_line(tiny_run: Path, tmp_path):
    run = _copy(tiny_run, tmp_path / "r")
    save_artifact(run, FAMILY, 20, {"weight": torch.ones(2, 5, 5), "bias": torch.ones(2, 5)}, {})
    with pytest.raises(RunDirError, match="do not fit the checkpoint") as e:
        align(run, metrics=FAMILY, steps=[40], options=OPTS, progress=False)
    assert "\n" not in str(e.value)
    assert stored_artifact_steps(run, FAMILY) == [20]
    assert not artifact_path(run, FAMILY, 40).exists()
    assert store.stored_steps(run, FAMILY) == []


def test_missing_heldout_text_is_one_line(tmp_path):
    from test_architectures import save_series

    series = save_series(tmp_path / "s", "gpt2", steps=(5,))
    opts = OPTS.updated(parallel_files=("bible:en", "bible:fr"))
    with pytest.raises(MetricError, match="held-out") as e:
        align(series, metrics=FAMILY, options=opts, progress=False)
    assert "\n" not in str(e.value)
    (tmp_path / "en.txt").write_text("In the beginning God created the heaven and the earth.\n" * 9)
    opts = opts.updated(test_files=(("en", str(tmp_path / "en.txt")),))
    with pytest.raises(MetricError, match="none for fr"):
        align(series, metrics=FAMILY, options=opts, progress=False)
    args = ["align", str(series), "--metrics", FAMILY, "--parallel", "bible:en", "bible:fr"]
    res = CliRunner().invoke(cli, args + ["--test", f"en={tmp_path / 'en.txt'}", "--quiet"])
    assert res.exit_code != 0 and "none for fr" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (series / "analysis.zarr").exists() and not (series / "artifacts").exists()


# --- any architecture: blocks that are identity maps -----------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identity_blocks_read_the_same_at_every_layer(arch: str, tmp_path):
    """External series (no vocabulary: CE, KL, accuracy and disagreement only) of a model
    whose blocks add nothing to the residual stream."""
    from test_architectures import tiny_model, tokenizer

    from probekit.data import corpus

    model = tiny_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "c_proj.bias", "o_proj.weight", "down_proj.weight")):
                p.zero_()
    series = tmp_path / arch
    model.save_pretrained(series / "checkpoint-3")
    tokenizer().save_pretrained(series / "checkpoint-3")
    verses = corpus.parallel_verses("web", "segond", split="test")[:80]
    for i, lang in enumerate(("en", "fr")):
        (tmp_path / f"{lang}.txt").write_text("\n".join(v[1 + i] for v in verses))
    opts = OPTS.updated(
        parallel_files=("bible:en", "bible:fr"),
        test_files=tuple((lang, str(tmp_path / f"{lang}.txt")) for lang in ("en", "fr")),
        lens_tokens=256,
    )
    cube = align(series, metrics=FAMILY, options=opts, progress=False).sel(step=3)
    np.testing.assert_allclose(cube["tuned_kl"], 0.0, atol=1e-6)
    ce = cube["tuned_ce"]
    np.testing.assert_allclose(ce, ce.isel(layer=-1).broadcast_like(ce), atol=1e-5)
    assert "tuned_mass" not in cube  # no vocabulary: the language readings are not defined
    tensors, record = load_artifact(series, FAMILY, 3)
    torch.testing.assert_close(
        tensors["weight"], torch.eye(32).expand_as(tensors["weight"]), atol=1e-5, rtol=0
    )
    assert record["steps"] <= 2 * EVAL_STEPS


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_align_tuned_lens(tiny_run: Path, tmp_path):
    run = _copy(tiny_run, tmp_path / "cli")
    args = ["align", str(run), "--metrics", "tuned_lens", "--steps", "1,4", "--quiet"]
    res = CliRunner().invoke(cli, args + ["--pairs", "8", "--seq-len", "32"])
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(run)
    assert list(cube["step"].values) == [1, 4]
    assert cube["tuned_ce"].dims == ("step", "lens", "layer", "language")
    assert list(cube["lens"].values) == ["logit", "tuned"]
    assert stored_artifact_steps(run, FAMILY) == [1, 4]
    assert load_artifact(run, FAMILY, 4)[1]["warm_start_step"] == 1
    assert load_artifact(run, FAMILY, 4)[1]["tokens_per_language"] == 4096  # the default


def test_report_draws_both_lenses(series_run: Path, tmp_path):
    import json

    res = CliRunner().invoke(cli, ["report", str(series_run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    charts = {c["name"]: c for c in rep["charts"]}
    assert charts["lens_layers_chart"]["n_rows"] > 0
    assert "latent_layer_chart" in charts or any(
        s["chart"] == "latent_layer_chart" for s in rep["skipped"]
    )

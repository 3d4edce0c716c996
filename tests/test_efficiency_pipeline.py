"""`eval`, `teff` and `sweep` end to end on nano runs: perplexity, TEff, controls, reruns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import tiny_cfg

from probekit import store
from probekit.checkpoints import list_checkpoints
from probekit.cli.main import cli
from probekit.config import dump_config
from probekit.errors import MetricError
from probekit.evaluation import evaluate, teff_table
from probekit.sweep import expand_grid, run_sweep

GRID = """
name = "g"
base = "base.toml"
[grid]
"data.p" = [0.5, 0.1]
[references]
fractions = [0.25, 0.5, 1.0]
controls = true
[analysis]
n_pairs = 12
seq_len = 32
eval_max_tokens = 4096
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    cfg = tiny_cfg(steps=40)
    cfg.pop("name")
    cfg["train"]["batch_size"] = 10  # 10 % of it is a whole sequence: exact control budgets
    (folder / "base.toml").write_text(dump_config(cfg))
    (folder / "grid.toml").write_text(GRID)
    return folder


@pytest.fixture(scope="module")
def swept(grid: Path) -> Path:
    out = grid / "runs"
    run_sweep(grid / "grid.toml", out, progress=False)
    return out


def test_eval_ppl_per_language_and_step(tiny_run: Path):
    cube = evaluate(tiny_run, max_tokens=4096, progress=False)
    ppl = cube["ppl"]
    assert ppl.dims == ("step", "language") and list(ppl["language"].values) == ["EN1", "EN2"]
    assert np.all(np.isfinite(ppl.values)) and np.all(ppl.values > 1)
    first, last = ppl.isel(step=0), ppl.isel(step=-1)
    assert np.all(last.values < first.values)  # training lowers test perplexity
    assert np.all(cube["ppl_char"].values < ppl.values)  # more characters than tokens
    steps = store.stored_steps(tiny_run, "perplexity")
    evaluate(tiny_run, max_tokens=4096, progress=False)  # a rerun computes nothing new
    assert store.stored_steps(tiny_run, "perplexity") == steps


def test_grid_expansion_and_update_matched_controls(grid: Path):
    planned = {r.name: r for r in expand_grid(grid / "grid.toml")}
    assert {"g_p0.5", "g_p0.1", "ctrl_g_p0.1", "ctrl_g_p0.5"} <= set(planned)
    refs = [r for r in planned.values() if r.kind == "reference"]
    assert len(refs) == 3
    run = planned["g_p0.1"].resolved.train
    ctrl = planned["ctrl_g_p0.1"].resolved
    # same optimiser steps, and the minority language's token count (10 % of the budget)
    assert ctrl.train.steps == run.steps
    assert ctrl.train.tokens == pytest.approx(0.1 * run.tokens)
    assert ctrl.data.mode == "mono"


def test_sweep_table_and_rerun_skips(swept: Path, grid: Path):
    table = pd.read_csv(swept / "teff.csv")
    assert set(table["language"]) == {"EN1", "EN2"}
    row = table[(table["run"] == "g_p0.1") & (table["language"] == "EN2")].iloc[0]
    assert row["tokens"] == pytest.approx(0.1 * 40 * 10 * 64, rel=0.3)  # counted, not assumed
    assert math.isfinite(row["teff"]) and row["teff"] > 0 and math.isfinite(row["teff_control"])
    ckpt = list_checkpoints(swept / "g_p0.1")[-1].path / "model.safetensors"
    mtime = ckpt.stat().st_mtime_ns
    run_sweep(grid / "grid.toml", swept, analyse=False, progress=False)
    assert ckpt.stat().st_mtime_ns == mtime  # finished runs are not retrained
    cube = store.open_cube(swept / "g_p0.1")
    assert cube["teff"].dims == ("step", "language")


def test_teff_cli_table_and_csv(swept: Path, tmp_path: Path):
    refs = sorted(str(p) for p in swept.glob("ref_*"))
    args = ["teff", str(swept / "g_p0.1"), "--csv", str(tmp_path / "t.csv")]
    for r in refs:
        args += ["--reference", r]
    res = CliRunner().invoke(cli, args + ["--control", str(swept / "ctrl_g_p0.1")])
    assert res.exit_code == 0, res.output
    assert "teff" in res.output and (tmp_path / "t.csv").is_file()


def test_teff_bad_references(swept: Path, tiny_run: Path):
    with pytest.raises(MetricError, match="not a monolingual run"):
        teff_table([swept / "g_p0.1"], [swept / "g_p0.5"])
    res = CliRunner().invoke(
        cli, ["teff", str(tiny_run), "--reference", str(swept / "ref_en_nano_1_T0.0256M_s0")]
    )
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


def test_teff_names_the_language_whose_references_rise(swept: Path, monkeypatch):
    """A reference curve that does not fall with tokens cannot be inverted: the one-line
    error names the language and the run, not just the numbers."""
    import probekit.evaluation as ev

    real = ev._final_ppl
    rising = {0.25: 50.0, 0.5: 60.0, 1.0: 20.0}  # the 0.5 reference worse than the 0.25 one

    def fake(facts, lang):
        if facts.mode == "mono":
            return rising[round(facts.budget / (40 * 10 * 64), 2)]
        return real(facts, lang)

    monkeypatch.setattr(ev, "_final_ppl", fake)
    refs = sorted(swept.glob("ref_*"))
    with pytest.raises(MetricError, match=r"EN\d? references of g_p0.1 \(3 budgets\): .*decrease"):
        teff_table([swept / "g_p0.1"], refs, method="interp")


def test_schedule_token_share_from_the_run(tmp_path: Path):
    from probekit.training import train

    cfg = tiny_cfg(steps=40, schedule="0.1_0.9")
    train(cfg, tmp_path / "sched", progress=False)
    final = list_checkpoints(tmp_path / "sched")[-1]
    share = final.tokens_per_language["EN2"] / final.tokens
    assert abs(share - 0.5) < 0.08  # mean of the schedule, counted from the stream


def test_references_of_the_runs_own_seed(monkeypatch):
    from types import SimpleNamespace

    import probekit.evaluation as ev

    def facts(seed: int, budget: float):
        return SimpleNamespace(seed=seed, budget=budget, languages=["EN"], path=f"r{seed}_{budget}")

    run = facts(1, 100.0)
    refs = [facts(s, b) for s in (0, 1) for b in (10.0, 50.0, 100.0)]
    ppl = {
        (s, b): (200.0 if s == 0 else 100.0) * (100.0 / b) ** 0.5
        for s in (0, 1)
        for b in (10, 50, 100)
    }
    monkeypatch.setattr(ev, "_references_for", lambda f, lang, r: r)
    monkeypatch.setattr(ev, "_final_ppl", lambda r, lang: ppl[(r.seed, r.budget)])
    _, info = ev.scaling_reference(run, "EN", refs, "interp")
    assert info["seeds"] == [1] and info["ppl"][-1] == pytest.approx(100.0)
    _, pooled = ev.scaling_reference(facts(7, 100.0), "EN", refs, "interp")
    assert pooled["seeds"] == [0, 1]
    assert pooled["ppl"][-1] == pytest.approx((200.0 * 100.0) ** 0.5)  # geometric mean

"""Report: synthetic cubes -> write_report -> files, report.json, self-contained HTML."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from probekit.errors import MetricError, ProbekitError
from probekit.report import (
    MissingMetric,
    grad_heatmap,
    layer_profile,
    similarity_heatmap,
    sweep_chart,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = [100, 200, 400]
LAYERS = [0, 1, 2, 3]
DIRS = ["L1->L2", "L2->L1"]
LANGS = ["EN1", "EN2"]
TENSORS = ["attn.c_attn.weight", "attn.c_proj.weight", "ln_1.bias", "mlp.c_fc.weight", "block"]


def make_cube(name: str, p: float, seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    s, lay = len(STEPS), len(LAYERS)

    def r(*shape: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
        return rng.uniform(lo, hi, size=shape)

    coords = {
        "step": STEPS,
        "tokens": ("step", [s_ * 4096.0 for s_ in STEPS]),
        "layer": LAYERS,
        "direction": DIRS,
        "language": LANGS,
        "tensor": TENSORS,
        "matrix": ["input", "output"],
        "pairing": ["clone", "all"],
        "freq_bin": [0.0, 10.0, 100.0, 1000.0],
        "neuron": np.arange(6),
    }
    sl = ("step", "layer")
    v = {}
    for m in ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2"):
        v[m] = (sl, r(s, lay, lo=-0.3))
        v[f"{m}_baseline"] = (sl, r(s, lay, hi=0.2))
        v[f"{m}_lo"] = (sl, v[m][1] - 0.05)
        v[f"{m}_hi"] = (sl, v[m][1] + 0.05)
    v["retrieval_acc"] = (("step", "layer", "direction"), r(s, lay, 2))
    v["grad_cos"] = (("step", "layer", "tensor"), r(s, lay, len(TENSORS), lo=-0.2))
    v["neuron_overlap"] = (sl, r(s, lay))
    v["neuron_overlap_chance"] = (sl, r(s, lay, hi=0.3))
    v["lang_specific_frac"] = (("step", "layer", "language"), r(s, lay, 2))
    v["neuron_act_prob"] = (("step", "layer", "language", "neuron"), r(s, lay, 2, 6))
    v["embed_cos"] = (("step", "matrix", "pairing"), r(s, 2, 2))
    v["embed_cos_by_freq"] = (("step", "matrix", "freq_bin"), r(s, 2, 4))
    v["embed_freq_count"] = (("step", "matrix", "freq_bin"), rng.integers(1, 500, (s, 2, 4)))
    for m in ("ppl", "ppl_char", "mlpe"):
        v[m] = (("step", "language"), r(s, 2, lo=20, hi=80))
    for m in ("teff", "mlte", "teff_control"):
        v[m] = (("step", "language"), r(s, 2, lo=0.5, hi=2.5))
    v["probe_transfer"] = (("step", "layer", "direction"), r(s, lay, 2))
    v["probe_in_language"] = (("step", "layer", "direction"), r(s, lay, 2))
    ds = xr.Dataset(v, coords=coords, attrs={"run_name": name, "p": p, "mode": "clone"})
    ds["teff"].attrs["method"] = "power-law"
    return ds


@pytest.fixture(scope="module")
def runs() -> dict[str, xr.Dataset]:
    return {"p50": make_cube("p50", 0.5, 0), "p10": make_cube("p10", 0.1, 1)}


@pytest.fixture(scope="module")
def report(tmp_path_factory, runs) -> Path:
    out = tmp_path_factory.mktemp("report")
    runs = dict(runs)
    runs["p30-nograd"] = make_cube("p30-nograd", 0.3, 2).drop_vars("grad_cos")
    sweep = pd.DataFrame(
        [
            {
                "run": f"r{p}-{sd}",
                "p": p,
                "language": lang,
                "ppl": 30 + 10 * p + sd,
                "teff": 1 + p,
                "seed": sd,
                "mode": "clone",
                "vocab": vocab,
            }
            for p in (0.05, 0.1, 0.5)
            for lang in LANGS
            for sd in (0, 1)
            for vocab in ("disjoint", "anchored")
        ]
    )
    index = write_report(runs, out, sweep_table=sweep, title="test report")
    assert index == out / "index.html"
    return out


EXPECTED = (
    [
        f"similarity_heatmap_{m}"
        for m in ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2")
    ]
    + [
        f"layer_profile_{m}"
        for m in ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2")
    ]
    + [
        "grad_heatmap_p50",
        "grad_heatmap_p10",
        "grad_mean_over_time",
        "neuron_overlap_chart",
        "lang_specific_chart",
        "ppl_chart",
        "teff_chart",
        "sweep_chart",
        "embed_cos_chart",
        "embed_freq_chart",
        "retrieval_chart",
        "probe_chart",
    ]
)


def test_every_chart_present_with_data(report: Path) -> None:
    rep = json.loads((report / "report.json").read_text())
    charts = {c["name"]: c for c in rep["charts"]}
    assert set(EXPECTED) <= set(charts), set(EXPECTED) - set(charts)
    for name, c in charts.items():
        assert c["n_rows"] > 0, name
        assert c["caption"] and c["title"], name
        png = report / c["png"]
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
    assert rep["skipped"] == []


def test_missing_grad_gives_note_not_crash(report: Path) -> None:
    rep = json.loads((report / "report.json").read_text())
    mean = next(c for c in rep["charts"] if c["name"] == "grad_mean_over_time")
    assert any("p30-nograd has no grad_cos" in n for n in mean["notes"])
    page = (report / "index.html").read_text()
    assert "skipped: run p30-nograd has no grad_cos" in page
    assert "grad_heatmap_p30-nograd" not in {c["name"] for c in rep["charts"]}


def test_html_self_contained(report: Path) -> None:
    page = (report / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert page.count('id="vega-bundle"') == 1  # one copy of the JS for all charts
    assert page.count('class="probekit-chart"') == len(EXPECTED)
    assert "summary" in page and "mean hidden_cos" in page


def test_check_script_static(report: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report.py"), str(report), "--no-browser"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_script_flags_remote_script(tmp_path: Path, report: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in report.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    page = (bad / "index.html").read_text()
    (bad / "index.html").write_text(
        page.replace("</head>", '<script src="https://cdn.example.org/x.js"></script></head>')
    )
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report.py"), str(bad), "--no-browser"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "cdn.example.org" in res.stdout


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_browser_renders_without_errors(report: Path) -> None:
    pytest.importorskip("websockets")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "check_report.py"),
            str(report),
            "--require-browser",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_bad_input(tmp_path: Path, runs) -> None:
    with pytest.raises(ProbekitError, match="align"):
        write_report({}, tmp_path / "r")
    empty = xr.Dataset(coords={"step": STEPS})
    with pytest.raises(ProbekitError, match="run e has no analysis cube"):
        write_report({"e": empty}, tmp_path / "r")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ProbekitError, match="cannot write report"):
        write_report(runs, blocker / "sub")


def test_chart_functions(runs) -> None:
    with pytest.raises(MissingMetric):
        similarity_heatmap({"a": runs["p50"].drop_vars("cka")}, "cka")
    with pytest.raises(MissingMetric):
        sweep_chart(pd.DataFrame())
    with pytest.raises(MetricError, match="no grad_cos at step 7"):
        grad_heatmap(runs["p50"], step=7)
    # A single Dataset works as well as a dict; NaN steps (outer-joined cube) are skipped.
    ds = runs["p10"].copy()
    ds["hidden_cos"] = ds["hidden_cos"].where(ds["step"] < 400)
    spec = layer_profile(ds).to_dict()
    assert "final checkpoint" in json.dumps(spec["title"])
    vals = spec["layer"][0]["data"]["values"]
    assert {v["step"] for v in vals} == {200}
    assert similarity_heatmap(runs, x="tokens").to_dict()["facet"]

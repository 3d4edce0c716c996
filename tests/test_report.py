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
    VARIABLES,
    MissingMetric,
    compute_findings,
    findings_table,
    grad_heatmap,
    layer_profile,
    make_report,
    similarity_heatmap,
    sweep_chart,
    write_report,
)
from probekit.report.html import shrink_png

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


SIM = ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2")
EXPECTED = (
    [f"similarity_heatmap_{m}" for m in SIM]
    + [f"layer_profile_{m}" for m in SIM]
    + [
        "grad_heatmap",
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
    assert any("run p30-nograd: it has no grad_cos" in n for n in mean["notes"])
    page = (report / "index.html").read_text()
    assert "not drawn for run p30-nograd: it has no grad_cos" in page
    assert "probekit align p30-nograd --metrics gradients" in page


def test_html_self_contained(report: Path) -> None:
    page = (report / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert page.count('id="vega-bundle"') == 1  # one copy of the JS for all charts
    assert page.count('id="chart-data"') == 1  # one copy of the chart data
    assert page.count('class="probekit-chart"') == len(EXPECTED)
    # Chart specs name their data sets instead of carrying them.
    for spec in re.findall(r'class="chart-spec"[^>]*>(.*?)</script>', page, re.S):
        assert '"values"' not in spec
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
    vals = spec["data"]["values"]
    assert {v["step"] for v in vals} == {200}
    assert similarity_heatmap(runs, x="tokens").to_dict()["facet"]


# ----------------------------------------------------------------- the page as a reader sees it


def test_page_reads_findings_first_and_by_question(report: Path) -> None:
    page = (report / "index.html").read_text()
    first_chart = page.index('class="probekit-chart"')
    assert page.index("What the runs show") < first_chart
    assert page.index('class="findings"') < first_chart
    for q in ("Does the rare language gain?", "Are the representations shared?",
              "Is the machinery shared?"):  # fmt: skip
        assert f">{q}</h2>" in page
    assert page.count("How to read this:") == 3
    # The lens / patching section exists only when a cube has such variables.
    assert "Which language does each layer think in" not in page
    # Section headings are human titles; the internal name is only a small label.
    assert "<h3>similarity_heatmap_hidden_cos" not in page
    assert "Linear-map R² per layer at the end of training" in page
    rep = json.loads((report / "report.json").read_text())
    assert {c["question"] for c in rep["charts"]} == {"gain", "representations", "machinery"}
    # The run selector: one check-box per run, every run chart declares the parameter.
    assert page.count('<input type="checkbox"') == 3
    specs = re.findall(r'class="chart-spec"[^>]*>(.*?)</script>', page, re.S)
    assert sum('"name":"shown"' in sp for sp in specs) >= len(EXPECTED) - 1  # all but sweep


def _cells(groups, rows) -> dict:
    t = findings_table(groups, rows)
    return {r["measure"]: r for r in t.to_dict("records")}


def test_findings_follow_the_numbers(runs) -> None:
    base = {k: ds.copy(deep=True) for k, ds in runs.items()}
    groups, rows = compute_findings(base)
    assert [g.runs for g in groups] == [["p10"], ["p50"]]  # most imbalanced first
    before = _cells(groups, rows)
    f_lin = next(f for f in rows if f.var == "linmap_r2")
    # Make the 90/10 run's linear-map R² far higher than the 50/50 run's, and its TEff below 1.
    changed = {k: ds.copy(deep=True) for k, ds in runs.items()}
    changed["p10"]["linmap_r2"] = changed["p10"]["linmap_r2"] + 5.0
    changed["p10"]["teff"] = changed["p10"]["teff"] * 0 + 0.5
    changed["p50"]["teff"] = changed["p50"]["teff"] * 0 + 0.7
    groups2, rows2 = compute_findings(changed)
    after = _cells(groups2, rows2)
    g10 = groups2[0].label
    lin2 = next(f for f in rows2 if f.var == "linmap_r2")
    assert lin2.values[g10] == pytest.approx(f_lin.values[g10] + 5.0)
    assert after["linear-map R²"][g10] != before["linear-map R²"][g10]
    assert after["linear-map R²"][g10].startswith(f"{lin2.values[g10]:.3f}")
    assert lin2.comparison == "higher"
    assert "is higher than the most balanced" in lin2.sentence
    teff2 = next(f for f in rows2 if f.var == "teff")
    assert teff2.values[g10] == pytest.approx(0.5)
    assert "does not gain" in teff2.sentence
    assert teff2.comparison == "lower" and "by 0.200" in teff2.sentence
    # ... and back the other way: the sentence follows the numbers, not a fixed text.
    changed["p10"]["linmap_r2"] = changed["p10"]["linmap_r2"] - 50.0
    lin3 = next(f for f in compute_findings(changed)[1] if f.var == "linmap_r2")
    assert lin3.comparison == "lower" and "is lower than" in lin3.sentence
    assert (
        f"above its different-text baseline in {groups2[1].label.lower()} only"
        in lin3.sentence.lower()
    )


def test_findings_use_the_sweep_table_control(runs) -> None:
    table = pd.DataFrame(
        [
            {"run": "p10", "language": "EN2", "teff": 3.5, "teff_control": 2.0, "transfer": 1.75},
            {"run": "p50", "language": "EN2", "teff": 1.4, "teff_control": 1.6, "transfer": 0.8},
        ]
    )
    groups, rows = compute_findings(runs, table)
    teff = rows[0]
    assert teff.var == "teff" and teff.measure == "TEff of EN2"
    assert teff.values == {groups[0].label: 3.5, groups[1].label: 1.4}
    assert teff.extra["transfer"][groups[0].label] == 1.75
    assert "transfer above 1) in " + groups[0].label in teff.sentence
    assert _cells(groups, rows)["TEff of EN2"][groups[0].label] == "3.500 (2.000; 1.750)"


# The demo's plan: log-spaced early, linear later, and the last step one after the previous.
LOG_STEPS = [0, 1, 3, 8, 23, 65, 130, 195, 260, 325, 390, 391]


def test_checkpoints_placed_by_tokens(runs) -> None:
    ds = make_cube("log", 0.1, 3).isel(step=[0, 1, 2])
    ds = xr.concat([ds] * 4, dim="step").isel(step=slice(0, len(LOG_STEPS)))
    ds = ds.assign_coords(step=LOG_STEPS, tokens=("step", [s * 2560.0 for s in LOG_STEPS]))
    spec = similarity_heatmap({"log": ds}, "cka").to_dict()
    enc = spec["spec"]["encoding"]
    assert enc["x"]["field"] == "x0" and enc["x2"]["field"] == "x1"
    assert enc["x"]["scale"]["type"] == "symlog"
    rows = pd.DataFrame(spec["data"]["values"])
    cells = rows.drop_duplicates("step").sort_values("step")
    assert cells["x0"].iloc[0] == 0  # step 0 starts at 0 tokens
    assert (cells["x0"].to_numpy() < cells["tokens"].to_numpy()).sum() == len(cells) - 1
    assert cells["x1"].to_numpy()[:-1] == pytest.approx(cells["x0"].to_numpy()[1:])
    # Evenly spaced checkpoints stay on a linear axis.
    lin = similarity_heatmap(runs, "cka").to_dict()["spec"]["encoding"]["x"]["scale"]
    assert lin.get("type") != "symlog"


def test_future_family_gets_its_section(tmp_path: Path, runs) -> None:
    ds = runs["p10"].copy()
    ds["lens_top1_l2"] = (("step", "layer"), np.linspace(0, 1, 12).reshape(3, 4))
    assert "lens_top1_l2" not in VARIABLES
    ds["patch_kept"] = (("step", "layer"), np.linspace(0, 1, 12).reshape(3, 4))
    write_report({"p10": ds, "p50": runs["p50"]}, tmp_path / "r", png=False)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Which language does each layer think in" in page
    assert "patching: share of L2&#x27;s own quality kept by L1&#x27;s state" in page
    assert "probekit align p50 --metrics lens`" in page  # the family, not the variable
    assert "probekit align p50 --metrics patching`" in page
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {"variable_lens_top1_l2", "variable_patch_kept"} <= {c["name"] for c in rep["charts"]}


def _decode(png: bytes) -> np.ndarray:
    """Minimal PNG decoder for the filters vl-convert and shrink_png write (none/sub/up)."""
    import struct
    import zlib

    i, idat, head = 8, b"", None
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        t, d = png[i + 4 : i + 8], png[i + 8 : i + 8 + n]
        head = d if t == b"IHDR" else head
        idat += d if t == b"IDAT" else b""
        i += 12 + n
    w, h, _, ctype = struct.unpack(">IIBB", head[:10])
    c = 4 if ctype == 6 else 3
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * c + 1)
    img = np.zeros((h, w * c), np.uint8)
    prev = np.zeros(w * c, np.uint8)
    for r in range(h):
        f, line = rows[r, 0], rows[r, 1:]
        if f == 1:
            line = np.cumsum(line.reshape(w, c), axis=0, dtype=np.uint32).astype(np.uint8)
        img[r] = line.reshape(-1) + (prev if f == 2 else 0)
        prev = img[r]
    return img.reshape(h, w, c)[..., :3]


def test_png_shrunk_losslessly(report: Path, runs) -> None:
    import vl_convert as vlc

    from probekit.report.html import _spec, _vl_version

    raw = vlc.vegalite_to_png(_spec(layer_profile(runs, "cka")), vl_version=_vl_version())
    small = shrink_png(raw)
    assert small[:8] == b"\x89PNG\r\n\x1a\n" and len(small) < len(raw) / 2
    assert np.array_equal(_decode(small), _decode(raw))
    assert shrink_png(b"not a png") == b"not a png"


# ---------------------------------------------------------------------------------- sweeps


def _write_run(run_dir: Path, ds: xr.Dataset) -> None:
    from probekit.store import write_steps

    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(f'name = "{run_dir.name}"\n[data]\nclones = 1\n')
    write_steps(run_dir, "similarity", ds, attrs=dict(ds.attrs))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sweep")
    rows = []
    for i, (p, seed) in enumerate([(0.5, 0), (0.5, 1), (0.1, 0), (0.1, 1)]):
        name = f"grid_p{p}_s{seed}"
        ds = make_cube(name, p, 10 + i)
        ds.attrs.update(seed=seed, languages=LANGS)
        _write_run(d / name, ds)
        for lang in LANGS:
            rare = lang == "EN2" and p < 0.5
            rows.append(
                {"run": name, "group": f"grid_p{p}", "seed": seed, "mode": "clone",
                 "vocab": "clone", "p": p, "schedule": "", "language": lang,
                 "ppl": 40 + 10 * rare, "mlpe": 45 + 40 * rare, "teff": 1 + 2 * rare + 0.1 * seed,
                 "teff_control": 1.5 + 0.5 * rare, "transfer": 0.9 + 0.8 * rare}
            )  # fmt: skip
    # A reference run: a run folder the sweep page must not draw.
    ref = make_cube("ref_EN_tiny_0.1_s0", 0.0, 20)
    _write_run(d / "ref_EN_tiny_0.1_s0", ref.drop_vars([v for v in ref.data_vars if v != "ppl"]))
    pd.DataFrame(rows).to_csv(d / "teff.csv", index=False)
    return d


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory, sweep_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("sweep_report")
    index = make_report([sweep_dir], out)
    assert index == out / "index.html"
    return out


def test_sweep_page(sweep_report: Path) -> None:
    rep = json.loads((sweep_report / "report.json").read_text())
    assert rep["kind"] == "sweep"
    assert set(rep["runs"]) == {f"grid_p{p}_s{s}" for p in (0.5, 0.1) for s in (0, 1)}
    names = {c["name"] for c in rep["charts"]}
    assert {"sweep_chart", "grid_alignment_chart", "teff_chart"} <= names
    # Seeds of one p are one group in the findings, most imbalanced first.
    groups = rep["findings"]["groups"]
    assert [g["label"] for g in groups] == ["p = 0.1, 2 runs", "p = 0.5, 2 runs"]
    teff = rep["findings"]["rows"][0]
    assert teff["values"]["p = 0.1, 2 runs"] == pytest.approx(3.05)
    assert teff["extra"]["transfer"]["p = 0.1, 2 runs"] == pytest.approx(1.7)
    page = (sweep_report / "index.html").read_text()
    spec = next(
        json.loads(sp)
        for sp in re.findall(r'class="chart-spec" data-target="chart-sweep_chart">(.*?)</script>',
                             page, re.S)
    )  # fmt: skip
    marks = json.dumps(spec)
    assert '"errorbar"' in marks and '"mean"' in marks  # every seed, mean and interval
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report.py"), str(sweep_report),
         "--no-browser"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_make_report_bad_folder(tmp_path: Path, sweep_dir: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ProbekitError, match="neither") as err:
        make_report([tmp_path / "notes"], tmp_path / "out")
    assert "\n" not in str(err.value)
    with pytest.raises(ProbekitError, match="single sweep folder"):
        make_report([sweep_dir, sweep_dir / "grid_p0.5_s0"], tmp_path / "out")
    with pytest.raises(ProbekitError, match="not found"):
        make_report([tmp_path / "missing"], tmp_path / "out")


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_browser_renders_sweep_page(sweep_report: Path) -> None:
    pytest.importorskip("websockets")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report.py"), str(sweep_report),
         "--require-browser"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_headings_are_titles_and_bookkeeping_is_not_charted(tmp_path: Path, runs) -> None:
    """No chart heading carries its internal id; bookkeeping variables (scored characters,
    summed NLL, tokens seen) stay in the cube while a researcher's variable is drawn."""
    ds = runs["p10"].copy()
    for var in ("n_chars", "nll_tokens", "n_tokens", "tokens_lang"):
        ds[var] = (("step",), np.arange(3.0) + 1)
    ds["lape"] = (("step", "layer"), np.linspace(0, 1, 12).reshape(3, 4))
    write_report({"p10": ds, "p50": runs["p50"]}, tmp_path / "r", png=False)
    page = (tmp_path / "r" / "index.html").read_text()
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    names = {c["name"] for c in rep["charts"]}
    assert "variable_lape" in names
    assert not names & {f"variable_{v}" for v in ("n_chars", "nll_tokens", "n_tokens")}
    for heading in re.findall(r"<h3>(.*?)</h3>", page, re.S):
        assert not any(n in heading for n in names), heading
    assert 'class="id"' not in page

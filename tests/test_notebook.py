"""examples/notebook.py runs top to bottom as a plain script and writes the report."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.py"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # the notebook sets torch's thread count for the whole process; later tests compare
    # weights bitwise with runs made at one thread, so put it back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_notebook_runs_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROBEKIT_NOTEBOOK_OUT", str(tmp_path / "out"))
    ns = runpy.run_path(str(NOTEBOOK), run_name="__main__")
    report = Path(ns["report"])
    assert report == tmp_path / "out" / "report" / "index.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert list(report.parent.glob("*.png"))
    assert (tmp_path / "out" / "hidden_cos_heatmap.html").is_file()
    assert (tmp_path / "out" / "hidden_cos_profile.html").is_file()
    cube = ns["cube"]
    assert int(cube["step"].values[-1]) == 40
    assert {"hidden_cos", "ppl", "grad_cos", "neuron_overlap"} <= set(cube.data_vars)

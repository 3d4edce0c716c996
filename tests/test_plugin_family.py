"""A family from another package, found through the ``probekit.families`` entry point, is
computed by the CLI serially and on two dask workers (the same numbers) and drawn by the report
with its title: tests/plugins/pk_attn_entropy.py is the one file its author writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "plugins" / "pk_attn_entropy.py"


def _install(site: Path) -> None:
    """What `pip install` of the plugin's package leaves: its module and its dist-info."""
    site.mkdir(parents=True)
    shutil.copy(PLUGIN, site / PLUGIN.name)
    info = site / "pk_attn_entropy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pk-attn-entropy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[probekit.families]\nattn_entropy = pk_attn_entropy:AttentionEntropy\n"
    )


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    cmd = [sys.executable, "-m", "probekit.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_an_entry_point_family_is_computed_serially_on_workers_and_reported(
    tiny_run: Path, tmp_path: Path
):
    site = tmp_path / "site"
    _install(site)
    runs = []
    for name in ("serial", "workers"):
        runs.append(tmp_path / name)
        shutil.copytree(tiny_run, runs[-1], ignore=shutil.ignore_patterns("analysis.zarr"))
    common = ["--metrics", "attn_entropy", "--pairs", "12", "--seq-len", "32", "--quiet"]
    serial = _cli(site, "align", str(runs[0]), *common)
    assert serial.returncode == 0, serial.stderr
    workers = _cli(site, "align", str(runs[1]), *common, "--workers", "2")
    assert workers.returncode == 0, workers.stderr
    a = xr.open_zarr(runs[0] / "analysis.zarr", group="attn_entropy")
    b = xr.open_zarr(runs[1] / "analysis.zarr", group="attn_entropy")
    assert a["attn_entropy"].sizes["step"] > 1
    xr.testing.assert_identical(a["attn_entropy"].load(), b["attn_entropy"].load())
    help_text = _cli(site, "align", "--help").stdout
    assert "attn_entropy (attn_entropy)" in " ".join(help_text.split())
    report = _cli(site, "report", str(runs[0]), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "attention entropy per head" in (tmp_path / "report" / "index.html").read_text()


def test_a_broken_entry_point_is_a_warning_not_a_failure(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    info = site / "pk_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pk-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[probekit.families]\nbroken = pk_missing:Nothing\n")
    out = _cli(site, "align", "--help")
    assert out.returncode == 0
    assert "family entry point 'broken' not loaded (ModuleNotFoundError" in out.stderr

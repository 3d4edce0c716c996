"""`demo`: the whole toolkit end to end on the shipped corpus, reusing finished work.

The quick grid (tiny preset, ~1 M tokens) shows every stage and chart in about nine
minutes on a 2-core CPU; `--full` runs the setting of
research/feasibility2.md, where the 10 % clone's token efficiency is clearly above
both 1 and the update-matched control.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

GRIDS = Path(__file__).parent  # the demo grids are the .toml files beside this module


def run_demo(
    out: str | Path = "demo_runs",
    full: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Train, analyse and report the demo grid into `out`; return the summary numbers.

    The runs are trained and analysed on `workers` one-thread processes (default: the CPUs
    this process may use, at most one per run). One thread per run is faster on a few cores
    than one run on all of them, and makes the numbers the same on any machine: a run's
    weights depend on how many threads summed its gradients (by ~1e-5)."""
    from probekit.report import make_report
    from probekit.store import open_cube
    from probekit.sweep import expand_grid, run_sweep

    start = time.time()
    out = Path(out)
    grid = GRIDS / ("full_grid.toml" if full else "demo_grid.toml")
    planned = expand_grid(grid)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(cpus or 1, len(planned))
    table_text = run_sweep(grid, out, progress=progress, workers=workers)
    runs = [out / r.name for r in planned if r.kind == "run"]
    teff_csv = out / "teff.csv"
    table = pd.read_csv(teff_csv) if teff_csv.is_file() else None
    report = make_report(runs, out / "report", title="probekit demo", sweep_table=table)
    summary = {"report": str(report), "minutes": (time.time() - start) / 60}
    print(table_text)
    print(f"\nreport: {report}")
    for run in runs:
        cube = open_cube(run)
        name = cube.attrs.get("run_name", run.name)
        cos = cube["hidden_cos"].isel(step=-1).sel(layer=slice(1, None)).mean().item()
        summary[f"{name}/hidden_cos"] = cos
        line = f"{name}: mean hidden_cos (layers 1..L, final step) {cos:.3f}"
        if table is not None:
            rows = table[(table["run"] == name)]
            minority = rows.loc[rows["tokens"].idxmin()] if len(rows) else None
            if minority is not None:
                summary[f"{name}/teff"] = float(minority["teff"])
                line += f"; TEff of {minority['language']} {minority['teff']:.2f}"
                if "teff_control" in rows and pd.notna(minority.get("teff_control")):
                    line += f" (update-matched control {minority['teff_control']:.2f})"
        print(line)
    print(f"demo finished in {summary['minutes']:.1f} min")
    return summary

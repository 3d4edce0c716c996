"""A sweep's output folder as one report: detect it, open its runs, tabulate the grid.

`probekit sweep GRID --out DIR` writes DIR/<run>/ for every multilingual run, monolingual
reference and update-matched control (each with a config.toml), DIR/configs/, and DIR/teff.csv
(one row per multilingual run and language at the final step; see probekit.sweep). A folder
is taken as a sweep when it holds a teff.csv and run folders with a config.toml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from probekit.errors import ProbekitError
from probekit.report.catalog import title_of
from probekit.report.findings import ALIGNMENT, at_step_of, final_mean


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").is_file() or (path / "analysis.zarr").is_dir()


def is_sweep_dir(path: Path) -> bool:
    """A folder with a teff.csv and at least one run folder (holding a config.toml)."""
    path = Path(path)
    return (path / "teff.csv").is_file() and any(
        (d / "config.toml").is_file() for d in path.iterdir() if d.is_dir()
    )


def _config_fields(run_dir: Path) -> dict:
    """The grid fields of a run's config.toml (p, schedule, clones, seed), as far as present."""
    from probekit.config import read_toml

    try:
        cfg = read_toml(run_dir / "config.toml")
    except Exception:  # an unreadable config only costs the clone count
        return {}
    d = cfg.get("data", {})
    return {k: d[k] for k in ("clones",) if k in d}


def load_sweep(path: Path) -> tuple[dict[str, xr.Dataset], pd.DataFrame, dict[str, dict]]:
    """The sweep's multilingual runs (name -> cube), its teff.csv, and per run its grid fields.

    Runs are the table's `run` names that have an analysis cube; references and controls are
    not drawn (they enter through TEff and its control).
    """
    from probekit.store import open_cube

    path = Path(path)
    try:
        table = pd.read_csv(path / "teff.csv")
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"{path / 'teff.csv'}: unreadable CSV ({exc})") from None
    if "run" not in table:
        raise ProbekitError(f"{path / 'teff.csv'}: no `run` column; not a probekit sweep table")
    runs: dict[str, xr.Dataset] = {}
    fields: dict[str, dict] = {}
    missing = []
    for name in dict.fromkeys(table["run"].astype(str)):
        run_dir = path / name
        if not (run_dir / "analysis.zarr").is_dir():
            missing.append(name)
            continue
        runs[name] = open_cube(run_dir)
        fields[name] = _config_fields(run_dir)
    if not runs:
        raise ProbekitError(
            f"{path}: none of the sweep's runs ({', '.join(missing) or 'none listed'}) has an "
            "analysis cube; run `probekit align RUN_DIR` on them first"
        )
    if "clones" not in table:
        table["clones"] = (
            table["run"].astype(str).map(lambda r: fields.get(r, {}).get("clones", np.nan))
        )
    return runs, table, fields


def alignment_points(runs: Mapping[str, xr.Dataset], table: pd.DataFrame, x: str) -> pd.DataFrame:
    """One row per run and alignment measure at the final step (layers >= 1 averaged), with
    the run's seed and its value of the sweep axis `x` (taken from the sweep table)."""
    info = table.drop_duplicates("run").set_index(table.drop_duplicates("run")["run"].astype(str))
    rows = []
    for name, ds in runs.items():
        xv = info[x].get(name, math.nan) if x in info else math.nan
        seed = info["seed"].get(name, 0) if "seed" in info else 0
        for var in (*ALIGNMENT, "neuron_overlap", "grad_cos", "retrieval_acc"):
            v = final_mean(ds, var)
            if not np.isfinite(v):
                continue
            base = (
                at_step_of(ds, f"{var}_baseline", var)
                if f"{var}_baseline" in ds
                else at_step_of(ds, "neuron_overlap_chance", var)
                if var == "neuron_overlap"
                else math.nan
            )
            rows.append(
                {
                    "run": name,
                    "seed": seed,
                    x: xv,
                    "measure": title_of(var),
                    "value": v,
                    "baseline": base,
                }
            )
    return pd.DataFrame(rows)

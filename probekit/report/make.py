"""`report`: the report's entry point: run folders or a sweep folder in, one page out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probekit.errors import ProbekitError, RunDirError


def _read_table(sweep_table: str | Path | pd.DataFrame | None) -> pd.DataFrame | None:
    if sweep_table is None or isinstance(sweep_table, pd.DataFrame):
        return sweep_table
    try:
        return pd.read_csv(sweep_table)
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"--sweep-table {sweep_table}: unreadable CSV ({exc})") from None


def make_report(
    run_dirs: list[str | Path],
    out: str | Path,
    title: str = "probekit report",
    sweep_table: str | Path | pd.DataFrame | None = None,
) -> Path:
    """Write out/index.html (self-contained), a PNG per chart and out/report.json.

    `run_dirs` is one or more run folders (each with an analysis cube), or one sweep output
    folder (`probekit sweep GRID --out DIR`: run folders with a config.toml, and a teff.csv),
    which gives one page for the whole grid: TEff and the alignment measures against what the
    grid varies, every seed shown. Anything else raises a one-line ProbekitError.
    """
    from probekit.report.charts import sweep_axis
    from probekit.report.grid import alignment_points, is_run_dir, is_sweep_dir, load_sweep
    from probekit.report.html import GridInfo, write_report
    from probekit.store import open_cube

    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ProbekitError("no run or sweep folder given")
    for path in paths:
        if not path.is_dir():
            raise RunDirError(f"run directory not found: {path}")
    if len(paths) == 1 and not is_run_dir(paths[0]) and is_sweep_dir(paths[0]):
        runs, table, _ = load_sweep(paths[0])
        given = _read_table(sweep_table)
        table = given if given is not None else table
        x = sweep_axis(table)
        grid = GridInfo(table, x, alignment_points(runs, table, x))
        if title == "probekit report":
            title = f"probekit sweep: {paths[0].resolve().name}"
        return write_report(
            runs,
            Path(out),
            title=title,
            grid=grid,
            subtitle=f"sweep over {x}, {table['seed'].nunique() if 'seed' in table else 1} seed(s)",
        )
    runs = {}
    for run in paths:
        if not is_run_dir(run):
            what = "a sweep folder given with other folders" if is_sweep_dir(run) else "neither"
            raise ProbekitError(
                f"{run} is {what}: a run folder (config.toml or analysis.zarr) or a single "
                "sweep folder (run folders with config.toml, and a teff.csv) is needed"
            )
        cube = open_cube(run)
        name = str(cube.attrs.get("run_name") or run.name)
        runs[name if name not in runs else f"{name} ({run})"] = cube
    return write_report(runs, Path(out), sweep_table=_read_table(sweep_table), title=title)

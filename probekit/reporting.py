"""`report`: open runs' cubes and write the HTML report (the charts live in probekit.report)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probekit.errors import ProbekitError, RunDirError
from probekit.store import open_cube


def make_report(
    run_dirs: list[str | Path],
    out: str | Path,
    title: str = "probekit report",
    sweep_table: str | Path | pd.DataFrame | None = None,
) -> Path:
    """Write out/index.html (self-contained) and a PNG per chart for one or more runs."""
    from probekit.report import write_report

    runs = {}
    for run in map(Path, run_dirs):
        if not run.is_dir():
            raise RunDirError(f"run directory not found: {run}")
        cube = open_cube(run)
        name = str(cube.attrs.get("run_name") or run.name)
        runs[name if name not in runs else f"{name} ({run})"] = cube
    table = None
    if isinstance(sweep_table, pd.DataFrame):
        table = sweep_table
    elif sweep_table is not None:
        try:
            table = pd.read_csv(sweep_table)
        except (OSError, ValueError) as exc:
            raise ProbekitError(f"--sweep-table {sweep_table}: unreadable CSV ({exc})") from None
    return write_report(runs, Path(out), sweep_table=table, title=title)

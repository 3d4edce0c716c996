"""`align`: the alignment families of every checkpoint of a series, appended to its cube.

A thin call of the one driver (`probekit.engine`) with the families `align` computes by
default (similarity, neurons, gradients, embeddings, probes) or the ones named.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from probekit import engine
from probekit.metrics import resolve
from probekit.options import AnalysisOptions

AlignOptions = AnalysisOptions  # the name notebooks used before the driver had one options type


def align(
    run_dir: str | Path,
    metrics: str | list[str] | None = None,
    steps: list[int] | str | None = None,
    recompute: bool = False,
    options: AnalysisOptions | None = None,
    workers: int = 0,
    progress: bool = True,
    strict: bool = False,
    scheduler: str | None = None,
) -> xr.Dataset:
    """Compute metrics for every (or the chosen) checkpoint and return the run's cube.

    `metrics` names families or variables (default: every family `align` computes).
    Already stored checkpoints are skipped unless `recompute`. `workers` > 0 spreads
    checkpoints over a local dask.distributed cluster, `scheduler` over an existing one.
    Families a run cannot have are an error when named explicitly (or `strict`), and
    skipped with a note otherwise.
    """
    explicit = metrics not in (None, "all", ["all"])
    return engine.run(
        run_dir,
        resolve(metrics, "align"),
        steps=steps,
        recompute=recompute,
        options=options,
        workers=workers,
        scheduler=scheduler,
        progress=progress,
        explicit=explicit or strict,
        label="align",
    )

"""The report's chart of the `calibrated` family: per layer at the final checkpoint, each
measure's raw score beside its permutation null and its null-calibrated score."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from probekit.report.charts import MissingMetric, run_color_scale

CAPTION = (
    "Per layer (0 = embeddings) at each run's final checkpoint, for every measure: the raw "
    "score on the calibration sample, the mean of its permutation null (the score with the two "
    "languages' rows shuffled: what no correspondence at all gives at this width and sample "
    "size) and the calibrated score (raw − null) / (1 − null): 0 at the null, 1 at the maximum "
    "(Gröger et al. 2026). A raw score far above 0 can be all null; only the calibrated line "
    "compares across layers, checkpoints and measures."
)
TITLE = "Similarity against its permutation null, per layer at the end of training"
KINDS = {"cal_raw": "raw", "cal_null_mean": "null mean", "cal_score": "calibrated"}


def calibration_chart(
    runs: Mapping[str, xr.Dataset] | xr.Dataset, *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Raw, null-mean and calibrated score per layer (final checkpoint), a panel per measure."""
    if isinstance(runs, xr.Dataset):
        runs = {str(runs.attrs.get("run_name", "run")): runs}
    frames = []
    for run, ds in runs.items():
        if "cal_score" not in ds.data_vars:
            continue
        da = ds["cal_score"]
        ok = da.notnull().any([d for d in da.dims if d != "step"]).values
        if not ok.any():
            continue
        step = int(da["step"].values[np.nonzero(ok)[0][-1]])
        for var, kind in KINDS.items():
            v = ds[var].sel(step=step)
            df = v.drop_vars([c for c in v.coords if c not in v.dims]).to_dataframe("value")
            df = df.reset_index().dropna(subset=["value"])
            df["kind"], df["run"], df["step"] = kind, run, step
            frames.append(df)
    if not frames:
        raise MissingMetric("no run has cal_score (run `probekit align RUN --metrics calibrated`)")
    df = pd.concat(frames, ignore_index=True).rename(columns={"cal_measure": "measure"})
    names = list(color_domain) if color_domain is not None else list(dict.fromkeys(df["run"]))
    chart = (
        alt.Chart(alt.Data(values=json.loads(df.to_json(orient="records"))))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title="score"),
            color=alt.Color("run:N", scale=run_color_scale(names), title="run"),
            strokeDash=alt.StrokeDash(
                "kind:N", sort=list(KINDS.values()), title="", legend=alt.Legend(orient="top")
            ),
            tooltip=["run:N", "step:Q", "measure:N", "layer:O", "kind:N", "value:Q"],
        )
        .properties(width=200, height=160)
    )
    return chart.facet(
        facet=alt.Facet("measure:N", title=None, sort=list(dict.fromkeys(df["measure"]))),
        columns=3,
    ).properties(title=TITLE)

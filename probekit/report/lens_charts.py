"""The report's tuned-lens section: both lenses side by side (family `tuned_lens`).

* `lens_layers_chart`: per layer at each run's final checkpoint, KL to the final distribution
  and the input language's own vocabulary mass, logit vs tuned lens (one panel per input
  language);
* `latent_layer_chart`: the latent-language layer over training, logit vs tuned lens.
"""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from probekit.report.charts import MissingMetric

CAPTIONS = {
    "lens_layers_chart": "Final checkpoint, per layer: KL(final || lens) (nats, lower = the "
    "layer already predicts what the model predicts) for the logit lens (dashed) and the tuned "
    "lens (solid), one panel per input language and one colour per run.",
    "latent_layer_chart": "Over training: the first layer at which the input language's own "
    "vocabulary holds more than half of the lens's probability mass (missing where no layer "
    "does), logit (dashed) vs tuned lens (solid).",
}


def _final(da: xr.DataArray) -> xr.DataArray | None:
    ok = [int(s) for s in da["step"].values if np.isfinite(da.sel(step=s).values).any()]
    return da.sel(step=ok[-1]) if ok else None


def _runs_with(runs: Mapping[str, xr.Dataset], var: str) -> dict[str, xr.Dataset]:
    have = {k: ds for k, ds in runs.items() if var in ds.data_vars}
    if not have:
        raise MissingMetric(f"no run has {var} (probekit align RUN --metrics tuned_lens)")
    return have


def lens_layers_chart(runs: Mapping[str, xr.Dataset]) -> alt.TopLevelMixin:
    """KL to the final distribution per layer at the final checkpoint, both lenses."""
    rows = []
    for name, ds in _runs_with(runs, "tuned_kl").items():
        da = _final(ds["tuned_kl"])
        if da is None:
            continue
        df = da.drop_vars([c for c in da.coords if c not in da.dims]).to_dataframe("kl")
        df = df.reset_index()
        df.insert(0, "run", name)
        rows.append(df)
    if not rows:
        raise MissingMetric("no run has tuned_kl data")
    df = pd.concat(rows, ignore_index=True)
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("kl:Q", title="KL(final || lens), nats"),
            color=alt.Color("run:N"),
            strokeDash=alt.StrokeDash("lens:N", sort=["tuned", "logit"]),
            column=alt.Column("language:N", title="input language"),
            tooltip=["run", "lens", "layer", "language", alt.Tooltip("kl:Q", format=".4f")],
        )
        .properties(width=220, height=180, title="Logit vs tuned lens per layer")
    )


def latent_layer_chart(runs: Mapping[str, xr.Dataset]) -> alt.TopLevelMixin:
    """The latent-language layer per checkpoint, both lenses."""
    rows = []
    for name, ds in _runs_with(runs, "tuned_latent_layer").items():
        da = ds["tuned_latent_layer"]
        df = da.drop_vars([c for c in da.coords if c not in da.dims and c != "tokens"])
        df = df.to_dataframe("layer").reset_index().dropna(subset=["layer"])
        if "tokens" not in df:
            df["tokens"] = df["step"]
        df.insert(0, "run", name)
        rows.append(df)
    df = pd.concat(rows, ignore_index=True)
    if df.empty:
        raise MissingMetric("no checkpoint has a latent-language layer (no layer's own mass > 1/2)")
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", title="training tokens"),
            y=alt.Y("layer:Q", title="latent-language layer"),
            color=alt.Color("run:N"),
            strokeDash=alt.StrokeDash("lens:N", sort=["tuned", "logit"]),
            column=alt.Column("language:N", title="input language"),
            tooltip=["run", "lens", "language", "step", "layer"],
        )
        .properties(width=220, height=180, title="Latent-language layer over training")
    )

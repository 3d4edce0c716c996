"""The report's features section: the `features` family's dictionary read per run.

Three charts (see probekit/metrics/features.py for the variables): shared / specific / dead
feature counts over training per run and layer; causal importance of the top features of
each kind against random alive ones at the final checkpoint; and the top features of each
kind with their top-activating context in each language.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from probekit.report.charts import MissingMetric

CAPTIONS = {
    "feature_kinds_chart": "Features of the shared dictionary per kind over training (one panel "
    "per run and layer): shared fire on both languages' versions of the same text, specific "
    "carry less than features_specific of their activation mass on the other language, dead "
    "never fire (or carry under a tenth of the mean feature's mass).",
    "feature_effect_chart": "Final checkpoint: mean increase in each language's next-token loss "
    "when one feature's contribution is removed from its layer, for the heaviest features of "
    "each kind and as many random alive features (the control).",
    "feature_contexts_chart": "Final checkpoint: the heaviest features of each kind and the "
    "context each fires on most strongly in each language (the token in [[ ]]).",
}


def _runs_with(runs: Mapping[str, xr.Dataset], var: str) -> dict[str, xr.Dataset]:
    have = {}
    for k, ds in runs.items():
        if var in ds.data_vars:
            da = ds[var]
            keep = [s for s in ds["step"].values if bool(da.sel(step=s).notnull().any())]
            if keep:
                have[k] = ds.sel(step=keep).dropna("layer", how="all", subset=[var])
    if not have:
        raise MissingMetric(var)
    return have


def feature_kinds_chart(runs: Mapping[str, xr.Dataset]) -> alt.TopLevelMixin:
    rows = []
    for k, ds in _runs_with(runs, "features_count").items():
        da = ds["features_count"]
        for s, tok in zip(ds["step"].values, ds["tokens"].values, strict=True):
            for lay in da["layer"].values:
                for kind in da["kind"].values:
                    v = float(da.sel(step=s, layer=lay, kind=kind))
                    rows.append(
                        {"run": k, "layer": f"layer {int(lay)}", "kind": str(kind),
                         "tokens": float(tok), "step": int(s), "count": v}
                    )  # fmt: skip
    df = pd.DataFrame(rows)
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", scale=alt.Scale(type="symlog"), title="training tokens"),
            y=alt.Y("count:Q", title="features"),
            color=alt.Color("kind:N"),
            tooltip=["run:N", "layer:N", "kind:N", "step:Q", "count:Q"],
        )
        .properties(width=260, height=180)
        .facet(row="layer:N", column="run:N")
        .properties(title="Shared, language-specific and dead features over training")
    )


def _final(ds: xr.Dataset, var: str) -> xr.Dataset:
    da = ds[var]
    steps = [s for s in ds["step"].values if bool(da.sel(step=s).notnull().any())]
    return ds.sel(step=steps[-1])


def feature_effect_chart(runs: Mapping[str, xr.Dataset]) -> alt.TopLevelMixin:
    rows = []
    for k, ds in _runs_with(runs, "feature_effect").items():
        last = _final(ds, "feature_effect")
        names = [str(n) for n in last["kind"].values]
        for lay in last["layer"].values:
            sel = last["feature_selected"].sel(layer=lay).values
            kind = last["feature_kind"].sel(layer=lay).values.astype(int)
            for li, lang in enumerate(last["language"].values):
                eff = last["feature_effect"].sel(layer=lay).values[li]
                groups = {f"top {names[kd]}": (sel == 1) & (kind == kd) for kd in range(3)}
                groups["random alive"] = sel == 2
                for g, mask in groups.items():
                    if mask.any():
                        rows.append(
                            {"run": k, "layer": f"layer {int(lay)}", "language": str(lang),
                             "features": g, "effect": float(np.nanmean(eff[mask])),
                             "n": int(mask.sum())}
                        )  # fmt: skip
    if not rows:
        raise MissingMetric("feature_effect")
    return (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(
            x=alt.X("features:N", title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset="language:N",
            y=alt.Y("effect:Q", title="loss increase (nats)"),
            color=alt.Color("language:N"),
            tooltip=["run:N", "layer:N", "features:N", "language:N", "effect:Q", "n:Q"],
        )
        .properties(width=240, height=180)
        .facet(row="layer:N", column="run:N")
        .properties(title="Removing one feature: top features of each kind against random ones")
    )


def feature_contexts_chart(runs: Mapping[str, xr.Dataset], per_kind: int = 3) -> alt.Chart:
    rows = []
    for k, ds in _runs_with(runs, "feature_context").items():
        last = _final(ds, "feature_mean_act")
        names = [str(n) for n in last["kind"].values]
        for lay in last["layer"].values:
            kind = last["feature_kind"].sel(layer=lay).values.astype(int)
            mass = (last["feature_freq"] * last["feature_mean_act"].fillna(0)).sel(layer=lay)
            mass = mass.sum("language").values
            text = last["feature_context"].sel(layer=lay)
            for kd in range(3):
                cand = np.flatnonzero(kind == kd)
                for f in cand[np.argsort(-mass[cand], kind="stable")][:per_kind]:
                    for lang in last["language"].values:
                        ctx = str(text.sel(language=lang, feature=f, rank=0).values)
                        rows.append(
                            {"row": f"{k} · layer {int(lay)} · {names[kd]} · #{int(f)} · {lang}",
                             "context": ctx.replace("\n", " ") or "(does not fire)"}
                        )  # fmt: skip
    if not rows:
        raise MissingMetric("feature_context")
    df = pd.DataFrame(rows).reset_index()
    base = alt.Chart(df).encode(y=alt.Y("index:O", axis=None))
    left = base.mark_text(align="left").encode(text="row:N").properties(width=330)
    right = base.mark_text(align="left").encode(text="context:N").properties(width=420)
    return alt.hconcat(left, right).properties(
        title="Top features of each kind and their top-activating contexts"
    )


def add_charts(add: Callable, runs: Mapping[str, xr.Dataset], names: Sequence[str]) -> None:
    """Hand each chart to the report's `add(name, vars, make, caption, title)`; the section
    appears only when some run has the features family (as the lens/patching ones do)."""
    if not any("features_count" in ds.data_vars for ds in runs.values()):
        return
    add(
        "feature_kinds_chart", ("features_count",), lambda: feature_kinds_chart(runs),
        CAPTIONS["feature_kinds_chart"], "Shared, specific and dead features over training",
    )  # fmt: skip
    add(
        "feature_effect_chart", ("feature_effect",), lambda: feature_effect_chart(runs),
        CAPTIONS["feature_effect_chart"], "Do the features matter to each language?",
    )  # fmt: skip
    add(
        "feature_contexts_chart", ("feature_context",), lambda: feature_contexts_chart(runs),
        CAPTIONS["feature_contexts_chart"], "Top features and where they fire",
    )  # fmt: skip

"""Altair charts over analysis cubes: one function per chart, usable from notebooks.

Every function takes `runs` (run name -> cube, or a single cube) and returns an `altair` chart.
A function raises `MissingMetric` when no given run has the variable it needs; runs that lack
it are left out of the picture (the report shows a note for them, see `missing_runs`).

Conventions kept across charts so that pictures can be compared side by side:
- one colour per run everywhere (`run_color_scale`; pass `color_domain` = all run names so a
  chart that lacks some runs still gives each run its usual colour);
- one shared value scale per chart (facets share axes and colour scales);
- the "final" step of a variable is the last step at which that variable has data (cubes are an
  outer join of metric families on `step`, so some steps are NaN for some variables).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from probekit.errors import MetricError
from probekit.report.catalog import VARIABLES

__all__ = [
    "CAPTIONS",
    "SIMILARITY_METRICS",
    "MissingMetric",
    "embed_cos_chart",
    "embed_freq_chart",
    "grad_heatmap",
    "grad_mean_over_time",
    "lang_specific_chart",
    "layer_profile",
    "missing_runs",
    "n_rows",
    "neuron_overlap_chart",
    "ppl_chart",
    "probe_chart",
    "retrieval_chart",
    "run_color_scale",
    "similarity_heatmap",
    "summary_table",
    "sweep_chart",
    "sweep_table_from_runs",
    "teff_chart",
]

RunsLike = Mapping[str, xr.Dataset] | xr.Dataset


class MissingMetric(MetricError):
    """No given run has the variable a chart needs."""


# The similarity measures drawn as heat-maps and layer profiles; titles from the one table.
SIMILARITY_METRICS: dict[str, str] = {
    m: VARIABLES[m]["title"]
    for m in ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2")
}

# One line each: how to read the chart. Similarity charts are per metric ("{metric}" filled in).
CAPTIONS: dict[str, str] = {
    "similarity_heatmap": "Each cell is the L1-vs-L2 {metric} of parallel text at one layer "
    "(rows, 0 = embeddings) and checkpoint; cells sit at the checkpoint's training tokens and "
    "span half way to its neighbours (log scale for log-spaced checkpoints, step 0 at the "
    "left edge). Warmer = more shared. One panel per run, one colour scale for all.",
    "layer_profile": "{metric} per layer at the final checkpoint, one colour per run (the "
    "paper's Table 2 as a picture); dashed = different-text baseline, bars = bootstrap "
    "interval where stored. Only the height above the baseline is shared content.",
    "grad_heatmap": "Cosine between the L1 and L2 gradients of each parameter tensor (rows) in "
    "each layer (columns) at the final checkpoint, a panel per run on one colour scale (paper "
    "Figs 11-13); positive = the languages push the weights the same way, 0 = unrelated.",
    "grad_mean_over_time": "Mean gradient cosine over tensors (except whole-block) and layers "
    "against training tokens; higher = the two languages' updates agree more; 0 = unrelated.",
    "neuron_overlap_chart": "Overlap (Jaccard) of the L1- and L2-active MLP neuron sets per "
    "layer over training tokens; dashed = overlap expected by chance. Above chance = shared "
    "neurons.",
    "lang_specific_chart": "Final-checkpoint fraction of MLP neurons specific to one language, "
    "per layer; one panel per language. Lower = more neurons shared.",
    "ppl_chart": "Per-language test perplexity against training tokens (log scale), one panel "
    "per language; dashed = monolingual perplexity equivalent (MLPE) where stored. Lower = "
    "better.",
    "teff_chart": "Token efficiency (TEff) per language against training tokens; the grey rule "
    "marks TEff = 1 (as good as a monolingual model on the same tokens), dashed = "
    "update-matched control where stored. Above 1 = the language gains from the other.",
    "sweep_chart": "Final perplexity (log; dashed = MLPE), TEff (dashed = update-matched "
    "control) and transfer ratio where present, against what the runs vary (paper Figs 1 and "
    "3); colour = language, a point per run and seed, line = mean over seeds with a ±1 sd bar. "
    "Above the rule at 1 = cross-lingual gain.",
    "grid_alignment_chart": "Each alignment measure at the final checkpoint (mean over layers "
    "≥ 1) against what the sweep varies: a point per run and seed, line = mean over seeds with "
    "a ±1 sd bar, dashed grey = its different-text baseline (or chance overlap).",
    "embed_freq_chart": "Final cosine between clone-pair embeddings by the token's training "
    "frequency (lower bin edge, log x) (paper Fig 7); higher = clone pairs share an embedding.",
    "embed_cos_chart": "Mean embedding cosine over training tokens for clone pairs (solid) and "
    "all pairs (dashed), input and output matrices (paper Fig 6 over time).",
    "retrieval_chart": "Final-checkpoint parallel-sentence retrieval accuracy per layer; solid = "
    "L1->L2, dashed = L2->L1; chance is 1 / number of pairs. Higher = representations "
    "identify translations.",
    "probe_chart": "Final-checkpoint probe accuracy per layer: solid = probe trained in one "
    "language and tested in the other, dashed = in-language. Close = the probe transfers.",
}

# Colour-blind friendly and distinct (Tableau 10), then Tableau 20 extras for big sweeps.
_PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip

_LANG_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


# ----------------------------------------------------------------------------------- helpers


def run_color_scale(names: Sequence[str]) -> alt.Scale:
    """One fixed colour per run name (in the given order), shared by every chart."""
    names = list(dict.fromkeys(names))
    rng = [_PALETTE[i % len(_PALETTE)] for i in range(len(names))]
    return alt.Scale(domain=names, range=rng)


def _as_runs(runs: RunsLike) -> dict[str, xr.Dataset]:
    if isinstance(runs, xr.Dataset):
        return {str(runs.attrs.get("run_name", "run")): runs}
    return dict(runs)


def _with(runs: RunsLike, *names: str) -> dict[str, xr.Dataset]:
    """Runs that have at least one of `names`; MissingMetric if none does."""
    rs = _as_runs(runs)
    have = {k: ds for k, ds in rs.items() if any(n in ds.data_vars for n in names)}
    if not have:
        raise MissingMetric(f"no run has {' or '.join(names)}")
    return have


def missing_runs(runs: RunsLike, *names: str) -> list[str]:
    """Names of the runs that have none of the variables `names` (for skip notes)."""
    return [k for k, ds in _as_runs(runs).items() if not any(n in ds.data_vars for n in names)]


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    # JSON round trip: numpy scalars -> plain types, NaN -> null (Vega cannot read NaN).
    return json.loads(df.to_json(orient="records", double_precision=5))


def _data(frames: list[pd.DataFrame]) -> alt.Data:
    # Inline values (not a DataFrame) so Altair's global 5000-row guard does not trip on big
    # sweeps and no process-wide data-transformer setting has to change.
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return alt.Data(values=_records(df))


def _valid_steps(da: xr.DataArray) -> np.ndarray:
    other = [d for d in da.dims if d != "step"]
    ok = da.notnull().any(dim=other) if other else da.notnull()
    return da["step"].values[ok.values]


def _pick_step(da: xr.DataArray, step: int | str, run: str) -> xr.DataArray:
    """The variable at `step` ("final" = last step with data), without the step dim."""
    steps = _valid_steps(da)
    if len(steps) == 0:
        raise MissingMetric(f"run {run} has no data for {da.name}")
    if step == "final":
        s = steps[-1]
    else:
        if int(step) not in set(int(x) for x in steps):
            raise MetricError(
                f"run {run} has no {da.name} at step {step}; steps with data: "
                f"{', '.join(str(int(x)) for x in steps)}"
            )
        s = int(step)
    return da.sel(step=s)


def _frame(da: xr.DataArray, run: str, name: str = "value") -> pd.DataFrame:
    """Long table of one variable, NaNs dropped, with `run` and (if known) `tokens` columns."""
    keep = [c for c in da.coords if c not in da.dims and c != "tokens"]
    df = da.drop_vars(keep).to_dataframe(name=name).reset_index()
    df = df.dropna(subset=[name])
    if "step" in da.dims and "tokens" not in df.columns:
        df["tokens"] = df["step"]  # no token count stored: fall back to steps
    df.insert(0, "run", run)
    return df


def _final_step(da: xr.DataArray) -> int | None:
    steps = _valid_steps(da)
    return int(steps[-1]) if len(steps) else None


# Public names for the other report modules (findings, grid).
pick_step = _pick_step
final_step = _final_step


def _color(color_domain: Sequence[str] | None, runs: Mapping[str, xr.Dataset]) -> alt.Color:
    domain = list(color_domain) if color_domain is not None else list(runs)
    return alt.Color("run:N", scale=run_color_scale(domain), title="run")


def n_rows(chart: alt.TopLevelMixin) -> int:
    """Number of data rows a chart carries (all inline data sets together)."""
    spec = chart.to_dict()
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "values" and isinstance(v, list):
                    total += len(v)
                elif k == "datasets" and isinstance(v, dict):
                    total += sum(len(x) for x in v.values() if isinstance(x, list))
                else:
                    walk(v)
        elif isinstance(node, list):
            for x in node:
                walk(x)

    walk(spec)
    return total


_TOKENS_AXIS = alt.Axis(format="~s", title="training tokens")

# ------------------------------------------------------------------ axes and the run selector

# The page-wide run selector: a Vega-Lite parameter holding the run names to show. Every chart
# of runs declares it (all runs shown) and filters its rows on it; the page sets it in every
# view at once (see html.py). In a notebook it simply shows every run.
SHOWN = "shown"
SHOWN_FILTER = f"indexof({SHOWN}, datum.run) >= 0"


def _shown(chart: Any, names: Sequence[str]) -> Any:
    """Declare the `shown` parameter (all of `names`) and filter the chart's rows on it."""
    return chart.add_params(alt.param(name=SHOWN, value=list(names))).transform_filter(SHOWN_FILTER)


# Each tick formatted on its own (an axis `format` shares one SI prefix: "0M, 0M, 0.1M").
_SI_LABEL = "format(datum.value, '~s')"


def token_scale(tokens: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """How to place checkpoints by training tokens: linear, or symlog for log-spaced plans.

    A checkpoint plan is taken as log-spaced when its nonzero token counts span a factor of 20
    or more and its widest gap is at least 5 times its first (plans that are log-spaced early
    and linear later, like the demo's, count as log-spaced). The symlog scale's constant is
    the smallest nonzero count, so step 0 (0 tokens) sits one short gap left of it.
    Returns {"log": bool, "constant": float, "scale": alt.Scale, "axis": alt.Axis}.
    """
    t = np.unique(np.asarray([x for x in tokens if np.isfinite(x)], dtype=float))
    pos = t[t > 0]
    log = False
    if len(pos) >= 3:
        gaps = np.diff(pos)
        log = pos[-1] / pos[0] >= 20 and gaps.max() >= 5 * gaps[0]
    if not log:
        return {
            "log": False,
            "constant": 1.0,
            "scale": alt.Scale(zero=bool(len(t) and t.min() == 0)),
            "axis": alt.Axis(labelExpr=_SI_LABEL, title="training tokens"),
        }
    c = float(pos[0])
    ticks = [0.0] if t.min() == 0 else []
    lo, hi = int(np.floor(np.log10(pos[0]))), int(np.ceil(np.log10(pos[-1])))
    for e in range(lo, hi + 1):
        for m in (1, 3) if hi - lo <= 3 else (1,):
            v = m * 10.0**e
            if pos[0] * 0.7 <= v <= pos[-1] * 1.3:
                ticks.append(v)
    return {
        "log": True,
        "constant": c,
        "scale": alt.Scale(type="symlog", constant=c),
        "axis": alt.Axis(
            labelExpr=_SI_LABEL, values=ticks, title="training tokens (log scale; 0 at the left)"
        ),
    }


def _tokens_x(df: pd.DataFrame, field: str = "tokens", **kw: Any) -> alt.X:
    ts = token_scale(df["tokens"].to_numpy() if "tokens" in df else [])
    return alt.X(f"{field}:Q", scale=ts["scale"], axis=ts["axis"], **kw)


def _cell_edges(tokens: np.ndarray, ts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Left and right token edges of each checkpoint's heat-map cell: half way to its
    neighbours on the chart's scale (the first cell starts at its own count when that is 0)."""
    t = np.asarray(tokens, dtype=float)
    c = ts["constant"]

    def fwd(x: np.ndarray) -> np.ndarray:
        return np.log1p(x / c) if ts["log"] else x

    def inv(u: np.ndarray) -> np.ndarray:
        return c * np.expm1(u) if ts["log"] else u

    u = fwd(t)
    if len(u) == 1:
        w = max(abs(u[0]) * 0.1, 1.0 if not ts["log"] else 0.1)
        return inv(u - w), inv(u + w)
    mid = (u[:-1] + u[1:]) / 2
    first = u[0] - (u[1] - u[0]) / 2
    if t[0] == 0:
        first = u[0]
    last = u[-1] + (u[-1] - u[-2]) / 2
    left = np.concatenate([[first], mid])
    right = np.concatenate([mid, [last]])
    return inv(left), inv(right)


# No legend for dash styles: with run-coloured lines it renders as blank symbols; each
# caption says what solid and dashed mean instead.
_DASH_LEGEND = None


def _tip_value(title: str = "value") -> alt.Tooltip:
    return alt.Tooltip("value:Q", format=".4f", title=title)


_TIP_TOKENS = alt.Tooltip("tokens:Q", format=",.0f", title="tokens")


# ------------------------------------------------------------------------------ similarity


def similarity_heatmap(
    runs: RunsLike,
    metric: str = "hidden_cos",
    *,
    x: str = "tokens",
    color_domain: Sequence[str] | None = None,
) -> alt.FacetChart:
    """Layer x checkpoint heat-map of a similarity metric, one panel per run.

    Each checkpoint is a cell spanning half the way to its neighbours on the x axis: training
    tokens (`x="tokens"`, log-scaled for log-spaced checkpoint plans) or the step number.
    """
    rs = _with(runs, metric)
    if x not in ("step", "tokens"):
        raise MetricError(f"x must be 'step' or 'tokens', not {x!r}")
    df = pd.concat([_frame(ds[metric], k) for k, ds in rs.items()], ignore_index=True)
    ts = token_scale(df[x].to_numpy())
    parts = []
    for _, g in df.groupby("run", sort=False):
        pos = np.sort(g[x].unique())
        left, right = _cell_edges(pos, ts)
        parts.append(g.merge(pd.DataFrame({x: pos, "x0": left, "x1": right}), on=x))
    df = pd.concat(parts, ignore_index=True)
    label = SIMILARITY_METRICS.get(metric, metric)
    axis = ts["axis"] if x == "tokens" else alt.Axis(format="~s", title="checkpoint step")
    lo, hi = float(df["value"].min()), float(df["value"].max())
    # Diverging scale centred at 0 when values straddle 0 (cosines), sequential otherwise.
    scale = (
        alt.Scale(scheme="redblue", reverse=True, domainMid=0)
        if lo < 0 < hi
        else alt.Scale(scheme="viridis")
    )
    base = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=alt.X("x0:Q", scale=ts["scale"], axis=axis),
            x2="x1:Q",
            y=alt.Y("layer:O", sort="descending", title="layer (0 = embeddings)"),
            color=alt.Color("value:Q", scale=scale, title=label),
            tooltip=["run:N", "step:Q", _TIP_TOKENS, "layer:O", _tip_value(label)],
        )
        .properties(width=260, height=200)
    )
    names = list(color_domain) if color_domain is not None else list(rs)
    chart = base.facet(
        column=alt.Column("run:N", title=None, sort=names), data=_data([df])
    ).properties(title=f"{label}: layer × training")
    return _shown(chart, names)


def layer_profile(
    runs: RunsLike,
    metric: str = "hidden_cos",
    step: int | str = "final",
    *,
    color_domain: Sequence[str] | None = None,
) -> alt.LayerChart:
    """Per-layer profile at one step, runs side by side, baseline dashed, bootstrap bars."""
    rs = _with(runs, metric)
    frames = []
    for k, ds in rs.items():
        da = _pick_step(ds[metric], step, k)
        s = int(da["step"])
        f = _frame(da, k).assign(step=s)
        for extra in ("baseline", "lo", "hi"):
            if f"{metric}_{extra}" in ds:
                e = _frame(ds[f"{metric}_{extra}"].sel(step=s), k, extra)
                f = f.merge(e[["layer", extra]], on="layer", how="left")
        frames.append(f)
    label = SIMILARITY_METRICS.get(metric, metric)
    color = _color(color_domain, rs)
    x = alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
    df = pd.concat(frames, ignore_index=True)
    tip = ["run:N", "step:Q", "layer:O", _tip_value(label)]
    if "baseline" in df:
        tip.append(alt.Tooltip("baseline:Q", format=".4f", title="different-text baseline"))
    if "lo" in df and "hi" in df:
        tip += [alt.Tooltip("lo:Q", format=".4f"), alt.Tooltip("hi:Q", format=".4f")]
    layers = [
        alt.Chart()
        .mark_line(point=True)
        .encode(x=x, y=alt.Y("value:Q", title=label), color=color, tooltip=tip)
    ]
    if "baseline" in df:
        layers.append(
            alt.Chart()
            .transform_filter("isValid(datum.baseline)")
            .mark_line(strokeDash=[5, 4], opacity=0.8)
            .encode(x=x, y="baseline:Q", color=color, tooltip=tip)
        )
    if "lo" in df and "hi" in df:
        layers.append(
            alt.Chart()
            .transform_filter("isValid(datum.lo) && isValid(datum.hi)")
            .mark_rule(strokeWidth=2, opacity=0.7)
            .encode(x=x, y="lo:Q", y2="hi:Q", color=color)
        )
    when = "final checkpoint" if step == "final" else f"step {step}"
    chart = alt.layer(*layers, data=_data([df])).properties(
        title=f"{label} per layer ({when})", width=420, height=260
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


# ------------------------------------------------------------------------------ gradients


def _cell_values(x: Any, y: Any, amax: float) -> alt.Chart:
    """The value printed in each heat-map cell: light text on strong colours, dark on pale."""
    return (
        alt.Chart()
        .mark_text(fontSize=9)
        .encode(
            x=x,
            y=y,
            text=alt.Text("value:Q", format=".2f"),
            color=alt.condition(
                f"abs(datum.value) > {0.6 * amax}", alt.value("white"), alt.value("black")
            ),
        )
    )


def grad_heatmap(
    run_ds: xr.Dataset,
    step: int | str = "final",
    *,
    run: str | None = None,
    value_domain: tuple[float, float] | None = None,
) -> alt.LayerChart:
    """Tensor x layer heat-map of gradient cosine at one step, values written in the cells.

    `value_domain` fixes the colour scale (the report passes the range over all runs so
    the per-run heat-maps compare).
    """
    name = run or str(run_ds.attrs.get("run_name", "run"))
    _with({name: run_ds}, "grad_cos")
    da = _pick_step(run_ds["grad_cos"], step, name)
    s = int(da["step"])
    df = _frame(da, name)
    # Whole-block cosine last, after the individual tensors (sorted by name, as in Fig 11).
    order = sorted(t for t in df["tensor"].unique() if t != "block")
    if "block" in set(df["tensor"]):
        order.append("block")
    m = value_domain or (float(df["value"].min()), float(df["value"].max()))
    amax = max(abs(m[0]), abs(m[1]), 1e-6)
    scale = alt.Scale(scheme="redblue", reverse=True, domain=[-amax, amax])
    x = alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0))
    y = alt.Y("tensor:N", sort=order, title=None)
    rect = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=x,
            y=y,
            color=alt.Color("value:Q", scale=scale, title="grad cos"),
            tooltip=["tensor:N", "layer:O", alt.Tooltip("value:Q", format=".3f")],
        )
    )
    text = _cell_values(x, y, amax)
    n_layers = df["layer"].nunique()
    return alt.layer(rect, text, data=alt.Data(values=_records(df))).properties(
        title=f"gradient cosine L1 vs L2, {name}, step {s}",
        width=max(200, 34 * n_layers),
        height=alt.Step(18),
    )


def grad_mean_over_time(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.Chart:
    """Mean gradient cosine over tensors (not "block") and layers, against tokens."""
    rs = _with(runs, "grad_cos")
    frames = []
    for k, ds in rs.items():
        g = ds["grad_cos"]
        if "tensor" in g.dims:
            g = g.sel(tensor=[t for t in g["tensor"].values if t != "block"])
        m = g.mean(dim=[d for d in g.dims if d != "step"], skipna=True)
        frames.append(_frame(m, k))
    df = pd.concat(frames, ignore_index=True)
    chart = (
        alt.Chart(_data([df]))
        .mark_line(point=True)
        .encode(
            x=_tokens_x(df),
            y=alt.Y("value:Q", title="mean gradient cosine"),
            color=_color(color_domain, rs),
            tooltip=["run:N", "step:Q", _TIP_TOKENS, _tip_value("mean gradient cosine")],
        )
        .properties(title="mean gradient cosine over training", width=420, height=260)
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


# -------------------------------------------------------------------------------- neurons


def neuron_overlap_chart(
    runs: RunsLike, *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Active-neuron overlap per layer over training, chance level dashed."""
    rs = _with(runs, "neuron_overlap")
    frames = []
    for k, ds in rs.items():
        frames.append(_frame(ds["neuron_overlap"], k).assign(kind="overlap"))
        if "neuron_overlap_chance" in ds:
            frames.append(_frame(ds["neuron_overlap_chance"], k).assign(kind="chance"))
    df = pd.concat(frames, ignore_index=True)
    chart = (
        alt.Chart()
        .mark_line()
        .encode(
            x=_tokens_x(df),
            y=alt.Y("value:Q", title="neuron overlap"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["overlap", "chance"], range=[[1, 0], [4, 3]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=["run:N", "kind:N", "layer:O", "step:Q", _TIP_TOKENS, _tip_value()],
        )
        .properties(width=180, height=130)
    )
    names = list(color_domain) if color_domain is not None else list(rs)
    chart = chart.facet(
        facet=alt.Facet("layer:O", title="layer"), columns=4, data=_data([df])
    ).properties(title="MLP neuron overlap L1 ∩ L2 per layer")
    return _shown(chart, names)


def lang_specific_chart(
    runs: RunsLike, step: int | str = "final", *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Fraction of language-specific neurons per layer at one step, a panel per language."""
    rs = _with(runs, "lang_specific_frac")
    frames = []
    for k, ds in rs.items():
        da = _pick_step(ds["lang_specific_frac"], step, k)
        frames.append(_frame(da, k).assign(step=int(da["step"])))
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title="language-specific fraction"),
            color=_color(color_domain, rs),
            tooltip=["run:N", "language:N", "layer:O", "step:Q", _tip_value()],
        )
        .properties(width=260, height=200)
    )
    chart = chart.facet(column=alt.Column("language:N"), data=_data(frames)).properties(
        title="language-specific MLP neurons per layer"
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


# ------------------------------------------------------------------------- LM performance


def ppl_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Per-language perplexity over training (log y), MLPE dashed where stored."""
    rs = _with(runs, "ppl")
    frames = []
    for k, ds in rs.items():
        frames.append(_frame(ds["ppl"], k).assign(kind="PPL"))
        if "mlpe" in ds:
            frames.append(_frame(ds["mlpe"], k).assign(kind="MLPE"))
    df = pd.concat(frames, ignore_index=True)
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=_tokens_x(df),
            y=alt.Y("value:Q", scale=alt.Scale(type="log"), title="perplexity"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["PPL", "MLPE"], range=[[1, 0], [5, 4]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=["run:N", "language:N", "kind:N", "step:Q", _TIP_TOKENS, _tip_value()],
        )
        .properties(width=300, height=220)
    )
    chart = chart.facet(column=alt.Column("language:N"), data=_data([df])).properties(
        title="perplexity per language"
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


def teff_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Token efficiency per language over training, with the TEff = 1 rule."""
    rs = _with(runs, "teff")
    frames = []
    for k, ds in rs.items():
        frames.append(_frame(ds["teff"], k).assign(kind="TEff"))
        if "teff_control" in ds:
            frames.append(_frame(ds["teff_control"], k).assign(kind="control"))
    df = pd.concat(frames, ignore_index=True)
    line = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=_tokens_x(df),
            y=alt.Y("value:Q", title="TEff", scale=alt.Scale(zero=False)),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["TEff", "control"], range=[[1, 0], [5, 4]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=["run:N", "language:N", "kind:N", "step:Q", _TIP_TOKENS, _tip_value()],
        )
    )
    rule = alt.Chart().mark_rule(color="grey", strokeDash=[2, 2]).encode(y=alt.datum(1))
    methods = {str(ds["teff"].attrs.get("method")) for ds in rs.values()} - {"None"}
    title = "token efficiency per language" + (
        f" ({', '.join(sorted(methods))})" if methods else ""
    )
    chart = (
        alt.layer(line, rule)
        .properties(width=300, height=220)
        .facet(column=alt.Column("language:N"), data=_data([df]))
        .properties(title=title)
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


def sweep_table_from_runs(runs: RunsLike) -> pd.DataFrame | None:
    """Sweep table (run, p, language, ppl, teff, mode) from final steps of runs with a `p`."""
    rows = []
    for k, ds in _as_runs(runs).items():
        p = ds.attrs.get("p")
        if p is None or "ppl" not in ds:
            continue
        ppl = _pick_step(ds["ppl"], "final", k)
        teff = None
        if "teff" in ds and _final_step(ds["teff"]) is not None:
            teff = _pick_step(ds["teff"], "final", k)
        for lang in ppl["language"].values:
            rows.append(
                {
                    "run": k,
                    "p": float(p),
                    "language": str(lang),
                    "ppl": float(ppl.sel(language=lang)),
                    "teff": float(teff.sel(language=lang)) if teff is not None else np.nan,
                    "mode": ds.attrs.get("mode"),
                }
            )
    if len({r["run"] for r in rows}) < 2:
        return None  # one point is not a sweep
    return pd.DataFrame(rows)


def sweep_chart(table: pd.DataFrame, x: str | None = None) -> alt.HConcatChart:
    """Final PPL, TEff (and the transfer ratio) against what the sweep varies (paper Figs 1, 3).

    Every seed is a point; the line is the mean over seeds with a ±1 sd bar; dashed: MLPE on
    the perplexity panel, the update-matched control on the TEff panel.
    """
    if table is None or len(table) == 0:
        raise MissingMetric("no sweep table")
    need = {"language", "ppl"}
    if not need <= set(table.columns):
        raise MissingMetric(f"sweep table lacks {', '.join(sorted(need - set(table.columns)))}")
    x = x or sweep_axis(table)
    if x not in table:
        raise MissingMetric(f"sweep table lacks {x}")
    df = table.copy()
    df = df[df[x].notna()]
    if not len(df):
        raise MissingMetric(f"sweep table has no {x} values")
    group = "vocab" if "vocab" in df and df["vocab"].nunique(dropna=True) > 1 else None
    if group is None:
        df["vocab"] = ""
    langs = sorted(df["language"].astype(str).unique())
    color = alt.Color(
        "language:N",
        scale=alt.Scale(domain=langs, range=_LANG_PALETTE[: len(langs)] or _LANG_PALETTE),
    )
    shape = alt.Shape("vocab:N", title="vocab") if group else alt.value("circle")
    tip = [c for c in ("run:N", "seed:N") if c.split(":")[0] in df] + [
        f"{x}:{'N' if x == 'schedule' else 'Q'}",
        "language:N",
    ]
    for col, fmt in (
        ("ppl", ".2f"),
        ("mlpe", ".2f"),
        ("teff", ".3f"),
        ("teff_control", ".3f"),
        ("transfer", ".3f"),
    ):
        if col in df:
            tip.append(alt.Tooltip(f"{col}:Q", format=fmt))
    xe = _sweep_x(df, x)
    panels = [
        _seed_panel(
            xe,
            "ppl",
            "final perplexity",
            color,
            shape,
            tip,
            log=True,
            dashed="mlpe" if "mlpe" in df and df["mlpe"].notna().any() else None,
        )
    ]
    if "teff" in df and df["teff"].notna().any():
        ctrl = "teff_control" if "teff_control" in df and df["teff_control"].notna().any() else None
        panels.append(_seed_panel(xe, "teff", "TEff", color, shape, tip, dashed=ctrl, rule=1.0))
    if "transfer" in df and df["transfer"].notna().any():
        panels.append(
            _seed_panel(
                xe, "transfer", "transfer = MLTE / MLTE(control)", color, shape, tip, rule=1.0
            )
        )
    return alt.hconcat(*panels, data=_data([df])).properties(
        title=f"final perplexity and token efficiency across {_AXIS_TITLES.get(x, x)}"
    )


# ------------------------------------------------------------------------------ embeddings


def embed_freq_chart(
    runs: RunsLike,
    step: int | str = "final",
    *,
    matrices: Sequence[str] = ("input", "output"),
    color_domain: Sequence[str] | None = None,
) -> alt.FacetChart:
    """Clone-pair embedding cosine by token-frequency bin (log x), a panel per matrix."""
    rs = _with(runs, "embed_cos_by_freq")
    frames = []
    for k, ds in rs.items():
        da = _pick_step(ds["embed_cos_by_freq"], step, k)
        s = int(da["step"])
        f = _frame(da, k).assign(step=s)
        if "embed_freq_count" in ds:
            c = _frame(ds["embed_freq_count"].sel(step=s), k, "count")
            f = f.merge(
                c[["run", "matrix", "freq_bin", "count"]],
                on=["run", "matrix", "freq_bin"],
                how="left",
            )
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    df = df[df["matrix"].isin(list(matrices))]
    # Log axis: a bin starting at 0 is drawn at 1 (its upper neighbour's lower edge is >= 1).
    df["freq_bin"] = df["freq_bin"].clip(lower=1)
    tip = [
        "run:N",
        "matrix:N",
        alt.Tooltip("freq_bin:Q", format=",.0f", title="bin from"),
        _tip_value("clone-pair cosine"),
    ]
    if "count" in df:
        tip.append(alt.Tooltip("count:Q", title="tokens in bin"))
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X(
                "freq_bin:Q",
                scale=alt.Scale(type="log"),
                axis=alt.Axis(format="~s"),
                title="token training frequency (bin)",
            ),
            y=alt.Y("value:Q", title="clone-pair cosine"),
            color=_color(color_domain, rs),
            tooltip=tip,
        )
        .properties(width=300, height=220)
    )
    chart = chart.facet(
        column=alt.Column("matrix:N", title="embedding matrix"), data=_data([df])
    ).properties(title="clone-pair embedding cosine by token frequency")
    return _shown(chart, color_domain if color_domain is not None else list(rs))


def embed_cos_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Mean embedding cosine (clone pairs vs all pairs) over training, a panel per matrix."""
    rs = _with(runs, "embed_cos")
    df = pd.concat([_frame(ds["embed_cos"], k) for k, ds in rs.items()], ignore_index=True)
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=_tokens_x(df),
            y=alt.Y("value:Q", title="mean embedding cosine"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "pairing:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["clone", "all"], range=[[1, 0], [5, 4]]),
            ),
            detail="pairing:N",
            tooltip=["run:N", "matrix:N", "pairing:N", "step:Q", _TIP_TOKENS, _tip_value()],
        )
        .properties(width=300, height=220)
    )
    chart = chart.facet(
        column=alt.Column("matrix:N", title="embedding matrix"), data=_data([df])
    ).properties(title="embedding cosine over training")
    return _shown(chart, color_domain if color_domain is not None else list(rs))


# ---------------------------------------------------------------------- retrieval / probes


def retrieval_chart(
    runs: RunsLike, step: int | str = "final", *, color_domain: Sequence[str] | None = None
) -> alt.Chart:
    """Parallel-sentence retrieval accuracy per layer, both directions."""
    rs = _with(runs, "retrieval_acc")
    frames = []
    for k, ds in rs.items():
        da = _pick_step(ds["retrieval_acc"], step, k)
        frames.append(_frame(da, k).assign(step=int(da["step"])))
    chart = (
        alt.Chart(_data(frames))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title="retrieval accuracy", scale=alt.Scale(domain=[0, 1])),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "direction:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["L1->L2", "L2->L1"], range=[[1, 0], [5, 4]]),
            ),
            detail="direction:N",
            tooltip=["run:N", "direction:N", "layer:O", "step:Q", _tip_value()],
        )
        .properties(title="translation retrieval accuracy per layer", width=420, height=260)
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


def probe_chart(
    runs: RunsLike, step: int | str = "final", *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Probe accuracy per layer: cross-language transfer (solid) vs in-language (dashed)."""
    rs = _with(runs, "probe_transfer", "probe_in_language")
    frames = []
    for k, ds in rs.items():
        for var, kind in (("probe_transfer", "transfer"), ("probe_in_language", "in-language")):
            if var in ds and _final_step(ds[var]) is not None:
                da = _pick_step(ds[var], step, k)
                frames.append(_frame(da, k).assign(step=int(da["step"]), kind=kind))
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("value:Q", title="probe accuracy"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["transfer", "in-language"], range=[[1, 0], [5, 4]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=["run:N", "direction:N", "kind:N", "layer:O", _tip_value()],
        )
        .properties(width=300, height=220)
    )
    chart = chart.facet(column=alt.Column("direction:N"), data=_data(frames)).properties(
        title="probe accuracy per layer"
    )
    return _shown(chart, color_domain if color_domain is not None else list(rs))


# --------------------------------------------------------------------------------- summary


def summary_table(runs: RunsLike) -> pd.DataFrame:
    """Final-step headline numbers per run (one row per run), for the report's table."""
    rows = []
    for k, ds in _as_runs(runs).items():
        row: dict[str, Any] = {"run": k, "mode": ds.attrs.get("mode"), "p": ds.attrs.get("p")}
        if "step" in ds.coords and ds.sizes.get("step"):
            row["last step"] = int(ds["step"].values[-1])
            if "tokens" in ds.coords:
                row["tokens"] = f"{float(ds['tokens'].values[-1]):.3g}"
        for var in ("hidden_cos", "cka", "grad_cos", "neuron_overlap"):
            if var in ds and _final_step(ds[var]) is not None:
                da = _pick_step(ds[var], "final", k)
                if var == "grad_cos" and "tensor" in da.dims:
                    da = da.sel(tensor=[t for t in da["tensor"].values if t != "block"])
                if "layer" in da.dims and var != "grad_cos":
                    da = da.sel(layer=da["layer"] >= 1)  # mean over blocks, as Table 2
                row[f"mean {var}"] = round(float(da.mean(skipna=True)), 3)
        for var in ("ppl", "teff"):
            if var in ds and _final_step(ds[var]) is not None:
                da = _pick_step(ds[var], "final", k)
                for lang in da["language"].values:
                    row[f"{var} {lang}"] = round(float(da.sel(language=lang)), 3)
        if "embed_cos" in ds and _final_step(ds["embed_cos"]) is not None:
            da = _pick_step(ds["embed_cos"], "final", k)
            if "input" in da["matrix"].values and "clone" in da["pairing"].values:
                row["embed cos (input, clone)"] = round(
                    float(da.sel(matrix="input", pairing="clone")), 3
                )
        rows.append(row)
    return pd.DataFrame(rows)


def grad_heatmap_runs(
    runs: RunsLike, step: int | str = "final", *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Tensor x layer heat-map of gradient cosine at one step, a panel per run, one colour
    scale for all (values written in the cells)."""
    rs = _with(runs, "grad_cos")
    frames = []
    for k, ds in rs.items():
        da = _pick_step(ds["grad_cos"], step, k)
        frames.append(_frame(da, k).assign(step=int(da["step"])))
    df = pd.concat(frames, ignore_index=True)
    order = sorted(t for t in df["tensor"].unique() if t != "block")
    if "block" in set(df["tensor"]):
        order.append("block")
    amax = max(float(df["value"].abs().max()), 1e-6)
    scale = alt.Scale(scheme="redblue", reverse=True, domain=[-amax, amax])
    x = alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0))
    y = alt.Y("tensor:N", sort=order, title=None)
    rect = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=x,
            y=y,
            color=alt.Color("value:Q", scale=scale, title="grad cos"),
            tooltip=["run:N", "step:Q", "tensor:N", "layer:O", _tip_value("gradient cosine")],
        )
    )
    text = _cell_values(x, y, amax)
    n_layers = df["layer"].nunique()
    names = list(color_domain) if color_domain is not None else list(rs)
    chart = (
        alt.layer(rect, text)
        .properties(width=max(160, 30 * n_layers), height=alt.Step(16))
        .facet(
            facet=alt.Facet("run:N", title=None, sort=names),
            columns=3,
            data=_data([df]),
        )
        .properties(title="gradient cosine L1 vs L2 per tensor and layer (final checkpoint)")
    )
    return _shown(chart, names)


def variable_chart(
    runs: RunsLike, var: str, *, title: str | None = None, color_domain: Sequence[str] | None = None
) -> alt.TopLevelMixin:
    """Generic chart of any cube variable (e.g. a new lens_/patch_/ablation_ family).

    With a `layer` dim: the final-checkpoint value per layer; otherwise the value over
    training tokens. Other dims are averaged, except a first small one (<= 4 values), which
    gets a panel per value.
    """
    rs = _with(runs, var)
    frames = []
    panel = None
    for k, ds in rs.items():
        da = ds[var]
        if "layer" in da.dims:
            da = _pick_step(da, "final", k)
        rest = [d for d in da.dims if d not in ("step", "layer")]
        small = [d for d in rest if da.sizes[d] <= 4]
        panel = small[0] if small else None
        da = da.mean(dim=[d for d in rest if d != panel], skipna=True)
        f = _frame(da, k)
        if panel:
            f[panel] = f[panel].astype(str)
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    label = title or var
    by_layer = "layer" in df
    x = (
        alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
        if by_layer
        else _tokens_x(df)
    )
    tip = ["run:N", "step:Q", _tip_value(label)] + (["layer:O"] if by_layer else [_TIP_TOKENS])
    if panel:
        tip.append(f"{panel}:N")
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(x=x, y=alt.Y("value:Q", title=label), color=_color(color_domain, rs), tooltip=tip)
        .properties(width=300 if panel else 420, height=220)
    )
    when = " per layer (final checkpoint)" if by_layer else " over training"
    if panel:
        chart = chart.facet(column=alt.Column(f"{panel}:N"), data=_data([df]))
    else:
        chart = alt.layer(chart, data=_data([df]))
    chart = chart.properties(title=label + when)
    return _shown(chart, color_domain if color_domain is not None else list(rs))


def sweep_axis(table: pd.DataFrame) -> str:
    """The column a sweep varies: `p`, else `schedule`, else `clones` (falls back to `p`)."""
    for col in ("p", "schedule", "clones"):
        if col in table and table[col].nunique(dropna=True) > 1:
            return col
    return "p"


_AXIS_TITLES = {"p": "share p of the second language", "schedule": "sampling schedule",
                "clones": "number of clones"}  # fmt: skip


def _sweep_x(table: pd.DataFrame, x: str) -> alt.X:
    if x == "schedule" or table[x].dtype == object:
        return alt.X(f"{x}:N", title=_AXIS_TITLES.get(x, x), axis=alt.Axis(labelAngle=0))
    return alt.X(f"{x}:Q", title=_AXIS_TITLES.get(x, x), scale=alt.Scale(zero=False))


def _seed_panel(
    x: alt.X,
    field: str,
    title: str,
    color: alt.Color,
    shape: Any,
    tip: list[Any],
    *,
    log: bool = False,
    dashed: str | None = None,
    rule: float | None = None,
) -> alt.LayerChart:
    """Every seed as a point, the mean over seeds as a line with a ±1 sd bar, and optionally a
    dashed line for a control column and a grey rule."""
    scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    y = alt.Y(f"{field}:Q", scale=scale, title=title)
    base = alt.Chart().transform_filter(f"isValid(datum['{field}'])")
    layers = [
        base.mark_point(filled=True, size=45, opacity=0.8).encode(
            x=x, y=y, color=color, shape=shape, tooltip=tip
        ),
        base.mark_line(opacity=0.8).encode(
            x=x,
            y=alt.Y(f"mean({field}):Q", scale=scale, title=title),
            color=color,
            detail="vocab:N",
        ),
        base.mark_errorbar(extent="stdev", opacity=0.6).encode(
            x=x, y=alt.Y(f"{field}:Q", scale=scale, title=title), color=color, detail="vocab:N"
        ),
    ]
    if dashed:
        layers.append(
            alt.Chart()
            .transform_filter(f"isValid(datum['{dashed}'])")
            .mark_line(strokeDash=[5, 4], opacity=0.8)
            .encode(
                x=x,
                y=alt.Y(f"mean({dashed}):Q", scale=scale, title=title),
                color=color,
                detail="vocab:N",
            )
        )
    if rule is not None:
        layers.append(
            alt.Chart().mark_rule(color="grey", strokeDash=[2, 2]).encode(y=alt.datum(rule))
        )
    return alt.layer(*layers).properties(width=300, height=230)


def grid_alignment_chart(points: pd.DataFrame, x: str = "p") -> alt.FacetChart:
    """Final-checkpoint alignment measures (layer mean) against what the sweep varies: every
    seed a point, the mean over seeds a line with a ±1 sd bar, the baseline dashed.

    `points` has columns run, seed, `x`, measure, value and optionally baseline (one row per
    run and measure; see probekit.report.grid.alignment_points).
    """
    if points is None or not len(points):
        raise MissingMetric("no alignment measures in the sweep's runs")
    df = points.copy()
    xe = _sweep_x(df, x)
    y = alt.Y("value:Q", title=None, scale=alt.Scale(zero=False))
    tip = ["run:N", "seed:N", "measure:N", _tip_value()]
    if "baseline" in df:
        tip.append(alt.Tooltip("baseline:Q", format=".4f", title="different-text baseline"))
    layers = [
        alt.Chart()
        .mark_point(filled=True, size=45, color=_PALETTE[0])
        .encode(x=xe, y=y, tooltip=tip),
        alt.Chart().mark_line(color=_PALETTE[0]).encode(x=xe, y="mean(value):Q"),
        alt.Chart().mark_errorbar(extent="stdev", color=_PALETTE[0]).encode(x=xe, y="value:Q"),
    ]
    if "baseline" in df and df["baseline"].notna().any():
        layers.append(
            alt.Chart()
            .transform_filter("isValid(datum.baseline)")
            .mark_line(strokeDash=[5, 4], color="grey")
            .encode(x=xe, y="mean(baseline):Q")
        )
    return (
        alt.layer(*layers)
        .properties(width=220, height=170)
        .facet(facet=alt.Facet("measure:N", title=None), columns=4, data=_data([df]))
        .resolve_scale(y="independent")
        .properties(
            title="alignment at the final checkpoint (layers ≥ 1 averaged) across the sweep"
        )
    )

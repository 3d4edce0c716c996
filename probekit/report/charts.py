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


SIMILARITY_METRICS: dict[str, str] = {
    "hidden_cos": "hidden-state cosine",
    "hidden_cos_centred": "centred hidden-state cosine",
    "cka": "linear CKA",
    "linmap_r2": "linear-map R²",
    "procrustes_r2": "Procrustes R²",
}

# One line each: how to read the chart. Similarity charts are per metric ("{metric}" filled in).
CAPTIONS: dict[str, str] = {
    "similarity_heatmap": "Each cell is the L1-vs-L2 {metric} of parallel text at one layer "
    "(rows, 0 = embeddings) and checkpoint (columns); warmer = more shared representation. "
    "One panel per run, one colour scale for all.",
    "layer_profile": "Final-checkpoint {metric} per layer, one colour per run (the paper's "
    "Table 2 as a picture); dashed = different-text baseline, bars = bootstrap interval. "
    "Higher above the baseline = more aligned.",
    "grad_heatmap": "Cosine between the L1 and L2 gradients of each parameter tensor (rows) in "
    "each layer (columns) at one checkpoint (paper Figs 11-13); positive = the languages push "
    "the weights the same way.",
    "grad_mean_over_time": "Mean gradient cosine over tensors (except whole-block) and layers "
    "against training tokens; higher = the two languages' updates agree more.",
    "neuron_overlap_chart": "Overlap of the L1- and L2-active MLP neuron sets per layer over "
    "training; dashed = overlap expected by chance. Above chance = shared neurons.",
    "lang_specific_chart": "Final-checkpoint fraction of MLP neurons specific to one language, "
    "per layer; one panel per language. Lower = more neurons shared.",
    "ppl_chart": "Per-language perplexity against training tokens (log scale), one panel per "
    "language; dashed = monolingual perplexity equivalent (MLPE) where available. Lower = better.",
    "teff_chart": "Token efficiency (TEff) per language against training tokens; the grey rule "
    "marks TEff = 1 (as good as a monolingual model on the same tokens), dashed = control. "
    "Above 1 = the language gains from the other.",
    "sweep_chart": "Final PPL (left, log) and TEff (right) against the share p of L2 across a "
    "sweep (paper Figs 1 and 3); colour = language, lines = mean over seeds. TEff above the "
    "rule at 1 = cross-lingual gain.",
    "embed_freq_chart": "Final cosine between clone-pair embeddings by the token's training "
    "frequency (lower bin edge, log x) (paper Fig 7); higher = clone pairs share an embedding.",
    "embed_cos_chart": "Mean embedding cosine over training for clone pairs (solid) and all "
    "pairs (dashed), input and output matrices (paper Fig 6 over time).",
    "retrieval_chart": "Final-checkpoint parallel-sentence retrieval accuracy per layer; solid = "
    "L1->L2, dashed = L2->L1. Higher = representations identify translations.",
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
    return json.loads(df.to_json(orient="records", double_precision=6))


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
# No legend for dash styles: with run-coloured lines it renders as blank symbols; each
# caption says what solid and dashed mean instead.
_DASH_LEGEND = None


# ------------------------------------------------------------------------------ similarity


def similarity_heatmap(
    runs: RunsLike,
    metric: str = "hidden_cos",
    *,
    x: str = "step",
    color_domain: Sequence[str] | None = None,  # unused; kept for a uniform call signature
) -> alt.FacetChart:
    """Layer x checkpoint heat-map of a similarity metric, one panel per run."""
    rs = _with(runs, metric)
    if x not in ("step", "tokens"):
        raise MetricError(f"x must be 'step' or 'tokens', not {x!r}")
    df = pd.concat([_frame(ds[metric], k) for k, ds in rs.items()], ignore_index=True)
    label = SIMILARITY_METRICS.get(metric, metric)
    xenc = (
        alt.X("step:O", title="checkpoint step", axis=alt.Axis(labelAngle=0))
        if x == "step"
        # Ordinal with number labels: checkpoints are often log-spaced, so equal-width cells.
        else alt.X("tokens:O", title="training tokens", axis=alt.Axis(format="~s"))
    )
    lo, hi = float(df["value"].min()), float(df["value"].max())
    # Diverging scale centred at 0 when values straddle 0 (cosines), sequential otherwise.
    scale = (
        alt.Scale(scheme="redblue", reverse=True, domainMid=0)
        if lo < 0 < hi
        else alt.Scale(scheme="viridis")
    )
    base = (
        alt.Chart(alt.Data(values=_records(df)))
        .mark_rect()
        .encode(
            x=xenc,
            y=alt.Y("layer:O", sort="descending", title="layer (0 = embeddings)"),
            color=alt.Color("value:Q", scale=scale, title=label),
            tooltip=[
                "run:N",
                "step:Q",
                alt.Tooltip("tokens:Q", format="~s"),
                "layer:O",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
        .properties(width=alt.Step(14) if df["step"].nunique() > 20 else 260, height=200)
    )
    return (
        base.facet(column=alt.Column("run:N", title=None, sort=list(rs)))
        .properties(title=f"{label}: layer × checkpoint")
        .resolve_scale(x="independent")
    )


def layer_profile(
    runs: RunsLike,
    metric: str = "hidden_cos",
    step: int | str = "final",
    *,
    color_domain: Sequence[str] | None = None,
) -> alt.LayerChart:
    """Per-layer profile at one step, runs side by side, baseline dashed, bootstrap bars."""
    rs = _with(runs, metric)
    frames, base_frames, err_frames = [], [], []
    for k, ds in rs.items():
        da = _pick_step(ds[metric], step, k)
        s = int(da["step"])
        frames.append(_frame(da, k).assign(step=s))
        if f"{metric}_baseline" in ds:
            b = ds[f"{metric}_baseline"].sel(step=s)
            base_frames.append(_frame(b, k).assign(step=s))
        if f"{metric}_lo" in ds and f"{metric}_hi" in ds:
            lo = _frame(ds[f"{metric}_lo"].sel(step=s), k, "lo")
            hi = _frame(ds[f"{metric}_hi"].sel(step=s), k, "hi")
            err_frames.append(lo.merge(hi[["run", "layer", "hi"]], on=["run", "layer"]))
    label = SIMILARITY_METRICS.get(metric, metric)
    color = _color(color_domain, rs)
    x = alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
    df = pd.concat(frames, ignore_index=True)
    main = (
        alt.Chart(_data([df]))
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("value:Q", title=label),
            color=color,
            tooltip=["run:N", "step:Q", "layer:O", alt.Tooltip("value:Q", format=".3f")],
        )
    )
    layers = [main]
    if base_frames:
        layers.append(
            alt.Chart(_data(base_frames))
            .mark_line(strokeDash=[5, 4], opacity=0.8)
            .encode(
                x=x,
                y="value:Q",
                color=color,
                tooltip=[
                    "run:N",
                    "layer:O",
                    alt.Tooltip("value:Q", format=".3f", title="baseline"),
                ],
            )
        )
    if err_frames:
        layers.append(
            alt.Chart(_data(err_frames))
            .mark_rule(strokeWidth=2, opacity=0.7)
            .encode(x=x, y="lo:Q", y2="hi:Q", color=color)
        )
    when = "final checkpoint" if step == "final" else f"step {step}"
    return alt.layer(*layers).properties(title=f"{label} per layer ({when})", width=420, height=260)


# ------------------------------------------------------------------------------ gradients


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
    text = (
        alt.Chart()
        .mark_text(fontSize=9)
        .encode(
            x=x,
            y=y,
            text=alt.Text("value:Q", format=".2f"),
            # Light text on strong colours, dark on pale ones.
            color=alt.condition(
                f"abs(datum.value) > {0.6 * amax}", alt.value("white"), alt.value("black")
            ),
        )
    )
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
    return (
        alt.Chart(_data(frames))
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", axis=_TOKENS_AXIS),
            y=alt.Y("value:Q", title="mean gradient cosine"),
            color=_color(color_domain, rs),
            tooltip=["run:N", "step:Q", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(title="mean gradient cosine over training", width=420, height=260)
    )


# -------------------------------------------------------------------------------- neurons


def neuron_overlap_chart(
    runs: RunsLike, *, color_domain: Sequence[str] | None = None
) -> alt.FacetChart:
    """Active-neuron overlap per layer over training, chance level dashed."""
    rs = _with(runs, "neuron_overlap")
    frames = []
    for k, ds in rs.items():
        f = _frame(ds["neuron_overlap"], k).assign(kind="overlap")
        frames.append(f)
        if "neuron_overlap_chance" in ds:
            frames.append(_frame(ds["neuron_overlap_chance"], k).assign(kind="chance"))
    color = _color(color_domain, rs)
    chart = (
        alt.Chart()
        .mark_line()
        .encode(
            x=alt.X("tokens:Q", axis=_TOKENS_AXIS),
            y=alt.Y("value:Q", title="neuron overlap"),
            color=color,
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["overlap", "chance"], range=[[1, 0], [4, 3]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=["run:N", "kind:N", "layer:O", "step:Q", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=180, height=130)
    )
    return chart.facet(
        facet=alt.Facet("layer:O", title="layer"), columns=4, data=_data(frames)
    ).properties(title="MLP neuron overlap L1 ∩ L2 per layer")


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
            tooltip=[
                "run:N",
                "language:N",
                "layer:O",
                "step:Q",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
        .properties(width=260, height=200)
    )
    return chart.facet(column=alt.Column("language:N"), data=_data(frames)).properties(
        title="language-specific MLP neurons per layer"
    )


# ------------------------------------------------------------------------- LM performance


def ppl_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Per-language perplexity over training (log y), MLPE dashed where stored."""
    rs = _with(runs, "ppl")
    frames = []
    for k, ds in rs.items():
        frames.append(_frame(ds["ppl"], k).assign(kind="PPL"))
        if "mlpe" in ds:
            frames.append(_frame(ds["mlpe"], k).assign(kind="MLPE"))
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", axis=_TOKENS_AXIS),
            y=alt.Y("value:Q", scale=alt.Scale(type="log"), title="perplexity"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["PPL", "MLPE"], range=[[1, 0], [5, 4]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=[
                "run:N",
                "language:N",
                "kind:N",
                "step:Q",
                alt.Tooltip("value:Q", format=".2f"),
            ],
        )
        .properties(width=300, height=220)
    )
    return chart.facet(column=alt.Column("language:N"), data=_data(frames)).properties(
        title="perplexity per language"
    )


def teff_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Token efficiency per language over training, with the TEff = 1 rule."""
    rs = _with(runs, "teff")
    frames = []
    for k, ds in rs.items():
        frames.append(_frame(ds["teff"], k).assign(kind="TEff"))
        if "teff_control" in ds:
            frames.append(_frame(ds["teff_control"], k).assign(kind="control"))
    line = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", axis=_TOKENS_AXIS),
            y=alt.Y("value:Q", title="TEff", scale=alt.Scale(zero=False)),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "kind:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["TEff", "control"], range=[[1, 0], [5, 4]]),
                title=None,
            ),
            detail="kind:N",
            tooltip=[
                "run:N",
                "language:N",
                "kind:N",
                "step:Q",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
    )
    rule = alt.Chart().mark_rule(color="grey", strokeDash=[2, 2]).encode(y=alt.datum(1))
    methods = {str(ds["teff"].attrs.get("method")) for ds in rs.values()} - {"None"}
    title = "token efficiency per language" + (
        f" ({', '.join(sorted(methods))})" if methods else ""
    )
    return (
        alt.layer(line, rule)
        .properties(width=300, height=220)
        .facet(column=alt.Column("language:N"), data=_data(frames))
        .properties(title=title)
    )


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


def sweep_chart(table: pd.DataFrame) -> alt.HConcatChart:
    """Final PPL and TEff against the L2 share p across a sweep (paper Figs 1 and 3)."""
    if table is None or len(table) == 0:
        raise MissingMetric("no sweep table")
    need = {"p", "language", "ppl"}
    if not need <= set(table.columns):
        raise MissingMetric(f"sweep table lacks {', '.join(sorted(need - set(table.columns)))}")
    df = table.copy()
    # Vocabulary (disjoint / anchored) varies across some sweeps: show it as the point shape.
    group = "vocab" if "vocab" in df and df["vocab"].nunique(dropna=True) > 1 else None
    if group is None:
        df["vocab"] = ""
    langs = sorted(df["language"].astype(str).unique())
    color = alt.Color(
        "language:N",
        scale=alt.Scale(domain=langs, range=_LANG_PALETTE[: len(langs)] or _LANG_PALETTE),
    )
    data = alt.Data(values=_records(df))
    tip = ["run:N", "p:Q", "language:N", alt.Tooltip("ppl:Q", format=".2f")]
    if "teff" in df:
        tip.append(alt.Tooltip("teff:Q", format=".3f"))
    if "seed" in df:
        tip.append("seed:N")
    x = alt.X("p:Q", title="share of L2 (p)")

    def panel(field: str, title: str, log: bool) -> alt.LayerChart:
        scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
        pts = (
            alt.Chart()
            .mark_point(filled=True, size=50)
            .encode(
                x=x,
                y=alt.Y(f"{field}:Q", scale=scale, title=title),
                color=color,
                shape=alt.Shape("vocab:N", title="vocab") if group else alt.value("circle"),
                tooltip=tip,
            )
        )
        # Mean over seeds (or the single value) joined per language and vocabulary.
        line = (
            alt.Chart()
            .mark_line(opacity=0.7)
            .encode(
                x=x,
                y=f"mean({field}):Q",
                color=color,
                detail="vocab:N",
                strokeDash=alt.StrokeDash("vocab:N", legend=None) if group else alt.value([1, 0]),
            )
        )
        return alt.layer(pts, line)

    panels = [panel("ppl", "final perplexity", True)]
    if "teff" in df and df["teff"].notna().any():
        teff = panel("teff", "TEff", False)
        rule = alt.Chart().mark_rule(color="grey", strokeDash=[2, 2]).encode(y=alt.datum(1))
        panels.append(alt.layer(teff, rule))
    return alt.hconcat(
        *[p.properties(width=320, height=240) for p in panels], data=data
    ).properties(title="final PPL and TEff across the p sweep")


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
        alt.Tooltip("freq_bin:Q", format="~s", title="bin from"),
        alt.Tooltip("value:Q", format=".3f"),
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
    return chart.facet(
        column=alt.Column("matrix:N", title="embedding matrix"), data=_data([df])
    ).properties(title="clone-pair embedding cosine by token frequency")


def embed_cos_chart(runs: RunsLike, *, color_domain: Sequence[str] | None = None) -> alt.FacetChart:
    """Mean embedding cosine (clone pairs vs all pairs) over training, a panel per matrix."""
    rs = _with(runs, "embed_cos")
    frames = [_frame(ds["embed_cos"], k) for k, ds in rs.items()]
    chart = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", axis=_TOKENS_AXIS),
            y=alt.Y("value:Q", title="mean embedding cosine"),
            color=_color(color_domain, rs),
            strokeDash=alt.StrokeDash(
                "pairing:N",
                legend=_DASH_LEGEND,
                scale=alt.Scale(domain=["clone", "all"], range=[[1, 0], [5, 4]]),
            ),
            detail="pairing:N",
            tooltip=[
                "run:N",
                "matrix:N",
                "pairing:N",
                "step:Q",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
        .properties(width=300, height=220)
    )
    return chart.facet(
        column=alt.Column("matrix:N", title="embedding matrix"), data=_data(frames)
    ).properties(title="embedding cosine over training")


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
    return (
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
            tooltip=[
                "run:N",
                "direction:N",
                "layer:O",
                "step:Q",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
        .properties(title="translation retrieval accuracy per layer", width=420, height=260)
    )


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
            tooltip=[
                "run:N",
                "direction:N",
                "kind:N",
                "layer:O",
                alt.Tooltip("value:Q", format=".3f"),
            ],
        )
        .properties(width=300, height=220)
    )
    return chart.facet(column=alt.Column("direction:N"), data=_data(frames)).properties(
        title="probe accuracy per layer"
    )


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

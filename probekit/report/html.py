"""Write the report: one self-contained HTML page, a PNG per chart, and report.json.

The page inlines ONE copy of the Vega / Vega-Lite / vega-embed bundle (from vl-convert, so no
network and no CDN) and embeds every chart's spec as a JSON script block; a small loader calls
vegaEmbed for each. This keeps the page usable offline and as a CI artifact.
"""

from __future__ import annotations

import datetime as _dt
import functools
import html
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import vl_convert as vlc
import xarray as xr

from probekit.errors import MetricError, ProbekitError
from probekit.report import charts as C

# Every variable a cube may carry that the report knows how to draw (or summarise).
METRIC_VARS = (
    *C.SIMILARITY_METRICS,
    "retrieval_acc",
    "grad_cos",
    "neuron_overlap",
    "lang_specific_frac",
    "neuron_act_prob",
    "embed_cos",
    "embed_cos_by_freq",
    "ppl",
    "ppl_char",
    "teff",
    "mlte",
    "mlpe",
    "teff_control",
    "probe_transfer",
    "probe_in_language",
)

# Which `probekit` command fills a missing variable (for the skip notes).
# `probekit align --metrics` takes metric or family names (see the CLI help).
_FIX = {
    "ppl": "probekit eval RUN_DIR",
    "teff": "probekit teff RUN_DIR --reference MONO_RUN",
    "neuron_overlap": "probekit align RUN_DIR --metrics neurons",
    "lang_specific_frac": "probekit align RUN_DIR --metrics neurons",
    "embed_cos_by_freq": "probekit align RUN_DIR --metrics embeddings",
    "probe_transfer": "probekit align RUN_DIR --metrics probes",
}


def _fix(var: str) -> str:
    return _FIX.get(var, f"probekit align RUN_DIR --metrics {var}")


@dataclass
class Rendered:
    """One chart of the report."""

    name: str
    chart: alt.TopLevelMixin
    caption: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    name: str
    reason: str


def _vl_version() -> str:
    # vl-convert must bundle the Vega-Lite version the installed Altair writes specs for.
    try:
        from altair.utils._importers import vl_version_for_vl_convert

        return vl_version_for_vl_convert()
    except Exception:  # private helper moved: derive it from the schema version
        major, minor = alt.SCHEMA_VERSION.lstrip("v").split(".")[:2]
        return f"v{major}_{minor}"


@functools.lru_cache(maxsize=2)
def _js_bundle(vl_version: str) -> str:
    return vlc.javascript_bundle(vl_version=vl_version)


def _spec(chart: alt.TopLevelMixin) -> dict[str, Any]:
    spec = chart.to_dict()
    # The $schema URL is only a label, but keep the page free of http(s) URLs in our scripts.
    spec.pop("$schema", None)
    return spec


def _json_for_script(obj: Any) -> str:
    # Escape <, >, & so no value can close the <script> block early; still valid JSON.
    s = json.dumps(obj, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _partial_notes(runs: Mapping[str, xr.Dataset], *vars_: str) -> list[str]:
    want = " or ".join(vars_)
    return [
        f"skipped: run {r} has no {want} — run `{_fix(vars_[0]).replace('RUN_DIR', r)}`"
        for r in C.missing_runs(runs, *vars_)
    ]


def build_charts(
    runs: Mapping[str, xr.Dataset], sweep_table: pd.DataFrame | None = None
) -> tuple[list[Rendered], list[Skipped]]:
    """Every chart the runs allow, plus what was skipped and why (no files written)."""
    names = list(runs)
    out: list[Rendered] = []
    skipped: list[Skipped] = []

    def add(
        name: str, vars_: tuple[str, ...], make: Callable[[], alt.TopLevelMixin], caption: str
    ) -> None:
        try:
            chart = make()
        except C.MissingMetric:
            skipped.append(
                Skipped(
                    name,
                    "; ".join(_partial_notes(runs, *vars_))
                    or f"skipped: no run has {' or '.join(vars_)}",
                )
            )
            return
        except MetricError as e:  # e.g. a variable present but all-NaN
            skipped.append(Skipped(name, f"skipped: {e}"))
            return
        out.append(Rendered(name, chart, caption, _partial_notes(runs, *vars_)))

    def add_runs_chart(name: str, *vars_: str) -> None:
        """A chart of every run drawn by the charts function of the same name."""
        add(name, vars_, lambda: getattr(C, name)(runs, color_domain=names), C.CAPTIONS[name])

    for metric, label in C.SIMILARITY_METRICS.items():
        add(
            f"similarity_heatmap_{metric}",
            (metric,),
            lambda m=metric: C.similarity_heatmap(runs, m, x="step"),
            C.CAPTIONS["similarity_heatmap"].format(metric=label),
        )
        add(
            f"layer_profile_{metric}",
            (metric,),
            lambda m=metric: C.layer_profile(runs, m, color_domain=names),
            C.CAPTIONS["layer_profile"].format(metric=label),
        )

    # Gradient heat-maps: one per run, on one colour scale so runs compare.
    grad_runs = {k: ds for k, ds in runs.items() if "grad_cos" in ds}
    if grad_runs:
        vals = [float(ds["grad_cos"].min()) for ds in grad_runs.values()] + [
            float(ds["grad_cos"].max()) for ds in grad_runs.values()
        ]
        dom = (min(vals), max(vals))
        for k, ds in grad_runs.items():
            add(
                f"grad_heatmap_{k}",
                ("grad_cos",),
                lambda k=k, ds=ds: C.grad_heatmap(ds, run=k, value_domain=dom),
                C.CAPTIONS["grad_heatmap"],
            )
        # The per-run charts carry no note about other runs; the mean chart below does.
        for r in out:
            if r.name.startswith("grad_heatmap_"):
                r.notes = []
    else:
        add(
            "grad_heatmap",
            ("grad_cos",),
            lambda: C.grad_heatmap(next(iter(runs.values()))),
            C.CAPTIONS["grad_heatmap"],
        )
    add_runs_chart("grad_mean_over_time", "grad_cos")
    add_runs_chart("neuron_overlap_chart", "neuron_overlap")
    add_runs_chart("lang_specific_chart", "lang_specific_frac")
    add_runs_chart("ppl_chart", "ppl")
    add_runs_chart("teff_chart", "teff")
    table = sweep_table if sweep_table is not None else C.sweep_table_from_runs(runs)
    try:
        out.append(Rendered("sweep_chart", C.sweep_chart(table), C.CAPTIONS["sweep_chart"]))
    except C.MissingMetric as e:
        skipped.append(
            Skipped(
                "sweep_chart",
                f"skipped: {e} (pass sweep_table=, or give "
                "two or more runs with a `p` attribute and ppl)",
            )
        )
    add_runs_chart("embed_cos_chart", "embed_cos")
    add_runs_chart("embed_freq_chart", "embed_cos_by_freq")
    add_runs_chart("retrieval_chart", "retrieval_acc")
    add_runs_chart("probe_chart", "probe_transfer", "probe_in_language")
    return out, skipped


def _check_runs(runs: Mapping[str, xr.Dataset]) -> None:
    if not runs:
        raise ProbekitError(
            "no runs given, so no analysis cube; run `probekit align RUN_DIR` first"
        )
    for name, ds in runs.items():
        if not isinstance(ds, xr.Dataset) or not any(v in ds.data_vars for v in METRIC_VARS):
            raise ProbekitError(
                f"run {name} has no analysis cube; run `probekit align RUN_DIR` first"
            )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta{color:#666;font-size:.9em}
section.chart{margin:2.2em 0;border-top:1px solid #ddd;padding-top:1em}
p.caption{color:#444;max-width:70em} p.note,li.skip{color:#a15c00}
table.summary{border-collapse:collapse;font-size:.88em}
table.summary td,table.summary th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
table.summary th{background:#f3f3f3}
a.png{font-size:.85em}
"""

_LOADER = """
document.querySelectorAll('script.chart-spec').forEach(function (el) {
  var target = document.getElementById(el.dataset.target);
  var spec = JSON.parse(el.textContent);
  vegaEmbed(target, spec, {mode: 'vega-lite', renderer: 'svg', actions: false})
    .catch(function (err) {
      console.error('chart ' + el.dataset.target + ' failed: ' + err);
      target.textContent = 'chart failed to render: ' + err;
    });
});
"""


def _page(
    title: str,
    rendered: list[Rendered],
    skipped: list[Skipped],
    summary: pd.DataFrame,
    runs: Mapping[str, xr.Dataset],
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        # One inlined copy of vega + vega-lite + vega-embed for all charts.
        f'<script id="vega-bundle">{_js_bundle(_vl_version())}</script>',
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s): {e(", ".join(runs))} · generated '
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
        "<h2>Summary (final step per run)</h2>",
        summary.to_html(index=False, classes="summary", na_rep="–", border=0),
    ]
    if skipped:
        parts.append("<h2>Skipped charts</h2><ul>")
        parts += [f'<li class="skip"><b>{e(s.name)}</b>: {e(s.reason)}</li>' for s in skipped]
        parts.append("</ul>")
    parts.append("<h2>Contents</h2><ul>")
    parts += [f'<li><a href="#sec-{e(r.name)}">{e(r.name)}</a></li>' for r in rendered]
    parts.append("</ul>")
    for r in rendered:
        div = f"chart-{r.name}"
        parts.append(f'<section class="chart" id="sec-{e(r.name)}"><h3>{e(r.name)}</h3>')
        parts.append(f'<p class="caption">{e(r.caption)}</p>')
        parts += [f'<p class="note">{e(n)}</p>' for n in r.notes]
        parts.append(f'<div class="probekit-chart" id="{e(div)}"></div>')
        parts.append(f'<a class="png" href="{e(r.name)}.png">PNG</a>')
        parts.append(
            f'<script type="application/json" class="chart-spec" '
            f'data-target="{e(div)}">{_json_for_script(_spec(r.chart))}</script>'
        )
        parts.append("</section>")
    parts.append(f"<script>{_LOADER}</script></body></html>")
    return "\n".join(parts)


def write_report(
    runs: Mapping[str, xr.Dataset],
    out: Path,
    sweep_table: pd.DataFrame | None = None,
    title: str = "probekit report",
    *,
    png: bool = True,
) -> Path:
    """Write out/index.html, out/<chart>.png and out/report.json; return the index path."""
    _check_runs(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ProbekitError(f"cannot write report to {out}: {err.strerror or err}") from None
    rendered, skipped = build_charts(runs, sweep_table)
    vl = _vl_version()
    entries = []
    try:
        for r in rendered:
            spec = _spec(r.chart)
            if png:
                (out / f"{r.name}.png").write_bytes(
                    vlc.vegalite_to_png(spec, vl_version=vl, scale=2)
                )
            entries.append(
                {
                    "name": r.name,
                    "title": _title(spec),
                    "caption": r.caption,
                    "png": f"{r.name}.png" if png else None,
                    "n_rows": C.n_rows(r.chart),
                    "notes": r.notes,
                }
            )
        report = {
            "title": title,
            "generated": _dt.datetime.now().isoformat(timespec="seconds"),
            "runs": {
                k: {
                    "p": ds.attrs.get("p"),
                    "mode": ds.attrs.get("mode"),
                    "variables": sorted(str(v) for v in ds.data_vars),
                }
                for k, ds in runs.items()
            },
            "charts": entries,
            "skipped": [{"chart": s.name, "reason": s.reason} for s in skipped],
        }
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        index = out / "index.html"
        index.write_text(
            _page(title, rendered, skipped, C.summary_table(runs), runs), encoding="utf-8"
        )
    except OSError as err:
        raise ProbekitError(f"cannot write report to {out}: {err.strerror or err}") from None
    return index


def _title(spec: dict[str, Any]) -> str:
    t = spec.get("title")
    if isinstance(t, dict):
        t = t.get("text")
    return str(t) if t is not None else ""

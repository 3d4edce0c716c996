"""Write the report: one self-contained HTML page, a PNG per chart, and report.json.

The page opens with what the runs found (probekit.report.findings), then one section per
question (probekit.report.catalog.QUESTIONS), each with the charts whose variables the cubes
have, then the charts no cube could fill with the command that fills them.

It inlines ONE copy of the Vega / Vega-Lite / vega-embed bundle (from vl-convert: no network,
no CDN) and ONE JSON block of chart data: each dataset is stored once, column-wise, and the
chart specs name it instead of carrying it. A small loader rebuilds the rows and calls
vegaEmbed per chart; one set of run check-boxes sets every chart's `shown` parameter.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import html
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import vl_convert as vlc
import xarray as xr

from probekit.errors import MetricError, ProbekitError
from probekit.report import charts as C
from probekit.report import findings as F
from probekit.report.calibration_charts import CAPTION as CALIBRATION_CAPTION
from probekit.report.calibration_charts import TITLE as CALIBRATION_TITLE
from probekit.report.calibration_charts import calibration_chart
from probekit.report.catalog import (
    QUESTIONS,
    VARIABLES,
    fix_command,
    is_bookkeeping,
    is_companion,
    question_of,
    title_of,
)

# Every variable a cube may carry that the report knows how to draw (or summarise).
METRIC_VARS = tuple(VARIABLES)

PNG_SCALE = 1  # 1x keeps the demo's page and PNGs under 1.5 MB; pass png_scale=2 for print


def shrink_png(png: bytes) -> bytes:
    """The same image, smaller: vl-convert writes RGBA with fast zlib settings; this drops an
    all-opaque alpha channel, picks the better of the none/up row filters and compresses at
    level 9 (lossless; typically 4-5x smaller). Anything unexpected is returned unchanged."""
    try:
        if png[:8] != b"\x89PNG\r\n\x1a\n":
            return png
        chunks, i = [], 8
        while i < len(png):
            (n,) = struct.unpack(">I", png[i : i + 4])
            chunks.append((png[i + 4 : i + 8], png[i + 8 : i + 8 + n]))
            i += 12 + n
        w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
        if depth != 8 or ctype != 6 or interlace != 0:
            return png
        raw = np.frombuffer(
            zlib.decompress(b"".join(d for t, d in chunks if t == b"IDAT")), np.uint8
        )
        rows = raw.reshape(h, w * 4 + 1)
        img = np.empty((h, w * 4), np.uint8)
        prev = np.zeros(w * 4, np.uint8)
        for r in range(h):
            f, line = rows[r, 0], rows[r, 1:]
            if f == 0:
                img[r] = line
            elif f == 1:
                img[r] = np.cumsum(line.reshape(w, 4), axis=0, dtype=np.uint32).reshape(-1)
            elif f == 2:
                img[r] = line + prev
            else:  # average / Paeth: not worth decoding here
                return png
            prev = img[r]
        px = img.reshape(h, w, 4)
        if (px[..., 3] == 255).all():
            px, ctype = px[..., :3], 2
        c = px.shape[2]
        best = b""
        for ft in (0, 2):  # sub (1) never won on charts
            data = px if ft == 0 else np.diff(px, axis=0, prepend=0)
            body = np.concatenate(
                [np.full((h, 1), ft, np.uint8), data.astype(np.uint8).reshape(h, w * c)], axis=1
            )
            z = zlib.compress(body.tobytes(), 9)
            best = z if not best or len(z) < len(best) else best

        def chunk(t: bytes, d: bytes) -> bytes:
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        head = struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0)
        out = png[:8] + chunk(b"IHDR", head) + chunk(b"IDAT", best) + chunk(b"IEND", b"")
        return out if len(out) < len(png) else png
    except (ValueError, zlib.error, struct.error, IndexError):
        return png


@dataclass
class Rendered:
    """One chart of the report."""

    name: str
    chart: alt.TopLevelMixin
    caption: str
    notes: list[str] = field(default_factory=list)
    question: str = "other"
    title: str = ""


@dataclass
class Skipped:
    name: str
    reason: str
    question: str = "other"
    title: str = ""


@dataclass
class GridInfo:
    """What a sweep page adds: the sweep table, its axis, and per-run alignment points."""

    table: pd.DataFrame
    x: str
    points: pd.DataFrame


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
    s = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def externalise_data(spec: dict[str, Any], store: dict[str, Any]) -> dict[str, Any]:
    """Move every inline `data.values` of a spec into `store` (one entry per distinct data
    set, column-wise) and leave `{"name": id}` in its place; returns the spec."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and isinstance(data.get("values"), list):
                rows = data["values"]
                text = json.dumps(rows, sort_keys=True, separators=(",", ":"))
                key = "d" + hashlib.sha1(text.encode()).hexdigest()[:12]
                store.setdefault(key, _columns(rows))
                node["data"] = {"name": key}
            for k, v in node.items():
                if k != "data":
                    walk(v)
        elif isinstance(node, list):
            for x in node:
                walk(x)

    walk(spec)
    return spec


def _partial_notes(runs: Mapping[str, xr.Dataset], *vars_: str) -> list[str]:
    want = " or ".join(vars_)
    return [
        f"not drawn for run {r}: it has no {want} — run `{fix_command(vars_[0], r)}`"
        for r in C.missing_runs(runs, *vars_)
    ]


def _extra_vars(runs: Mapping[str, xr.Dataset]) -> list[str]:
    """Variables drawn with the generic chart, in first-seen order: those of the lens /
    patching / ablation question (it has no dedicated chart yet), listed or found by prefix,
    and those of any other registered family the report has no question for."""
    seen: dict[str, None] = {}
    for ds in runs.values():
        for v in map(str, ds.data_vars):
            drawn = question_of(v) in ("layers", "other") and not is_companion(v)
            if drawn and not is_bookkeeping(v):  # bookkeeping stays in the cube
                seen[v] = None
    return list(seen)


def build_charts(
    runs: Mapping[str, xr.Dataset],
    sweep_table: pd.DataFrame | None = None,
    grid: GridInfo | None = None,
) -> tuple[list[Rendered], list[Skipped]]:
    """Every chart the runs allow, in page order, plus what was skipped and why."""
    names = list(runs)
    out: list[Rendered] = []
    skipped: list[Skipped] = []

    def add(
        name: str,
        vars_: tuple[str, ...],
        make: Callable[[], alt.TopLevelMixin],
        caption: str,
        title: str,
        notes: bool = True,
    ) -> None:
        q = question_of(vars_[0]) or "other"
        try:
            chart = make()
        except C.MissingMetric:
            reason = "; ".join(_partial_notes(runs, *vars_)) or f"no run has {' or '.join(vars_)}"
            skipped.append(Skipped(name, reason, q, title))
            return
        except MetricError as e:  # e.g. a variable present but all-NaN
            skipped.append(Skipped(name, str(e), q, title))
            return
        out.append(
            Rendered(name, chart, caption, _partial_notes(runs, *vars_) if notes else [], q, title)
        )

    def runs_chart(name: str, title: str, *vars_: str) -> None:
        """A chart of every run drawn by the charts function of the same name."""
        add(
            name, vars_, lambda: getattr(C, name)(runs, color_domain=names), C.CAPTIONS[name], title
        )

    # Does the rare language gain?
    if grid is not None:
        add(
            "sweep_chart",
            ("ppl",),
            lambda: C.sweep_chart(grid.table, x=grid.x),
            C.CAPTIONS["sweep_chart"],
            f"Perplexity and TEff across the sweep ({grid.x})",
            notes=False,
        )
    runs_chart("teff_chart", "Token efficiency over training", "teff")
    runs_chart("ppl_chart", "Perplexity over training", "ppl")
    if grid is None:
        table = sweep_table if sweep_table is not None else C.sweep_table_from_runs(runs)
        try:
            chart = C.sweep_chart(table)
            out.append(
                Rendered(
                    "sweep_chart",
                    chart,
                    C.CAPTIONS["sweep_chart"],
                    question="gain",
                    title="Perplexity and TEff across the runs' share p",
                )
            )
        except C.MissingMetric as e:
            skipped.append(
                Skipped(
                    "sweep_chart",
                    f"{e}: pass the sweep's teff.csv (`--sweep-table`), report the sweep folder "
                    "itself, or give two or more runs with a `p` and ppl",
                    "gain",
                    "Perplexity and TEff across the runs' share p",
                )
            )

    # Are the representations shared?
    if grid is not None:
        add(
            "grid_alignment_chart",
            ALIGN_VARS,
            lambda: C.grid_alignment_chart(grid.points, x=grid.x),
            C.CAPTIONS["grid_alignment_chart"],
            f"Alignment across the sweep ({grid.x})",
            notes=False,
        )
    for metric in C.SIMILARITY_METRICS:
        label = title_of(metric)
        add(
            f"layer_profile_{metric}",
            (metric,),
            lambda m=metric: C.layer_profile(runs, m, color_domain=names),
            C.CAPTIONS["layer_profile"].format(metric=label),
            f"{label[0].upper()}{label[1:]} per layer at the end of training",
        )
        add(
            f"similarity_heatmap_{metric}",
            (metric,),
            lambda m=metric: C.similarity_heatmap(runs, m, color_domain=names),
            C.CAPTIONS["similarity_heatmap"].format(metric=label),
            f"{label[0].upper()}{label[1:]} over training, layer by layer",
        )
    runs_chart("retrieval_chart", "Finding the translation by nearest neighbour", "retrieval_acc")
    if any("cal_score" in ds.data_vars for ds in runs.values()):  # computed only when named
        add(
            "calibration_chart",
            ("cal_score",),
            lambda: calibration_chart(runs, color_domain=names),
            CALIBRATION_CAPTION,
            CALIBRATION_TITLE,
        )
    runs_chart(
        "probe_chart", "Probes trained in one language, tested in the other", "probe_transfer",
        "probe_in_language",
    )  # fmt: skip

    # Is the machinery shared?
    runs_chart("neuron_overlap_chart", "Shared MLP neurons over training", "neuron_overlap")
    runs_chart("lang_specific_chart", "Language-specific neurons per layer", "lang_specific_frac")
    runs_chart("grad_mean_over_time", "Do the two languages' updates agree?", "grad_cos")
    add(
        "grad_heatmap",
        ("grad_cos",),
        lambda: C.grad_heatmap_runs(runs, color_domain=names),
        C.CAPTIONS["grad_heatmap"],
        "Gradient agreement per tensor and layer at the end of training",
        notes=False,  # the mean chart above carries the note about runs without grad_cos
    )
    runs_chart("embed_cos_chart", "Is a token embedded like its clone?", "embed_cos")
    runs_chart("embed_freq_chart", "Clone embeddings by token frequency", "embed_cos_by_freq")

    # The tuned lens beside the logit lens (probekit.report.lens_charts)
    from probekit.report import lens_charts

    for fn, vars_, title in (
        ("lens_layers_chart", ("tuned_kl",), "Logit vs tuned lens per layer"),
        ("latent_layer_chart", ("tuned_latent_layer",), "Latent-language layer over training"),
    ):
        if any(vars_[0] in ds.data_vars for ds in runs.values()):  # computed only when named
            add(
                fn,
                vars_,
                lambda f=fn: getattr(lens_charts, f)(runs),
                lens_charts.CAPTIONS[fn],
                title,
            )
    # Which features does each language use? (the features family's own charts)
    from probekit.report import feature_charts

    feature_charts.add_charts(add, runs, names)

    # Later questions (lens, patching, ablation): whatever variables of those families exist.
    for var in _extra_vars(runs):
        add(
            f"variable_{var}",
            (var,),
            lambda v=var: C.variable_chart(runs, v, title=title_of(v), color_domain=names),
            f"{title_of(var)}: one line per run.",
            title_of(var)[0].upper() + title_of(var)[1:],
        )
    return out, skipped


ALIGN_VARS = ("hidden_cos", "cka", "linmap_r2")


def _check_runs(runs: Mapping[str, xr.Dataset]) -> None:
    if not runs:
        raise ProbekitError(
            "no runs given, so no analysis cube; run `probekit align RUN_DIR` first"
        )
    for name, ds in runs.items():
        ok = isinstance(ds, xr.Dataset) and any(
            question_of(str(v)) is not None for v in ds.data_vars
        )
        if not ok:
            raise ProbekitError(
                f"run {name} has no analysis cube; run `probekit align RUN_DIR` first"
            )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.1em} .meta{color:#666;font-size:.9em;margin-top:0}
h2{margin-top:1.8em;border-bottom:2px solid #ddd;padding-bottom:.2em}
p.read{color:#333;background:#f6f8fa;border-left:4px solid #4e79a7;padding:.5em .8em;
max-width:75em}
section.chart{margin:1.6em 0 2.2em} section.chart h3{margin-bottom:.2em}
p.caption{color:#444;max-width:75em;margin-top:.2em} p.note,li.skip{color:#a15c00}
span.id{color:#999;font-size:.75em;font-weight:normal;margin-left:.6em}
table.findings,table.summary{border-collapse:collapse;font-size:.88em;margin:.6em 0}
table.findings td,table.findings th,table.summary td,table.summary th{border:1px solid #ccc;
padding:.3em .6em;text-align:right} table.findings td:first-child,
table.findings td:nth-child(2){text-align:left}
table.findings th,table.summary th{background:#f3f3f3}
ol.sentences li{margin:.35em 0;max-width:75em}
#run-select{position:sticky;top:0;background:#fff;padding:.4em 0;z-index:5;
border-bottom:1px solid #eee;font-size:.9em}
#run-select label{margin-right:1em;white-space:nowrap}
#run-select .sw{display:inline-block;width:.8em;height:.8em;margin:0 .25em;border-radius:2px}
ul.toc{columns:2;font-size:.92em} a.png{font-size:.85em}
"""

_LOADER = """
(function () {
  var DATA = JSON.parse(document.getElementById('chart-data').textContent);
  var rows = {};
  function records(key) {
    if (rows[key]) return rows[key];
    var cols = DATA[key], names = Object.keys(cols), n = names.length ? cols[names[0]].length : 0;
    var out = new Array(n);
    for (var i = 0; i < n; i++) {
      var r = {};
      for (var j = 0; j < names.length; j++) r[names[j]] = cols[names[j]][i];
      out[i] = r;
    }
    return (rows[key] = out);
  }
  function used(node, acc) {
    if (Array.isArray(node)) { node.forEach(function (x) { used(x, acc); }); }
    else if (node && typeof node === 'object') {
      if (node.data && typeof node.data.name === 'string' && DATA[node.data.name]) {
        acc[node.data.name] = true;
      }
      Object.keys(node).forEach(function (k) { used(node[k], acc); });
    }
    return acc;
  }
  var views = [];
  document.querySelectorAll('script.chart-spec').forEach(function (el) {
    var target = document.getElementById(el.dataset.target);
    var spec = JSON.parse(el.textContent);
    spec.datasets = {};
    Object.keys(used(spec, {})).forEach(function (k) { spec.datasets[k] = records(k); });
    vegaEmbed(target, spec, {mode: 'vega-lite', renderer: 'svg', actions: false})
      .then(function (res) { views.push(res.view); })
      .catch(function (err) {
        console.error('chart ' + el.dataset.target + ' failed: ' + err);
        target.textContent = 'chart failed to render: ' + err;
      });
  });
  var boxes = document.querySelectorAll('#run-select input');
  boxes.forEach(function (box) {
    box.addEventListener('change', function () {
      var shown = Array.from(boxes).filter(function (b) { return b.checked; })
        .map(function (b) { return b.value; });
      views.forEach(function (view) {
        var has = true;
        try { view.signal('shown'); } catch (e) { has = false; }
        if (has) view.signal('shown', shown).runAsync();
      });
    });
  });
})();
"""


def _findings_html(groups: list[F.Group], rows: list[F.Finding]) -> list[str]:
    e = html.escape
    if not rows:
        return [
            "<p>No measure with a control is stored yet: run `probekit eval` and "
            "`probekit align` on the runs.</p>"
        ]
    table = F.findings_table(groups, rows)
    parts = [
        '<table class="findings"><thead><tr>'
        + "".join(f"<th>{e(str(c))}</th>" for c in table.columns)
        + "</tr></thead><tbody>"
    ]
    for _, r in table.iterrows():
        parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r.values) + "</tr>")
    parts.append("</tbody></table>")
    parts.append(
        '<p class="caption">Each cell: value at the final checkpoint (mean over layers ≥ 1 and '
        "over the group's runs), its control in parentheses (for TEff: control TEff; transfer "
        "ratio), and the bootstrap interval in brackets where stored (per-layer bounds "
        "averaged). Groups are ordered from the smallest share of the rarer language to the "
        "largest.</p>"
    )
    parts.append('<ol class="sentences">')
    parts += [f"<li><b>{e(f.measure)}.</b> {e(f.sentence)}</li>" for f in rows]
    parts.append("</ol>")
    return parts


def _page(
    title: str,
    rendered: list[Rendered],
    skipped: list[Skipped],
    summary: pd.DataFrame,
    runs: Mapping[str, xr.Dataset],
    groups: list[F.Group],
    found: list[F.Finding],
    subtitle: str = "",
) -> tuple[str, dict[str, Any]]:
    e = html.escape
    store: dict[str, Any] = {}
    specs = {r.name: externalise_data(_spec(r.chart), store) for r in rendered}
    names = list(runs)
    scale = C.run_color_scale(names)
    colours = dict(zip(scale.domain, scale.range, strict=True))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        # One inlined copy of vega + vega-lite + vega-embed for all charts.
        f'<script id="vega-bundle">{_js_bundle(_vl_version())}</script>',
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{e(subtitle + " · ") if subtitle else ""}{len(runs)} run(s): '
        f"{e(', '.join(runs))} · generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
    ]
    if len(names) > 1:
        parts.append('<div id="run-select">Show runs: ')
        for n in names:
            parts.append(
                f'<label><input type="checkbox" value="{e(n)}" checked>'
                f'<span class="sw" style="background:{colours[n]}"></span>{e(n)}</label>'
            )
        parts.append("</div>")
    parts.append('<h2 id="findings">What the runs show</h2>')
    parts += _findings_html(groups, found)
    by_q: dict[str, list[Rendered]] = {}
    for r in rendered:
        by_q.setdefault(r.question, []).append(r)
    order = [q for q in QUESTIONS if q in by_q] + [q for q in by_q if q not in QUESTIONS]
    parts.append('<h2>Contents</h2><ul class="toc">')
    parts.append('<li><a href="#findings">What the runs show</a></li>')
    for q in order:
        qt = QUESTIONS.get(q, {"title": q})["title"]
        parts.append(f'<li><a href="#q-{e(q)}">{e(qt)}</a><ul>')
        parts += [
            f'<li><a href="#sec-{e(r.name)}">{e(r.title or r.name)}</a></li>' for r in by_q[q]
        ]
        parts.append("</ul></li>")
    if skipped:
        parts.append('<li><a href="#not-drawn">Charts these runs cannot fill</a></li>')
    parts.append("</ul>")
    for q in order:
        info = QUESTIONS.get(q, {"title": q, "read": ""})
        parts.append(f'<h2 id="q-{e(q)}">{e(info["title"])}</h2>')
        if info.get("read"):
            parts.append(f'<p class="read"><b>How to read this:</b> {e(info["read"])}</p>')
        for r in by_q[q]:
            div = f"chart-{r.name}"
            parts.append(
                f'<section class="chart" id="sec-{e(r.name)}"><h3>{e(r.title or r.name)}</h3>'
            )
            parts.append(f'<p class="caption">{e(r.caption)}</p>')
            parts += [f'<p class="note">{e(n)}</p>' for n in r.notes]
            parts.append(f'<div class="probekit-chart" id="{e(div)}"></div>')
            parts.append(f'<a class="png" href="{e(r.name)}.png">PNG</a>')
            parts.append(
                f'<script type="application/json" class="chart-spec" '
                f'data-target="{e(div)}">{_json_for_script(specs[r.name])}</script>'
            )
            parts.append("</section>")
    if skipped:
        parts.append('<h2 id="not-drawn">Charts these runs cannot fill</h2><ul>')
        parts += [
            f'<li class="skip"><b>{e(s.title or s.name)}</b>: {e(s.reason)}</li>' for s in skipped
        ]
        parts.append("</ul>")
    parts.append("<h2>Final-step numbers per run</h2>")
    parts.append(summary.to_html(index=False, classes="summary", na_rep="–", border=0))
    parts.append(
        f'<script type="application/json" id="chart-data">{_json_for_script(store)}</script>'
    )
    parts.append(f"<script>{_LOADER}</script></body></html>")
    return "\n".join(parts), specs


def write_report(
    runs: Mapping[str, xr.Dataset],
    out: Path,
    sweep_table: pd.DataFrame | None = None,
    title: str = "probekit report",
    *,
    png: bool = True,
    png_scale: float = PNG_SCALE,
    grid: GridInfo | None = None,
    subtitle: str = "",
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
    rendered, skipped = build_charts(runs, sweep_table, grid)
    table = grid.table if grid is not None else sweep_table
    groups, found = F.compute_findings(runs, table)
    vl = _vl_version()
    entries = []
    try:
        for r in rendered:
            spec = _spec(r.chart)
            if png:
                (out / f"{r.name}.png").write_bytes(
                    shrink_png(vlc.vegalite_to_png(spec, vl_version=vl, scale=png_scale))
                )
            entries.append(
                {
                    "name": r.name,
                    "title": _title(spec),
                    "heading": r.title,
                    "question": r.question,
                    "caption": r.caption,
                    "png": f"{r.name}.png" if png else None,
                    "n_rows": C.n_rows(r.chart),
                    "notes": r.notes,
                }
            )
        page, _ = _page(
            title, rendered, skipped, C.summary_table(runs), runs, groups, found, subtitle
        )
        report = {
            "title": title,
            "generated": _dt.datetime.now().isoformat(timespec="seconds"),
            "kind": "sweep" if grid is not None else "runs",
            "runs": {
                k: {
                    "p": ds.attrs.get("p"),
                    "mode": ds.attrs.get("mode"),
                    "variables": sorted(str(v) for v in ds.data_vars),
                }
                for k, ds in runs.items()
            },
            "findings": {
                "groups": [{"label": g.label, "share": g.share, "runs": g.runs} for g in groups],
                "rows": [
                    {
                        "var": f.var,
                        "measure": f.measure,
                        "control": f.control,
                        "values": f.values,
                        "controls": f.controls,
                        "intervals": f.intervals,
                        "extra": f.extra,
                        "comparison": f.comparison,
                        "sentence": f.sentence,
                    }
                    for f in found
                ],
            },
            "charts": entries,
            "skipped": [
                {"chart": s.name, "title": s.title, "question": s.question, "reason": s.reason}
                for s in skipped
            ],
        }
        (out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
        index = out / "index.html"
        index.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ProbekitError(f"cannot write report to {out}: {err.strerror or err}") from None
    return index


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _title(spec: dict[str, Any]) -> str:
    t = spec.get("title")
    if isinstance(t, dict):
        t = t.get("text")
    return str(t) if t is not None else ""

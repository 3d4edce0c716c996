"""What the runs found: final-step numbers beside their controls, and one sentence each.

Every number and every word of comparison is computed here from the cubes (and the sweep
table when given); nothing is fixed text that could contradict them. Runs are compared by the
share of their rarer language: runs of the same share (seeds) are averaged into one group,
and the groups are ordered from the most imbalanced (smallest share) to the most balanced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from probekit.report import charts as C
from probekit.report.catalog import title_of

# Measures read against a different-text baseline `<metric>_baseline`, in table order.
ALIGNMENT = ("hidden_cos", "hidden_cos_centred", "cka", "linmap_r2", "procrustes_r2")


@dataclass
class Group:
    """Runs of one language share (seeds of one configuration)."""

    label: str
    share: float  # share of the rarer language (nan when unknown)
    runs: list[str]


@dataclass
class Finding:
    """One row of the findings table."""

    var: str
    measure: str
    control: str  # what the value is read against
    values: dict[str, float]  # group label -> value (mean over its runs)
    controls: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    extra: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. transfer
    comparison: str = ""  # "higher" / "lower" / "equal" / "" (one group)
    sentence: str = ""


def fmt(v: float | None) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def _share(ds: xr.Dataset) -> float:
    p = ds.attrs.get("p")
    try:
        p = float(p)
    except (TypeError, ValueError):
        return math.nan
    return min(p, 1 - p) if np.isfinite(p) else math.nan


def _languages(ds: xr.Dataset) -> list[str]:
    langs = ds.attrs.get("languages")
    if isinstance(langs, (list, tuple)) and len(langs) >= 2:
        return [str(x) for x in langs]
    if "language" in ds.coords:
        return [str(x) for x in ds["language"].values]
    return []


def rare_language(runs: Mapping[str, xr.Dataset]) -> str | None:
    """The language the findings follow: the rarer one in most runs (with balanced runs
    only, the second language, the one `p` is the share of)."""
    votes: dict[str, int] = {}
    first = None
    for ds in runs.values():
        langs = _languages(ds)
        if len(langs) < 2:
            continue
        first = first or langs[1]
        try:
            p = float(ds.attrs.get("p"))
        except (TypeError, ValueError):
            continue
        if np.isfinite(p) and p != 0.5:
            pick = langs[1] if p < 0.5 else langs[0]
            votes[pick] = votes.get(pick, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else first


def groups_of(runs: Mapping[str, xr.Dataset]) -> list[Group]:
    """Runs grouped by configuration apart from the seed, most imbalanced first."""
    keyed: dict[tuple, list[str]] = {}
    for k, ds in runs.items():
        key = (
            _share(ds),
            str(ds.attrs.get("mode", "")),
            str(ds.attrs.get("vocab_mode", "")),
            str(ds.attrs.get("schedule", "") or ""),
        )
        key = tuple("nan" if isinstance(x, float) and math.isnan(x) else x for x in key)
        keyed.setdefault(key, []).append(k)
    out = []
    for key, names in keyed.items():
        share = key[0] if isinstance(key[0], float) else math.nan
        ds = runs[names[0]]
        try:
            p = float(ds.attrs.get("p"))
        except (TypeError, ValueError):
            p = math.nan
        sched = str(ds.attrs.get("schedule", "") or "")
        what = f"p = {p:g}" if np.isfinite(p) else f"schedule {sched}" if sched else ""
        if len(names) == 1:
            label = names[0] + (f" ({what})" if what else "")
        else:
            label = f"{what or names[0]}, {len(names)} runs"
        out.append(Group(label, share, names))
    return sorted(out, key=lambda g: (math.isnan(g.share), g.share))


def final_mean(ds: xr.Dataset, var: str, sel: dict[str, Any] | None = None) -> float:
    """Final-step mean of a variable over layers >= 1 (the paper's Table 2 mean) and any
    other dims; "block" tensors of grad_cos left out."""
    if var not in ds or C.final_step(ds[var]) is None:
        return math.nan
    da = C.pick_step(ds[var], "final", "")
    if sel:
        da = da.sel(**{k: v for k, v in sel.items() if k in da.dims})
    if "layer" in da.dims and (da["layer"] >= 1).any():
        da = da.sel(layer=da["layer"] >= 1)
    if "tensor" in da.dims:
        da = da.sel(tensor=[t for t in da["tensor"].values if t != "block"])
    return float(da.mean(skipna=True))


def at_step_of(ds: xr.Dataset, var: str, like: str) -> float:
    """Mean of `var` (layers >= 1) at the final step of `like` (e.g. a baseline)."""
    if var not in ds or like not in ds or C.final_step(ds[like]) is None:
        return math.nan
    s = C.final_step(ds[like])
    da = ds[var].sel(step=s)
    if "layer" in da.dims and (da["layer"] >= 1).any():
        da = da.sel(layer=da["layer"] >= 1)
    return float(da.mean(skipna=True))


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else math.nan


def _compare(f: Finding, groups: list[Group]) -> None:
    """Fill f.comparison and the comparative part of the sentence."""
    have = [g for g in groups if np.isfinite(f.values.get(g.label, math.nan))]
    if len(have) < 2:
        return
    a, b = have[0], have[-1]  # most imbalanced, most balanced
    va, vb = f.values[a.label], f.values[b.label]
    diff = va - vb
    f.comparison = "higher" if diff > 0 else "lower" if diff < 0 else "equal"


def _comparison_clause(f: Finding, groups: list[Group]) -> str:
    have = [g for g in groups if np.isfinite(f.values.get(g.label, math.nan))]
    if len(have) < 2:
        return ""
    a, b = have[0], have[-1]
    va, vb = f.values[a.label], f.values[b.label]
    noun = "run" if len(a.runs) == 1 else "setting"
    if f.comparison == "equal":
        clause = f"the most imbalanced {noun} ({a.label}) equals the most balanced ({b.label})"
    else:
        clause = (
            f"the most imbalanced {noun} ({a.label}) is {f.comparison} than the most balanced "
            f"({b.label}) by {fmt(abs(va - vb))}"
        )
    ia, ib = f.intervals.get(a.label), f.intervals.get(b.label)
    if ia and ib:
        overlap = ia[0] <= ib[1] and ib[0] <= ia[1]
        clause += (
            ", within the bootstrap intervals (they overlap)"
            if overlap
            else ", beyond the bootstrap intervals"
        )
    if len(have) > 2:
        vals = [f.values[g.label] for g in have]
        steps = np.sign(np.diff(vals))
        if (steps > 0).all():
            clause += ", and it rises steadily with the share"
        elif (steps < 0).all():
            clause += ", and it falls steadily with the share"
        else:
            clause += ", but not monotonically with the share"
    return clause


def _teff_finding(
    runs: Mapping[str, xr.Dataset],
    groups: list[Group],
    lang: str,
    table: pd.DataFrame | None,
) -> Finding | None:
    f = Finding("teff", f"TEff of {lang}", "update-matched control (TEff); transfer ratio", {})
    for g in groups:
        teff, ctrl, transfer = [], [], []
        for r in g.runs:
            row = None
            if table is not None and {"run", "language", "teff"} <= set(table.columns):
                m = table[(table["run"].astype(str) == r) & (table["language"].astype(str) == lang)]
                row = m.iloc[-1] if len(m) else None
            if row is not None:
                teff.append(float(row["teff"]))
                ctrl.append(float(row.get("teff_control", math.nan)))
                transfer.append(float(row.get("transfer", math.nan)))
            else:
                ds = runs[r]
                teff.append(final_mean(ds, "teff", {"language": lang}))
                ctrl.append(final_mean(ds, "teff_control", {"language": lang}))
                transfer.append(math.nan)
        if np.isfinite(_mean(teff)):
            f.values[g.label] = _mean(teff)
            f.controls[g.label] = _mean(ctrl)
            f.extra.setdefault("transfer", {})[g.label] = _mean(transfer)
    if not f.values:
        return None
    _compare(f, groups)
    clauses = []
    above1 = [g.label for g in groups if f.values.get(g.label, 0) > 1]
    if len(above1) == len(f.values):
        clauses.append(f"{lang} gains from the other language (TEff above 1) in every run")
    elif above1:
        clauses.append(
            f"{lang} gains from the other language (TEff above 1) in {_list(above1)} only"
        )
    else:
        clauses.append(f"{lang} does not gain from the other language (TEff not above 1)")
    transfer = f.extra["transfer"]
    has_t = [k for k in f.values if np.isfinite(transfer.get(k, math.nan))]
    has_c = [k for k in f.values if np.isfinite(f.controls.get(k, math.nan))]
    if has_t:
        beyond = [g.label for g in groups if transfer.get(g.label, math.nan) > 1]
        clauses.append(
            f"more than its update-matched control explains (transfer above 1) in {_list(beyond)}"
            if beyond
            else "no more than its update-matched control explains (transfer not above 1)"
        )
    elif has_c:
        over = [k for k in has_c if f.values[k] > f.controls[k]]
        clauses.append(
            f"above its update-matched control in {_list(over)}"
            if over
            else "not above its update-matched control in any run"
        )
    else:
        clauses.append("no update-matched control was given (a sweep with controls = true has it)")
    clause = _comparison_clause(f, groups)
    if clause:
        clauses.append(clause)
    f.sentence = _sentence(clauses)
    return f


def _sentence(clauses: list[str]) -> str:
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."


def _list(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _measure_finding(
    runs: Mapping[str, xr.Dataset],
    groups: list[Group],
    var: str,
    control_var: str | None,
    control_text: str,
    *,
    sel: dict[str, Any] | None = None,
    control_sel: dict[str, Any] | None = None,
    constant: float | None = None,
    where: str = "final checkpoint, layers ≥ 1",
    title: str | None = None,
) -> Finding | None:
    f = Finding(var, title or title_of(var), control_text, {})
    for g in groups:
        vals, ctrls, los, his = [], [], [], []
        for r in g.runs:
            ds = runs[r]
            vals.append(final_mean(ds, var, sel))
            if control_var:
                if control_sel is not None:
                    ctrls.append(final_mean(ds, control_var, control_sel))
                else:
                    ctrls.append(at_step_of(ds, control_var, var))
            if f"{var}_lo" in ds and f"{var}_hi" in ds:
                los.append(at_step_of(ds, f"{var}_lo", var))
                his.append(at_step_of(ds, f"{var}_hi", var))
        if not np.isfinite(_mean(vals)):
            continue
        f.values[g.label] = _mean(vals)
        f.controls[g.label] = constant if constant is not None else _mean(ctrls)
        if np.isfinite(_mean(los)) and np.isfinite(_mean(his)):
            f.intervals[g.label] = (_mean(los), _mean(his))
    if not f.values:
        return None
    _compare(f, groups)
    clauses = []
    with_c = [g.label for g in groups if np.isfinite(f.controls.get(g.label, math.nan))]
    if with_c:
        above = [k for k in with_c if f.values[k] > f.controls[k]]
        what = control_text if constant is not None else f"its {control_text}"
        gaps = [f.values[k] - f.controls[k] for k in with_c]
        span = f"{fmt(min(gaps))} to {fmt(max(gaps))}" if len(gaps) > 1 else fmt(gaps[0])
        if len(above) == len(with_c):
            head = f"above {what}" + (" in every run" if len(with_c) > 1 else "")
        elif above:
            head = f"above {what} in {_list(above)} only"
        else:
            head = f"not above {what}" + (" in any run" if len(with_c) > 1 else "")
        clauses.append(f"{head} (difference {span})")
    else:
        clauses.append(f"{f.measure} is stored without a control")
    clause = _comparison_clause(f, groups)
    if clause:
        clauses.append(clause)
    f.sentence = _sentence(clauses)
    return f


def compute_findings(
    runs: Mapping[str, xr.Dataset], sweep_table: pd.DataFrame | None = None
) -> tuple[list[Group], list[Finding]]:
    """The groups of runs and one Finding per measure the runs have (table order)."""
    groups = groups_of(runs)
    out: list[Finding] = []
    lang = rare_language(runs)
    if lang is not None:
        t = _teff_finding(runs, groups, lang, sweep_table)
        if t is not None:
            out.append(t)
    for var in ALIGNMENT:
        if not any(var in ds for ds in runs.values()):
            continue
        f = _measure_finding(runs, groups, var, f"{var}_baseline", "different-text baseline")
        if f is not None:
            out.append(f)
    retr_base = any("retrieval_acc_baseline" in ds for ds in runs.values())
    extras = [
        (
            "retrieval_acc",
            "retrieval_acc_baseline" if retr_base else None,
            "different-text baseline",
            None,
            None,
            None,
        ),
        ("neuron_overlap", "neuron_overlap_chance", "chance overlap", None, None, None),
        ("grad_cos", None, "zero", None, None, 0.0),
    ]
    for var, cvar, ctext, sel, csel, const in extras:
        if not any(var in ds for ds in runs.values()):
            continue
        f = _measure_finding(
            runs, groups, var, cvar, ctext, sel=sel, control_sel=csel, constant=const
        )
        if f is not None:
            out.append(f)
    if any("embed_cos" in ds for ds in runs.values()):
        f = _measure_finding(
            runs,
            groups,
            "embed_cos",
            "embed_cos",
            "all-pairs cosine",
            sel={"matrix": "input", "pairing": "clone"},
            control_sel={"matrix": "input", "pairing": "all"},
            where="final checkpoint, input embeddings",
            title="clone-pair input-embedding cosine",
        )
        if f is not None:
            out.append(f)
    return groups, out


def findings_table(groups: list[Group], rows: list[Finding]) -> pd.DataFrame:
    """One row per measure: each group's value (control) [interval], and the comparison."""
    recs = []
    for f in rows:
        rec: dict[str, Any] = {"measure": f.measure, "read against": f.control}
        for g in groups:
            v = f.values.get(g.label)
            if v is None:
                rec[g.label] = "–"
                continue
            cell = fmt(v)
            c = f.controls.get(g.label, math.nan)
            if np.isfinite(c):
                cell += f" ({fmt(c)}"
                t = f.extra.get("transfer", {}).get(g.label, math.nan)
                cell += f"; {fmt(t)})" if np.isfinite(t) else ")"
            if g.label in f.intervals:
                lo, hi = f.intervals[g.label]
                cell += f" [{fmt(lo)}, {fmt(hi)}]"
            rec[g.label] = cell
        if len(groups) > 1:
            rec["imbalanced vs balanced"] = f.comparison or "–"
        recs.append(rec)
    return pd.DataFrame(recs)

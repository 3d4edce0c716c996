"""Compare the analysis cubes of two runs (or two copies of one run), variable by variable.

    python scripts/compare_cubes.py RUN_A RUN_B [--atol 1e-6] [--rtol 1e-6] [--family F ...]

Every family stored in either cube is compared: the same variables, dims and coordinates,
and values equal within |a - b| <= atol + rtol * |b| (NaN equals NaN). One line per
variable with its largest difference; exit status 1 when anything differs, 2 on bad input.
This is how a refactor proves it changed no number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr


def largest_difference(a: xr.Dataset, b: xr.Dataset) -> float:
    """The largest absolute difference over the numeric variables both Datasets hold."""
    diffs = [
        _max_diff(a[n].values, b[n].values)
        for n in set(a.data_vars) & set(b.data_vars)
        if a[n].shape == b[n].shape and a[n].dtype.kind in "fiu"
    ]
    return max(diffs, default=0.0)


def compare_datasets(a: xr.Dataset, b: xr.Dataset, atol: float, rtol: float) -> list[str]:
    """Differences between two Datasets of one family, as lines (empty: equal)."""
    problems = []
    only = sorted(set(a.data_vars) ^ set(b.data_vars))
    if only:
        problems.append(f"variables in one cube only: {', '.join(only)}")
    for name in sorted(set(a.coords) & set(b.coords)):
        ca, cb = a[name].values, b[name].values
        if ca.shape != cb.shape or not _close(ca, cb, atol, rtol):
            problems.append(f"coordinate {name} differs: {_brief(ca)} vs {_brief(cb)}")
    for name in sorted(set(a.data_vars) & set(b.data_vars)):
        va, vb = a[name], b[name]
        if va.dims != vb.dims or va.shape != vb.shape:
            problems.append(f"{name}: dims {dict(va.sizes)} vs {dict(vb.sizes)}")
            continue
        if not _close(va.values, vb.values, atol, rtol):
            problems.append(f"{name}: max |diff| {_max_diff(va.values, vb.values):.3g}")
    return problems


def _close(x: np.ndarray, y: np.ndarray, atol: float, rtol: float) -> bool:
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        return bool([str(v) for v in x.ravel()] == [str(v) for v in y.ravel()])
    return bool(np.allclose(x, y, atol=atol, rtol=rtol, equal_nan=True))


def _max_diff(x: np.ndarray, y: np.ndarray) -> float:
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        return 0.0 if [str(v) for v in x.ravel()] == [str(v) for v in y.ravel()] else float("inf")
    d = np.abs(x.astype(float) - y.astype(float))
    nan_mismatch = np.isnan(x.astype(float)) != np.isnan(y.astype(float))
    return float("inf") if nan_mismatch.any() else float(np.nanmax(d, initial=0.0))


def _brief(v: np.ndarray) -> str:
    return np.array2string(v, threshold=6, edgeitems=2)


def compare_runs(
    run_a: Path, run_b: Path, atol: float = 1e-6, rtol: float = 1e-6, families: list | None = None
) -> dict[str, list[str]]:
    """{family: lines} over every family stored in either run (or the ones named): the first
    line gives the largest difference, any further line is a difference beyond tolerance."""
    from probekit import store

    names = families or sorted(set(store.families(run_a)) | set(store.families(run_b)))
    out = {}
    for fam in names:
        a, b = store.read_family(run_a, fam), store.read_family(run_b, fam)
        if a is None or b is None:
            out[fam] = [f"stored in {run_a if b is None else run_b} only"]
        else:
            out[fam] = compare_datasets(a, b, atol, rtol)
            out[fam].insert(0, f"largest |diff| {largest_difference(a, b):.3g}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--family", action="append", default=None, help="Only this family.")
    args = ap.parse_args(argv)
    from probekit.errors import ProbekitError

    for run in (args.run_a, args.run_b):
        if not (run / "analysis.zarr").is_dir():
            print(f"error: {run}: no analysis cube (analysis.zarr)", file=sys.stderr)
            return 2
    try:
        result = compare_runs(args.run_a, args.run_b, args.atol, args.rtol, args.family)
    except ProbekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = 0
    for fam, lines in result.items():
        head, problems = (lines[0], lines[1:]) if lines[0].startswith("largest") else ("", lines)
        print(f"{fam}: {'equal' if not problems else 'DIFFERENT'} ({head})")
        for line in problems:
            print(f"  {line}")
        bad += bool(problems)
    tol = f"atol {args.atol}, rtol {args.rtol}"
    print(f"{len(result) - bad} of {len(result)} families equal ({tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

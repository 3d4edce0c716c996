"""How far reduced precision (--dtype) moves each family's numbers against float32.

    python scripts/compare_dtypes.py RUN [--steps 300] [--dtypes bfloat16,float16]
        [--metrics similarity,neurons,...] [--max-tokens 8192] [--markdown]

RUN's config, tokenizer and the chosen checkpoints are copied into one scratch run per dtype
(nothing of RUN is written); `align` (every default family) and `eval` (perplexity) compute
them there; then every numeric variable is compared cell by cell with float32's: the largest
and the median |difference| over cells finite in both, the median |float32 value| for scale,
and how many cells are NaN in one only. One line per family and variable (--markdown: a table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def scratch_copy(run: Path, dst: Path, steps: list[int] | None) -> Path:
    """RUN without its analysis: config, tokenizer, the chosen checkpoints."""
    dst.mkdir(parents=True)
    for item in run.iterdir():
        if item.name in ("analysis.zarr", "artifacts", "checkpoints") or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)
    src = run / "checkpoints"
    for ck in sorted(src.iterdir()):
        digits = "".join(c for c in ck.name if c.isdigit())
        if ck.is_dir() and not ck.name.startswith(".") and (not steps or int(digits) in steps):
            shutil.copytree(ck, dst / "checkpoints" / ck.name)
    return dst


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, int, int]:
    """(max |a - b|, median |a - b|, median |a|, cells compared, NaN in one only)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    lone = int((np.isfinite(a) != np.isfinite(b)).sum())
    if not both.any():
        return float("nan"), float("nan"), float("nan"), 0, lone
    d = np.abs(a[both] - b[both])
    return (
        float(d.max()),
        float(np.median(d)),
        float(np.median(np.abs(a[both]))),
        int(both.sum()),
        lone,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", default=None, help="Checkpoint steps (default: the last).")
    ap.add_argument("--dtypes", default="bfloat16", help="Compared with float32.")
    ap.add_argument("--metrics", default=None, help="align families (default: all of align's).")
    ap.add_argument("--max-tokens", type=int, default=8192, help="eval test tokens per language.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import probekit
    from probekit import store
    from probekit.checkpoints import list_checkpoints

    steps = (
        [int(s) for s in args.steps.split(",")]
        if args.steps
        else [list_checkpoints(args.run)[-1].step]
    )
    dtypes = ["float32"] + [d for d in args.dtypes.split(",") if d and d != "float32"]
    tmp = Path(tempfile.mkdtemp(prefix="pk-dtypes-"))
    runs, seconds = {}, {}
    try:
        for dt in dtypes:
            run = scratch_copy(args.run, tmp / dt, steps)
            opts = probekit.AlignOptions(dtype=dt)
            t0 = time.perf_counter()
            probekit.align(run, args.metrics, steps=steps, options=opts, progress=False)
            probekit.evaluate(
                run, steps=steps, max_tokens=args.max_tokens, progress=False, options=opts
            )
            seconds[dt] = time.perf_counter() - t0
            runs[dt] = run
        rows = []
        for dt in dtypes[1:]:
            for fam in sorted(store.families(runs["float32"])):
                ref, got = store.read_family(runs["float32"], fam), store.read_family(runs[dt], fam)
                for name in sorted(ref.data_vars):
                    if ref[name].dtype.kind not in "fiu" or name not in got:
                        continue
                    rows.append((dt, fam, name, *compare(ref[name].values, got[name].values)))
        print(
            f"{args.run} steps {steps}; seconds (align + eval): "
            + ", ".join(f"{d} {s:.1f}" for d, s in seconds.items())
        )
        if args.markdown:
            print(
                "| dtype | family | variable | max abs diff | median abs diff | median abs f32 "
                "| cells | NaN in one only |"
            )
            print("|---|---|---|---|---|---|---|---|")
        for dt, fam, name, mx, med, scale, n, lone in rows:
            if args.markdown:
                print(
                    f"| {dt} | {fam} | `{name}` | {mx:.2g} | {med:.2g} | {scale:.3g} "
                    f"| {n} | {lone} |"
                )
            else:
                print(
                    f"{dt:9s} {fam:12s} {name:28s} max {mx:9.2g} median {med:9.2g} "
                    f"(|f32| median {scale:.3g}; {n} cells, {lone} NaN in one only)"
                )
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

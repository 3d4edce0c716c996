"""Benchmark: the permutation null's cost against the measures it calibrates, its memory at two
permutation counts, and the `calibrated` family's cost per checkpoint against align's.

Usage: python bench/bench_calibration.py [--quick] [--repeat 3] [--perms 100]

1. Synthetic samples of the family's default size (512 rows; L + 1 layers and width d of the
   tiny, cpu and small presets): ``measures`` = building the sample's matrices and the six raw
   scores once (what an uncalibrated run of these measures costs); ``null`` = --perms permuted
   scorings on top. Printed: seconds and null / measures, and the cost of one permutation as a
   multiple of the measures.
2. Peak traced memory (tracemalloc: numpy's allocations) of ``null_calibrate`` at 10 and 10x
   that many permutations, per shape: it must not grow with the count (only the [K, L, 6] score
   vector does: 8 bytes per score).
3. On a trained tiny clone run (the one bench_align_ratio.py trains, /tmp/pk-bench-ratio-tiny):
   ``engine.compute_checkpoint`` of its final checkpoint for similarity, calibrated and every
   default align family, side by side, best of --repeat: calibrated / align (all) is what
   naming it adds to a checkpoint, which decides its `command` (docs/calibration.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _best(fn, repeat: int) -> float:  # noqa: ANN001
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def synthetic(shapes: dict[str, tuple[int, int]], n_rows: int, perms: int, repeat: int) -> None:
    from probekit.metrics.calibration import PreparedSample, null_calibrate, permutations

    print(f"\n## permutation null vs the measures ({n_rows} rows, {perms} permutations)")
    print(
        f"{'shape':18s} {'measures s':>10s} {'null s':>8s} {'null/meas':>9s} {'1 perm/meas':>11s}"
    )
    rng = np.random.default_rng(0)
    for name, (layers, d) in shapes.items():
        x, y = rng.standard_normal((2, layers, n_rows, d))

        def measures(x=x, y=y) -> None:  # noqa: ANN001
            PreparedSample(x, y, x, y, 1, 10).scores(np.arange(n_rows), np.arange(n_rows))

        prep = PreparedSample(x, y, x, y, 1, 10)
        plist = list(permutations(n_rows, 1, perms, seed=0))

        def null(prep=prep, plist=plist) -> None:  # noqa: ANN001
            for p in plist:
                prep.scores(p, p)

        tm, tn = _best(measures, repeat), _best(null, repeat)
        print(
            f"{name + f' L{layers} d{d}':18s} {tm:10.3f} {tn:8.3f} {tn / tm:9.1f} "
            f"{tn / perms / tm:11.3f}"
        )
    print(f"\n## peak traced memory of null_calibrate ({n_rows} rows)")
    lo, hi = 10, 10 * 10
    print(f"{'shape':18s} {f'{lo} perms MB':>12s} {f'{hi} perms MB':>13s} {'ratio':>6s}")
    for name, (layers, d) in shapes.items():
        x, y = rng.standard_normal((2, layers, n_rows, d))
        peaks = []
        for k in (lo, hi):
            tracemalloc.start()
            null_calibrate(x, y, n_perm=k, k=10)
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
        print(
            f"{name + f' L{layers} d{d}':18s} {peaks[0]:12.1f} {peaks[1]:13.1f} "
            f"{peaks[1] / peaks[0]:6.3f}"
        )


def on_run(repeat: int, perms: int) -> None:
    from bench_align_ratio import ensure_run

    from probekit import engine
    from probekit.metrics import families_for
    from probekit.options import AnalysisOptions
    from probekit.series import cached_series

    run = ensure_run("tiny")
    opts = AnalysisOptions(null_permutations=perms).validated()
    series = cached_series(run, opts)
    step = series.checkpoints()[-1].step
    fams = [f.name for f in families_for("align") if f.applies(series) is None]
    cases = {
        "similarity": ["similarity"],
        "calibrated": ["calibrated"],
        "align (all)": fams,
        "align (all) + calibrated": fams + ["calibrated"],
    }
    for names in cases.values():  # warm-up
        engine.compute_checkpoint(run, step, names, opts)
    res = {k: float("inf") for k in cases}
    for _ in range(repeat):  # interleaved
        for k, names in cases.items():
            res[k] = min(
                res[k], _best(lambda n=names: engine.compute_checkpoint(run, step, n, opts), 1)
            )
    print(f"\n## one checkpoint of {run} ({len(series.parallel)} pairs, {perms} permutations)")
    print(f"{'case':26s} {'seconds':>8s} {'/ align (all)':>13s}")
    for k, v in res.items():
        print(f"{k:26s} {v:8.3f} {v / res['align (all)']:13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--perms", type=int, default=100)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shape only, 1 repeat, no run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"tiny": (5, 128), "cpu": (5, 256), "small": (13, 768)}
    if args.quick:
        synthetic({"tiny": shapes["tiny"]}, args.rows, args.perms, 1)
        return
    synthetic(shapes, args.rows, args.perms, args.repeat)
    on_run(args.repeat, args.perms)


if __name__ == "__main__":
    main()

"""How far a run's stored gradient cosines are from the independent float64 oracle.

    python scripts/check_gradients_oracle.py RUN [RUN ...] [--steps 0,12,157]

For every (or the chosen) checkpoint of each GPT-2 run, the oracle of tests/oracles.py (two
autograd calls per pair, float64 cosines) recomputes `grad_cos` on the same gradient pairs the
cube was made from (the first --grad-pairs of the series' parallel data, default 16), and the
largest |cube - oracle| is printed per step and over the run. Run it on two copies of a run
(before / after a change to the gradients family) to see which one is closer to the oracle.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from oracles import gradient_alignment_reference  # noqa: E402

from probekit import open_cube  # noqa: E402
from probekit.checkpoints import load_checkpoint  # noqa: E402
from probekit.hooks import pad_batch  # noqa: E402
from probekit.options import AnalysisOptions  # noqa: E402
from probekit.series import cached_series  # noqa: E402


def oracle_distance(run: Path, steps: list[int] | None, grad_pairs: int) -> list[tuple]:
    """[(step, max |cube - oracle| over the block layers and embeddings)] for one run."""
    cube = open_cube(run)
    if "grad_cos" not in cube:
        raise SystemExit(f"error: {run}: no grad_cos in the cube (run probekit align first)")
    series = cached_series(run, AnalysisOptions().validated())
    par = series.parallel
    n = min(grad_pairs, len(par))
    ids1, m1 = pad_batch(par.ids1[:n])
    ids2, m2 = pad_batch(par.ids2[:n])
    out = []
    for info in series.checkpoints():
        if steps is not None and info.step not in steps:
            continue
        if info.step not in cube["step"].values:
            continue
        ref = gradient_alignment_reference(load_checkpoint(info), ids1, m1, ids2, m2)
        stored = cube["grad_cos"].sel(step=info.step)
        ref = ref.sel(layer=stored["layer"], tensor=stored["tensor"])
        out.append((info.step, float(np.nanmax(np.abs(stored.values - ref.values)))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", default=None, help="comma-separated steps (default: all)")
    ap.add_argument("--grad-pairs", type=int, default=AnalysisOptions().n_grad_pairs)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the oracle is a serial loop; one thread is its fastest setting
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    for run in args.runs:
        if not run.is_dir():
            raise SystemExit(f"error: {run}: no such run directory")
        rows = oracle_distance(run, steps, args.grad_pairs)
        for step, diff in rows:
            print(f"{run}  step {step:6d}  max |grad_cos - oracle| {diff:.2e}")
        worst = max((d for _, d in rows), default=float("nan"))
        print(f"{run}  all {len(rows)} steps  max |grad_cos - oracle| {worst:.2e}")


if __name__ == "__main__":
    main()

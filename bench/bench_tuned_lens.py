"""Benchmark: the tuned lens's cost per checkpoint as a multiple of one forward of the pairs.

Usage: python bench/bench_tuned_lens.py [--presets tiny,cpu] [--repeat 1]

For each preset the clone run of bench_align_ratio.py is reused (or trained: 4 steps, under
/tmp/pk-bench-ratio-PRESET). Its last checkpoint is analysed with the default options (64
pairs, seq-len 128, batch 16, 4,096 lens tokens per language), side by side in one process:

* ``bare fwd``: the plain Hugging Face forward of the L1 and L2 batches of the parallel pairs;
* ``tuned_lens, cold``: `engine.compute_checkpoint(..., ["tuned_lens"])` with no stored
  translators (trained from the identity), divided by bare fwd;
* ``tuned_lens, warm``: the same with the previous checkpoint's translators stored (warm
  start), divided by bare fwd;
* ``lens`` (the logit lens) for scale.

Artifacts are written under a copy of the run (the run's own stay untouched).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align_ratio import ensure_run  # noqa: E402


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_preset(preset: str, repeat: int) -> None:
    from probekit import engine
    from probekit.artifacts import load_artifact
    from probekit.checkpoints import load_checkpoint
    from probekit.hooks import pad_batch
    from probekit.options import AnalysisOptions
    from probekit.series import cached_series

    src = ensure_run(preset)
    run = Path(f"/tmp/pk-bench-tuned-{preset}")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("analysis.zarr", "artifacts"))
    opts = AnalysisOptions().validated()
    series = cached_series(run, opts)
    ckpts = series.checkpoints()
    prev, last = ckpts[-2].step, ckpts[-1].step
    par = series.parallel
    model = load_checkpoint(ckpts[-1]).eval()
    bs = opts.batch_size
    batches = [
        pad_batch([ids[i] for i in range(s, min(s + bs, len(par)))])[0]
        for ids in (par.ids1, par.ids2)
        for s in range(0, len(par), bs)
    ]

    @torch.no_grad()
    def bare() -> None:
        for ids in batches:
            model(ids)

    folder = run / "artifacts" / "tuned_lens"

    def cold() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        engine.compute_checkpoint(run, last, ["tuned_lens"], opts)

    def warm() -> None:
        for p in folder.glob(f"step_{last:08d}*"):
            p.unlink()
        engine.compute_checkpoint(run, last, ["tuned_lens"], opts)

    engine.compute_checkpoint(run, last, ["lens"], opts)  # builds the series once
    t_bare = timed(bare, max(repeat, 3))
    t_lens = timed(lambda: engine.compute_checkpoint(run, last, ["lens"], opts), repeat)
    t_cold = timed(cold, repeat)
    cold_rec = load_artifact(run, "tuned_lens", last)[1]
    shutil.rmtree(folder, ignore_errors=True)
    engine.compute_checkpoint(run, prev, ["tuned_lens"], opts)  # the warm start's source
    t_warm = timed(warm, repeat)
    warm_rec = load_artifact(run, "tuned_lens", last)[1]
    print(f"{preset}: step {last} (warm from {prev}), {len(par)} pairs")
    print(f"  bare fwd             {t_bare:8.3f} s")
    print(f"  lens                 {t_lens:8.3f} s  {t_lens / t_bare:6.1f}x")
    for name, t, rec in (("cold", t_cold, cold_rec), ("warm", t_warm, warm_rec)):
        print(
            f"  tuned_lens, {name}     {t:8.3f} s  {t / t_bare:6.1f}x  "
            f"({rec['steps']} steps, validation KL {rec['initial_kl']:.4f} -> "
            f"{rec['final_kl']:.4f}, from {rec['warm_start_step']})"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for preset in args.presets.split(","):
        bench_preset(preset.strip(), args.repeat)


if __name__ == "__main__":
    main()

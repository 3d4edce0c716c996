"""Benchmark: the features family's cost per checkpoint, as a multiple of one forward of its
training tokens, and its peak memory.

Usage: python bench/bench_features.py [--presets tiny,cpu] [--steps 400]

For each preset the clone run of bench_align_ratio.py is reused (or trained: 4 steps, under
/tmp/pk-bench-ratio-PRESET, checkpoints 0 and 4). In a child process per preset (a child's
peak RSS is its own): ``features`` at checkpoint 0 (cold: no stored dictionary) and then at
checkpoint 4 (warm-started from 0's), default options (64 pairs, seq-len 128, a middle and
the last layer, 4 x d_model latents, k 8, 8192 training tokens per language, 400 Adam steps),
each through ``engine.compute_checkpoint`` (load, bridge, training, readings, causal
importance, artifact). Side by side in the same child: the bare Hugging Face forward (LM
head included, no_grad) of the training windows of both languages, once. Printed: seconds,
the ratio to that forward, the phases (train / readings / causal) from the artifact's
record, and the peak RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, resource, shutil, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from probekit import engine
from probekit.artifacts import load_artifact, ARTIFACTS_DIR
from probekit.checkpoints import load_checkpoint
from probekit.metrics.features import training_text
from probekit.options import AnalysisOptions
from probekit.series import cached_series
run, steps = sys.argv[1], int(sys.argv[2])
shutil.rmtree(f"{run}/{ARTIFACTS_DIR}/features", ignore_errors=True)
opts = AnalysisOptions(features_steps=steps).validated()
series = cached_series(__import__("pathlib").Path(run), opts)
infos = series.checkpoints()
windows, _ = training_text(series, opts.features_tokens)
model = load_checkpoint(infos[-1])
seqs = [w for lang in series.pair for w in windows[lang]]
with torch.no_grad():
    model(torch.as_tensor(np.stack(seqs[:2])))  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(seqs), opts.batch_size):
        model(torch.as_tensor(np.stack(seqs[lo : lo + opts.batch_size])))
    bare = time.perf_counter() - t0
del model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"bare": bare, "tokens": int(sum(len(s) for s in seqs)), "before_kb": before}
for name, info in (("cold", infos[0]), ("warm", infos[-1])):
    t0 = time.perf_counter()
    engine.compute_checkpoint(run, info.step, ["features"], opts)
    out[name] = time.perf_counter() - t0
    out[name + "_phases"] = load_artifact(run, "features", info.step)[1]["seconds"]
out["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps per checkpoint and layer")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_align_ratio import ensure_run

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    print(
        "preset | train tokens | bare fwd s | cold s (x fwd) | warm s (x fwd) | "
        "warm phases train/readings/causal s | peak RSS MB (before)"
    )
    for preset in args.presets.split(","):
        run = ensure_run(preset)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), str(args.steps)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{preset}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        ph = r["warm_phases"]
        print(
            f"{preset} | {r['tokens']} | {r['bare']:.3f} | {r['cold']:.2f} "
            f"({r['cold'] / r['bare']:.0f}x) | {r['warm']:.2f} ({r['warm'] / r['bare']:.0f}x) | "
            f"{ph['train']:.2f}/{ph['readings']:.2f}/{ph['causal']:.2f} | "
            f"{r['peak_kb'] / 1024:.0f} ({r['before_kb'] / 1024:.0f})"
        )


if __name__ == "__main__":
    main()

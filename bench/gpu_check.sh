#!/usr/bin/env bash
# One-shot GPU check (< 8 min on one GPU): prints one table.
#   trainer tokens/s and MFU for the mini and small presets (bf16, torch.compile) against the
#   device's dense bf16 peak; align pairs/s and eval tokens/s on cuda; align / bare forward(+b)
#   and eval / bare forward of its windows (bench/bench_align_ratio.py's ratios, on cuda).
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (default /tmp/pk-gpu-check; runs are reused)
# Without CUDA it stops at once with a one-line message (exit 2).
set -euo pipefail
OUT="${1:-/tmp/pk-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PROBEKIT_CACHE="${PROBEKIT_CACHE:-$OUT/cache}"
python - "$OUT" <<'EOF'
import json, statistics, sys, time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); "
          "run it on a GPU machine", file=sys.stderr)
    sys.exit(2)
out = Path(sys.argv[1])
name = torch.cuda.get_device_name(0)
# dense bf16 peak, TFLOP/s (vendor data sheets, without sparsity)
PEAKS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
         "A10": 125.0, "L4": 121.0}
peak = next((v for k, v in PEAKS.items() if k in name), None)

from probekit import engine
from probekit.config import PRESETS
from probekit.options import AnalysisOptions
from probekit.training import train

rows = []


def row(what, value, unit, note=""):
    rows.append((what, value, unit, note))
    print(f"  {what}: {value:.3g} {unit} {note}", flush=True)


def run_cfg(preset, steps, batch):
    return {"name": f"gpu_{preset}", "seed": 0,
            "data": {"mode": "clone", "p": 0.5, "sources": {"en": ["bible:web"]}},
            "tokenizer": {"vocab_size": 512}, "model": {"preset": preset},
            "train": {"steps": steps, "batch_size": batch, "lr": 3e-4, "precision": "bf16",
                      "compile": True},
            "checkpoints": {"log_spaced": 1, "every": steps}, "eval": {"n_sequences": 4}}


for preset, steps, batch in (("mini", 120, 32), ("small", 80, 32)):
    run = out / f"train_{preset}"
    t0 = time.perf_counter()
    train(run_cfg(preset, steps, batch), run, device="cuda", progress=False, force=True)
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    tps = statistics.median([r["tok_per_s"] for r in log if "tok_per_s" in r][steps // 2 :])
    p = PRESETS[preset]
    L, d, T = p["n_layer"], p["n_embd"], p["context"]
    n_params = L * (4 * d * d + 2 * d * p["n_inner"]) + 1024 * d  # blocks + cloned vocab
    flops_per_token = 6 * n_params + 12 * L * d * T  # PaLM appendix B
    row(f"train {preset} tokens/s", tps, "tok/s", f"({time.perf_counter() - t0:.0f} s incl. compile)")
    if peak:
        row(f"train {preset} MFU", 100 * tps * flops_per_token / (peak * 1e12), "%",
            f"of {peak:.0f} TFLOP/s bf16 dense ({name})")

# align / eval on cuda, on the mini run's final checkpoint
for preset in ("mini",):
    run = out / f"train_{preset}"
    opts = AnalysisOptions(device="cuda", max_tokens=16384).validated()
    series = engine.cached_series(run, opts)
    step = series.checkpoints()[-1].step
    fams = [f.name for f in engine.FAMILIES.values() if f.command == "align" and f.applies(series) is None]
    engine.compute_checkpoint(run, step, fams, opts)  # warm
    torch.cuda.synchronize(); t0 = time.perf_counter()
    engine.compute_checkpoint(run, step, fams, opts)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    row(f"align {preset} (all families)", len(series.parallel) / dt, "pairs/s", f"({dt:.2f} s/ckpt)")
    t0 = time.perf_counter()
    res = engine.compute_checkpoint(run, step, ["perplexity"], opts)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    n = int(res["perplexity"]["n_tokens"].sum())
    row(f"eval {preset}", n / dt, "tok/s", f"({dt:.2f} s/ckpt)")
print()
print(f"| {'measure':34s} | {'value':>10s} | unit    | note")
print(f"| {'-' * 34} | {'-' * 10} | ------- | ----")
for what, value, unit, note in rows:
    print(f"| {what:34s} | {value:10.4g} | {unit:7s} | {note}")
EOF
echo
echo "ratios on cuda (align / bare forward(+backward), eval / bare windows):"
python bench/bench_align_ratio.py --presets mini --repeat 2 --device cuda

"""Benchmark: align's and eval's cost per checkpoint as a multiple of the bare model work.

Usage: python bench/bench_align_ratio.py [--quick] [--presets tiny,cpu] [--repeat 3]

For each preset a clone run is trained once (4 steps, under /tmp/pk-bench-ratio-PRESET, reused
afterwards); its final checkpoint is analysed with the default options (64 pairs, seq-len 128,
batch 16, 16 gradient pairs). Side by side in one process, interleaved, best of --repeat:

* ``bare fwd``: the plain Hugging Face forward (LM head included) of the same L1 and L2
  batches align feeds its activation families, under no_grad;
* ``bare grad f+b``: one forward+backward per language of the gradient pairs as one batch
  (the least any per-pair gradient method needs); align (all) is divided by the sum of both;
* every align family alone and all together (``engine.compute_checkpoint``: checkpoint load,
  forwards, accumulators, results), divided by bare fwd (activation families) or bare f+b
  (gradients, all). These are a series' steady state: the model and the bridge kept from the
  previous checkpoint are refreshed, not rebuilt (``load_checkpoint(reuse=True)``,
  ``hooks.bridge_for``); ``align (all), cold`` drops both first, as for the first checkpoint
  a process analyses;
* eval (perplexity, 8192 test tokens per language at the default stride) divided by the bare
  forward of exactly the windows it scores.

Run the same script under the previous commit's tree (PYTHONPATH=OLD_TREE) for "before".
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def ensure_run(preset: str) -> Path:
    run = Path(f"/tmp/pk-bench-ratio-{preset}")
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        return run
    from probekit.training import train

    cfg = {
        "name": f"bench_ratio_{preset}",
        "seed": 0,
        "data": {"mode": "clone", "p": 0.5, "sources": {"en": ["bible:web"]}},
        "tokenizer": {"vocab_size": 512},
        "model": {"preset": preset},
        "train": {"steps": 4, "batch_size": 8, "lr": 3e-3},
        "checkpoints": {"log_spaced": 1, "every": 4},
        "eval": {"n_sequences": 4},
    }
    train(cfg, run, progress=False)
    return run


def best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_preset(preset: str, repeat: int, max_tokens: int, device: str = "cpu") -> None:
    from probekit import engine
    from probekit.checkpoints import load_checkpoint, release_kept
    from probekit.hooks import pad_batch, release_bridge
    from probekit.metrics import families_for
    from probekit.metrics.perplexity import _plan_windows
    from probekit.options import AnalysisOptions
    from probekit.series import cached_series

    run = ensure_run(preset)
    opts = AnalysisOptions(max_tokens=max_tokens, device=device).validated()
    series = cached_series(run, opts)
    info = series.checkpoints()[-1]
    par = series.parallel
    model = load_checkpoint(info, device=device).eval()
    bs = opts.batch_size
    batches = [
        [
            pad_batch([ids[i] for i in range(s, min(s + bs, len(par)))])[0]
            for s in range(0, len(par), bs)
        ]
        for ids in (par.ids1, par.ids2)
    ]
    ng = min(opts.n_grad_pairs, len(par))
    grad_ids = [pad_batch(ids[:ng]) for ids in (par.ids1, par.ids2)]

    @torch.no_grad()
    def bare_fwd() -> None:
        for lang in batches:
            for ids in lang:
                model(ids.to(device))

    def bare_grad() -> None:
        for ids, mask in grad_ids:
            model.zero_grad(set_to_none=True)
            ids, labels = ids.to(device), ids.masked_fill(~mask, -100).to(device)
            model(ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    # eval's windows: the same plan sliding_window_nll scores
    texts = series.test_texts()
    win = series.context
    windows = []
    for ids, _ in texts.values():
        plan = _plan_windows(len(ids), win, max(1, win // 4), max(1, win // 4))
        w = min(win, len(ids) - 1)
        t = torch.as_tensor(ids.astype("int64"))
        starts = [s for s, _, _ in plan]
        windows += [
            torch.stack([t[s : s + w] for s in starts[b : b + 16]])
            for b in range(0, len(starts), 16)
        ]

    @torch.no_grad()
    def bare_windows() -> None:
        for x in windows:
            model(x.to(device))

    fams = [f.name for f in families_for("align") if f.applies(series) is None]
    cases = {"bare fwd": bare_fwd, "bare grad f+b": bare_grad, "bare eval windows": bare_windows}
    for f in fams:
        cases[f] = lambda f=f: engine.compute_checkpoint(run, info.step, [f], opts)
    cases["align (all)"] = lambda: engine.compute_checkpoint(run, info.step, fams, opts)

    def cold() -> None:  # a process's first checkpoint: nothing kept from an earlier one
        release_kept()
        release_bridge()
        engine.compute_checkpoint(run, info.step, fams, opts)

    cases["align (all), cold"] = cold
    cases["eval"] = lambda: engine.compute_checkpoint(run, info.step, ["perplexity"], opts)
    for fn in cases.values():  # warm-up (series caches, first-call costs)
        fn()
    res = {k: float("inf") for k in cases}
    for _ in range(repeat):  # interleaved: load drifts hit every case alike
        for k, fn in cases.items():
            res[k] = min(res[k], best(fn, 1))
    fwd, grad = res["bare fwd"], res["bare grad f+b"]
    n_tok = sum(int(x.numel()) for x in windows)
    print(f"\n## {preset}: {par.__len__()} pairs, {ng} gradient pairs, eval {n_tok} window tokens")
    print(f"{'case':24s} {'seconds':>8s} {'ratio':>7s}  (denominator)")
    for k, v in res.items():
        if k == "bare fwd":
            den, name = fwd, "bare fwd"
        elif k in ("bare grad f+b", "gradients"):
            den, name = grad, "bare grad f+b"
        elif k.startswith("align (all)"):
            den, name = fwd + grad, "bare fwd + grad f+b"
        elif k in ("eval", "bare eval windows"):
            den, name = res["bare eval windows"], "bare eval windows"
        else:
            den, name = fwd, "bare fwd"
        print(f"{k:24s} {v:8.3f} {v / den:7.2f}  ({name})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8192, help="eval test tokens per language")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny only, 2 repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = ["tiny"] if args.quick else args.presets.split(",")
    for p in presets:
        bench_preset(p, 2 if args.quick else args.repeat, args.max_tokens, args.device)


if __name__ == "__main__":
    main()

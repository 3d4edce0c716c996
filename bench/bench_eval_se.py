"""How many test tokens does a perplexity need? Standard error per token budget.

Usage: python bench/bench_eval_se.py RUN [--steps S1,S2] [--block 128]

For the chosen checkpoints of RUN (default: the first non-zero, a middle and the final one)
every target of each language's test stream (up to 65,536 tokens, the final checkpoint's
default) is scored once with eval's sliding window (window = context, stride = window / 4), and
for a prefix of n tokens (n = 4,096 ... 65,536) it prints the perplexity, the relative
standard error of the perplexity (= the standard error of the mean NLL, since
d PPL / PPL = d mean NLL) under two estimates: i.i.d. tokens (sd / sqrt(n)) and a block
bootstrap over contiguous blocks of --block tokens (tokens of one text are correlated), and the
prefix's deviation from the 65,536-token value; and the same for eval's default at
intermediate checkpoints: every 4th window of the 65,536 tokens (16,384 targets spread over the
whole text).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIZES = (4096, 8192, 16384, 32768, 65536)


@torch.no_grad()
def token_nll(model, tokens: np.ndarray, window: int) -> np.ndarray:  # noqa: ANN001
    """Per-target NLL in stream order, every target scored once (eval's plan)."""
    from probekit.metrics.perplexity import _plan_windows

    stride = max(1, window // 4)
    plan = _plan_windows(len(tokens), window, stride, stride)
    w = min(window, len(tokens) - 1)
    t = torch.as_tensor(tokens.astype(np.int64))
    out = np.full(len(tokens), np.nan)
    win = np.full(len(tokens), -1)
    for k, (_, lo, hi) in enumerate(plan):
        win[lo : hi + 1] = k
    for b in range(0, len(plan), 16):
        chunk = plan[b : b + 16]
        seqs = torch.stack([t[s : s + w + 1] for s, _, _ in chunk])
        logits = model(seqs[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")
        for row, (s, lo, hi) in zip(nll, chunk, strict=True):
            out[lo : hi + 1] = row[lo - s - 1 : hi - s].numpy()
    return out[1:], win[1:]


def block_se(x: np.ndarray, block: int, reps: int, rng: np.random.Generator) -> float:
    nb = len(x) // block
    sums = x[: nb * block].reshape(nb, block).mean(1)
    draws = rng.integers(0, nb, (reps, nb))
    return float(sums[draws].mean(1).std())


def main() -> None:
    from probekit.checkpoints import load_checkpoint
    from probekit.options import AnalysisOptions
    from probekit.series import cached_series

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", default="")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    series = cached_series(args.run, AnalysisOptions(max_tokens=max(SIZES)).validated())
    ckpts = series.checkpoints()
    if args.steps:
        want = {int(s) for s in args.steps.split(",")}
        ckpts = [c for c in ckpts if c.step in want]
    else:
        ckpts = [ckpts[1], ckpts[len(ckpts) // 2], ckpts[-1]]
    rng = np.random.default_rng(0)
    print(f"{args.run}: window {series.context}, blocks of {args.block} tokens")
    print("step lang       n      ppl  rel.SE iid  rel.SE block  ppl/ppl(65536)-1")
    for info in ckpts:
        model = load_checkpoint(info).eval()
        for lang, (ids, _) in series.test_texts().items():
            nll, win = token_nll(model, ids, series.context)
            keep = np.isfinite(nll) & (ids[1:] != 0)  # pad targets are never scored
            nll, win = nll[keep], win[keep]
            full = math.exp(nll.mean())
            # eval's intermediate default: every 4th window of the same tokens
            x = nll[win % 4 == 0]
            iid = x.std() / math.sqrt(len(x))
            blk = block_se(x, args.block // 4, 1000, rng)  # a block = 4 windows' targets
            ppl = math.exp(x.mean())
            print(
                f"{info.step:4d} {lang:4s} {len(x):7d} {ppl:8.2f} {iid:10.4f} "
                f"{blk:13.4f} {ppl / full - 1:+17.4f}  every 4th window"
            )
            for n in SIZES:
                x = nll[: n - 1]
                if len(x) < n - 1 and n != SIZES[0]:
                    break
                iid = x.std() / math.sqrt(len(x))
                blk = block_se(x, args.block, 1000, rng)
                ppl = math.exp(x.mean())
                print(
                    f"{info.step:4d} {lang:4s} {len(x) + 1:7d} {ppl:8.2f} {iid:10.4f} "
                    f"{blk:13.4f} {ppl / full - 1:+17.4f}"
                )


if __name__ == "__main__":
    main()

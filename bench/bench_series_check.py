"""Benchmark: the series check's cost against align's own (issue 30).

Usage: python bench/bench_series_check.py [--shape tiny|70m] [--n 2] [--threads 1]

Builds a folder series of N random GPT-NeoX checkpoints (tiny: the tests' 2 x 32; 70m:
Pythia-70m's shape, 6 x 512, vocabulary 50,304, rotary 25 %, parallel residual), then times,
side by side in this process: the check align runs first (sampled hash), the full-byte hash
(`probekit check --full`), and `align` of the N checkpoints with every default family
(--pairs 16 --grad-pairs 4 --batch-size 8; the check included). Prints the ratios of the
check to align. The files were just written, so they are in the page cache: the check's
reads are memory speed here; from a cold disk the sampled check reads ~64 KiB per tensor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_series import tokenizer  # noqa: E402
from tiny_models import TINY_SIZES  # noqa: E402

SHAPES = {
    "tiny": dict(TINY_SIZES["gpt_neox"]),
    "70m": dict(
        num_hidden_layers=6,
        hidden_size=512,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=2048,
        vocab_size=50_304,
        rotary_pct=0.25,
        use_parallel_residual=True,
    ),
}


def write(root: Path, shape: str, n: int, tok) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sizes = {"vocab_size": len(tok)} | SHAPES[shape]
    cfg = AutoConfig.for_model("gpt_neox", **sizes)
    nbytes = 0
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / f"checkpoint-{(i + 1) * 1000}")
        tok.save_pretrained(root / f"checkpoint-{(i + 1) * 1000}")
        nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return nbytes


def timed(fn, repeat: int = 1) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import probekit
    from probekit.checkpoints import list_checkpoints
    from probekit.series_check import check_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="pk-bench-check-"))
    try:
        nbytes = write(tmp, args.shape, args.n, tokenizer())
        ckpts = list_checkpoints(tmp)
        sampled = timed(lambda: check_checkpoints(ckpts), 3)
        full = timed(lambda: check_checkpoints(ckpts, full=True), 3)
        opts = probekit.AlignOptions(
            parallel_files=("bible:en", "bible:fr"), n_pairs=16, n_grad_pairs=4, batch_size=8
        )
        align = timed(lambda: probekit.align(tmp, options=opts, progress=False))
        print(
            f"{args.shape} GPT-NeoX, {args.n} checkpoints of {nbytes / 2**20:.1f} MiB "
            f"(float32), {args.threads} thread(s)"
        )
        print(f"  check, sampled hash: {sampled:8.4f} s  ({sampled / args.n * 1e3:.2f} ms/ckpt)")
        print(f"  check, full hash:    {full:8.4f} s  ({full / args.n * 1e3:.2f} ms/ckpt)")
        print(f"  align (every default family, check included): {align:8.2f} s")
        print(f"  sampled check / align: {sampled / align:.5f}   full / align: {full / align:.5f}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

"""Benchmark: any HF checkpoint series (issue 13).

Usage: python bench/bench_series.py [--quick] [--threads 1]

(1) Peak memory over a long series: N = 10, 50, 100 synthetic tiny Llama checkpoints (2 x 32,
a different random model per step, a flat folder of checkpoint-N/ with a tokenizer each);
each N is aligned (similarity + gradients, 8 pairs of 32 tokens, --parallel bible:en bible:fr)
in a fresh subprocess that prints its peak RSS (ru_maxrss) and seconds per checkpoint. Flat:
the peak must not grow with N (one checkpoint at a time; results go to the store as they come).
(2) Seconds per checkpoint per architecture (GPT-2, GPT-NeoX, Llama, Qwen2, OLMo, OLMo 2,
BLOOM; every family, the same tiny sizes), two checkpoints each, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the tests' tiny architectures (tests/ is not a package: put it on the path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import TINY_SIZES as SIZES  # noqa: E402

ALIGN_ARGS = [
    "--parallel", "bible:en", "bible:fr", "--pairs", "8", "--seq-len", "32",
    "--batch-size", "4", "--grad-pairs", "2", "--quiet",
]  # fmt: skip

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from click.testing import CliRunner
from probekit.cli.main import cli
series, n = sys.argv[1], int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = CliRunner().invoke(cli, ["align", series, "--metrics", "similarity,gradients"]
                         + json.loads(sys.argv[4]))
assert res.exit_code == 0, res.output
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps(dict(n=n, before_kb=before, peak_kb=peak, per_ckpt=dt / n)))
"""


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from probekit.data import corpus

    verses = corpus.parallel_verses("web", "segond", split="train")[:1500]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([v[1] for v in verses] + [v[2] for v in verses], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def write_series(root: Path, arch: str, n: int, tok) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), **SIZES[arch])
    for i in range(n):
        torch.manual_seed(i)
        dst = root / f"checkpoint-{(i + 1) * 100}"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
        tok.save_pretrained(dst)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5/10/20 checkpoints")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs-only", action="store_true", help="only (2), per architecture")
    args = ap.parse_args()
    tok = tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="pk-bench-series-"))
    try:
        print("(1) peak memory over a flat series of tiny Llama checkpoints")
        peaks = []
        sizes = () if args.archs_only else (5, 10, 20) if args.quick else (10, 50, 100)
        for n in sizes:
            series = write_series(tmp / f"flat{n}", "llama", n, tok)
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(series),
                    str(n),
                    str(args.threads),
                    json.dumps(ALIGN_ARGS),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            peaks.append(r["peak_kb"])
            print(
                f"  {n:4d} checkpoints: peak RSS {r['peak_kb'] / 1024:7.1f} MB "
                f"(at start {r['before_kb'] / 1024:6.1f} MB), {r['per_ckpt']:.2f} s/checkpoint"
            )
            shutil.rmtree(series)
        if peaks:
            print(f"  peak at the largest N / at the smallest: {peaks[-1] / peaks[0]:.3f}")

        print("(2) seconds per checkpoint per architecture (every family, 2 checkpoints)")
        import torch
        from click.testing import CliRunner

        from probekit.cli.main import cli

        torch.set_num_threads(args.threads)
        for arch in SIZES:
            series = write_series(tmp / arch, arch, 2, tok)
            t0 = time.perf_counter()
            res = CliRunner().invoke(cli, ["align", str(series), *ALIGN_ARGS])
            dt = (time.perf_counter() - t0) / 2
            err = (res.output.strip().splitlines() or [""])[-1]
            status = "ok" if res.exit_code == 0 else f"FAILED: {err[:200]}"
            print(f"  {arch:9s} {dt:6.2f} s/checkpoint  {status}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

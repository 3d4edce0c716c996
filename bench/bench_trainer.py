"""Throughput of `probekit.training.train` against a bare PyTorch loop, side by side.

Same model (preset), same batches, same number of steps; the bare loop has no logging,
eval or checkpointing. Prints tokens/s of both and train()'s overhead (target <= 15 %).

    python bench/bench_trainer.py                 # tiny preset, 60 steps
    python bench/bench_trainer.py --preset cpu --steps 40 --threads 2
    python bench/bench_trainer.py --arch gpt2,llama --preset tiny,cpu --threads 1

With several architectures (`--arch gpt2,llama`) it also times their bare loops interleaved,
round by round on the same batches, and prints each one's tok/s and the ratio to the first:
a shared machine drifts, so only side-by-side rounds compare architectures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probekit.checkpoints import read_train_log  # noqa: E402
from probekit.config import RunConfig, load_config  # noqa: E402
from probekit.training import build_model, train  # noqa: E402
from probekit.training.trainer import _ce_sum, lr_factor  # noqa: E402


class SyntheticStream:
    """Random ids, a pure function of the sequence index (like MixtureStream)."""

    def __init__(self, vocab: int, seq_len: int, n_langs: int = 2):
        self.vocab, self.seq_len, self.n_langs = vocab, seq_len, n_langs

    def sequences(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(start)
        ids = rng.integers(1, self.vocab, size=(count, self.seq_len + 1), dtype=np.int64)
        return ids, np.arange(start, start + count) % self.n_langs

    def language_counts(self, n: int) -> np.ndarray:
        return np.bincount(np.arange(n) % self.n_langs, minlength=self.n_langs)

    def repeat_warning(self, total_sequences: int) -> None:
        return None


class SyntheticData:
    languages = ["EN1", "EN2"]
    model_vocab_size = 1024  # the cloned 512-piece vocabulary of feasibility2.md
    pad_id = 0
    fingerprint = "synthetic"

    def stream(self, total_sequences: int, seq_len: int) -> SyntheticStream:
        return SyntheticStream(self.model_vocab_size, seq_len)

    def heldout(self, lang: str, n: int, seq_len: int) -> np.ndarray:
        return SyntheticStream(self.model_vocab_size, seq_len).sequences(10**9, n)[0]


def real_data(cfg: RunConfig, run_dir: Path):
    try:
        from probekit.data import prepare_run_data

        return prepare_run_data(cfg, run_dir), "real (shipped corpus)"
    except Exception as exc:  # noqa: BLE001 - no corpus here: fall back to synthetic ids
        return SyntheticData(), f"synthetic ids ({type(exc).__name__}: {str(exc)[:80]})"


def bare_loop(cfg: RunConfig, data, steps: int) -> float:
    """The minimal loop train() does per step; returns seconds."""
    t = cfg.train
    B, T = t.batch_size, cfg.model.context
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.model_vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.min_lr_frac)
    )
    stream = data.stream(t.steps * B, T)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        ids = torch.from_numpy(stream.sequences(step * B, B)[0])
        s, n = _ce_sum(model, ids, data.pad_id)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    float(s.detach())
    return time.perf_counter() - t0


def compare_archs(archs: list[str], preset: str, args) -> None:
    """Bare loops of each architecture, interleaved over rounds; the median per architecture."""
    cfgs = {
        a: load_config(
            {
                "model": {"preset": preset, "arch": a},
                "train": {"steps": args.steps, "batch_size": args.batch_size, "device": "cpu"},
            }
        )
        for a in archs
    }
    with tempfile.TemporaryDirectory() as tmp:
        first = cfgs[archs[0]]
        data = SyntheticData() if args.synthetic else real_data(first, Path(tmp))[0]
        tokens = args.rounds_steps * args.batch_size * first.model.context
        for a in archs:
            bare_loop(cfgs[a], data, 3)  # warm-up
        times: dict[str, list[float]] = {a: [] for a in archs}
        for _ in range(args.rounds):
            for a in archs:
                times[a].append(bare_loop(cfgs[a], data, args.rounds_steps))
    med = {a: float(np.median(t)) for a, t in times.items()}
    print(
        f"preset {preset}: bare loops side by side ({args.rounds} interleaved rounds of "
        f"{args.rounds_steps} steps, median), threads {torch.get_num_threads()}"
    )
    for a in archs:
        print(
            f"  {a:6s} {tokens / med[a]:10,.0f} tok/s   "
            f"{med[archs[0]] / med[a]:.2f}x the speed of {archs[0]}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="a preset, or several: tiny,cpu")
    ap.add_argument("--arch", default="gpt2", help="an architecture, or several: gpt2,llama")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (several archs)")
    ap.add_argument("--rounds-steps", type=int, default=10, help="steps per round")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--synthetic", action="store_true", help="skip the corpus, use random ids")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.arch.split(",")
    for preset in args.preset.split(","):
        for arch in archs:
            bench_train(preset, arch, args)
        if len(archs) > 1:
            compare_archs(archs, preset, args)
    return 0


def bench_train(preset: str, arch: str, args) -> None:
    """train() against the bare loop of the same model, batches and steps."""
    raw = {
        "model": {"preset": preset, "arch": arch},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "device": "cpu"},
    }
    cfg = load_config(raw)
    B, T = args.batch_size, cfg.model.context
    tokens = args.steps * B * T
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        data, kind = (SyntheticData(), "synthetic ids") if args.synthetic else real_data(cfg, run)
        bare_loop(cfg, data, 3)  # warm up allocator and kernels
        # bare, train(), bare again: a shared machine drifts, so the bare time is the mean
        bare_before = bare_loop(cfg, data, args.steps)
        t0 = time.perf_counter()
        train(raw, run, progress=False, data=data, device="cpu")
        full = time.perf_counter() - t0
        bare_after = bare_loop(cfg, data, args.steps)
        bare = (bare_before + bare_after) / 2
        n_ckpt = len(list((run / "checkpoints").glob("step_*")))
        # train()'s own per-step timing (excludes setup, eval, checkpoints, log writes)
        log = [r for r in read_train_log(run) if "tok_per_s" in r]
        loop = sum(
            (r["tokens"] - p) / r["tok_per_s"]
            for r, p in zip(log, [0] + [x["tokens"] for x in log], strict=False)
        )
    print(
        f"preset {preset}, arch {arch}, {args.steps} steps x {B} x {T} tokens, "
        f"threads {torch.get_num_threads()}, data: {kind}"
    )
    print(
        f"  bare PyTorch loop : {tokens / bare:10,.0f} tok/s  ({bare:.2f} s; "
        f"before {tokens / bare_before:,.0f}, after {tokens / bare_after:,.0f})"
    )
    print(
        f"  probekit train()  : {tokens / full:10,.0f} tok/s  ({full:.2f} s, "
        f"{n_ckpt} checkpoints, eval every {cfg.eval.interval} steps)"
    )
    print(f"  train() steps only: {tokens / loop:10,.0f} tok/s  ({loop:.2f} s)")
    print(f"  overhead, steps only : {100 * (loop / bare - 1):+.1f} % (target <= 15 %)")
    print(f"  overhead, end to end : {100 * (full / bare - 1):+.1f} % (setup, held-out eval and")
    print("    checkpoints included; a short run has a dense plan, so this is the worst case)")


if __name__ == "__main__":
    raise SystemExit(main())

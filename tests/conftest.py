"""Shared fixtures: an isolated token cache, and one tiny trained run reused by analysis tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threads only contend on 2 cores


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    os.environ["PROBEKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny_cfg(p: float = 0.1, steps: int = 40, **data) -> dict:
    """A nano clone run on one shipped Bible: trains in seconds on a CPU."""
    return {
        "name": data.pop("name", f"tiny_{p}"),
        "seed": 0,
        "data": {"mode": "clone", "p": p, "sources": {"en": ["bible:web"]}, **data},
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano"},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3},
        "checkpoints": {"log_spaced": 2, "every": steps // 2},
        "eval": {"n_sequences": 4},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained nano clone 90/10 run (checkpoints at 0, 1, 4, 20, 40)."""
    from probekit.training import train

    out = tmp_path_factory.mktemp("runs") / "clone_90_10"
    train(tiny_cfg(), out, progress=False)
    return out


def train_then_kill(cfg: dict, run: Path, overrides: list[str], timeout: float = 120) -> None:
    """Train `cfg` into `run` in a child process (one thread) and kill -9 it once checkpoints
    0..3 exist; fails if the child finished first."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from probekit.training import train\n"
        f"train({cfg!r}, {str(run)!r}, progress=False, overrides={overrides!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env)
    ckpts, deadline = run / "checkpoints", time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            done = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
            if len(done) >= 4:  # steps 0, 1, 2, 3 exist: kill it
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

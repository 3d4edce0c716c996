"""Shared fixtures: an isolated token cache, and one tiny trained run reused by analysis tests."""

from __future__ import annotations

import os
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

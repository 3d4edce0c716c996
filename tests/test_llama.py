"""Llama-style models in the trainer (model.arch = "llama"): build, train, resume, load, eval."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_then_kill
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from probekit.checkpoints import read_train_log
from probekit.config import PRESETS, dump_config, llama_inner, load_config
from probekit.errors import ConfigError
from probekit.training import train
from probekit.training.model import build_model, count_params

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def llama_cfg(steps: int = 12) -> dict:
    return {
        "seed": 0,
        "data": {"mode": "clone", "p": 0.3, "sources": {"en": ["bible:web"]}},
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano", "arch": "llama"},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3},
        "checkpoints": {"log_spaced": 2, "every": 4},
        "eval": {"n_sequences": 4},
    }


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # as the killed child: bitwise equality needs one reduction order
    return train(llama_cfg(), tmp_path_factory.mktemp("llama") / "run", progress=False)


def test_arch_field_and_matched_sizes():
    for preset, p in PRESETS.items():
        m = load_config({"model": {"preset": preset, "arch": "llama"}}).model
        assert (m.n_layer, m.n_embd, m.n_head, m.context) == (
            p["n_layer"],
            p["n_embd"],
            p["n_head"],
            p["context"],
        )
        assert m.n_inner == llama_inner(p["n_embd"]) and m.n_inner % 8 == 0
        # 3 d i (SwiGLU) against GPT-2's 2 d 4d: within 2 %
        assert abs(3 * m.n_inner / (8 * p["n_embd"]) - 1) < 0.02
    # an explicit n_inner wins
    assert load_config({"model": {"arch": "llama", "n_inner": 100}}).model.n_inner == 100
    # gpt2 configs do not mention arch (config.toml and fingerprints of old runs unchanged)
    text = dump_config(load_config({}))
    assert "arch" not in text
    assert 'arch = "llama"' in dump_config(load_config({"model": {"arch": "llama"}}))
    with pytest.raises(ConfigError, match=r"model\.arch: unknown architecture 'mamba' "):
        load_config({"model": {"arch": "mamba"}})


def test_llama_model_is_untied_and_near_gpt2_size():
    for preset in ("nano", "tiny", "cpu"):
        g = build_model({"preset": preset}, 512, seed=0)
        ll = build_model({"preset": preset, "arch": "llama"}, 512, seed=0)
        assert isinstance(ll, LlamaForCausalLM)
        assert ll.lm_head.weight is not ll.model.embed_tokens.weight
        assert ll.config.attention_dropout == 0.0 and not ll.config.mlp_bias
        n_g, n_l = count_params(g, True), count_params(ll, True)
        assert abs(n_l / n_g - 1) < 0.03, (preset, n_g, n_l)


def test_llama_trains_and_loads_with_transformers_alone(llama_run):
    log = read_train_log(llama_run)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert 'arch = "llama"' in (llama_run / "config.toml").read_text()
    # a fresh interpreter, no probekit import: the folder is an ordinary HF checkpoint
    final = str(llama_run / "checkpoints" / "step_000012")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({final!r})\n"
        "assert type(m).__name__ == 'LlamaForCausalLM', type(m)\n"
        "assert 'probekit' not in sys.modules\n"
        "out = m(input_ids=torch.tensor([[1, 5, 9]])).logits\n"
        "assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(llama_run / "checkpoints/step_000012")
    w = weights(llama_run, 12)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), w[name]), name
    assert not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])


def test_kill_9_then_resume_matches_uninterrupted_llama_run(llama_run, tmp_path, capsys):
    run = tmp_path / "run"
    train_then_kill(llama_cfg(), run, ["eval.interval=1", "checkpoints.every=1"], timeout=180)
    ckpts = run / "checkpoints"
    assert not (ckpts / "step_000012").exists()
    capsys.readouterr()
    torch.set_num_threads(1)
    train(llama_cfg(), run, progress=False, overrides=["eval.interval=1", "checkpoints.every=1"])
    assert "resuming" in capsys.readouterr().err
    a, b = weights(llama_run, 12), weights(run, 12)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_gives_finite_perplexity(llama_run):
    from probekit.evaluation import evaluate

    cube = evaluate(llama_run, steps=[0, 12], max_tokens=2048, progress=False)
    ppl = cube["ppl"].values
    assert ppl.size and torch.isfinite(torch.as_tensor(ppl)).all()
    # the trained model beats its initialisation
    first, last = cube["ppl"].sel(step=0), cube["ppl"].sel(step=12)
    assert float(last.mean()) < float(first.mean())


def test_align_families_run_on_a_llama_series(llama_run, tmp_path):
    import shutil

    from probekit.analysis import align
    from probekit.options import AnalysisOptions

    run = tmp_path / "run"
    shutil.copytree(llama_run, run, ignore=shutil.ignore_patterns("analysis.zarr"))
    opts = AnalysisOptions(n_pairs=8, n_grad_pairs=4)
    cube = align(
        run,
        metrics=["similarity", "neurons", "gradients", "embeddings"],
        steps=[12],
        options=opts,
        progress=False,
    ).sel(step=12)
    for var in ("hidden_cos", "cka", "grad_cos", "embed_cos", "neuron_overlap"):
        assert var in cube and np.isfinite(cube[var].values).any(), var

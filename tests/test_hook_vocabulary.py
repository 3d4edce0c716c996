"""The open hook vocabulary: a family names the activations it reads; the model view resolves
them per architecture or says in one line why it cannot; the driver reads exactly those."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import probekit
from probekit import metrics
from probekit.errors import MetricError
from probekit.hooks import load_bridge, pad_batch, run_activations
from probekit.metrics import Needs, Variable
from probekit.model_view import HOOK_KINDS, ModelView
from probekit.options import AnalysisOptions

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "plugins"))
from pk_attn_entropy import AttentionEntropy  # noqa: E402 - the one-file plugin family
from tiny_models import TINY_SIZES  # noqa: E402

OPTS = AnalysisOptions(n_pairs=12, seq_len=32, batch_size=6, n_grad_pairs=4)


def _tiny(arch: str):
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=40, **TINY_SIZES[arch])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


class _Tok:  # what load_bridge reads of a tokenizer
    def __init__(self):
        from tokenizers import Tokenizer, models

        vocab = {"<pad>": 0, "<|endoftext|>": 1} | {f"t{i}": i for i in range(2, 40)}
        self.backend_tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t2"))


def test_every_kind_resolves_to_hooks_and_unknowns_are_one_line():
    view = ModelView.from_config(_tiny("gpt2").config)
    assert view.hook_names("resid") == view.resid_hooks
    assert view.hook_names("attn_pattern") == [f"blocks.{i}.attn.hook_pattern" for i in (0, 1)]
    assert view.hook_names("blocks.{l}.attn.hook_z")[1] == "blocks.1.attn.hook_z"
    assert view.hook_names("blocks.1.hook_resid_mid") == ["blocks.1.hook_resid_mid"]
    with pytest.raises(MetricError, match="unknown activation 'colour'") as err:
        view.hook_names("colour")
    assert "\n" not in str(err.value)
    neox = ModelView.from_config(_tiny("gpt_neox").config)
    assert "parallel residual" in neox.unavailable("resid_mid")
    with pytest.raises(MetricError, match="not available for gpt_neox"):
        neox.hook_names("resid_mid")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_run_activations_reads_each_declared_kind(arch):
    model = _tiny(arch)
    view = ModelView.from_config(model.config)
    bridge = load_bridge(model, _Tok(), view)
    ids, mask = pad_batch([np.arange(2, 12), np.arange(5, 12)])
    kinds = [k for k in HOOK_KINDS if view.unavailable(k) is None]
    act = run_activations(bridge, ids, mask, view, kinds)
    assert set(act) == set(kinds)
    assert act.resid.shape == (3, 2, 10, 32)
    pattern = act["attn_pattern"]
    assert len(pattern) == 2 and pattern[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(pattern[0].sum(-1), torch.ones(2, 4, 10))  # probabilities
    assert act["mlp"][0].shape[-1] == view.d_mlp and act["mlp_out"][1].shape == (2, 10, 32)
    # the residual entering block 1 is the stream after block 0
    torch.testing.assert_close(act["resid_pre"][1], act.resid[1])
    with pytest.raises(KeyError, match="declare it in Needs.activations"):
        run_activations(bridge, ids, mask, view, ["resid"])["mlp"]
    with pytest.raises(MetricError, match="has no hook 'blocks.0.attn.hook_nothing'"):
        run_activations(bridge, ids, mask, view, ["blocks.{l}.attn.hook_nothing"])


class ResidMid(AttentionEntropy):
    name = "resid_mid_family"
    variables = (Variable("resid_mid_x", "never computed"),)
    needs = Needs(activations=frozenset({"resid_mid"}))


class Unknown(AttentionEntropy):
    name = "unknown_kind_family"
    variables = (Variable("unknown_x", "never computed"),)
    needs = Needs(activations=frozenset({"colour"}))


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    return out


def test_a_family_reading_attention_patterns_through_the_driver(run: Path):
    family = metrics.register(AttentionEntropy())
    try:
        final = probekit.list_checkpoints(run)[-1].step
        cube = probekit.align(run, metrics=family.name, steps=[final], options=OPTS, progress=False)
    finally:
        del metrics.FAMILIES[family.name]
    ent = cube["attn_entropy"].sel(step=final)
    cfg = transformers.AutoConfig.from_pretrained(probekit.list_checkpoints(run)[-1].path)
    assert ent.dims == ("language", "block", "head")
    assert ent.shape == (2, cfg.n_layer, cfg.n_head)
    # causal attention over t + 1 positions: entropy between 0 and log(T)
    assert np.all(ent.values >= 0) and np.all(ent.values <= np.log(OPTS.seq_len))


def test_an_unknown_kind_fails_before_any_checkpoint_is_loaded(run: Path, monkeypatch):
    import probekit.engine as engine

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(engine, "load_checkpoint", boom)
    family = metrics.register(Unknown())
    try:
        with pytest.raises(MetricError, match="unknown activation 'colour'"):
            probekit.align(run, metrics=family.name, options=OPTS, progress=False)
    finally:
        del metrics.FAMILIES[family.name]
    assert not (run / "analysis.zarr" / family.name).exists()


def test_a_kind_the_architecture_lacks_is_refused_up_front(tmp_path: Path, monkeypatch):
    """A GPT-NeoX series has no stream between attention and MLP: one line, nothing loaded."""
    from probekit.engine import check_needs

    model = _tiny("gpt_neox")
    model.save_pretrained(tmp_path / "step_000010")

    class Info:
        path = tmp_path / "step_000010"

    class NoParallel:
        parallel = None

    with pytest.raises(MetricError, match="resid_mid_family: activation 'resid_mid' is not"):
        check_needs([ResidMid()], NoParallel(), [Info()])

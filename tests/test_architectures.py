"""Any causal LM's checkpoint series (issue 13): tiny random GPT-2, GPT-NeoX, Llama, Qwen2,
OLMo, OLMo 2 and BLOOM models saved as series, every family on each, exact identities."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import TINY_SIZES

import probekit
from probekit.cli.main import cli
from probekit.hooks import FINAL_NORM_HOOK, load_bridge, pad_batch, run_activations
from probekit.metrics.gradients import gradient_alignment_general, mean_paper_tensors
from probekit.model_view import ModelView

ARCHS = ("gpt2", "gpt_neox", "llama", "qwen2", "olmo", "olmo2", "bloom")
# the parallel-text-free, fast options every align call here uses
FAST = ["--pairs", "8", "--seq-len", "32", "--batch-size", "4", "--grad-pairs", "2", "--quiet"]


@lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE of 400 pieces trained on a little shipped English and French text."""
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
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_model(arch: str, seed: int = 0, vocab_size: int | None = None, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        arch, vocab_size=vocab_size or len(tokenizer()), **TINY_SIZES[arch], **extra
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_series(root: Path, arch: str, layout: str = "checkpoint-{}", steps=(0, 10), **kw) -> Path:
    """Checkpoints of `arch` (a different random model per step), each with a tokenizer."""
    for i, step in enumerate(steps):
        dst = root / layout.format(step)
        tiny_model(arch, seed=i, **kw).save_pretrained(dst)
        tokenizer().save_pretrained(dst)
    return root


def cli_run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_on_every_architecture(arch: str, tmp_path: Path):
    series = save_series(tmp_path / arch, arch)
    res = cli_run("align", series, "--parallel", "bible:en", "bible:fr", *FAST)
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(series)
    assert list(cube["step"].values) == [0, 10] and list(cube["layer"].values) == [0, 1, 2]
    assert list(cube["language"].values) == ["en", "fr"]
    for name in ("hidden_cos", "cka", "linmap_r2"):
        assert cube[name].dims == ("step", "layer") and np.isfinite(cube[name]).all(), name
    d_mlp = 128 if arch in ("gpt2", "bloom") else 64
    assert cube["neuron_act_prob"].dims == ("step", "layer", "language", "neuron")
    assert cube.sizes["neuron"] == d_mlp
    assert np.isfinite(cube["neuron_act_prob"].sel(layer=[1, 2])).all()
    for name in ("probe_transfer", "probe_in_language"):
        assert np.isfinite(cube[name]).all(), name
    grad = cube["grad_cos"]
    assert grad.dims == ("step", "layer", "tensor")
    tensors = set(grad["tensor"].values)
    if arch == "gpt2":  # GPT-2 keeps its own tensor names (and its fast path)
        assert {"attn.q.weight", "attn.c_attn.weight", "mlp.c_fc.weight"} <= tensors
    else:
        assert {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight"} <= tensors
        assert {"mlp.in.weight", "mlp.out.weight", "block"} <= tensors
        assert "raw" in grad.coords
        if arch in ("llama", "qwen2", "olmo", "olmo2"):
            assert "mlp.gate.weight" in tensors
        if arch != "olmo":  # OLMo's LayerNorms have no parameters
            assert {"norm1.weight", "norm2.weight"} <= tensors
    blocks = grad.sel(layer=[1, 2], tensor="block").values
    assert np.isfinite(blocks).all() and np.all(np.abs(blocks) <= 1 + 1e-9)
    assert np.isfinite(cube["grad_cos_head"]).any()
    assert "embed_cos" not in cube  # no clones: skipped with a note


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_same_text_in_both_languages_is_identity(arch: str, tmp_path: Path):
    series = save_series(tmp_path / arch, arch, layout="step_{}", steps=(5,))
    res = cli_run(
        "align", series, "--parallel", "bible:en", "bible:en", "--metrics", "similarity", *FAST
    )
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(series).sel(step=5)
    np.testing.assert_allclose(cube["hidden_cos"].values, 1.0, atol=1e-5)
    np.testing.assert_allclose(cube["cka"].values, 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_of_a_sequence_with_itself(arch: str):
    model = tiny_model(arch)
    view = ModelView.from_config(model.config)
    rng = np.random.default_rng(0)
    ids, mask = pad_batch([rng.integers(2, 400, n) for n in (12, 7)])
    da = gradient_alignment_general(model, view, ids, mask, ids, mask)
    vals = da.values[np.isfinite(da.values)]
    np.testing.assert_allclose(vals, 1.0, atol=1e-9)
    # every tensor has a cell; NaN only where the gradient is zero in exact arithmetic
    # (BLOOM's key bias: a constant added to every key score cancels in the softmax)
    empty = [str(t) for t in da["tensor"].values if np.isnan(da.sel(tensor=t)).all()]
    assert empty == (["attn.k.bias"] if arch == "bloom" else [])
    assert da.sizes["layer"] == view.n_layers + 2
    assert mean_paper_tensors(da) == pytest.approx(1.0, abs=1e-9)


def test_general_gradients_equal_gpt2_fast_path():
    from probekit.metrics.gradients import gradient_alignment

    model = tiny_model("gpt2")  # tied embeddings: both paths tell the two uses apart
    view = ModelView.from_config(model.config)
    rng = np.random.default_rng(1)
    ids1, m1 = pad_batch([rng.integers(2, 400, n) for n in (12, 9, 15)])
    ids2, m2 = pad_batch([rng.integers(2, 400, n) for n in (10, 14, 8)])
    general = gradient_alignment_general(model, view, ids1, m1, ids2, m2)
    fast = gradient_alignment(model, ids1, m1, ids2, m2)
    same = {
        "embed.weight": "wte.weight",
        "norm1.weight": "ln_1.weight",
        "attn.qkv.weight": "attn.c_attn.weight",
        "attn.o.bias": "attn.c_proj.bias",
        "mlp.in.weight": "mlp.c_fc.weight",
        "mlp.out.weight": "mlp.c_proj.weight",
        "lm_head.weight": "lm_head.weight",
        "block": "block",
    }
    for a, b in same.items():
        np.testing.assert_allclose(
            general.sel(tensor=a).values, fast.sel(tensor=b).values, atol=1e-6, err_msg=a
        )
    assert model.lm_head.weight is model.transformer.wte.weight  # tie restored


@pytest.mark.parametrize("arch", ARCHS)
def test_bridge_activations_equal_hf_hidden_states(arch: str, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    save_series(tmp_path, arch, steps=(1,))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1").eval()
    view = ModelView.from_config(model.config)
    ids, mask = pad_batch([np.arange(3, 13), np.arange(20, 30)])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    seen = {}
    norm = view.final_norm(model).register_forward_hook(
        lambda mod, args, out: seen.setdefault("final", args[0].detach())
    )
    with torch.no_grad():
        model(ids)
    norm.remove()
    with torch.no_grad():
        logits = model(ids).logits
    bridge = load_bridge(model, tokenizer(), view)
    # the forward stops at the final norm (every cached hook has fired), on every architecture
    assert FINAL_NORM_HOOK in bridge.hook_dict
    acts = run_activations(bridge, ids, mask, view, ["resid", "mlp"])
    with torch.no_grad():  # the stop is gone afterwards: a plain call runs to the logits
        torch.testing.assert_close(bridge(ids), logits, atol=1e-5, rtol=1e-5)
    assert acts.resid.shape == (view.n_layers + 1, 2, 10, view.d_model)
    assert [a.shape for a in acts.mlp] == [(2, 10, view.d_mlp)] * view.n_layers
    # HF's last hidden state has the final norm applied; the residual stream is its input
    for lay in range(view.n_layers):
        torch.testing.assert_close(acts.resid[lay], hs[lay], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts.resid[-1], seen["final"], atol=1e-5, rtol=1e-5)


# whose bridge computes only with the wrapped model's own tensors (no weight copied at boot)
REUSABLE = {"gpt2", "llama", "qwen2", "olmo", "olmo2"}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bridge_reused_for_the_next_checkpoint_is_exact(arch: str, monkeypatch):
    """bridge_for on checkpoint B after A: the same activations, bit for bit, as a bridge
    booted on B; re-used only where every tensor it reads is the model's own."""
    from probekit import checkpoints, hooks

    hooks.release_bridge()
    a = tiny_model(arch, seed=0)
    view = ModelView.from_config(a.config)
    first = hooks.bridge_for(a, tokenizer(), view)
    second = hooks.bridge_for(tiny_model(arch, seed=1), tokenizer(), view)
    assert (first is second) == (arch in REUSABLE)
    ids, mask = pad_batch([np.arange(3, 15), np.arange(20, 29)])
    got = run_activations(second, ids, mask, view, ["resid", "mlp"])
    want = run_activations(
        load_bridge(tiny_model(arch, seed=1), tokenizer(), view), ids, mask, view, ["resid", "mlp"]
    )
    assert torch.equal(got.resid, want.resid)
    assert all(map(torch.equal, got.mlp, want.mlp))
    # another configuration, or a model over the size limit: booted afresh
    other = tiny_model(arch, seed=2, vocab_size=len(tokenizer()) + 8)
    assert hooks.bridge_for(other, tokenizer(), ModelView.from_config(other.config)) is not second
    monkeypatch.setattr(checkpoints, "KEEP_MAX_BYTES", 0)
    hooks.release_bridge()
    third = hooks.bridge_for(tiny_model(arch, seed=0), tokenizer(), view)
    assert hooks.bridge_for(tiny_model(arch, seed=1), tokenizer(), view) is not third
    hooks.release_bridge()


def test_bridge_boots_a_model_built_in_memory():
    """No folder, no config.architectures, no name_or_path: filled in before the boot."""
    for arch in ("llama", "bloom"):
        model = tiny_model(arch)
        view = ModelView.from_config(model.config)
        bridge = load_bridge(model, tokenizer(), view)
        ids = torch.arange(3, 11)[None]
        with torch.no_grad():
            torch.testing.assert_close(bridge(ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_eval_any_series_per_language(tmp_path: Path):
    from probekit.data import corpus

    series = save_series(tmp_path / "s", "llama", layout="global_step{}")
    verses = corpus.parallel_verses("web", "segond", split="test")[:60]
    (tmp_path / "en.txt").write_text("\n".join(v[1] for v in verses))
    (tmp_path / "fr.txt").write_text("\n".join(v[2] for v in verses))
    res = cli_run(
        "eval",
        series,
        "--test",
        f"en={tmp_path / 'en.txt'}",
        "--test",
        f"fr={tmp_path / 'fr.txt'}",
        "--max-tokens",
        "400",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(series)
    assert list(cube["language"].values) == ["en", "fr"]
    assert cube["ppl"].dims == ("step", "language") and np.isfinite(cube["ppl"]).all()
    assert np.isfinite(cube["ppl_char"]).all() and (cube["ppl"] > 1).all()
    assert "per char" in res.output
    res = cli_run("eval", series)  # without test text: says what is missing
    assert res.exit_code == 2 and "--test" in res.output


def test_clone_offset_series(tmp_path: Path):
    """A model over two id-shifted copies of the vocabulary, fed the same text in each."""
    v = len(tokenizer())
    series = save_series(tmp_path / "clone", "qwen2", vocab_size=2 * v, steps=(3,))
    res = cli_run(
        "align",
        series,
        "--parallel",
        "bible:en",
        "bible:en",
        "--clone-offset",
        str(v),
        "--metrics",
        "embeddings,similarity",
        *FAST,
    )
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(series)
    assert set(cube["embed_cos"].dims) == {"step", "matrix", "pairing"}
    assert np.isfinite(cube["embed_cos"]).all() and np.isfinite(cube["hidden_cos"]).all()
    res = cli_run("align", series, "--parallel", "bible:en", "bible:en", "--clone-offset", 2 * v)
    assert res.exit_code == 2 and "exceed the model's vocabulary" in res.output

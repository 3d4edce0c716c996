"""The causal and lens families (lens, patching, ablation) on constructed models."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

import probekit
from probekit.analysis import AlignOptions, align
from probekit.checkpoints import list_checkpoints, load_checkpoint
from probekit.cli.main import cli
from probekit.errors import MetricError
from probekit.hooks import load_bridge, pad_batch, run_activations
from probekit.metrics import FAMILIES, families_for, resolve
from probekit.metrics.ablation import heldout_ppl, random_like, specific_neurons, zero_hooks
from probekit.metrics.neurons import NeuronAccumulator
from probekit.model_view import ModelView
from probekit.series import open_series

OPTS = AlignOptions(n_pairs=12, seq_len=32, batch_size=6)
CAUSAL = "lens,patching,ablation"


@pytest.fixture(scope="module")
def copied(tiny_run: Path, tmp_path_factory) -> tuple[Path, int]:
    """The final checkpoint with EN2's embedding and output rows copied from EN1's, and the
    three causal families computed on it."""
    out = tmp_path_factory.mktemp("causal") / "copy"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    info = list_checkpoints(out)[-1]
    model = load_checkpoint(info)
    v = model.config.vocab_size // 2
    with torch.no_grad():
        model.transformer.wte.weight[v:] = model.transformer.wte.weight[:v]
        model.lm_head.weight[v:] = model.lm_head.weight[:v]
    model.save_pretrained(info.path)
    align(out, metrics=CAUSAL, steps=[info.step], options=OPTS, progress=False)
    return out, info.step


def test_not_computed_by_default_but_by_name():
    assert not {"lens", "patching", "ablation"} & {f.name for f in families_for("align")}
    assert [f.name for f in resolve(CAUSAL, "align")] == ["lens", "patching", "ablation"]
    assert [f.name for f in resolve("patch_kept", "align")] == ["patching"]
    for name in ("lens", "patching", "ablation"):
        for var in FAMILIES[name].variables:
            assert var.definition or var.title


def test_copied_clone_is_one_language(copied):
    run, step = copied
    cube = probekit.open_cube(run).sel(step=step)
    mass = cube["lens_mass"]
    assert set(mass["vocab_language"].values) == {"EN1", "EN2", "shared"}
    # identical unembedding rows for a piece and its clone: the mass splits equally
    np.testing.assert_allclose(
        mass.sel(vocab_language="EN1").values, mass.sel(vocab_language="EN2").values, atol=1e-6
    )
    np.testing.assert_allclose(mass.sum("vocab_language").values, 1.0, atol=1e-6)
    ce = cube["lens_ce"].dropna("layer")
    np.testing.assert_allclose(ce.sel(language="EN1"), ce.sel(language="EN2"), atol=1e-5)
    acc = cube["lens_acc_collapsed"].dropna("layer").values
    assert np.all(acc >= cube["lens_acc"].dropna("layer").values - 1e-12)
    # patching L1's state keeps all of L2's loss: the states are the same
    kept = cube["patch_kept"].dropna("layer").values
    np.testing.assert_allclose(kept, 1.0, atol=1e-4)
    pce = cube["patch_ce"]
    np.testing.assert_allclose(pce.sel(condition="same_text"), pce.sel(condition="none"), atol=1e-5)
    assert np.all(pce.sel(condition="different_text") > pce.sel(condition="none"))
    # both languages run the same computation: no specific neurons, equal ablation effects
    d = cube["ablation_dppl"]
    np.testing.assert_allclose(d.sel(language="EN1"), d.sel(language="EN2"), atol=1e-6)
    assert int(cube["ablation_n_neurons"].fillna(0).sum()) == 0
    assert "definition" in cube["lens_mass"].attrs and "definition" in cube["patch_kept"].attrs


def test_lens_at_last_layer_is_the_models_own_loss(copied):
    run, step = copied
    series = open_series(run, OPTS.validated())
    par = series.parallel
    model = load_checkpoint(list_checkpoints(run)[-1])
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in par.ids1:
            ids = torch.as_tensor(seq)[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(seq) - 1
    cube = probekit.open_cube(run).sel(step=step)
    last = int(model.config.n_layer)
    lens = float(cube["lens_ce"].sel(layer=last, language="EN1"))
    assert lens == pytest.approx(total / count, abs=1e-4)


def test_decode_after_the_bridge_boot_is_the_models_logits(tiny_run: Path):
    """The driver boots its bridge before the lens decodes: the wrapped modules still give
    the model's own logits at the last layer."""
    info = list_checkpoints(tiny_run)[-1]
    model = load_checkpoint(info)
    view = ModelView.from_config(model.config)
    ids = torch.arange(2, 22)[None]
    with torch.no_grad():
        ref = model(ids).logits
        series = open_series(tiny_run, OPTS.validated())
        bridge = load_bridge(model, series.tokenizer, view)
        act = run_activations(bridge, ids, torch.ones_like(ids, dtype=torch.bool), view)
        lens = view.decode(model, act.resid[-1])
    torch.testing.assert_close(lens, ref, atol=1e-4, rtol=1e-4)


V, D_MLP = 8, 16


def split_neuron_model() -> transformers.GPT2LMHeadModel:
    """One block whose first D_MLP/2 MLP neurons fire only on L1 tokens (ids 1..V-1) and push
    up the logits of L1 tokens; L2 tokens (V+1..2V-1) never fire them."""
    cfg = transformers.GPT2Config(
        vocab_size=2 * V,
        n_positions=32,
        n_embd=8,
        n_layer=1,
        n_head=1,
        n_inner=D_MLP,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    half = D_MLP // 2
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight[1:V, 0] = 1.0
        tr.wte.weight[V + 1 :, 0] = -1.0
        tr.wte.weight[:, 2] = 0.5  # keeps the final norm's input away from zero
        blk = tr.h[0]
        for ln in (blk.ln_1, blk.ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
        blk.mlp.c_fc.weight[0, :half] = 10.0
        blk.mlp.c_fc.bias[:half] = -5.0
        blk.mlp.c_fc.bias[half:] = 1.0  # shared neurons: fire everywhere, write nothing
        blk.mlp.c_proj.weight[:half, 1] = 1.0  # specific neurons write coordinate 1
        model.lm_head.weight[1:V, 1] = 3.0  # ... which raises every L1 token's logit
        model.lm_head.weight[V + 1 :, 0] = -3.0  # L2 tokens read the language coordinate
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(2 * V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def test_ablating_split_neurons_hurts_only_their_language():
    model = split_neuron_model()
    view = ModelView.from_config(model.config)
    bridge = load_bridge(model, _tokenizer(), view)
    g = torch.Generator().manual_seed(0)
    seqs1 = [torch.randint(1, V, (24,), generator=g).numpy() for _ in range(8)]
    seqs2 = [s + V for s in seqs1]
    acc = NeuronAccumulator(1, D_MLP, ["L1", "L2"])
    for lang, seqs in (("L1", seqs1), ("L2", seqs2)):
        act = run_activations(bridge, *pad_batch(seqs), view, ["mlp"])
        acc.update(lang, act.mlp, act.mask)
    masks = specific_neurons(acc.result())
    assert masks[0, 0].tolist() == [True] * (D_MLP // 2) + [False] * (D_MLP // 2)
    assert not masks[:, 1].any()
    texts = {"L1": np.concatenate(seqs1), "L2": np.concatenate(seqs2)}
    clean = heldout_ppl(bridge, [], texts, 16, "cpu")
    ablated = heldout_ppl(bridge, zero_hooks(view, masks[:, 0]), texts, 16, "cpu")
    assert ablated["L1"] > clean["L1"] * 1.5
    assert ablated["L2"] == pytest.approx(clean["L2"], rel=1e-6)
    rand = random_like(masks[:, 0], masks.any(1), seed=0)
    assert rand.sum() == masks[:, 0].sum() and not (rand & masks.any(1)).any()
    control = heldout_ppl(bridge, zero_hooks(view, rand), texts, 16, "cpu")
    assert control["L1"] == pytest.approx(clean["L1"], rel=1e-6)  # random neurons write nothing


def test_series_that_cannot_have_them(tmp_path: Path):
    external = SimpleNamespace(run_dir=tmp_path, vocab=None, languages=["L1", "L2"], mode="x")
    for name in ("lens", "patching", "ablation"):
        why = FAMILIES[name].applies(external)
        assert why and "vocabulary" in why and "\n" not in why
    mono = SimpleNamespace(run_dir=tmp_path, vocab=object(), languages=["EN"], mode="mono")
    assert "monolingual" in FAMILIES["lens"].applies(mono)
    pair = SimpleNamespace(run_dir=tmp_path, vocab=object(), languages=["en", "fr"], mode="pair")
    assert "token-aligned" in FAMILIES["patching"].applies(pair)


def test_cli_errors_and_names(tmp_path: Path, copied):
    from probekit.training import train

    cfg = {
        "data": {"mode": "mono", "sources": {"en": ["bible:web"]}},
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano"},
        "train": {"steps": 2, "batch_size": 4},
        "eval": {"n_sequences": 2},
    }
    train(cfg, tmp_path / "mono", progress=False)
    runner = CliRunner()
    res = runner.invoke(cli, ["align", str(tmp_path / "mono"), "--metrics", "lens"])
    assert res.exit_code == 2 and "monolingual" in res.output
    assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(MetricError, match="monolingual"):
        align(tmp_path / "mono", metrics="patching", progress=False)
    run, step = copied
    res = runner.invoke(
        cli,
        ["align", str(run), "--metrics", "lens", "--steps", str(step), "--pairs", "8"]
        + ["--seq-len", "16", "--recompute"],
    )
    assert res.exit_code == 0, res.output


def test_patching_layer_0_swaps_the_token_and_layer_l_is_l1s_prediction(tiny_run: Path):
    """On a trained clone model: patching L1's embedding-output state at t equals feeding L2's
    text with its token t swapped for the L1 clone; patching the last layer's state makes the
    prediction at t exactly L1's own."""
    from probekit.metrics.base import CheckpointContext
    from probekit.metrics.lens import collapse_map
    from probekit.metrics.patching import _positions, collapsed_ce, patching

    opts = AlignOptions(n_pairs=4, seq_len=16, batch_size=3).validated()
    series = open_series(tiny_run, opts)
    model = load_checkpoint(list_checkpoints(tiny_run)[-1])
    view = ModelView.from_config(model.config)
    ds = patching(CheckpointContext(model, view, series, opts), positions=3)
    canon = torch.as_tensor(collapse_map(series.vocab, view.vocab_size))
    par = series.parallel
    swapped, own, none = [], [], []
    with torch.no_grad():
        for s1, s2 in zip(par.ids1, par.ids2, strict=True):
            for t in _positions(len(s1), 3):
                target = torch.as_tensor([s2[t + 1]])
                ids = torch.as_tensor(s2).clone()
                none.append(collapsed_ce(model(ids[None]).logits[0, t : t + 1], target, canon))
                ids[t] = int(s1[t])
                swapped.append(collapsed_ce(model(ids[None]).logits[0, t : t + 1], target, canon))
                l1 = model(torch.as_tensor(s1)[None]).logits[0, t : t + 1]
                own.append(collapsed_ce(l1, target, canon))
    ce = ds["patch_ce"]
    last = view.n_layers
    assert float(ce.sel(layer=0, condition="same_text")) == pytest.approx(
        float(torch.cat(swapped).mean()), abs=1e-4
    )
    assert float(ce.sel(layer=last, condition="same_text")) == pytest.approx(
        float(torch.cat(own).mean()), abs=1e-4
    )
    assert float(ce.sel(layer=1, condition="none")) == pytest.approx(
        float(torch.cat(none).mean()), abs=1e-4
    )
    assert ds.attrs["n_positions"] == len(none)


def test_real_pair_lens_and_refused_patching(tmp_path: Path):
    """EN-FR with disjoint vocabularies: the lens splits mass over EN, FR and shared ids;
    patching (needs aligned positions) is a one-line error when named."""
    from probekit.training import train

    cfg = {
        "data": {
            "mode": "pair",
            "p": 0.5,
            "sources": {"en": ["bible:web"], "fr": ["bible:segond"]},
        },
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano"},
        "train": {"steps": 4, "batch_size": 4},
        "eval": {"n_sequences": 2},
    }
    run = tmp_path / "enfr"
    train(cfg, run, progress=False)
    with pytest.raises(MetricError, match="token-aligned") as err:
        align(run, metrics="patching", options=OPTS, progress=False)
    assert "\n" not in str(err.value)
    step = list_checkpoints(run)[-1].step
    cube = align(run, metrics="lens", steps=[step], options=OPTS, progress=False).sel(step=step)
    mass = cube["lens_mass"].dropna("layer", how="all")
    assert list(mass["vocab_language"].values) == ["EN", "FR", "shared"]
    np.testing.assert_allclose(mass.sum("vocab_language").values, 1.0, atol=1e-6)
    acc = cube["lens_acc"].dropna("layer", how="all")
    collapsed = cube["lens_acc_collapsed"].dropna("layer", how="all")
    np.testing.assert_allclose(acc.values, collapsed.values)  # no clone map: identity

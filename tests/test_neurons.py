import math
import os

import numpy as np
import pytest
import torch
import transformers

from probekit.errors import MetricError
from probekit.metrics.neurons import NeuronAccumulator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 8  # base vocabulary; L1 ids 1..V-1, L2 ids V+1..2V-1
D_MLP = 16


def half_specific_model(n_layer: int = 2) -> transformers.GPT2LMHeadModel:
    """GPT-2 whose first D_MLP/2 MLP neurons fire only on L1 tokens; the rest fire on all.

    wte rows carry +1 (L1) / -1 (L2) on coordinate 0; attention and positions are zeroed, so the
    MLP input after ln_2 has coordinate 0 = +-2.65. Specific neurons read it with weight 10 and
    bias -5; shared neurons have zero weight and bias +1.
    """
    cfg = transformers.GPT2Config(
        vocab_size=2 * V,
        n_positions=16,
        n_embd=8,
        n_layer=n_layer,
        n_head=1,
        n_inner=D_MLP,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight[1:V, 0] = 1.0
        tr.wte.weight[V + 1 :, 0] = -1.0
        for blk in tr.h:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.fill_(1.0)
            half = D_MLP // 2
            blk.mlp.c_fc.weight[0, :half] = 10.0
            blk.mlp.c_fc.bias[:half] = -5.0
            blk.mlp.c_fc.bias[half:] = 1.0
        tr.ln_f.weight.fill_(1.0)
    return model


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(2 * V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # No BOS token: the bridge then keeps this tokenizer as is (no hub look-up).
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0")


def mlp_post_bridge(model: transformers.GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """[n_layers, B, T, d_mlp] from a TransformerLens bridge (offline), hook mlp.hook_post."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=model, tokenizer=tiny_tokenizer(), device="cpu"
    )
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("mlp.hook_post"))
    return torch.stack(
        [cache[f"blocks.{i}.mlp.hook_post"] for i in range(len(model.transformer.h))]
    )


def mlp_post_hooks(model: transformers.GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """The same tensor via forward hooks on model.transformer.h[l].mlp.act."""
    acts = []
    hs = [
        b.mlp.act.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
        for b in model.transformer.h
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    return torch.stack(acts)


def batches(seed: int = 0, b: int = 4, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids1 = torch.randint(1, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 6:] = False
    return ids1, ids1 + V, mask


def test_bridge_hook_matches_act_hook():
    model = half_specific_model()
    ids1, _, _ = batches()
    a = mlp_post_bridge(model, ids1)
    b = mlp_post_hooks(model, ids1)
    assert a.shape == (2, 4, 10, D_MLP)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_half_specific_neurons_give_half():
    model = half_specific_model()
    acc = NeuronAccumulator(2, D_MLP, ["EN1", "EN2"])
    for seed in range(2):
        ids1, ids2, mask = batches(seed)
        acc.update("EN1", mlp_post_bridge(model, ids1), mask)
        acc.update("EN2", mlp_post_hooks(model, ids2), mask)
    ds = acc.result()
    frac = ds["lang_specific_frac"]
    np.testing.assert_allclose(frac.sel(language="EN1"), 0.5, atol=1e-9)
    np.testing.assert_allclose(frac.sel(language="EN2"), 0.0, atol=1e-9)
    lape = ds["lape"].values
    np.testing.assert_allclose(lape[:, : D_MLP // 2], 0.0, atol=1e-12)
    np.testing.assert_allclose(lape[:, D_MLP // 2 :], math.log(2), atol=1e-12)
    # LAPE's top-rate rule within each layer picks the same half here.
    ds2 = acc.result(selection="top_rate_per_layer", lape_top_rate=0.5)
    np.testing.assert_allclose(ds2["lang_specific_frac"].sel(language="EN1"), 0.5)
    # Top-8 sets: EN1 = specific neurons (ties at p = 1 broken by mean activation), EN2 = the
    # shared ones; so no overlap, chance k/(2N-k) = 1/3.
    ds3 = acc.result(top_k=8)
    np.testing.assert_allclose(ds3["neuron_overlap"], 0.0)
    np.testing.assert_allclose(ds3["neuron_overlap_coef"], 0.0)
    np.testing.assert_allclose(ds3["neuron_overlap_chance"], 8 / 24)
    assert int(ds["n_tokens"].sel(language="EN1")) == 2 * (4 * 10 - 4)


def test_dims_coords_and_definitions():
    acc = NeuronAccumulator(3, 5, ["EN1", "EN2"])
    g = torch.Generator().manual_seed(0)
    for lang in ("EN1", "EN2"):
        acc.update(lang, torch.randn(3, 2, 7, 5, generator=g))
    ds = acc.result()
    assert ds["neuron_act_prob"].dims == ("layer", "language", "neuron")
    assert ds["lape"].dims == ("layer", "neuron")
    assert ds["lang_specific_frac"].dims == ("layer", "language")
    for v in ("neuron_overlap", "neuron_overlap_coef", "neuron_overlap_chance"):
        assert ds[v].dims == ("layer",)
    assert list(ds.layer.values) == [1, 2, 3]
    assert list(ds.language.values) == ["EN1", "EN2"]
    assert ds.attrs["top_k"] == 1  # 10% of 5, at least 1
    for v in ds.data_vars.values():
        assert v.attrs["definition"]
    assert (ds["lape"] <= math.log(2) + 1e-12).all()
    # Global LAPE top-rate selection runs as well.
    acc.result(selection="top_rate", lape_top_rate=0.2)


def test_memory_independent_of_tokens():
    acc = NeuronAccumulator(2, 64, ["EN1", "EN2"])
    before = acc.nbytes
    shapes = [a.shape for a in (acc.counts, acc.act_sum, acc.tokens)]
    for t in (4, 256):
        acc.update("EN1", torch.randn(2, 8, t, 64), torch.ones(8, t, dtype=torch.bool))
        assert acc.nbytes == before
        assert [a.shape for a in (acc.counts, acc.act_sum, acc.tokens)] == shapes


def test_threshold_and_mask():
    acc = NeuronAccumulator(1, 2, ["A", "B"], threshold=0.5)
    acts = torch.tensor([[[[0.4, 0.6], [1.0, -1.0]]]])  # [1 layer, B=1, T=2, 2]
    acc.update("A", acts, torch.tensor([[True, False]]))
    assert acc.counts[0, 0].tolist() == [0, 1]
    assert acc.tokens.tolist() == [1, 0]


def test_bad_input():
    acc = NeuronAccumulator(1, 4, ["A", "B"])
    with pytest.raises(MetricError):
        acc.update("C", torch.zeros(1, 1, 2, 4))
    with pytest.raises(MetricError):
        acc.update("A", torch.zeros(2, 1, 2, 4))
    with pytest.raises(MetricError):
        acc.update("A", torch.zeros(1, 1, 2, 4), torch.ones(1, 3, dtype=torch.bool))
    acc.update("A", torch.zeros(1, 1, 2, 4))
    with pytest.raises(MetricError):
        acc.result()  # no tokens for B
    with pytest.raises(MetricError):
        NeuronAccumulator(1, 4, ["A", "A"])

import numpy as np
import pytest
import torch
import transformers

from probekit.errors import MetricError
from probekit.metrics.embeddings import (
    default_freq_bins,
    embedding_similarity,
    embedding_similarity_by_freq,
    shared_token_stats,
)

V = 200


def model_with_rows(width: int = 256, copy: bool = True, seed: int = 0):
    cfg = transformers.GPT2Config(
        vocab_size=2 * V,
        n_positions=8,
        n_embd=width,
        n_layer=1,
        n_head=1,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.transformer.wte.weight, model.lm_head.weight):
            w.copy_(torch.randn(w.shape, generator=g))
            if copy:
                w[V:] = w[:V]
    return model


def clone_pairs(start: int = 1) -> np.ndarray:
    ids = np.arange(start, V)
    return np.stack([ids, ids + V], axis=1)


def test_copied_rows_one_random_zero():
    cos = embedding_similarity(model_with_rows(copy=True), clone_pairs())
    assert cos.dims == ("matrix", "pairing")
    assert list(cos.matrix.values) == ["input", "output"]
    assert list(cos.pairing.values) == ["clone", "all"]
    assert cos.name == "embed_cos" and cos.attrs["definition"]
    np.testing.assert_allclose(cos.sel(pairing="clone"), 1.0, atol=1e-6)
    assert (abs(cos.sel(pairing="all")) < 0.02).all()
    rnd = embedding_similarity(model_with_rows(copy=False), clone_pairs())
    assert (abs(rnd) < 0.02).all()


def test_all_pairs_exact_matches_sampling_and_brute_force():
    model = model_with_rows(width=8, copy=False)
    p = clone_pairs()[:30]
    w = model.transformer.wte.weight.detach().double().numpy()
    u = w[p[:, 0]] / np.linalg.norm(w[p[:, 0]], axis=1, keepdims=True)
    v = w[p[:, 1]] / np.linalg.norm(w[p[:, 1]], axis=1, keepdims=True)
    c = u @ v.T
    brute = (c.sum() - np.trace(c)) / (30 * 29)
    exact = embedding_similarity(model, p)
    np.testing.assert_allclose(exact.sel(matrix="input", pairing="all"), brute, atol=1e-12)
    np.testing.assert_allclose(exact.sel(matrix="input", pairing="clone"), np.trace(c) / 30)
    sampled = embedding_similarity(model, p, n_all_pairs=200_000, seed=3)
    np.testing.assert_allclose(sampled.sel(pairing="all"), exact.sel(pairing="all"), atol=0.01)


def test_by_freq_bins_and_counts():
    model = model_with_rows(copy=True)
    with torch.no_grad():  # make the rarest half of the clones unrelated
        model.transformer.wte.weight[V + 1 : V + 100] = torch.randn(99, 256)
    p = clone_pairs()
    freq = np.where(p[:, 0] < 100, 3.0, 5e4)
    freq[0] = 0  # never seen
    out = embedding_similarity_by_freq(model, p, freq)
    assert out.dims == ("matrix", "freq_bin")
    assert out.name == "embed_cos_by_freq" and out.attrs["definition"]
    edges = default_freq_bins(freq)
    np.testing.assert_allclose(edges[:5], 10 ** (np.arange(5) / 4))
    assert out.freq_bin.values[0] == 0.0  # the below-1 bin is kept since it is not empty
    assert int(out["count"].sum()) == len(p)
    assert int(out["count"].sel(freq_bin=0.0)) == 1
    hi = out.sel(matrix="input").where(out["count"] > 0, drop=True)
    assert float(hi.isel(freq_bin=-1)) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(hi.isel(freq_bin=1))) < 0.1
    np.testing.assert_allclose(out.sel(matrix="output").where(out["count"] > 0, drop=True), 1.0)


def test_disjoint_vocab_raises_and_shared_stats():
    model = model_with_rows()
    with pytest.raises(MetricError, match="needs cloned languages"):
        embedding_similarity(model, np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(MetricError):
        embedding_similarity(model, np.array([[1, 5 * V]]))
    st = shared_token_stats(model, np.arange(1, 20))
    assert st.dims == ("stat", "group")
    assert list(st.group.values) == ["shared", "other"]
    assert int(st.sel(stat="n_tokens", group="shared")) == 19
    assert int(st.sel(stat="n_tokens", group="other")) == 2 * V - 20
    assert abs(float(st.sel(stat="in_out_cos", group="shared"))) < 0.2
    with pytest.raises(MetricError):
        shared_token_stats(model, np.array([], dtype=np.int64))

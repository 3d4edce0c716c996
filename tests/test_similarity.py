"""Streaming cross-language similarity (probekit.metrics.similarity): exactness and sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import cka_biased_gram, cka_debiased_gram

from probekit.errors import MetricError
from probekit.metrics.similarity import (
    METRICS,
    SimilarityAccumulator,
    matched_cosine,
    retrieval_accuracy,
    token_cosine,
)


def _data(L=3, B=16, T=10, d=8, seed=0, noise=0.5, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(L, B, T, d, generator=g) + offset
    h2 = h1 + noise * torch.randn(L, B, T, d, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, :2] = True
    return h1, mask, h2, mask.clone(), torch.arange(B)


def _feed(acc, h1, m1, h2, m2, idx, bs, baseline=True):
    B = h1.shape[1]
    for s in range(0, B, bs):
        sl = slice(s, s + bs)
        acc.update(h1[:, sl], m1[sl], h2[:, sl], m2[sl], idx[sl])
        if baseline:
            # driver pairs i with (i+1) mod n: here within the full set
            j = (idx[sl] + 1) % B
            acc.update_baseline(h1[:, sl], m1[sl], h2[:, j], m2[j], idx[sl])
    return acc


@pytest.mark.parametrize("aligned", [True, False])
def test_streaming_equals_one_shot(aligned):
    h1, m1, h2, m2, idx = _data()
    if not aligned:  # different lengths per side
        m2 = m2.clone()
        m2[:, -3:] = False
    res = []
    for bs in (16, 3):
        acc = SimilarityAccumulator(3, 8, aligned=aligned, n_groups=4)
        res.append(_feed(acc, h1, m1, h2, m2, idx, bs).result(ci=0.9, n_boot=30, seed=1))
    a, b = res
    assert set(a.data_vars) == set(b.data_vars)
    assert "cka_baseline_lo" in a and "retrieval_acc_hi" in a
    for v in a.data_vars:
        np.testing.assert_allclose(a[v].values, b[v].values, atol=1e-9, rtol=0, err_msg=v)


def test_identical_states():
    h1, m, _, _, idx = _data(B=24)
    acc = SimilarityAccumulator(3, 8, aligned=True)
    acc.update(h1, m, h1.clone(), m, idx)
    ds = acc.result()
    np.testing.assert_allclose(ds.hidden_cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(ds.hidden_cos_centred, 1.0, atol=1e-9)
    np.testing.assert_allclose(ds.cka, 1.0, atol=1e-9)
    np.testing.assert_allclose(ds.cka_biased, 1.0, atol=1e-9)
    np.testing.assert_array_equal(ds.retrieval_acc, 1.0)
    assert (ds.linmap_r2 > 0.999).all()
    np.testing.assert_allclose(ds.procrustes_r2, 1.0, atol=1e-9)
    assert ds.attrs["retrieval_chance"] == pytest.approx(1 / 24)


def test_orthogonal_map_procrustes():
    h1, m, _, _, idx = _data(B=32, d=8, offset=0.0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    h2 = h1 @ q
    acc = SimilarityAccumulator(3, 8, aligned=True)
    acc.update(h1, m, h2, m, idx)
    ds = acc.result()
    assert (ds.procrustes_r2 > 0.999).all()
    assert (ds.linmap_r2 > 0.99).all()
    assert (ds.hidden_cos < 0.7).all()
    np.testing.assert_allclose(ds.cka, 1.0, atol=1e-6)  # CKA is rotation invariant


def test_random_independent_cka_debiased_near_zero():
    g = torch.Generator().manual_seed(5)
    L, B, T, d = 2, 60, 4, 64  # low n (240 tokens), high d: biased CKA is inflated
    h1, h2 = torch.randn(L, B, T, d, generator=g), torch.randn(L, B, T, d, generator=g)
    m = torch.ones(B, T, dtype=torch.bool)
    acc = SimilarityAccumulator(L, d, metrics=("cka",), aligned=True)
    acc.update(h1, m, h2, m, torch.arange(B))
    ds = acc.result()
    assert (np.abs(ds.cka) < 0.05).all()
    assert (ds.cka_biased > 0.15).all()


@pytest.mark.parametrize("aligned", [True, False])
def test_streaming_cka_equals_gram(aligned):
    h1, m1, h2, m2, idx = _data(B=12, d=6, offset=5.0)
    acc = SimilarityAccumulator(3, 6, metrics=("cka", "hidden_cos"), aligned=aligned)
    _feed(acc, h1, m1, h2, m2, idx, 5, baseline=False)
    ds = acc.result()
    if aligned:
        x, y = h1[:, m1].double().numpy(), h2[:, m2].double().numpy()
    else:  # recover the matched tokens with the public helper logic
        x, y = _matched_tokens(h1, m1, h2, m2)
    for l in range(3):
        assert ds.cka.values[l] == pytest.approx(cka_debiased_gram(x[l], y[l]), abs=1e-6)
        assert ds.cka_biased.values[l] == pytest.approx(cka_biased_gram(x[l], y[l]), abs=1e-6)


def _matched_tokens(h1, m1, h2, m2):
    from scipy.optimize import linear_sum_assignment

    xs, ys = [], []
    for b in range(h1.shape[1]):
        a, c = h1[:, b, m1[b]].double(), h2[:, b, m2[b]].double()
        cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(
            c, dim=-1
        ).transpose(1, 2)
        r, k = linear_sum_assignment(cos[1:].mean(0).numpy(), maximize=True)
        xs.append(a[:, r])
        ys.append(c[:, k])
    return torch.cat(xs, 1).numpy(), torch.cat(ys, 1).numpy()


def test_maps_equal_explicit_token_fit():
    h1, m, h2, _, idx = _data(B=20, d=5, noise=1.0)
    ridge = 0.1
    acc = SimilarityAccumulator(3, 5, metrics=("linmap_r2", "procrustes_r2"), ridge=ridge)
    _feed(acc, h1, m, h2, m, idx, 7, baseline=False)
    ds = acc.result()
    fit, test = (idx % 2 == 0), (idx % 2 == 1)
    for l in range(3):
        xf, yf = h1[l, fit][m[fit]].double().numpy(), h2[l, fit][m[fit]].double().numpy()
        xt, yt = h1[l, test][m[test]].double().numpy(), h2[l, test][m[test]].double().numpy()
        mx, my = xf.mean(0), yf.mean(0)
        yc, xc = yf - my, xf - mx
        lam = ridge * np.trace(yc.T @ yc) / 5
        a = np.linalg.solve(yc.T @ yc + lam * np.eye(5), yc.T @ xc)
        sst = ((xt - xt.mean(0)) ** 2).sum()
        r2 = 1 - ((xt - (yt - my) @ a - mx) ** 2).sum() / sst
        assert ds.linmap_r2.values[l] == pytest.approx(r2, abs=1e-9)
        u, s, vt = np.linalg.svd(yc.T @ xc)
        w = s.sum() / np.trace(yc.T @ yc) * u @ vt
        r2p = 1 - ((xt - (yt - my) @ w - mx) ** 2).sum() / sst
        assert ds.procrustes_r2.values[l] == pytest.approx(r2p, abs=1e-9)


def test_matched_cosine_finds_permutation():
    g = torch.Generator().manual_seed(7)
    L, B, T, d = 3, 6, 9, 16
    h1 = torch.randn(L, B, T, d, generator=g)
    perm = torch.randperm(T, generator=g)
    h2 = h1[:, :, perm]
    m = torch.ones(B, T, dtype=torch.bool)
    acc = SimilarityAccumulator(L, d, aligned=False)
    acc.update(h1, m, h2, m, torch.arange(B))
    ds = acc.result()
    np.testing.assert_allclose(ds.hidden_cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(ds.cka, 1.0, atol=1e-9)
    np.testing.assert_allclose(matched_cosine(h1[:, 0], h2[:, 0]), 1.0, atol=1e-6)
    # aligned=True on the same data does not see the permutation
    acc2 = SimilarityAccumulator(L, d, metrics=("hidden_cos",), aligned=True)
    acc2.update(h1, m, h2, m, torch.arange(B))
    assert (acc2.result().hidden_cos < 0.5).all()


def test_one_shot_helpers():
    h1, m, h2, _, _ = _data(B=4)
    c = token_cosine(h1, h2, m)
    ref = torch.nn.functional.cosine_similarity(h1[1, 2][m[2]], h2[1, 2][m[2]], dim=-1).mean()
    assert c.shape == (3, 4) and c[1, 2] == pytest.approx(float(ref), abs=1e-6)
    p = np.random.default_rng(0).normal(size=(10, 4))
    a12, a21 = retrieval_accuracy(p, p + 1e-3)
    assert a12 == 1.0 and a21 == 1.0
    a12, _ = retrieval_accuracy(p, np.roll(p, 1, axis=0))
    assert a12 == 0.0


def test_bootstrap_interval_shrinks():
    widths = []
    for B in (40, 400):
        h1, m, h2, _, idx = _data(L=2, B=B, T=6, d=6, noise=1.5, seed=11)
        acc = SimilarityAccumulator(2, 6, n_groups=20)
        _feed(acc, h1, m, h2, m, idx, 100, baseline=False)
        ds = acc.result(ci=0.95, n_boot=200, seed=0)
        widths.append({k: float((ds[k + "_hi"] - ds[k + "_lo"]).mean()) for k in METRICS})
    for k in METRICS:
        assert widths[1][k] < 0.7 * widths[0][k], (k, widths)


def test_memory_constant_in_pairs():
    h1, m, h2, _, idx = _data(L=2, B=200, T=5, d=6)
    acc = SimilarityAccumulator(2, 6, metrics=("cka", "linmap_r2"), n_groups=4)
    acc.update(h1[:, :100], m[:100], h2[:, :100], m[:100], idx[:100])
    n1 = acc.nbytes_sums
    acc.update(h1[:, 100:], m[100:], h2[:, 100:], m[100:], idx[100:])
    assert acc.nbytes_sums == n1


def test_bad_input():
    h1, m, h2, _, idx = _data()
    with pytest.raises(MetricError):
        SimilarityAccumulator(3, 8, metrics=("hidden_cos", "svcca"))
    acc = SimilarityAccumulator(3, 8, aligned=True)
    with pytest.raises(MetricError):  # d mismatch
        acc.update(h1, m, h2[..., :7], m, idx)
    with pytest.raises(MetricError):  # aligned with T1 != T2
        acc.update(h1, m, h2[:, :, :9], m[:, :9], idx)
    with pytest.raises(MetricError):  # empty sequence
        m0 = m.clone()
        m0[0] = False
        acc.update(h1, m0, h2, m0, idx)
    with pytest.raises(MetricError):  # nothing fed
        acc.result()
    acc.update(h1, m, h2, m, idx)
    with pytest.raises(MetricError):  # same pair twice
        acc.update(h1, m, h2, m, idx)
    with pytest.raises(MetricError):  # ci without groups
        acc.result(ci=0.9)


def _feed_engine_order(
    acc: SimilarityAccumulator, h1: torch.Tensor, h2: torch.Tensor, bs: int, together=False
) -> None:
    """The engine's order: batch k's main pairs, then its baseline (L1 of pair i with L2 of
    pair i + 1 mod n); ``together``: both in one update_with_baseline call, as the engine."""
    n = h1.shape[1]
    mask = torch.ones(h1.shape[1:3], dtype=torch.bool)
    for s in range(0, n, bs):
        idx = torch.arange(s, min(s + bs, n))
        a, b, other = h1[:, idx], h2[:, idx], h2[:, (idx + 1) % n]
        if together:
            acc.update_with_baseline(a, mask[idx], b, mask[idx], other, mask[idx], idx)
        else:
            acc.update(a, mask[idx], b, mask[idx], idx)
            acc.update_baseline(a, mask[idx], other, mask[idx], idx)


@pytest.mark.parametrize("n_groups, n", [(None, 24), (4, 24), (3, 24)])
def test_shared_baseline_equals_computed_baseline(n_groups, n):
    """The baseline's one-language sums moved from the main cells give the numbers the
    baseline computes itself, intervals included."""
    g = torch.Generator().manual_seed(3)
    h1 = torch.randn(3, n, 7, 6, generator=g) + 2.0
    h2 = 0.5 * h1 + torch.randn(3, n, 7, 6, generator=g)
    out = []
    for share, together in ((False, False), (True, False), (True, True), (False, True)):
        acc = SimilarityAccumulator(3, 6, n_groups=n_groups, share_baseline=share)
        _feed_engine_order(acc, h1, h2, bs=5, together=together)
        out.append(acc.result(ci=0.9 if n_groups else None, n_boot=50))
    assert any(k.endswith("_baseline") for k in out[0].data_vars)
    for other in out[1:]:
        for k in out[0].data_vars:
            np.testing.assert_allclose(other[k].values, out[0][k].values, rtol=1e-10, atol=1e-12)


def test_shared_baseline_bad_input():
    g = torch.Generator().manual_seed(4)
    h1, h2 = torch.randn(2, 7, 5, 4, generator=g), torch.randn(2, 7, 5, 4, generator=g)
    acc = SimilarityAccumulator(2, 4, share_baseline=True)
    _feed_engine_order(acc, h1, h2, bs=3)  # 7 pairs: the odd pair count mixes parities
    with pytest.raises(MetricError, match="do not move whole cells"):
        acc.result()
    acc = SimilarityAccumulator(2, 4, share_baseline=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4] = False
    with pytest.raises(MetricError, match="full-length"):
        acc.update(h1[:, :3], mask, h2[:, :3], mask, torch.arange(3))
    acc = SimilarityAccumulator(2, 4, share_baseline=True)
    full = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(MetricError, match="main batch before"):
        acc.update_baseline(h1[:, :3], full, h2[:, :3], full, torch.arange(3))

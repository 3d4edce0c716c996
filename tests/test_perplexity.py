import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from probekit.errors import MetricError
from probekit.metrics.perplexity import (
    _plan_windows,
    perplexity,
    perplexity_dataarray,
    sliding_window_nll,
)

V = 40


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def brute_force(model, tokens, window, stride, pad_id=0):
    """Score each target alone, with the context the paper's convention gives it."""
    n = len(tokens)
    w = min(window, n - 1)
    regular = [s for s in range(0, n, stride) if s + w <= n - 1]
    total, count = 0.0, 0
    for j in range(1, n):
        if tokens[j] == pad_id:
            continue
        if j <= w:
            s = 0
        else:
            later = [s for s in regular if s + w >= j]
            s = later[0] if later else n - 1 - w
        ctx = torch.as_tensor(tokens[s:j], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ctx).logits[0, -1].float(), -1)
        total -= float(logp[tokens[j]])
        count += 1
    return total, count


@pytest.mark.parametrize("n", [41, 43, 10])  # (n-1-window) % stride == 0, ragged end, short
def test_matches_brute_force(model, n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(1, V, size=n)
    nll, cnt = sliding_window_nll(model, tokens, window=16, stride=4, batch_size=3)
    ref_nll, ref_cnt = brute_force(model, tokens, 16, 4)
    assert cnt == ref_cnt == n - 1  # every target scored exactly once
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_every_target_once():
    for n, window, stride in [(100, 16, 4), (101, 16, 5), (17, 16, 4), (5, 16, 4), (50, 8, 8)]:
        hits = np.zeros(n, int)
        for s, lo, hi in _plan_windows(n, window, stride, stride):
            assert s + 1 <= lo <= hi <= min(s + window, n - 1)
            hits[lo : hi + 1] += 1
        assert hits[0] == 0 and (hits[1:] == 1).all(), (n, window, stride)


def test_pad_excluded_and_batch_invariant(model):
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, V, size=60)
    tokens[[5, 20, 21, 59]] = 0
    nll1, cnt1 = sliding_window_nll(model, tokens, window=16, batch_size=1)
    nll8, cnt8 = sliding_window_nll(model, tokens, window=16, batch_size=8)
    ref_nll, ref_cnt = brute_force(model, tokens, 16, 4)
    assert cnt1 == cnt8 == ref_cnt == 59 - 4
    assert nll1 == pytest.approx(nll8, rel=1e-5)
    assert nll1 == pytest.approx(ref_nll, rel=1e-5)
    _, cnt_all = sliding_window_nll(model, tokens, window=16, pad_id=None)
    assert cnt_all == 59


def test_perplexity_dict_and_dataset(model):
    rng = np.random.default_rng(2)
    res = {}
    for lang in ("EN1", "EN2"):
        toks = rng.integers(1, V, size=40)
        res[lang] = perplexity(model, toks, n_chars=100, window=16)
        r = res[lang]
        assert r["ppl"] == pytest.approx(math.exp(r["nll"] / r["n_tokens"]))
        assert r["ppl_char"] == pytest.approx(math.exp(r["nll"] / 100))
        assert (r["stride"], r["scored_tail"]) == (4, 4)
    ds = perplexity_dataarray(res)
    assert list(ds.language.values) == ["EN1", "EN2"]
    assert ds["ppl"].sel(language="EN2") == pytest.approx(res["EN2"]["ppl"])
    assert ds.attrs["window"] == 16 and "definition" in ds["ppl"].attrs
    assert {"ppl", "ppl_char", "nll_tokens", "n_tokens"} <= set(ds.data_vars)


def test_bad_input(model):
    with pytest.raises(MetricError, match="1-D"):
        sliding_window_nll(model, np.zeros((2, 5), int), window=4)
    with pytest.raises(MetricError, match="at least 2"):
        sliding_window_nll(model, np.array([3]), window=4)
    with pytest.raises(MetricError, match="scored_tail"):
        sliding_window_nll(model, np.arange(1, 20), window=8, stride=2, scored_tail=4)
    with pytest.raises(MetricError, match="no token"):
        sliding_window_nll(model, np.zeros(20, int), window=8)
    with pytest.raises(MetricError, match="n_chars"):
        perplexity(model, np.arange(1, 20), n_chars=0, window=8)
    with pytest.raises(MetricError, match="disagree"):
        perplexity_dataarray(
            {
                "a": perplexity(model, np.arange(1, 20), 10, window=8),
                "b": perplexity(model, np.arange(1, 20), 10, window=16),
            }
        )


def test_every_kth_window_is_a_spread_sample(model):
    """every=k scores windows 0, k, 2k, ... of the plan: their targets, each once, with the
    same context as in the full pass (so the same per-target NLL)."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, V, size=121)
    plan = _plan_windows(len(tokens), 16, 4, 4)
    nll4, n4 = sliding_window_nll(model, tokens, window=16, stride=4, every=4, batch_size=5)
    assert n4 == sum(hi - lo + 1 for _, lo, hi in plan[::4])
    want = 0.0  # the same windows scored one by one, keeping the tail the plan scores
    for s, lo, hi in plan[::4]:
        ids = torch.as_tensor(tokens[s : hi + 1], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
        want -= float(sum(logp[t - s - 1, tokens[t]] for t in range(lo, hi + 1)))
    assert nll4 == pytest.approx(want, rel=1e-5)
    res = perplexity(model, tokens, n_chars=480, window=16, stride=4, every=4)
    assert res["n_tokens"] == n4 and res["n_chars"] == round(480 * n4 / 120)
    with pytest.raises(MetricError):
        sliding_window_nll(model, tokens, window=16, every=0)

import time
import warnings

import numpy as np
import pytest

from probekit.errors import MetricError
from probekit.metrics.probes import (
    DIGIT,
    OTHER,
    PUNCT,
    WORD_CONT,
    WORD_START,
    probe_transfer,
    token_labels,
)


def make_feats(labels, n_layers=3, d=16, sep=1.5, seed=0):
    """Features whose class means differ (more with depth), plus noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((labels.max() + 1, d))
    out = np.stack(
        [
            sep * layer * means[labels] + rng.standard_normal((len(labels), d))
            for layer in range(n_layers)
        ]
    )
    return out.astype(np.float32)


@pytest.fixture
def labels():
    return np.random.default_rng(1).integers(0, 2, size=400)


def test_identical_features_transfer_equals_in_language(labels):
    feats = make_feats(labels)
    ds = probe_transfer(feats, labels, feats, labels, paired=True)
    np.testing.assert_array_equal(ds.probe_transfer.values, ds.probe_in_language.values)
    assert ds.probe_transfer.dims == ("layer", "direction")
    assert list(ds.direction.values) == ["L1->L2", "L2->L1"]
    assert ds.probe_in_language.sel(layer=2).min() > 0.9  # separable at depth
    assert 0.4 < float(ds.probe_chance[0]) < 0.6
    assert "definition" in ds.probe_transfer.attrs and ds.attrs["paired"] == 1


def test_unrelated_features_transfer_is_chance(labels):
    feats1 = make_feats(labels)
    rng = np.random.default_rng(5)
    labels2 = rng.integers(0, 2, size=300)
    feats2 = rng.standard_normal((3, 300, 16)).astype(np.float32)
    ds = probe_transfer(feats1, labels, feats2, labels2, seed=3)
    t = ds.probe_transfer.sel(direction="L1->L2").values
    assert np.all(np.abs(t - 0.5) < 0.15)
    assert ds.probe_in_language.sel(direction="L1->L2", layer=2) > 0.9


def test_seeded_and_quiet(labels):
    feats = make_feats(labels, d=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convergence warnings must be suppressed
        a = probe_transfer(feats, labels, feats[:, ::-1], labels[::-1], seed=7, max_iter=2)
    b = probe_transfer(feats, labels, feats[:, ::-1], labels[::-1], seed=7, max_iter=2)
    np.testing.assert_array_equal(a.probe_transfer.values, b.probe_transfer.values)


def test_fast(labels):
    feats = make_feats(labels, n_layers=5, d=64)
    t0 = time.perf_counter()
    probe_transfer(feats, labels, feats, labels, paired=True)
    assert time.perf_counter() - t0 < 10


def test_bad_input(labels):
    feats = make_feats(labels)
    with pytest.raises(MetricError, match="layer, item, dim"):
        probe_transfer(feats[0], labels, feats, labels)
    with pytest.raises(MetricError, match="labels L2"):
        probe_transfer(feats, labels, feats, labels[:10])
    with pytest.raises(MetricError, match="paired"):
        probe_transfer(feats, labels, feats[:, :200], labels[:200], paired=True)
    with pytest.raises(MetricError, match="single class"):
        probe_transfer(feats, np.zeros_like(labels), feats, labels)
    with pytest.raises(MetricError, match="test_frac"):
        probe_transfer(feats, labels, feats, labels, test_frac=1.0)
    with pytest.raises(MetricError, match="layers or width"):
        probe_transfer(feats, labels, feats[:2], labels)


def test_token_labels():
    pieces = ["Ġthe", "ing", ",", "Ġ.", "12", "Ġ3", "Ċ", "<pad>", "<|endoftext|>", "The", "Ġ"]
    expected = [
        WORD_START,
        WORD_CONT,
        PUNCT,
        PUNCT,
        DIGIT,
        DIGIT,
        OTHER,
        OTHER,
        OTHER,
        WORD_CONT,
        OTHER,
    ]
    assert token_labels(pieces).tolist() == expected
    # byte-level UTF-8: "Ã©" is 'é'; a lone lead byte is part of a word
    assert token_labels(["ĠcafÃ©", "Ã"]).tolist() == [WORD_START, WORD_CONT]
    assert token_labels([" word", "word", "!"], byte_level=False).tolist() == [0, 1, 2]
    with pytest.raises(MetricError, match="piece strings"):
        token_labels([3])

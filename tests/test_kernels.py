"""Every fast kernel agrees with its plain reference (probekit.kernels)."""

import pytest
import torch

from probekit.kernels import (
    add_gram,
    add_gram_reference,
    column_sums,
    column_sums_reference,
    cross_gram,
    cross_gram_reference,
    fired_counts,
    fired_counts_reference,
)


@pytest.mark.parametrize("threshold", [0.0, 0.25, -0.1, 1e-40])
def test_fired_counts_equal_the_comparison(threshold):
    """The float32 sign-sum count equals (flat > t).sum(0) at the threshold itself, at -0.0,
    at subnormal distances from it, and with a non-finite activation in the batch."""
    g = torch.Generator().manual_seed(0)
    flat = torch.nn.functional.gelu(2 * torch.randn(300, 7, generator=g))
    t32 = torch.tensor(threshold, dtype=torch.float32)
    flat[:4, 0] = t32
    flat[4:8, 1] = -0.0
    flat[8, 2] = torch.nextafter(t32, torch.tensor(1.0))
    flat[9, 2] = torch.nextafter(t32, torch.tensor(-1.0))
    flat[10, 3] = 1e-45
    for extra in (None, float("nan"), float("inf"), float("-inf")):
        batch = flat.clone()
        if extra is not None:
            batch[11, 4] = extra
        want = fired_counts_reference(batch, threshold)
        assert torch.equal(fired_counts(batch, threshold).to(torch.int64), want)


def test_column_sums_are_float64_sums():
    g = torch.Generator().manual_seed(1)
    flat = 1e3 * torch.randn(4096, 9, generator=g) + 1e-3 * torch.randn(4096, 9, generator=g)
    want = flat.double().sum(0)
    for x in (flat, flat[::2], flat.t().contiguous().t(), flat.double()):
        got = column_sums(x)
        assert got.dtype == torch.float64
        want_x = column_sums_reference(x.double())
        torch.testing.assert_close(got, want_x, rtol=1e-13, atol=1e-9)
    assert not torch.equal(flat.sum(0).double(), want)  # float32 sums would not do


@pytest.mark.parametrize("n", [1, 37, 500])
def test_add_gram_is_the_upper_triangle_of_the_gram(n):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, 11, generator=g, dtype=torch.float64)
    acc = torch.zeros(3, 11, 11, dtype=torch.float64)
    ref = acc.clone()
    for _ in range(2):  # accumulates
        add_gram(acc, x)
        add_gram_reference(ref, x)
    torch.testing.assert_close(acc, ref, rtol=1e-13, atol=1e-12)
    assert not bool(acc.tril(-1).any())  # the lower triangle is left for the caller to mirror


def test_cross_gram_equals_bmm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 200, 9, generator=g, dtype=torch.float64)
    y = torch.randn(4, 200, 13, generator=g, dtype=torch.float64)
    got = cross_gram(x, y)
    assert got.shape == (4, 9, 13)
    torch.testing.assert_close(got, cross_gram_reference(x, y), rtol=1e-13, atol=1e-12)

"""Speed-specific implementations of a few sums, each beside its plain reference.

The metric families state their maths with the references' meaning and call the fast form;
tests/test_kernels.py holds every pair to agreement (exactly where the fast form is exact,
else to the stated tolerance). A new trick goes here, with its reference and its test, not
into a family's code.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg.blas import dsyrk


def fired_counts(flat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per column, how many of ``flat``'s rows exceed ``threshold``.

    For float32 on the CPU (what the bridge's activations arrive as) it is counted as the sum of
    sign(max(flat, t) - t) in float32: exact (t < a implies a - t > 0 under gradual underflow;
    a batch holds fewer than 2**24 rows) and twice as fast as reducing a bool tensor. Other
    dtypes and devices, and a batch with a non-finite activation, take the reference."""
    if flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.shape[0] < 2**24:
        fired = flat.clamp(min=threshold)
        if threshold:
            fired.sub_(threshold)
        counts = fired.sign_().sum(0)
        if bool(torch.isfinite(counts).all()):
            return counts
    return fired_counts_reference(flat, threshold)


def fired_counts_reference(flat: torch.Tensor, threshold: float) -> torch.Tensor:
    return (flat > threshold).sum(0)


def column_sums(flat: torch.Tensor) -> torch.Tensor:
    """flat.sum(0) in float64 precision: numpy's float64 reduction of the float32 rows, half the
    time of torch's, which first makes a float64 copy (the sums agree to 1e-15)."""
    if flat.dtype == torch.float32 and flat.device.type == "cpu":
        return torch.from_numpy(flat.numpy().sum(0, dtype=np.float64))
    return column_sums_reference(flat)


def column_sums_reference(flat: torch.Tensor) -> torch.Tensor:
    return flat.sum(0, dtype=torch.float64).cpu()


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc[l] += the upper triangle of x[l]' x[l], for float64 x [L, N, d] on the CPU.

    BLAS syrk does half a GEMM's work for a symmetric product (measured 1.8x faster than the
    float64 matmul at d = 128 and 256); the lower triangle stays as it was (the caller mirrors
    the summed upper one once, at the end)."""
    xs, sums = x.contiguous().numpy(), acc.numpy()
    for layer in range(xs.shape[0]):
        # xs[layer].T is the Fortran-ordered d x N matrix A, sums[layer].T a Fortran-ordered
        # view whose lower triangle is acc's upper one: syrk adds A A' there, with no copy
        c = sums[layer].T
        out = dsyrk(1.0, xs[layer].T, beta=1.0, c=c, lower=1, overwrite_c=1)
        if not np.shares_memory(out, c):  # a BLAS wrapper that copied c
            c[...] = np.tril(out) + np.triu(c, 1)


def add_gram_reference(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc += torch.triu(x.transpose(1, 2) @ x)


def cross_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x[l]' y[l] for float64 x [L, N, d1], y [L, N, d2] on the CPU, by numpy's float64 GEMM
    (1.3x torch's bmm at the similarity family's shapes, [L, d, N] x [L, N, d])."""
    return torch.from_numpy(x.numpy().transpose(0, 2, 1) @ y.numpy())


def cross_gram_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x.transpose(1, 2), y)

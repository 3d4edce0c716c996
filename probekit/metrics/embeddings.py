"""Embedding similarity between cloned tokens (paper §3.5, Figs. 6-7).

Input embeddings are rows of the model's input embedding matrix (``get_input_embeddings()``,
GPT-2's ``transformer.wte``); output embeddings are rows of its output projection
(``get_output_embeddings()``, ``lm_head``; for a tied model the same matrix).
``pairs`` is the clone map of a language pair: an int array [n, 2]
of (L1 id, L2 id) for every cloned id (shared ids excluded).

Baseline ("all"): the mean cosine between an L1 row and the L2 row of a *different* token, over
all n(n-1) such (L1 id, L2 id) pairs, computed exactly from sums of unit vectors (no sampling)
unless ``n_all_pairs`` is given, in which case that many random pairs (i != j) are drawn with
``seed``. (The paper's "all pairs" averages over all pairs of the 2n rows, within-language pairs
included; the cross-language version is the matching null for the clone pairing.)
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from probekit.errors import MetricError
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable
from probekit.series import Series


def _matrices(model: torch.nn.Module) -> dict[str, np.ndarray]:
    try:
        w_in = model.get_input_embeddings().weight
        w_out = model.get_output_embeddings().weight
    except AttributeError as e:
        raise MetricError("embedding similarity needs a Hugging Face causal LM") from e
    return {
        "input": w_in.detach().to("cpu", torch.float64).numpy(),
        "output": w_out.detach().to("cpu", torch.float64).numpy(),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _check_pairs(pairs: np.ndarray, vocab: int) -> np.ndarray:
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        raise MetricError(
            "clone embedding similarity needs cloned languages; this run has no cloned token "
            "pairs (disjoint or anchored vocabularies): use shared_token_stats instead"
        )
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise MetricError(f"pairs must be an int array [n, 2], got {pairs.dtype} {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= vocab:
        raise MetricError(f"pair ids must lie in [0, {vocab}), got [{pairs.min()}, {pairs.max()}]")
    return pairs.astype(np.int64)


def _clone_and_all(
    w: np.ndarray, pairs: np.ndarray, n_all_pairs: int | None, rng: np.random.Generator
) -> tuple[float, float]:
    u, v = _unit(w[pairs[:, 0]]), _unit(w[pairs[:, 1]])
    diag = (u * v).sum(1)
    n = len(pairs)
    clone = float(diag.mean())
    if n < 2:
        return clone, float("nan")
    if n_all_pairs is None:
        # mean_{i != j} u_i . v_j = (sum u . sum v - sum_i u_i . v_i) / (n^2 - n), exactly.
        allp = float((u.sum(0) @ v.sum(0) - diag.sum()) / (n * n - n))
    else:
        i = rng.integers(0, n, n_all_pairs)
        j = (i + rng.integers(1, n, n_all_pairs)) % n  # uniform over j != i
        allp = float((u[i] * v[j]).sum(1).mean())
    return clone, allp


def embedding_similarity(
    model: torch.nn.Module,
    pairs: np.ndarray,
    shared_ids: np.ndarray | None = None,
    n_all_pairs: int | None = None,
    seed: int = 0,
) -> xr.DataArray:
    """``embed_cos`` (matrix ["input", "output"], pairing ["clone", "all"]).

    clone: mean cosine between each cloned id's row and its clone's row. all: mean cosine between
    the L1 row of one token and the L2 row of a different token (exact over all n(n-1) pairs, or
    ``n_all_pairs`` random ones). Shared ids are not part of either (they have no clone); their
    number is recorded in attrs.
    """
    mats = _matrices(model)
    pairs = _check_pairs(pairs, min(m.shape[0] for m in mats.values()))
    rng = np.random.default_rng(seed)
    data = np.array([_clone_and_all(mats[m], pairs, n_all_pairs, rng) for m in mats])
    return xr.DataArray(
        data,
        dims=("matrix", "pairing"),
        coords={"matrix": ["input", "output"], "pairing": ["clone", "all"]},
        name="embed_cos",
        attrs={
            "definition": (
                "Mean cosine between a token's L1 and L2 embedding rows (clone), or between the "
                "L1 row of one token and the L2 row of another (all); input = wte, output = "
                "lm_head."
            ),
            "n_pairs": int(len(pairs)),
            "n_shared": int(0 if shared_ids is None else len(np.asarray(shared_ids))),
            "all_pairs": "exact" if n_all_pairs is None else f"{n_all_pairs} sampled",
            "seed": int(seed),
        },
    )


def default_freq_bins(freq: np.ndarray, per_decade: int = 4) -> np.ndarray:
    """Log10 bin edges from 10^0, ``per_decade`` per decade, up past max(freq)."""
    top = max(1.0, float(np.max(freq)))
    n = int(np.floor(np.log10(top) * per_decade)) + 1
    return 10.0 ** (np.arange(n + 1) / per_decade)


def embedding_similarity_by_freq(
    model: torch.nn.Module,
    pairs: np.ndarray,
    freq: np.ndarray,
    bins: np.ndarray | None = None,
) -> xr.DataArray:
    """``embed_cos_by_freq`` (matrix, freq_bin): clone-pair cosine binned by token frequency.

    freq[i] is the training count of pair i's token. The paper (Fig. 7) counts occurrences of
    the token in both languages (w and its clone w'); pass that. ``bins`` are increasing edges
    (default: 4 per decade from 1, see ``default_freq_bins``); bin b holds edges[b] <= f <
    edges[b+1], the last bin is closed on the right, and tokens with freq below edges[0] (e.g.
    never seen) get their own bin with lower edge 0. Coordinate ``freq_bin`` = lower edge;
    coordinate ``count`` = tokens per bin; empty bins are NaN.
    """
    mats = _matrices(model)
    pairs = _check_pairs(pairs, min(m.shape[0] for m in mats.values()))
    freq = np.asarray(freq, dtype=np.float64)
    if freq.shape != (len(pairs),) or (freq < 0).any():
        raise MetricError(f"freq must be [n_pairs] = [{len(pairs)}] non-negative counts")
    edges = default_freq_bins(freq) if bins is None else np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or (np.diff(edges) <= 0).any():
        raise MetricError("bins must be at least two strictly increasing edges")
    idx = np.searchsorted(edges, freq, side="right") - 1
    idx[freq == edges[-1]] = len(edges) - 2
    keep = idx < len(edges) - 1  # above the top edge: dropped
    lower = [0.0] + list(edges[:-1])
    idx = idx + 1  # bin 0 = below edges[0]
    cos = {m: (_unit(w[pairs[:, 0]]) * _unit(w[pairs[:, 1]])).sum(1) for m, w in mats.items()}
    n_bins = len(lower)
    count = np.bincount(idx[keep], minlength=n_bins)
    data = np.full((2, n_bins), np.nan)
    for r, m in enumerate(("input", "output")):
        s = np.bincount(idx[keep], weights=cos[m][keep], minlength=n_bins)
        data[r, count > 0] = s[count > 0] / count[count > 0]
    # Drop the "below first edge" bin when it is empty (the usual case with edges from 1).
    sl = slice(0 if count[0] > 0 else 1, None)
    return xr.DataArray(
        data[:, sl],
        dims=("matrix", "freq_bin"),
        coords={
            "matrix": ["input", "output"],
            "freq_bin": np.asarray(lower)[sl],
            "count": ("freq_bin", count[sl]),
        },
        name="embed_cos_by_freq",
        attrs={
            "definition": (
                "Mean cosine between a cloned token's L1 and L2 embedding rows, binned by the "
                "token's training frequency (freq_bin = lower bin edge)."
            ),
            "bin_edges": [float(e) for e in edges],
        },
    )


def shared_token_stats(
    model: torch.nn.Module, shared_ids: np.ndarray, exclude_ids: tuple[int, ...] = (0,)
) -> xr.DataArray:
    """``shared_token_stats`` (stat, group ["shared", "other"]) for anchored vocabularies.

    Stats per group of vocabulary ids: ``in_out_cos`` = mean cosine between a token's input
    (wte) row and its output (lm_head) row; ``input_norm`` / ``output_norm`` = mean row L2
    norms; ``n_tokens``. "other" = every id not in shared_ids or exclude_ids (default: pad 0).
    Shared tokens are trained by both languages, so this compares them against the rest.
    """
    mats = _matrices(model)
    vocab = min(m.shape[0] for m in mats.values())
    shared = np.unique(np.asarray(shared_ids, dtype=np.int64))
    if shared.size == 0:
        raise MetricError("shared_token_stats needs at least one shared id")
    if shared.min() < 0 or shared.max() >= vocab:
        raise MetricError(f"shared ids must lie in [0, {vocab})")
    other = np.setdiff1d(np.arange(vocab), np.union1d(shared, np.asarray(exclude_ids)))
    stats = ["in_out_cos", "input_norm", "output_norm", "n_tokens"]
    data = np.full((len(stats), 2), np.nan)
    for c, ids in enumerate((shared, other)):
        if ids.size == 0:
            data[3, c] = 0
            continue
        wi, wo = mats["input"][ids], mats["output"][ids]
        data[0, c] = float((_unit(wi) * _unit(wo)).sum(1).mean())
        data[1, c] = float(np.linalg.norm(wi, axis=1).mean())
        data[2, c] = float(np.linalg.norm(wo, axis=1).mean())
        data[3, c] = ids.size
    return xr.DataArray(
        data,
        dims=("stat", "group"),
        coords={"stat": stats, "group": ["shared", "other"]},
        name="shared_token_stats",
        attrs={
            "definition": (
                "Mean input-vs-output embedding cosine and mean row norms of shared (anchor) "
                "tokens versus all other tokens."
            ),
            "excluded_ids": [int(i) for i in exclude_ids],
        },
    )


class Embeddings(Family):
    """Cosine between a cloned token's L1 and L2 embedding rows (input and output), against
    different-token pairs, and binned by the token's training frequency."""

    name = "embeddings"
    variables = (
        Variable("embed_cos", "clone embedding cosine"),
        Variable("embed_cos_by_freq", "clone embedding cosine by token frequency"),
    )
    needs = Needs(weights=True)

    def applies(self, series: Series) -> str | None:
        if len(series.clone_pairs()) == 0:
            return (
                f"clone embedding similarity needs cloned languages; this run's "
                f"{series.pair[0]}/{series.pair[1]} vocabularies are {series.vocab_mode}"
            )
        return None

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        pairs = ctx.series.clone_pairs()
        parts = [embedding_similarity(ctx.model, pairs).to_dataset(name="embed_cos")]
        try:  # an external clone series has no training corpus to count tokens in
            freq = ctx.series.token_frequency(pairs[:, 0])
        except MetricError:
            freq = None
        if freq is not None:
            parts.append(
                embedding_similarity_by_freq(ctx.model, pairs, freq).to_dataset(
                    name="embed_cos_by_freq"
                )
            )
        return xr.merge(parts, compat="override", join="outer")

"""Null-calibrated similarity and neighbour measures between the two languages' states.

A raw similarity score has a non-zero value under "no correspondence at all" that depends on
width, depth, sample size and the measure itself, so one number means different things at
different layers and checkpoints. Following Gröger, Wen & Brbić 2026 ("Revisiting the Platonic
Representation Hypothesis: An Aristotelian View", arXiv 2602.14486; their `calibrated-similarity`
package), every measure here is read against a permutation null computed on the same sample:

* ``cal_raw``        the measure on the sample (row i of L1 with row i of L2);
* ``cal_null_mean``, ``cal_null_sd``  mean and standard deviation of the measure when the
  correspondence between the two languages' rows is permuted (n_perm permutations);
* ``cal_null_q``     the (1 - alpha) = 95 % critical value, the ceil(0.95 (K + 1))-th order
  statistic of the K null scores together with the observed one (Gröger et al.'s Algorithm 1);
* ``cal_p``          add-one permutation p-value (1 + #{null >= raw}) / (K + 1);
* ``cal_score``      (raw - null_mean) / (max - null_mean): 0 at the null's mean, 1 at the
  maximum (max = 1 for every measure here). Can be negative (below the null);
* ``cal_score_sig``  Gröger et al.'s thresholded form clip((raw - q) / (max - q), 0, 1): 0 unless
  the raw score clears the null's 95 % critical value (equals their package's `calibrate`).

The sample (bounded by ``null_sample`` rows, so memory does not grow with the pair count)
-----------------------------------------------------------------------------------------
* clones (token-aligned): token rows. From up to ``null_sample`` pairs (evenly spread), s =
  null_sample // pairs positions per pair (at most the shortest sequence), drawn once with a
  fixed seed; row (pair p, slot j) of L1 is paired with the same position of L2.
* real pairs: one row per pair, each sequence mean-pooled over its real tokens.
* retrieval always uses mean-pooled sequences of the sampled pairs (as ``similarity`` does).

The permutation null
--------------------
Each permutation draws pi over the sampled pairs and, for token rows, an independent shuffle
sigma_p of the s slots of every pair: L1 row (p, j) is scored against L2 row (pi(p), sigma_p(j)).
So pair correspondences are shuffled and within-pair positions too, while the grouping of a
sequence's tokens is kept (its rows still face the rows of one other sequence): tokens of one
sequence are alike, and a full row shuffle would break that dependence and make the null too
easy. Pooled rows (and retrieval) shuffle pairs only. One permutation is applied to every layer
and every measure at once (as Gröger et al.'s Algorithm 2 applies one per draw to all layers).
Memory does not grow with the number of permutations: each permuted score is computed from
matrices built once (Gram, cosine and neighbour masks of the unpermuted sample; a permutation
only re-indexes them) and only the [K, layer, measure] score vector is kept.

Measures (X = L1 rows, Y = L2 rows of one layer, n rows; definitions as in ``similarity``)
------------------------------------------------------------------------------------------
* ``hidden_cos``: mean over rows of cos(x_i, y_i) (every pair has s rows: the mean over pairs of
  the per-pair mean token cosine, on the sampled tokens).
* ``cka``: debiased linear CKA (unbiased HSIC, Song et al. 2012) of the raw states.
* ``linmap_r2``: ridge map Y -> X with intercept fitted on the rows of even-ranked sampled pairs
  (the pair index itself when every pair is sampled), lambda = 0.01 trace(Cov_fit(Y)) / d,
  held-out R^2 = 1 - SSE/SST on the odd-ranked pairs, SST around the test mean, summed over
  dims. Solved in the dual (n_fit x n_fit) when d > n_fit: the same map (push-through identity).
* ``retrieval_acc``: mean of both directions' translation retrieval accuracy of mean-pooled
  sequences (a hit when no other sequence has a strictly higher cosine; ties are hits).
* ``mknn``: mutual k-NN alignment (Huh et al. 2024, arXiv 2405.07987, platonic-rep
  ``mutual_knn``): rows L2-normalised, N_k(i) = the k rows of highest inner product, i excluded;
  mean_i |N_k^X(i) ∩ N_k^Y(i)| / k.
* ``cknna``: CKNNA (Huh et al. 2024) as the authors' code computes it (platonic-rep
  ``metrics.py::cknna``, unbiased): on L2-normalised rows, K = XX', L = YY', M = the mask of
  pairs (i, j) with j in both N_k^X(i) and N_k^Y(i); CKNNA = HSIC_u(M∘K, M∘L) /
  sqrt(HSIC_u(M_X∘K, M_X∘K) HSIC_u(M_Y∘L, M_Y∘L)) (no 1e-6 added to the denominator; NaN when
  a self term is not positive). Their feature clipping at the 95th percentile is not applied.
  Neighbour ties are broken by row order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import xarray as xr

from probekit.errors import MetricError
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable
from probekit.series import Series

MEASURES = ("hidden_cos", "cka", "linmap_r2", "retrieval_acc", "mknn", "cknna")
MAXIMA = {m: 1.0 for m in MEASURES}  # the score of identical representations
ALPHA = 0.05  # cal_null_q is the (1 - ALPHA) critical value
RIDGE = 1e-2  # as SimilarityAccumulator's default
CITATION = (
    "Gröger, Wen & Brbić 2026, arXiv 2602.14486 (permutation null calibration); "
    "Huh et al. 2024, arXiv 2405.07987 (mutual k-NN, CKNNA)"
)
_EPS = 1e-12


# ------------------------------------------------------------------------------ permutations


def permutations(n_pairs: int, slots: int, n_perm: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield ``n_perm`` row permutations of a sample of n_pairs * slots rows (pair-major):
    entry r = p * slots + j is the L2 row that L1 row r faces, (pi(p), sigma_p(j))."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(slots), (n_pairs, 1))
    for _ in range(n_perm):
        pi = rng.permutation(n_pairs)
        sigma = rng.permuted(base, axis=1) if slots > 1 else base
        yield (pi[:, None] * slots + sigma).ravel()


# ------------------------------------------------------------------------------ measures


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _hsic_u(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unbiased HSIC (Song et al. 2012) of kernels a, b [L, n, n] whose diagonals are zero;
    a and b need not be symmetric (tr(AB) = sum A ∘ B')."""
    n = a.shape[-1]
    tr = np.einsum("lij,lji->l", a, b)
    ab = np.einsum("lj,lj->l", a.sum(1), b.sum(2))  # 1'AB1
    s = a.sum((1, 2)) * b.sum((1, 2))
    return (tr + s / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (n * (n - 3))


def knn_indices(x: np.ndarray, k: int) -> np.ndarray:
    """[L, n, k]: for each row i of x [L, n, d], the k rows of highest inner product of the
    L2-normalised rows, i itself excluded (a tie at the k-th place is broken by the partition,
    deterministically)."""
    u = _unit(x)
    g = u @ u.transpose(0, 2, 1)
    n = g.shape[-1]
    g[:, np.arange(n), np.arange(n)] = -np.inf
    return np.argpartition(-g, k - 1, axis=-1)[..., :k]


def _take(m: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """m [L, n, n] with rows and columns re-indexed by perm (the kernel of Y[perm])."""
    return m[:, perm[:, None], perm[None, :]]


class PreparedSample:
    """Everything of one sample that a permutation only re-indexes, built once."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        p1: np.ndarray,
        p2: np.ndarray,
        slots: int,
        k: int,
        ridge: float = RIDGE,
    ) -> None:
        self.x, self.y = x, y
        L, n, d = x.shape
        if n < 4:
            raise MetricError(f"calibrated: the sample has {n} rows; CKA needs at least 4")
        if not 1 <= k < n:
            raise MetricError(
                f"--knn-k {k}: larger than the sample allows (n = {n} rows: k <= {n - 1})"
            )
        self.n, self.d, self.k, self.ridge = n, d, k, ridge
        ux, uy = _unit(x), _unit(y)
        self.cos = ux @ uy.transpose(0, 2, 1)  # [L, n, n]
        self.gy = y @ y.transpose(0, 2, 1)  # also the dual ridge's Gram
        self.kx0, self.gy0 = x @ x.transpose(0, 2, 1), self.gy.copy()
        diag = np.arange(n)
        self.kx0[:, diag, diag] = 0.0
        self.gy0[:, diag, diag] = 0.0
        self.h_xx, self.h_yy = _hsic_u(self.kx0, self.kx0), _hsic_u(self.gy0, self.gy0)
        self.kx0_rows, self.gy0_rows = self.kx0.sum(1), self.gy0.sum(2)
        self.nx2, self.ny2 = (x * x).sum(-1), (y * y).sum(-1)
        self.kx0_sum, self.gy0_sum = self.kx0.sum((1, 2)), self.gy0.sum((1, 2))
        if 2 * d <= n:  # CKA's permuted trace is taken in feature space: n x n not needed
            del self.kx0, self.gy0
        # neighbour measures on unit rows: index lists, so that a permutation costs O(n k)
        self.nx, self.ny = knn_indices(x, k), knn_indices(y, k)
        self.mx = np.zeros((L, n, n), bool)
        np.put_along_axis(self.mx, self.nx, True, axis=-1)
        self.my = np.zeros((L, n, n), bool)
        np.put_along_axis(self.my, self.ny, True, axis=-1)
        self.kn = ux @ ux.transpose(0, 2, 1)
        self.ln = uy @ uy.transpose(0, 2, 1)
        self.ln_nb = np.take_along_axis(self.ln, self.ny, -1)  # L[i, j] at Y's neighbours j
        ax, ay = self.mx * self.kn, self.my * self.ln
        self.c_xx, self.c_yy = _hsic_u(ax, ax), _hsic_u(ay, ay)
        # the linear map's split: rows of even-ranked pairs fit, odd-ranked score
        rank = np.arange(n) // slots
        self.fit, self.test = np.nonzero(rank % 2 == 0)[0], np.nonzero(rank % 2 == 1)[0]
        xt = x[:, self.test]
        self.sst = ((xt - xt.mean(1, keepdims=True)) ** 2).sum((1, 2))
        # retrieval on pooled sequences
        s = _unit(p1) @ _unit(p2).transpose(0, 2, 1)  # [L, m, m]
        self.s, self.rowmax, self.colmax = s, s.max(2), s.max(1)

    def scores(self, perm: np.ndarray, pair_perm: np.ndarray) -> np.ndarray:
        """[L, len(MEASURES)] with L2 rows taken in ``perm`` order (pooled: ``pair_perm``)."""
        n = self.n
        rows = np.arange(n)
        out = np.empty((self.x.shape[0], len(MEASURES)))
        out[:, 0] = self.cos[:, rows, perm].mean(1)
        if 2 * self.d <= n:  # tr(K~ G~_perm) in feature space: |X'Y_perm|^2 - sum |x|^2 |y|^2
            xy = self.x.transpose(0, 2, 1) @ self.y[:, perm]
            tr = (xy * xy).sum((1, 2)) - (self.nx2 * self.ny2[:, perm]).sum(1)
        else:  # n x n: cheaper than d x d products when d is large against n
            g0 = _take(self.gy0, perm)
            tr = np.array([np.vdot(a, b) for a, b in zip(self.kx0, g0, strict=True)])
        ab = np.einsum("lj,lj->l", self.kx0_rows, self.gy0_rows[:, perm])
        hxy = (tr + self.kx0_sum * self.gy0_sum / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (
            n * (n - 3)
        )
        out[:, 1] = _ratio(hxy, self.h_xx * self.h_yy)
        out[:, 2] = self._linmap(perm)
        m = np.arange(len(pair_perm))
        hit12 = self.s[:, m, pair_perm] >= self.rowmax
        hit21 = self.s[:, m, pair_perm] >= self.colmax[:, pair_perm]
        out[:, 3] = 0.5 * (hit12.mean(1) + hit21.mean(1))
        out[:, 4], c_xy = self._neighbours(perm)
        out[:, 5] = _ratio(c_xy, self.c_xx * self.c_yy)
        return out

    def _neighbours(self, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mutual k-NN and CKNNA's HSIC_u(M∘K, M∘L_perm) from the neighbour lists alone.

        Row i of the permuted Y is y_perm(i): its neighbours are inv(N_Y(perm(i))). The joint
        mask M keeps those that are X-neighbours of i too (at most n k entries), and the
        unbiased HSIC's four sums are taken over M's entries only."""
        L, n, k = self.nx.shape
        inv = np.empty_like(perm)
        inv[perm] = np.arange(n)
        cand = inv[self.ny[:, perm]]  # [L, n, k]: column j of each of i's Y-neighbours
        inx = np.take_along_axis(self.mx, cand, -1)  # also an X-neighbour: (i, j) in M
        mknn = inx.sum((1, 2)) / (n * k)
        a = np.take_along_axis(self.kn, cand, -1) * inx  # K_ij on M
        b = self.ln_nb[:, perm] * inx  # L_perm(i) perm(j) on M
        lay, row = np.arange(L)[:, None, None], np.arange(n)[None, :, None]
        # tr(AB) = sum over M of a_ij b_ji, where (j, i) must be in M too
        pi, pj = perm[row], perm[cand]
        back = self.mx[lay, cand, row] & self.my[lay, pj, pi]
        tr = (a * back * self.ln[lay, pj, pi]).sum((1, 2))
        col_a = np.bincount(
            (cand + n * np.arange(L)[:, None, None]).ravel(), a.ravel(), minlength=L * n
        ).reshape(L, n)  # 1'A
        ab = (col_a * b.sum(-1)).sum(-1)  # 1'A B 1
        s = a.sum((1, 2)) * b.sum((1, 2))
        hsic = (tr + s / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (n * (n - 3))
        return mknn, hsic

    def _linmap(self, perm: np.ndarray) -> np.ndarray:
        fit, test, d = self.fit, self.test, self.d
        xf, xt = self.x[:, fit], self.x[:, test]
        mxf = xf.mean(1, keepdims=True)
        pf, pt = perm[fit], perm[test]
        if d <= len(fit):  # primal: d x d normal equations
            yf, yt = self.y[:, pf], self.y[:, pt]
            myf = yf.mean(1, keepdims=True)
            yc = yf - myf
            cyy = yc.transpose(0, 2, 1) @ yc
            lam = self.ridge * np.trace(cyy, axis1=1, axis2=2) / d
            a = np.linalg.solve(
                cyy + lam[:, None, None] * np.eye(d), yc.transpose(0, 2, 1) @ (xf - mxf)
            )
            pred = (yt - myf) @ a + mxf
        else:  # dual: n_fit x n_fit, from the Gram of Y (push-through identity, same map)
            gff = self.gy[:, pf[:, None], pf[None, :]]
            gtf = self.gy[:, pt[:, None], pf[None, :]]
            col = gff.mean(1, keepdims=True)  # m_f . y_f for each fit row (as a row vector)
            gc = gff - gff.mean(2, keepdims=True) - col + gff.mean((1, 2), keepdims=True)
            cc = gtf - gtf.mean(2, keepdims=True) - col + gff.mean((1, 2), keepdims=True)
            lam = self.ridge * np.trace(gc, axis1=1, axis2=2) / d
            alpha = np.linalg.solve(gc + lam[:, None, None] * np.eye(len(fit)), xf - mxf)
            pred = cc @ alpha + mxf
        sse = ((xt - pred) ** 2).sum((1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.sst > 0, 1.0 - sse / self.sst, np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)


def null_calibrate(
    x: np.ndarray,
    y: np.ndarray,
    p1: np.ndarray | None = None,
    p2: np.ndarray | None = None,
    slots: int = 1,
    n_perm: int = 100,
    k: int = 10,
    seed: int = 0,
    ridge: float = RIDGE,
) -> dict[str, np.ndarray]:
    """Raw scores, their permutation null and calibrated scores, each [L, len(MEASURES)].

    x, y: [L, n, d] (or [n, d]) paired rows, pair-major with ``slots`` rows per pair; p1, p2:
    [L, m, d] pooled sequences (m = n / slots; default x, y themselves when slots = 1).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim == 2:
        x, y = x[None], y[None]
        p1 = None if p1 is None else np.asarray(p1, np.float64)[None]
        p2 = None if p2 is None else np.asarray(p2, np.float64)[None]
    if x.shape != y.shape or x.ndim != 3:
        raise MetricError(f"calibrated: X and Y must both be [L, n, d], got {x.shape}, {y.shape}")
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or n_perm < 2:
        raise MetricError(f"--null-permutations: expected an integer >= 2, got {n_perm!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1 or x.shape[1] % slots:
        raise MetricError(f"calibrated: {x.shape[1]} rows are not whole pairs of {slots} slots")
    if p1 is None or p2 is None:
        if slots != 1:
            raise MetricError("calibrated: token rows need their pooled sequences p1, p2")
        p1, p2 = x, y
    p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
    m = x.shape[1] // slots
    if p1.shape != p2.shape or p1.shape[:2] != (x.shape[0], m):
        raise MetricError(f"calibrated: pooled rows must be [L, {m}, d], got {p1.shape}")
    prep = PreparedSample(x, y, p1, p2, slots, k, ridge)
    raw = prep.scores(np.arange(x.shape[1]), np.arange(m))
    null = np.empty((n_perm, *raw.shape))
    for i, perm in enumerate(permutations(m, slots, n_perm, seed)):
        null[i] = prep.scores(perm, perm[::slots] // slots)
    return summarise(raw, null)


def summarise(raw: np.ndarray, null: np.ndarray) -> dict[str, np.ndarray]:
    """raw [...], null [K, ...] -> the stored variables (see the module docstring)."""
    k = null.shape[0]
    top = np.array([MAXIMA[m] for m in MEASURES])
    with np.errstate(all="ignore"):
        mean = np.nanmean(null, 0)
        sd = np.nanstd(null, 0, ddof=1)
        comb = np.sort(np.concatenate([raw[None], null]), 0)  # NaN sorts last
        idx = min(max(math.ceil((1 - ALPHA) * (k + 1)) - 1, 0), k)
        q = comb[idx]
        p = (1.0 + (null >= raw[None]).sum(0)) / (k + 1)
        score = (raw - mean) / (top - mean)
        sig = np.clip((raw - q) / np.maximum(top - q, _EPS), 0.0, 1.0)
    nan = ~np.isfinite(raw)
    return {
        "cal_raw": raw,
        "cal_null_mean": mean,
        "cal_null_sd": sd,
        "cal_null_q": q,
        "cal_p": np.where(nan, np.nan, p),
        "cal_score": score,
        "cal_score_sig": np.where(nan, np.nan, sig),
    }


# ------------------------------------------------------------------------------ the sample


class NullSample:
    """Gathers the bounded sample from streamed parallel pairs.

    ``pairs``: the sampled pair indices (in order); ``positions``: for token rows, pair index
    -> the positions taken (same count for every pair), None for pooled rows."""

    def __init__(
        self,
        n_layers_plus_1: int,
        d_model: int,
        pairs: list[int],
        positions: dict[int, np.ndarray] | None,
    ) -> None:
        self.pairs = list(pairs)
        self.rank = {p: r for r, p in enumerate(self.pairs)}
        self.positions = positions
        self.slots = len(next(iter(positions.values()))) if positions else 1
        L, m = n_layers_plus_1, len(self.pairs)
        self.p = np.zeros((2, L, m, d_model))
        self.t = np.zeros((2, L, m * self.slots, d_model)) if positions else None
        self.seen: set[int] = set()

    def update(self, index: np.ndarray, sides: tuple) -> None:
        """sides = ((resid [L, B, T, d], mask [B, T]) of L1, the same of L2)."""
        for b, i in enumerate(np.asarray(index).tolist()):
            r = self.rank.get(int(i))
            if r is None:
                continue
            self.seen.add(int(i))
            for s, (h, mask) in enumerate(sides):
                real = mask[b].to(torch.bool)
                seq = h[:, b].detach().to("cpu", torch.float64)
                self.p[s, :, r] = (seq[:, real].mean(1)).numpy()
                if self.t is not None:
                    pos = torch.as_tensor(self.positions[int(i)])
                    sl = slice(r * self.slots, (r + 1) * self.slots)
                    self.t[s, :, sl] = seq[:, pos].numpy()

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        missing = set(self.pairs) - self.seen
        if missing:
            raise MetricError(f"calibrated: sampled pairs never fed: {sorted(missing)[:5]}")
        x, y = (self.t[0], self.t[1]) if self.t is not None else (self.p[0], self.p[1])
        return x, y, self.p[0], self.p[1]


def plan_sample(
    lengths: list[int], aligned: bool, max_rows: int, seed: int = 0
) -> tuple[list[int], dict[int, np.ndarray] | None]:
    """Which pairs (evenly spread) and, for token-aligned pairs, which positions of each
    (same count per pair, drawn once with ``seed``) make a sample of at most ``max_rows``."""
    n = len(lengths)
    take = min(n, max_rows)
    pairs = sorted({int(round(v)) for v in np.linspace(0, n - 1, take)})
    if not aligned:
        return pairs, None
    slots = max(1, min(max_rows // len(pairs), min(lengths[p] for p in pairs)))
    rng = np.random.default_rng(seed)
    pos = {p: np.sort(rng.choice(lengths[p], slots, replace=False)) for p in pairs}
    return pairs, pos


# ------------------------------------------------------------------------------ the family

_TITLES = {
    "cal_raw": "raw score on the calibration sample",
    "cal_null_mean": "permutation-null mean",
    "cal_null_sd": "permutation-null standard deviation",
    "cal_null_q": "permutation-null 95 % critical value",
    "cal_p": "permutation p-value",
    "cal_score": "null-calibrated score",
    "cal_score_sig": "null-calibrated score above the 95 % critical value",
}
_DEFINITIONS = {
    "cal_raw": "each measure (hidden_cos, cka, linmap_r2, retrieval_acc, mknn, cknna) on the "
    "bounded sample of paired rows",
    "cal_null_mean": "mean of the measure over permutations of the row correspondence "
    "(pairs shuffled, and within-pair positions for token rows)",
    "cal_null_sd": "standard deviation (ddof 1) of the measure under the permutation null",
    "cal_null_q": "ceil(0.95 (K+1))-th order statistic of the K null scores and the raw one",
    "cal_p": "(1 + #{null >= raw}) / (K + 1)",
    "cal_score": "(raw - null_mean) / (max - null_mean); 0 at the null, 1 at the maximum "
    "(Gröger et al. 2026, arXiv 2602.14486)",
    "cal_score_sig": "clip((raw - q) / (max - q), 0, 1), q = cal_null_q (Gröger et al.'s "
    "calibrate)",
}
VARIABLES = tuple(_TITLES)


def _plan(series: Series) -> tuple[list[int], dict[int, np.ndarray] | None, str | None]:
    """The series' sample plan, and the one-line reason it cannot serve (k too large)."""
    par, opts = series.parallel, series.options
    lengths = [min(len(a), len(b)) for a, b in zip(par.ids1, par.ids2, strict=True)]
    pairs, pos = plan_sample(lengths, bool(par.aligned), opts.null_sample)
    rows = len(pairs) * (len(next(iter(pos.values()))) if pos else 1)
    why = None
    if opts.knn_k >= rows:
        why = (
            f"--knn-k {opts.knn_k}: larger than the calibration sample of {rows} rows "
            f"(k <= {rows - 1}; raise --null-sample or --pairs)"
        )
    return pairs, pos, why


class _CalibrationRun:
    def __init__(self, ctx: CheckpointContext) -> None:
        par, opts = ctx.series.parallel, ctx.options
        pairs, pos, why = _plan(ctx.series)
        if why:
            raise MetricError(why)
        self.aligned = bool(par.aligned)
        self.sample = NullSample(ctx.view.n_layers + 1, ctx.view.d_model, pairs, pos)
        self.n_perm, self.k = opts.null_permutations, opts.knn_k

    def update(self, batch: PairBatch) -> None:
        l1, l2 = batch.l1, batch.l2
        self.sample.update(batch.index, ((l1.resid, l1.mask), (l2.resid, l2.mask)))

    def result(self) -> xr.Dataset:
        x, y, p1, p2 = self.sample.arrays()
        slots = self.sample.slots
        out = null_calibrate(x, y, p1, p2, slots, self.n_perm, self.k)
        dvars = {
            name: xr.DataArray(
                v, dims=("layer", "cal_measure"), attrs={"definition": _DEFINITIONS[name]}
            )
            for name, v in out.items()
        }
        coords = {"layer": np.arange(x.shape[0]), "cal_measure": list(MEASURES)}
        # attrs are prefixed: open_cube merges every family's attrs into the cube's
        attrs = {
            "definition": "similarity of the two languages' states against a permutation null",
            "cal_citation": CITATION,
            "cal_rows": "tokens (aligned positions)" if self.aligned else "mean-pooled sequences",
            "cal_n_rows": int(x.shape[1]),
            "cal_n_sample_pairs": len(self.sample.pairs),
            "cal_slots_per_pair": int(slots),
            "cal_null": "pairs shuffled"
            + (", and within-pair positions" if slots > 1 else "")
            + "; one permutation for all layers and measures; retrieval shuffles pairs",
            "cal_n_permutations": int(self.n_perm),
            "cal_knn_k": int(self.k),
            "cal_alpha": ALPHA,
            "cal_ridge": RIDGE,
            "cal_seed": 0,
        }
        return xr.Dataset(dvars, coords=coords, attrs=attrs)


class Calibrated(Family):
    """Raw, permutation-null and null-calibrated scores of the similarity and neighbour
    measures per layer (dims layer, measure)."""

    name = "calibrated"
    variables = tuple(Variable(v, _TITLES[v], _DEFINITIONS[v]) for v in VARIABLES)
    needs = Needs(activations=frozenset({"resid"}))
    command = "causal"  # computed when named; see docs/calibration.md for its cost

    def applies(self, series: Series) -> str | None:
        # checked before any checkpoint is read, so a bad k fails even with every step stored
        return _plan(series)[2]

    def start(self, ctx: CheckpointContext) -> _CalibrationRun:
        return _CalibrationRun(ctx)

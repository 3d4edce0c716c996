"""Per-layer cross-language representation similarity with streaming accumulators (paper §3.3).

The driver feeds batches of parallel pairs (L1 sequence, L2 sequence) and memory does not grow
with the number of pairs, except for the mean-pooled sequence vectors kept for retrieval
(2 * n_layers * d float64 per pair: 160 KB per pair at d=768, 13 layers).

Token pairing
-------------
* ``aligned=True`` (cloned languages, paper "one_by_one"): position t of the L1 sequence is paired
  with position t of the L2 sequence, over positions real in both masks (equal for clones; for
  the different-text baseline the shorter text decides).
* ``aligned=False`` (real languages, paper "max_matching"): per pair, the T1 x T2 token cosine
  matrix is averaged over the matching layers (default: layers 1..L, the block outputs the paper
  used; layer 0 = embeddings is not in the average) and a maximum-weight one-to-one matching is
  found with ``scipy.optimize.linear_sum_assignment``. ONE matching is shared by all layers, as in
  the paper: with a per-layer matching each layer would pick its own most similar tokens, so
  layers would be compared on different token pairs and every layer would be inflated by the
  optimisation (more so for noisy layers), making the layer profile hard to read. The matched
  token pairs also feed CKA / linmap / Procrustes.

Definitions (X = L1 token states, Y = L2 token states on the paired tokens, one layer)
------------------------------------------------------------------------------------------
* ``hidden_cos``: mean over pairs of the per-pair mean token cosine (paper definition).
* ``hidden_cos_centred``: a *pooled* cosine of centred states,
  sum_t (x_t-m1).(y_t-m2) / sqrt(sum_t |x_t-m1|^2 * sum_t |y_t-m2|^2), with m1, m2 the mean of
  ALL real tokens of each language (matched or not). A mean of per-token ratios of centred
  vectors is not computable in one streaming pass (the means are only known at the end); the
  pooled ratio is exactly decomposable into d-sized sums, so it is exact, not an approximation.
* ``cka``: debiased linear CKA (unbiased HSIC, Song et al. 2012) computed exactly from
  feature-space sums (X'X, Y'Y, X'Y, column sums, sum x|x|^2, sum x|y|^2, ... see ``_hsic_u``);
  equals the n x n Gram-matrix oracle ``cka_debiased_gram`` (test-only, in tests/oracles.py)
  to rounding. ``cka_biased``: Kornblith 2019 biased linear CKA.
* ``retrieval_acc``: sequences are mean-pooled over their real tokens; an L1 sequence is a hit if
  no L2 sequence has a strictly higher cosine than its own translation (ties count as hits, which
  only matters for exactly duplicated texts); and the reverse. Chance = 1 / n_pairs.
* ``linmap_r2``: ridge map Y -> X with intercept, fitted on the tokens of pairs with even
  pair_index, lambda = ridge * trace(Cov_fit(Y)) / d (relative to the mean eigenvalue, so the
  strength does not depend on the scale of the states); R^2 = 1 - SSE/SST on pairs with odd
  pair_index, SST around the test-half mean, summed over dims.
* ``procrustes_r2``: similarity transform Y -> X: centre each language with the FIT-half means,
  W = U V' from the SVD of the centred cross-covariance Cov_fit(Y, X) = U S V', plus one isotropic
  scale s = trace(S) / trace(Cov_fit(Y)) (least squares; without it a plain norm difference
  between languages would dominate the score), scored as R^2 on the odd half like linmap.
* ``*_baseline``: the same code path on ``update_baseline`` data (the L2 side is a different
  pair's text). For retrieval the baseline is the same code path too, so its "own translation" is
  the other text and it is expected to be below chance.

Exactness: all sums are float64. Before accumulating, each language's states are shifted by a
fixed per-layer vector (the mean of the first batch): every accumulator-based metric is exactly
invariant to such a shift, and it avoids cancellation from the large mean component of residual
streams. Token cosines are computed in float32 (float64 if the input is float64) and summed in
float64.

Confidence intervals (block bootstrap): pair i goes to group ``pair_index % n_groups``; each
(group, parity) cell keeps its own additive sums, a replicate resamples groups with replacement
and adds their sums, intervals are percentiles. Retrieval is bootstrapped by resampling pooled
sequences (pairs) directly. Replicates with an undefined value (e.g. no odd pair drawn) are
dropped (nan-percentile).

Memory: d x d sums per layer per cell: X'Y, Y'Y (linmap/procrustes) and X'X (cka). For d=768 and
13 layers one d x d family is 13*768^2*8 B = 61 MB, so the three cost 184 MB per cell. Cells =
(group, parity) pairs actually seen: 2 without groups, n_groups with an even n_groups. With
all metrics, ci and a baseline: 2 streams * 20 groups * 184 MB = 7.4 GB (d=1024, 25 layers:
25 GB); use fewer groups, fewer layers or fewer metrics for big models. ``nbytes`` reports it.
Bootstrap cost: one batched d x d solve + SVD per layer per replicate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment

from probekit.errors import MetricError
from probekit.kernels import add_gram, cross_gram
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable

METRICS = (
    "hidden_cos",
    "hidden_cos_centred",
    "cka",
    "retrieval_acc",
    "linmap_r2",
    "procrustes_r2",
)
DIRECTIONS = ["L1->L2", "L2->L1"]
_EPS = 1e-12

_DEFINITIONS = {
    "hidden_cos": "mean over pairs of the per-pair mean cosine between paired token states "
    "(aligned positions, or one layer-averaged max-weight matching shared by all layers)",
    "hidden_cos_centred": "pooled cosine sum_t (x_t-m1).(y_t-m2) / sqrt(sum_t |x_t-m1|^2 "
    "sum_t |y_t-m2|^2) over paired tokens, m = mean of all real tokens of each language",
    "cka": "debiased linear CKA (unbiased HSIC, Song et al. 2012) between paired token states",
    "cka_biased": "biased linear CKA (Kornblith et al. 2019) between paired token states",
    "retrieval_acc": "fraction of sequences whose own translation has the highest cosine among "
    "all other-language sequences (mean-pooled real tokens, ties count as hits)",
    "linmap_r2": "held-out R^2 (odd pair_index) of a ridge map L2->L1 with intercept fitted on "
    "even pair_index tokens, lambda = ridge * trace(Cov(Y))/d",
    "procrustes_r2": "held-out R^2 (odd pair_index) of a rotation plus isotropic scale L2->L1 "
    "fitted on even pair_index tokens after centring with fit-half means",
}


# ----------------------------------------------------------------------------- one-shot helpers


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_cosine(h1: torch.Tensor, h2: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per-pair mean cosine over real aligned positions.

    h1, h2: [L, B, T, d]; mask: [B, T] (True = real token). Returns float64 [L, B].
    """
    if h1.shape != h2.shape or h1.dim() != 4 or tuple(mask.shape) != tuple(h1.shape[1:3]):
        raise MetricError(
            f"token_cosine needs h1, h2 [L,B,T,d] and mask [B,T], got "
            f"{tuple(h1.shape)}, {tuple(h2.shape)}, {tuple(mask.shape)}"
        )
    dt = _work_dtype(h1)
    a, b = h1.detach().to(dt), h2.detach().to(dt)
    # one fused pass per quantity: avoids materialising unit vectors for the whole batch
    dot = torch.linalg.vecdot(a, b)
    den = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp_min(
        _EPS
    )
    m = mask.to(dt)
    n = mask.sum(-1)
    if bool((n == 0).any()):
        raise MetricError("a sequence has no real tokens (mask all False)")
    cos = ((dot / den) * m).sum(-1, dtype=torch.float64) / n.to(torch.float64)
    return cos.cpu().numpy()


def _match(c: torch.Tensor, match_layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Max-weight one-to-one matching on the layer-averaged cosine matrix c [L, T1, T2]."""
    avg = c[list(match_layers)].mean(0).to(torch.float64).cpu().numpy()
    r, col = linear_sum_assignment(avg, maximize=True)
    return r, col


def _default_match_layers(n_layers: int) -> list[int]:
    return list(range(1, n_layers)) if n_layers > 1 else [0]


def matched_cosine(
    h1_seq: torch.Tensor, h2_seq: torch.Tensor, match_layers: Sequence[int] | None = None
) -> np.ndarray:
    """Per-layer mean cosine over one matching of the tokens of two sequences.

    h1_seq: [L, T1, d], h2_seq: [L, T2, d] (real tokens only). The matching maximises the
    cosine averaged over ``match_layers`` (default 1..L) and is shared by all layers.
    Returns float64 [L].
    """
    if h1_seq.dim() != 3 or h2_seq.dim() != 3 or h1_seq.shape[0] != h2_seq.shape[0]:
        raise MetricError("matched_cosine needs [L, T1, d] and [L, T2, d] stacks")
    if h1_seq.shape[2] != h2_seq.shape[2]:
        raise MetricError(f"d differs: {h1_seq.shape[2]} vs {h2_seq.shape[2]}")
    if h1_seq.shape[1] == 0 or h2_seq.shape[1] == 0:
        raise MetricError("a sequence has no tokens")
    ml = _default_match_layers(h1_seq.shape[0]) if match_layers is None else match_layers
    dt = _work_dtype(h1_seq)
    c = _unit(h1_seq.detach().to(dt)) @ _unit(h2_seq.detach().to(dt)).transpose(1, 2)
    r, col = _match(c, ml)
    return c[:, r, col].to(torch.float64).mean(1).cpu().numpy()


def _retrieval_beats(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For p1, p2 [L, n, d]: beat12[l,i,j] = cos(p1_i, p2_j) > cos(p1_i, p2_i); beat21 likewise."""
    u1 = p1 / np.maximum(np.linalg.norm(p1, axis=-1, keepdims=True), _EPS)
    u2 = p2 / np.maximum(np.linalg.norm(p2, axis=-1, keepdims=True), _EPS)
    s = u1 @ u2.transpose(0, 2, 1)  # [L, n1, n2]
    diag = np.diagonal(s, axis1=1, axis2=2)  # [L, n]
    beat12 = s > diag[:, :, None]
    beat21 = s.transpose(0, 2, 1) > diag[:, :, None]
    return beat12, beat21


def retrieval_accuracy(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation retrieval accuracy from pooled vectors.

    p1, p2: [n, d] or [L, n, d]; row i of p2 is the translation of row i of p1. Returns
    (L1->L2, L2->L1) accuracies, floats arrays of shape [] or [L].
    """
    p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
    if p1.shape != p2.shape or p1.ndim not in (2, 3) or p1.shape[-2] < 2:
        raise MetricError(f"retrieval needs two [n>=2, d] or [L, n, d] arrays, got {p1.shape}")
    squeeze = p1.ndim == 2
    if squeeze:
        p1, p2 = p1[None], p2[None]
    b12, b21 = _retrieval_beats(p1, p2)
    a12, a21 = (~b12.any(-1)).mean(-1), (~b21.any(-1)).mean(-1)
    return (a12[0], a21[0]) if squeeze else (a12, a21)


# --------------------------------------------------------------------- metrics from summed cells


def _hsic_u(s: CellSums, a: str, b: str) -> np.ndarray:
    """Unbiased HSIC per layer from feature-space sums (exactly the Gram formula).

    With K = XX', L = YY' and zeroed diagonals K~, L~:
      tr(K~L~)  = |X'Y|_F^2 - sum_i |x_i|^2 |y_i|^2
      1'K~1     = |sum x|^2 - sum_i |x_i|^2
      1'K~L~1   = sx' X'Y sy - sx.sum_i x_i|y_i|^2 - sy.sum_i y_i|x_i|^2 + sum_i |x_i|^2|y_i|^2
    """
    n = s.n
    sa, na2 = s.side(a)[:2]
    sb, nb2 = s.side(b)[:2]
    if a == b:
        _, _, m, va_nb, na2nb2 = s.side(a)
        vb_na = va_nb
    else:  # a, b = x, y
        m, na2nb2 = s.xy, s.nx2ny2  # X'Y
        va_nb, vb_na = s.x_ny2, s.y_nx2
    tr = (m * m).sum((-1, -2)) - na2nb2
    ka = (sa * sa).sum(-1) - na2
    kb = (sb * sb).sum(-1) - nb2
    kl = np.einsum("ld,lde,le->l", sa, m, sb) - (sa * va_nb).sum(-1) - (sb * vb_na).sum(-1)
    kl = kl + na2nb2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (tr + ka * kb / ((n - 1) * (n - 2)) - 2.0 * kl / (n - 2)) / (n * (n - 3))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)


def _cka(s: CellSums) -> tuple[np.ndarray, np.ndarray]:
    n = s.n
    if n < 4:
        nan = np.full(s.sx.shape[0], np.nan)
        return nan, nan
    deb = _ratio(_hsic_u(s, "x", "y"), _hsic_u(s, "x", "x") * _hsic_u(s, "y", "y"))
    mx, my = s.sx / n, s.sy / n

    def cen(m: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return m - n * u[:, :, None] * v[:, None, :]

    cxy, cxx, cyy = cen(s.xy, mx, my), cen(s.xx, mx, mx), cen(s.yy, my, my)
    num = (cxy * cxy).sum((-1, -2))
    den = (cxx * cxx).sum((-1, -2)) * (cyy * cyy).sum((-1, -2))
    return deb, _ratio(num, den)


def _centred_cos(s: CellSums) -> np.ndarray:
    n = s.n
    m1, m2 = s.ax / s.an1, s.ay / s.an2
    num = s.dot - (m1 * s.sy).sum(-1) - (m2 * s.sx).sum(-1) + n * (m1 * m2).sum(-1)
    v1 = s.nx2 - 2 * (m1 * s.sx).sum(-1) + n * (m1 * m1).sum(-1)
    v2 = s.ny2 - 2 * (m2 * s.sy).sum(-1) + n * (m2 * m2).sum(-1)
    return _ratio(num, v1 * v2)


def _map_r2(fit: CellSums, test: CellSums, kind: str, ridge: float) -> np.ndarray:
    """Held-out R^2 of x^ = y A + b, everything from sums (no token storage)."""
    n_layers, d = fit.sx.shape
    if fit.n < 2 or test.n < 2:
        return np.full(n_layers, np.nan)
    nf = fit.n
    mxf, myf = fit.sx / nf, fit.sy / nf
    cyy = fit.yy - nf * myf[:, :, None] * myf[:, None, :]
    cyx = fit.xy.transpose(0, 2, 1) - nf * myf[:, :, None] * mxf[:, None, :]  # Y'X centred
    tr_yy = np.trace(cyy, axis1=1, axis2=2)
    if kind == "linmap":
        lam = ridge * tr_yy / d
        a = np.linalg.solve(cyy + lam[:, None, None] * np.eye(d), cyx)
    else:
        u, sv, vt = np.linalg.svd(cyx)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(tr_yy > 0, sv.sum(-1) / tr_yy, 0.0)
        a = scale[:, None, None] * (u @ vt)
    b = mxf - np.einsum("ld,lde->le", myf, a)
    nt = test.n
    yx_t = test.xy.transpose(0, 2, 1)
    sse = (
        test.nx2
        - 2 * np.einsum("lde,lde->l", a, yx_t)
        - 2 * (test.sx * b).sum(-1)
        + ((test.yy @ a) * a).sum((1, 2))  # sum_def a_de yy_df a_fe
        + 2 * (np.einsum("ld,lde->le", test.sy, a) * b).sum(-1)
        + nt * (b * b).sum(-1)
    )
    sst = test.nx2 - (test.sx * test.sx).sum(-1) / nt
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


# ---------------------------------------------------------------------------- streaming classes

@dataclass
class CellSums:
    """The additive sums of one cell of pairs: float64 tensors while streaming, float64 arrays
    (counts as floats) once reduced. x are L1's paired token states, y L2's, both shifted by the
    stream's fixed shift; a1 / a2 every real token of each side. Per layer:"""

    n_pairs: Any  # pairs in the cell
    cos_sum: Any  # [L] sum of the per-pair cosines
    n: Any  # paired tokens
    an1: Any  # real L1 tokens
    an2: Any  # real L2 tokens
    sx: Any  # [L, d] sum_t x_t
    sy: Any
    ax: Any  # [L, d] sum over every real L1 token
    ay: Any
    dot: Any  # [L] sum_t x_t . y_t
    nx2: Any  # [L] sum_t |x_t|^2
    ny2: Any
    xy: Any = None  # [L, d, d] X'Y (the linear maps and CKA)
    yy: Any = None  # [L, d, d] Y'Y, an upper triangle while streaming
    xx: Any = None  # [L, d, d] X'X (CKA only, as everything below)
    x_nx2: Any = None  # [L, d] sum_t x_t |x_t|^2
    y_ny2: Any = None
    x_ny2: Any = None  # [L, d] sum_t x_t |y_t|^2
    y_nx2: Any = None
    nx4: Any = None  # [L] sum_t |x_t|^4
    ny4: Any = None
    nx2ny2: Any = None  # [L] sum_t |x_t|^2 |y_t|^2

    # the sums that read one side only (a shared baseline borrows them)
    X_SIDE: ClassVar[tuple[str, ...]] = ("an1", "ax", "sx", "nx2", "xx", "x_nx2", "nx4")
    Y_SIDE: ClassVar[tuple[str, ...]] = ("an2", "ay", "sy", "ny2", "yy", "y_ny2", "ny4")
    COUNTS: ClassVar[tuple[str, ...]] = ("n", "n_pairs", "an1", "an2")

    @classmethod
    def zeros(cls, n_layers: int, d: int, gram: bool, cka: bool) -> CellSums:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64)

        L = n_layers
        c = cls(z(), z(L), z(), z(), z(), z(L, d), z(L, d), z(L, d), z(L, d), z(L), z(L), z(L))
        if gram or cka:
            c.xy, c.yy = z(L, d, d), z(L, d, d)
        if cka:
            c.xx = z(L, d, d)
            c.x_nx2, c.y_ny2, c.x_ny2, c.y_nx2 = z(L, d), z(L, d), z(L, d), z(L, d)
            c.nx4, c.ny4, c.nx2ny2 = z(L), z(L), z(L)
        return c

    def present(self) -> dict[str, Any]:
        """name -> value of the sums this cell keeps."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def side(self, which: str) -> tuple[Any, Any, Any, Any, Any]:
        """(sum, sum of squared norms, Gram, sum_t v_t |v_t|^2, sum_t |v_t|^4) of x or y."""
        if which == "x":
            return self.sx, self.nx2, self.xx, self.x_nx2, self.nx4
        return self.sy, self.ny2, self.yy, self.y_ny2, self.ny4

    def borrow(self, other: CellSums, names: tuple[str, ...]) -> None:
        """Take ``other``'s sums of these names (those it keeps)."""
        for name in names:
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))

    def reduced(self) -> CellSums:
        """As float64 arrays, the Gram sums (kept as upper triangles) mirrored."""
        c = {k: v.numpy() for k, v in self.present().items()}
        for k in ("xx", "yy"):
            if k in c:
                u = c[k]
                c[k] = u + np.triu(u, 1).transpose(0, 2, 1)
        return CellSums(**c)

    @staticmethod
    def weighted(cells: list[tuple[float, CellSums]]) -> CellSums | None:
        """sum_i w_i cells_i over the cells with w_i != 0 (None when there are none)."""
        out: dict[str, Any] = {}
        for w, cell in cells:
            if w == 0:
                continue
            for k, a in cell.present().items():
                if k in out:
                    out[k] += w * a
                else:
                    out[k] = w * a
        if not out:
            return None
        for k in CellSums.COUNTS:
            out[k] = float(out[k])
        return CellSums(**out)

    def __add__(self, other: CellSums) -> CellSums:
        mine, theirs = self.present(), other.present()
        return CellSums(**{k: mine.get(k, 0) + theirs.get(k, 0) for k in mine | theirs})


def _real_sum(h: torch.Tensor, mask: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """h [L, B, T, d] summed over ``dims`` at real tokens (mask [B, T]), in float64 but with no
    float64 copy of the batch."""
    return (h if bool(mask.all()) else h * mask[None, :, :, None]).sum(dims, dtype=torch.float64)


class _Stream:
    """Additive per-(group, parity) sums for one kind of pairing (main or baseline)."""

    def __init__(self, owner: SimilarityAccumulator, one_language: bool = True) -> None:
        self.o = owner
        # False for a shared baseline: its one-language sums are the main stream's (see
        # SimilarityAccumulator, share_baseline); only the cross-language ones are kept here
        self.one_language = one_language
        self.cells: dict[tuple[int, int], CellSums] = {}
        self.pooled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.seen: set[int] = set()
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def _new_cell(self) -> CellSums:
        o = self.o
        return CellSums.zeros(o.n_layers, o.d_model, o._need_map, o._need_cka)

    def update(self, h1, mask1, h2, mask2, pair_index, l1_rows=None) -> dict:  # noqa: ANN001
        """Add a batch; returns {cell: (L1 rows, their squared norms)} as float64, shifted.

        ``l1_rows``: that dict from the main stream's update of the same L1 batch, for a shared
        baseline (same cells, same shift): its L1 rows are then not gathered again."""
        o = self.o
        h1, mask1, h2, mask2, idx = o._validate(h1, mask1, h2, mask2, pair_index)
        dup = self.seen.intersection(idx.tolist())
        if dup or len(set(idx.tolist())) != len(idx):
            raise MetricError(f"pair_index fed twice to the same stream: {sorted(dup)[:5]}")
        self.seen.update(idx.tolist())
        B = h1.shape[1]
        dt = _work_dtype(h1)
        h1, h2 = h1.detach().to("cpu", dt), h2.detach().to("cpu", dt)
        mask1, mask2 = mask1.to("cpu", torch.bool), mask2.to("cpu", torch.bool)

        # per-pair cosine and the token pairing
        if o.aligned:
            joint = mask1 & mask2  # equal for clones; differs for the different-text baseline
            cos = token_cosine(h1, h2, joint)  # [L, B]
            pos = [torch.nonzero(joint[b]).squeeze(1) for b in range(B)]
            rows, cols = pos, pos
        else:
            cos = np.empty((o.n_layers, B))
            rows, cols = [], []
            for b in range(B):
                r1, r2 = torch.nonzero(mask1[b]).squeeze(1), torch.nonzero(mask2[b]).squeeze(1)
                c = _unit(h1[:, b, r1]) @ _unit(h2[:, b, r2]).transpose(1, 2)
                r, col = _match(c, o.match_layers)
                cos[:, b] = c[:, r, col].to(torch.float64).mean(1).numpy()
                rows.append(r1[torch.from_numpy(r)])
                cols.append(r2[torch.from_numpy(col)])

        if o.share_baseline and not (bool(mask1.all()) and bool(mask2.all())):
            raise MetricError("share_baseline needs full-length sequences (no padding)")
        # pooled sequences for retrieval (small: [B, L, d] per batch)
        if o._need_retrieval and self.one_language:

            def pool(h: torch.Tensor, m: torch.Tensor) -> np.ndarray:  # [B, L, d] float64
                s = _real_sum(h, m, 2) / m.sum(1).to(torch.float64)[None, :, None]
                return s.permute(1, 0, 2).numpy()

            self.pooled.append((idx.copy(), pool(h1, mask1), pool(h2, mask2)))

        if self.shift is None and not self.one_language:
            if o._main.shift is None:
                raise MetricError("share_baseline: feed a main batch before its baseline")
            self.shift = o._main.shift  # the one-language sums it borrows were shifted so
        if self.shift is None:
            # fixed shift (mean of the first batch): exact invariance, less cancellation
            self.shift = (
                _real_sum(h1, mask1, (1, 2)) / mask1.sum(),
                _real_sum(h2, mask2, (1, 2)) / mask2.sum(),
            )
        c1, c2 = self.shift
        keys = [o.cell_key(i) for i in idx.tolist()]
        # token rows of the flattened [L, B*T, d] batch: one gather per cell and side
        T1, T2 = h1.shape[2], h2.shape[2]
        flat1, flat2 = h1.reshape(o.n_layers, -1, o.d_model), h2.reshape(o.n_layers, -1, o.d_model)
        real1 = [torch.nonzero(mask1[b]).squeeze(1) for b in range(B)]
        real2 = [torch.nonzero(mask2[b]).squeeze(1) for b in range(B)]
        out = {}
        for key in sorted(set(keys)):
            sel = [b for b in range(B) if keys[b] == key]
            cell = self.cells.get(key)
            if cell is None:
                cell = self.cells[key] = self._new_cell()
            cell.n_pairs += len(sel)
            cell.cos_sum += torch.from_numpy(cos[:, sel].sum(1))
            if not o._need_tokens:
                continue
            r1 = torch.cat([b * T1 + rows[b] for b in sel])
            r2 = torch.cat([b * T2 + cols[b] for b in sel])
            m1 = torch.cat([b * T1 + real1[b] for b in sel])
            m2 = torch.cat([b * T2 + real2[b] for b in sel])
            known = l1_rows.get(key) if l1_rows is not None else None
            out[key] = self._accumulate(cell, (flat1, r1, m1, c1), (flat2, r2, m2, c2), known)
        return out

    def _accumulate(self, cell, side1, side2, known=None) -> tuple:  # noqa: ANN001
        """Add one cell's tokens: side = (states [L, B*T, d], paired rows, real rows, shift);
        ``known`` = (x, |x|^2) of side 1's paired rows if already gathered. Returns those."""
        o = self.o

        def rows(flat, idx, shift):  # noqa: ANN001, ANN202 - float64, shifted
            x = flat.index_select(1, idx).to(torch.float64)
            return x.sub_(shift[:, None])  # in place: one float64 copy of the rows, not two

        (f1, r1, m1, c1), (f2, r2, m2, c2) = side1, side2
        x, nx2 = known if known is not None else (rows(f1, r1, c1), None)
        y = rows(f2, r2, c2)
        norms = None
        if self.one_language or o._need_cka:
            nx2 = (x * x).sum(-1) if nx2 is None else nx2
            norms = nx2, (y * y).sum(-1)  # [L, N] each
        self._accumulate_cross(cell, x, y, norms)
        if not self.one_language:
            return x, nx2
        nx2, ny2 = norms
        # every real token is paired (clones; the shorter side of a matching): same rows
        a1 = x if torch.equal(r1, m1) else rows(f1, m1, c1)
        a2 = y if torch.equal(r2, m2) else rows(f2, m2, c2)
        cell.an1 += a1.shape[1]
        cell.an2 += a2.shape[1]
        sx, sy = x.sum(1), y.sum(1)
        cell.ax += sx if a1 is x else a1.sum(1)
        cell.ay += sy if a2 is y else a2.sum(1)
        cell.sx += sx
        cell.sy += sy
        cell.nx2 += nx2.sum(1)
        cell.ny2 += ny2.sum(1)
        if cell.xy is not None:
            add_gram(cell.yy, y)
            if o._need_cka:
                add_gram(cell.xx, x)
                cell.x_nx2 += torch.bmm(nx2[:, None], x)[:, 0]  # sum_t x_t |x_t|^2
                cell.y_ny2 += torch.bmm(ny2[:, None], y)[:, 0]
                cell.nx4 += (nx2 * nx2).sum(1)
                cell.ny4 += (ny2 * ny2).sum(1)
        return x, nx2

    def _accumulate_cross(self, cell, x, y, norms) -> None:  # noqa: ANN001
        """The sums that pair the two sides (all a shared baseline keeps of its own);
        norms = the rows' squared norms (|x_t|^2, |y_t|^2), needed for CKA."""
        cell.n += x.shape[1]
        if cell.xy is None:
            cell.dot += (x * y).sum((1, 2))
            return
        xy = cross_gram(x, y)
        cell.xy += xy
        cell.dot += xy.diagonal(dim1=1, dim2=2).sum(1)  # sum_t x_t . y_t = trace(X'Y)
        if self.o._need_cka:
            nx2, ny2 = norms
            cell.x_ny2 += torch.bmm(ny2[:, None], x)[:, 0]
            cell.y_nx2 += torch.bmm(nx2[:, None], y)[:, 0]
            cell.nx2ny2 += (nx2 * ny2).sum(1)

    # -- reduction

    def full_cells(self) -> dict[tuple[int, int], CellSums]:
        """The cells as float64 arrays, with the Gram sums (kept as upper triangles) mirrored."""
        return {key: cell.reduced() for key, cell in self.cells.items()}

    def metrics(
        self, weights: dict[tuple[int, int], float], cells: dict[tuple[int, int], CellSums]
    ) -> dict[str, np.ndarray]:
        """Every metric from the weighted sum of the cells (``full_cells``)."""
        o = self.o
        L = o.n_layers
        nan = np.full(L, np.nan)
        w_fit = {k: w for k, w in weights.items() if k[1] == 0}
        w_test = {k: w for k, w in weights.items() if k[1] == 1}
        fit = CellSums.weighted([(w, cells[k]) for k, w in w_fit.items()])
        test = CellSums.weighted([(w, cells[k]) for k, w in w_test.items()])
        parts = [c for c in (fit, test) if c is not None]
        tot = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
        res: dict[str, np.ndarray] = {}
        have = tot is not None and tot.n_pairs > 0
        if "hidden_cos" in o.metrics:
            res["hidden_cos"] = tot.cos_sum / tot.n_pairs if have else nan
        if "hidden_cos_centred" in o.metrics:
            res["hidden_cos_centred"] = _centred_cos(tot) if have else nan
        if o._need_cka:
            res["cka"], res["cka_biased"] = _cka(tot) if have else (nan, nan)
        for m, kind in (("linmap_r2", "linmap"), ("procrustes_r2", "procrustes")):
            if m in o.metrics:
                ok = fit is not None and test is not None
                res[m] = _map_r2(fit, test, kind, o.ridge) if ok else nan
        return res

    def pooled_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate([p[0] for p in self.pooled])
        order = np.argsort(idx, kind="stable")
        p1 = np.concatenate([p[1] for p in self.pooled])[order].transpose(1, 0, 2)
        p2 = np.concatenate([p[2] for p in self.pooled])[order].transpose(1, 0, 2)
        return p1, p2  # [L, n, d], rows sorted by pair_index

    def nbytes(self) -> int:
        cells = sum(
            v.numel() * v.element_size() for c in self.cells.values() for v in c.present().values()
        )
        return cells + sum(p[1].nbytes + p[2].nbytes for p in self.pooled)


class SimilarityAccumulator:
    """Streaming per-layer similarity of L1 vs L2 hidden states over batches of parallel pairs.

    See the module docstring for definitions. ``update`` / ``update_baseline`` take
    h [L+1, B, T, d] float tensors, masks [B, T] bool and pair_index [B] int; ``result`` returns
    an xarray.Dataset with dims ``layer`` (and ``direction`` for retrieval).

    ``share_baseline``: the caller promises that pairs 0..n-1 are all fed to both streams,
    every sequence full-length (no padding), and that the L2 side of baseline pair i is the
    main stream's L2 sequence of pair (i + 1) mod n. The baseline's one-language sums are then
    the main stream's, moved between cells, and are not computed twice; ``result`` checks the
    cell bookkeeping. Same numbers as without it, to float64 rounding.
    """

    def __init__(
        self,
        n_layers_plus_1: int,
        d_model: int,
        metrics: Sequence[str] = METRICS,
        aligned: bool = True,
        n_groups: int | None = None,
        ridge: float = 1e-2,
        match_layers: Sequence[int] | None = None,
        share_baseline: bool = False,
    ) -> None:
        if int(n_layers_plus_1) < 1 or int(d_model) < 1:
            raise MetricError(
                f"need n_layers_plus_1 >= 1 and d_model >= 1, got {n_layers_plus_1}, {d_model}"
            )
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise MetricError(f"unknown similarity metric(s) {unknown}; choose from {METRICS}")
        if n_groups is not None and int(n_groups) < 2:
            raise MetricError(f"n_groups must be >= 2 or None, got {n_groups}")
        if not ridge >= 0:
            raise MetricError(f"ridge must be >= 0, got {ridge}")
        self.n_layers, self.d_model = int(n_layers_plus_1), int(d_model)
        self.metrics, self.aligned, self.ridge = metrics, bool(aligned), float(ridge)
        self.n_groups = None if n_groups is None else int(n_groups)
        ml = _default_match_layers(self.n_layers) if match_layers is None else list(match_layers)
        if not ml or any(not 0 <= m < self.n_layers for m in ml):
            raise MetricError(f"match_layers must lie in [0, {self.n_layers}), got {ml}")
        self.match_layers = ml
        self._need_cka = "cka" in metrics
        self._need_map = "linmap_r2" in metrics or "procrustes_r2" in metrics
        self._need_retrieval = "retrieval_acc" in metrics
        # token-level sums are only needed beyond the per-pair cosine
        self._need_tokens = self._need_cka or self._need_map or "hidden_cos_centred" in metrics
        self.share_baseline = bool(share_baseline)
        self._main = _Stream(self)
        self._base = _Stream(self, one_language=not self.share_baseline)

    def cell_key(self, pair_index: int) -> tuple[int, int]:
        """(bootstrap group, parity) of a pair: the cell its sums go to."""
        return (pair_index % self.n_groups if self.n_groups else 0, pair_index % 2)

    # -- input

    def _validate(self, h1, mask1, h2, mask2, pair_index):  # noqa: ANN001, ANN202
        for name, h in (("h1", h1), ("h2", h2)):
            if not isinstance(h, torch.Tensor) or h.dim() != 4 or not h.is_floating_point():
                raise MetricError(f"{name} must be a float tensor [L+1, B, T, d]")
            if h.shape[0] != self.n_layers or h.shape[3] != self.d_model:
                raise MetricError(
                    f"{name} has {h.shape[0]} layers and d={h.shape[3]}, accumulator expects "
                    f"{self.n_layers} layers and d={self.d_model}"
                )
        if h1.shape[1] != h2.shape[1]:
            raise MetricError(f"batch sizes differ: {h1.shape[1]} vs {h2.shape[1]}")
        for name, m, h in (("mask1", mask1, h1), ("mask2", mask2, h2)):
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(h.shape[1:3]):
                raise MetricError(f"{name} must be a tensor [B, T] matching its hidden states")
            if m.dtype != torch.bool:
                raise MetricError(f"{name} must be a bool tensor (True = real token)")
            if bool((m.sum(1) == 0).any()):
                raise MetricError(f"{name}: a sequence has no real tokens")
        if self.aligned:
            if h1.shape[2] != h2.shape[2]:
                raise MetricError(
                    f"aligned=True needs T1 == T2, got {h1.shape[2]} vs {h2.shape[2]}"
                )
            if bool(((mask1 & mask2).sum(1) == 0).any()):
                raise MetricError("aligned=True: a pair has no position that is real in both")
        idx = np.asarray(torch.as_tensor(pair_index).cpu().numpy())
        if idx.shape != (h1.shape[1],) or not np.issubdtype(idx.dtype, np.integer):
            raise MetricError(f"pair_index must be an int tensor [B], got {idx.dtype} {idx.shape}")
        if (idx < 0).any():
            raise MetricError("pair_index must be >= 0")
        return h1, mask1, h2, mask2, idx.astype(np.int64)

    def update(
        self,
        h1: torch.Tensor,
        mask1: torch.Tensor,
        h2: torch.Tensor,
        mask2: torch.Tensor,
        pair_index: torch.Tensor,
    ) -> None:
        """Add a batch of parallel pairs (L2 side = the translation / clone of the L1 side)."""
        self._main.update(h1, mask1, h2, mask2, pair_index)

    def update_baseline(
        self,
        h1: torch.Tensor,
        mask1: torch.Tensor,
        h2: torch.Tensor,
        mask2: torch.Tensor,
        pair_index: torch.Tensor,
    ) -> None:
        """Add a batch of mismatched pairs (L2 side = a different text); same code path."""
        self._base.update(h1, mask1, h2, mask2, pair_index)

    def update_with_baseline(
        self,
        h1: torch.Tensor,
        mask1: torch.Tensor,
        h2: torch.Tensor,
        mask2: torch.Tensor,
        h2_other: torch.Tensor,
        mask2_other: torch.Tensor,
        pair_index: torch.Tensor,
    ) -> None:
        """``update(h1, mask1, h2, mask2)`` then ``update_baseline(h1, mask1, h2_other,
        mask2_other)``; with ``share_baseline`` the L1 rows are gathered once for both."""
        rows = self._main.update(h1, mask1, h2, mask2, pair_index)
        shared = rows if self.share_baseline else None
        self._base.update(h1, mask1, h2_other, mask2_other, pair_index, shared)

    @property
    def nbytes(self) -> int:
        """Bytes held: additive sums (independent of pair count) + pooled retrieval vectors."""
        return self._main.nbytes() + self._base.nbytes()

    @property
    def nbytes_sums(self) -> int:
        """Bytes of the additive sums only (constant once every cell has been seen)."""
        return sum(
            v.numel() * v.element_size()
            for s in (self._main, self._base)
            for c in s.cells.values()
            for v in c.present().values()
        )

    # -- output

    def _baseline_parts(
        self, main: dict, main_pooled: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
        """The baseline's full cells and pooled vectors; a shared baseline takes its
        one-language sums from the main stream's full cells and pooled vectors (see
        ``share_baseline``)."""
        base = self._base
        cells = base.full_cells()
        if base.one_language:
            return cells, base.pooled_arrays() if self._need_retrieval else None
        n = len(self._main.seen)
        if base.seen != self._main.seen or self._main.seen != set(range(n)):
            raise MetricError("share_baseline: both streams need exactly the pairs 0..n-1")
        moved: dict[tuple[int, int], tuple[int, int]] = {}
        for j in range(n):  # L2 of pair j is the baseline partner of pair j - 1
            src, dst = self.cell_key(j), self.cell_key((j - 1) % n)
            if moved.setdefault(src, dst) != dst:
                raise MetricError(
                    f"share_baseline: {n} pairs do not move whole cells (use a multiple of "
                    f"{math.lcm(self.n_groups or 1, 2)} pairs, or no sharing)"
                )
        if sorted(moved.values()) != sorted(cells):
            raise MetricError("share_baseline: the baseline's cells do not match the main ones")
        for key, cell in cells.items():  # L1 side: pair i is in the same cell in both
            cell.borrow(main[key], CellSums.X_SIDE)
        for src, dst in moved.items():
            cells[dst].borrow(main[src], CellSums.Y_SIDE)
        pooled = None
        if main_pooled is not None:
            p1, p2 = main_pooled
            pooled = (p1, np.roll(p2, -1, axis=1))
        return cells, pooled

    def _stream_result(
        self,
        s: _Stream,
        cells: dict,
        pooled: tuple[np.ndarray, np.ndarray] | None,
        ci: float | None,
        n_boot: int,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        out = s.metrics({k: 1.0 for k in cells}, cells)
        reps: dict[str, list[np.ndarray]] = {k: [] for k in out}
        if ci is not None:
            keys = sorted(cells)
            groups = sorted({k[0] for k in keys})
            for _ in range(n_boot):
                draw = rng.integers(0, len(groups), len(groups))
                cnt = np.bincount(draw, minlength=len(groups))
                gw = dict(zip(groups, cnt.tolist(), strict=True))
                r = s.metrics({k: float(gw[k[0]]) for k in keys}, cells)
                for k, v in r.items():
                    reps[k].append(v)
        if self._need_retrieval:
            p1, p2 = pooled
            n = p1.shape[1]
            if n < 2:
                out["retrieval_acc"] = np.full((self.n_layers, 2), np.nan)
            else:
                b12, b21 = _retrieval_beats(p1, p2)
                out["retrieval_acc"] = np.stack(
                    [(~b12.any(-1)).mean(-1), (~b21.any(-1)).mean(-1)], -1
                )
                if ci is not None:
                    reps["retrieval_acc"] = list(_retrieval_boot(b12, b21, n_boot, rng))
        if ci is not None:
            lo_q, hi_q = 50 * (1 - ci), 50 * (1 + ci)
            for k in list(out):
                arr = np.asarray(reps[k])
                with np.errstate(all="ignore"):
                    ok = np.isfinite(arr).any(0)
                    safe = np.where(ok, arr, 0.0)
                    out[k + "_lo"] = np.where(ok, np.nanpercentile(safe, lo_q, axis=0), np.nan)
                    out[k + "_hi"] = np.where(ok, np.nanpercentile(safe, hi_q, axis=0), np.nan)
        return out

    def result(self, ci: float | None = None, n_boot: int = 1000, seed: int = 0) -> xr.Dataset:
        """All requested metrics (+ ``_baseline``, + ``_lo``/``_hi`` with ci) as a Dataset."""
        if not self._main.cells:
            raise MetricError("no pairs were fed to the similarity accumulator")
        if ci is not None and not 0 < ci < 1:
            raise MetricError(f"ci must lie in (0, 1), got {ci}")
        if ci is not None and self.n_groups is None:
            raise MetricError("confidence intervals need n_groups (block bootstrap groups)")
        if n_boot < 1:
            raise MetricError(f"n_boot must be >= 1, got {n_boot}")
        rng = np.random.default_rng(seed)
        main_pooled = self._main.pooled_arrays() if self._need_retrieval else None
        main_cells = self._main.full_cells()
        data = self._stream_result(self._main, main_cells, main_pooled, ci, n_boot, rng)
        if self._base.cells:
            cells, pooled = self._baseline_parts(main_cells, main_pooled)
            for k, v in self._stream_result(self._base, cells, pooled, ci, n_boot, rng).items():
                base, suffix = (k[:-3], k[-3:]) if k.endswith(("_lo", "_hi")) else (k, "")
                data[f"{base}_baseline{suffix}"] = v
        n_pairs = len(self._main.seen)
        dvars = {}
        for k, v in data.items():
            root = k.replace("_baseline", "").replace("_lo", "").replace("_hi", "")
            dims = ("layer", "direction") if root == "retrieval_acc" else ("layer",)
            attrs = {"definition": _DEFINITIONS[root]}
            if k != root:
                attrs["variant"] = k[len(root) :].lstrip("_")
            dvars[k] = xr.DataArray(np.asarray(v, np.float64), dims=dims, attrs=attrs)
        coords = {"layer": np.arange(self.n_layers)}
        if self._need_retrieval:
            coords["direction"] = DIRECTIONS
        attrs = {
            "definition": "cross-language representation similarity of parallel pairs per layer",
            "aligned": int(self.aligned),
            "pairing": "aligned positions" if self.aligned else "layer-averaged assignment",
            "matching": "one-by-one" if self.aligned else "layer-averaged assignment",
            "match_layers": list(self.match_layers),
            "ridge": self.ridge,
            "ridge_scaling": "lambda = ridge * trace(Cov_fit(L2 states)) / d",
            "procrustes": "rotation + isotropic scale, fit-half centring",
            "split": "fit on even pair_index, score on odd pair_index",
            "n_pairs": n_pairs,
            "n_pairs_baseline": len(self._base.seen),
            "n_groups": -1 if self.n_groups is None else self.n_groups,
            "ci": -1.0 if ci is None else float(ci),
            "n_boot": int(n_boot) if ci is not None else 0,
            "seed": int(seed),
            "bootstrap": "groups pair_index % n_groups resampled with replacement; retrieval "
            "resamples pooled sequences; percentile intervals",
        }
        if self._need_retrieval:
            attrs["retrieval_chance"] = 1.0 / max(n_pairs, 1)
        return xr.Dataset(dvars, coords=coords, attrs=attrs)


def _retrieval_boot(
    b12: np.ndarray, b21: np.ndarray, n_boot: int, rng: np.random.Generator, chunk: int = 256
):  # noqa: ANN202
    """Yield [L, 2] retrieval accuracies for pair resamples, without recomputing cosines.

    Sequence i is a hit in a resample iff none of the sequences that beat its translation is
    present: hits = (beat @ present == 0), weighted by how often i was drawn.
    """
    n = b12.shape[1]
    f12, f21 = b12.astype(np.float32), b21.astype(np.float32)
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        cnt = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(r)], 1)
        present = (cnt > 0).astype(np.float32)  # [n, r]
        accs = []
        for f in (f12, f21):
            hit = (f @ present) == 0  # [L, n, r]
            accs.append(np.einsum("lnr,nr->rl", hit, cnt.astype(np.float64)) / n)
        yield from np.stack(accs, -1)


# ----------------------------------------------------------------------------- the family

_TITLES = {
    "hidden_cos": "hidden-state cosine",
    "hidden_cos_centred": "centred hidden-state cosine",
    "cka": "linear CKA (debiased)",
    "cka_biased": "linear CKA (biased)",
    "retrieval_acc": "parallel-sentence retrieval accuracy",
    "linmap_r2": "linear-map R²",
    "procrustes_r2": "Procrustes R²",
}


class _SimilarityRun:
    def __init__(self, ctx: CheckpointContext):
        par, opts = ctx.series.parallel, ctx.options
        n_groups = 20 if opts.ci else None
        # the engine's baseline pairs L1 of pair i with L2 of pair i + 1 (mod n): with clones of
        # one length and whole cells moved, its one-language sums are the main stream's
        lengths = {len(ids) for ids in (*par.ids1, *par.ids2)}
        share = par.aligned and len(lengths) == 1 and len(par) % math.lcm(n_groups or 1, 2) == 0
        self.acc = SimilarityAccumulator(
            ctx.view.n_layers + 1,
            ctx.view.d_model,
            metrics=METRICS,
            aligned=par.aligned,
            n_groups=n_groups,
            share_baseline=share,
        )
        self.ci, self.n_boot = opts.ci, opts.n_boot

    def update(self, batch: PairBatch) -> None:
        l1, l2, other = batch.l1, batch.l2, batch.l2_other
        self.acc.update_with_baseline(
            l1.resid,
            l1.mask,
            l2.resid,
            l2.mask,
            other.resid,
            other.mask,
            torch.as_tensor(batch.index),
        )

    def result(self) -> xr.Dataset:
        return self.acc.result(ci=self.ci, n_boot=self.n_boot, seed=0)


class Similarity(Family):
    """Per-layer similarity of the two languages' hidden states on parallel text, with the
    different-text baseline (`*_baseline`) and optional bootstrap intervals (`*_lo`, `*_hi`)."""

    name = "similarity"
    variables = tuple(Variable(m, _TITLES[m], _DEFINITIONS[m]) for m in (*METRICS, "cka_biased"))
    needs = Needs(activations=frozenset({"resid"}), baseline=True)

    def start(self, ctx: CheckpointContext) -> _SimilarityRun:
        return _SimilarityRun(ctx)

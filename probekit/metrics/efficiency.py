"""Monolingual scaling references, MLPE, MLTE and token efficiency (paper §3.2).

A *scaling reference* maps the fraction ``x`` of the token budget ``T`` a monolingual model was
trained on to the test PPL it reaches, from a few measured monolingual runs:

* ``MLPE(x)``: the PPL a monolingual model reaches after ``x·T`` tokens;
* ``MLTE(ppl)``: the fraction of ``T`` a monolingual model needs to reach ``ppl`` (the inverse);
* ``TEff = MLTE·T / n_L``, with ``n_L`` the tokens of language L in the multilingual run
  (> 1: L gained from the other language(s); < 1: interference).

Two references exist. ``fit_power_law`` is the paper's fit 1/PPL = c − a·x^(−b). At CPU scale
the runs are far from the saturating regime and the fit degenerates (b → 0, errors up to 46 %,
research/feasibility*.md), so ``LogLogInterp`` interpolates log PPL linearly in log x between
the measured points instead. ``choose_reference`` picks one and records why. Neither ever
extrapolates silently: ``mlpe``/``mlte`` return ``(value, extrapolated)``.

Example::

    ref = choose_reference({0.1: 37.05, 0.2: 28.08, 0.3: 18.85, 0.5: 13.91, 1.0: 10.70})
    ds = token_efficiency(21.08, tokens_lang=0.49e6, budget_tokens=4.9e6, reference=ref)
    float(ds.teff), ref.method, ref.reason
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import xarray as xr
from scipy.optimize import OptimizeWarning, curve_fit

from probekit.errors import MetricError
from probekit.metrics.base import Family, Needs, Variable

__all__ = [
    "Flagged",
    "ScalingReference",
    "PowerLawFit",
    "LogLogInterp",
    "fit_power_law",
    "choose_reference",
    "token_efficiency",
]

DEGENERATE_B = 1e-2  # below this the "power law" is just 1/PPL linear in ln x (CPU-scale runs)
MAX_FIT_RESIDUAL = 0.05  # auto uses the fit only if it matches every point within 5 % in PPL


class Flagged(NamedTuple):
    """A value (float or array) and whether it lies outside the measured range."""

    value: Any
    extrapolated: Any


def _points(x: Any, ppl: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and sort measured (x, PPL) points."""
    x = np.asarray(x, dtype=float).ravel()
    ppl = np.asarray(ppl, dtype=float).ravel()
    if x.shape != ppl.shape:
        raise MetricError(f"scaling reference: {x.size} fractions but {ppl.size} PPL values")
    if x.size < 2:
        raise MetricError(f"scaling reference needs >= 2 monolingual points, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(ppl))):
        raise MetricError("scaling reference: fractions and PPLs must be finite")
    if np.any(x <= 0) or np.any(ppl <= 1):
        raise MetricError("scaling reference: fractions must be > 0 and PPLs > 1")
    order = np.argsort(x)
    x, ppl = x[order], ppl[order]
    if np.any(np.diff(x) == 0):
        raise MetricError("scaling reference: duplicate token fractions")
    return x, ppl


def _out(value: np.ndarray, flag: np.ndarray, scalar: bool) -> Flagged:
    if scalar:
        return Flagged(float(value), bool(flag))
    return Flagged(value, flag)


class ScalingReference(ABC):
    """Common interface of the monolingual references; subclasses set x/ppl/method."""

    x: np.ndarray  # measured fractions of T, sorted
    ppl: np.ndarray  # measured monolingual PPLs
    method: str
    reason: str

    @property
    def x_range(self) -> tuple[float, float]:
        return float(self.x[0]), float(self.x[-1])

    def in_range(self, x: Any) -> Any:
        """True where ``x`` lies within the measured fractions (tiny tolerance for rounding)."""
        xa = np.asarray(x, dtype=float)
        lo, hi = self.x_range
        ok = (xa >= lo * (1 - 1e-9)) & (xa <= hi * (1 + 1e-9))
        return bool(ok) if xa.ndim == 0 else ok

    def mlpe(self, x: Any) -> Flagged:
        """PPL a monolingual model reaches at fraction ``x`` of T, and the out-of-range flag."""
        xa = np.asarray(x, dtype=float)
        if np.any(~(xa > 0)):
            raise MetricError("MLPE needs token fractions > 0")
        return _out(self._mlpe(xa), ~np.asarray(self.in_range(xa)), xa.ndim == 0)

    def mlte(self, ppl: Any) -> Flagged:
        """Fraction of T a monolingual model needs to reach ``ppl``, and the out-of-range flag."""
        pa = np.asarray(ppl, dtype=float)
        if np.any(~(pa > 1)):
            raise MetricError("MLTE needs PPL values > 1")
        xs = self._mlte(pa)
        return _out(xs, ~np.asarray(self.in_range(xs)), pa.ndim == 0)

    @abstractmethod
    def _mlpe(self, x: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _mlte(self, ppl: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        """Attributes to store with a metric (method, reason, measured range)."""
        return {
            "method": self.method,
            "reason": getattr(self, "reason", ""),
            "x_min": self.x_range[0],
            "x_max": self.x_range[1],
        }


class LogLogInterp(ScalingReference):
    """Piecewise-linear interpolation of log PPL in log x between measured points.

    Fit-free and exactly invertible. Outside the measured range the end segments are extended
    (a local power law) and the result is flagged as extrapolated.
    """

    method = "interp"

    def __init__(self, x: Any, ppl: Any) -> None:
        self.x, self.ppl = _points(x, ppl)
        if np.any(np.diff(self.ppl) >= 0):
            # MLTE must be a function of PPL: a rising or flat curve cannot be inverted
            raise MetricError(
                "monolingual PPL must strictly decrease with tokens, got "
                + ", ".join(f"{a:g}->{b:g}" for a, b in zip(self.x, self.ppl, strict=True))
            )
        self.lx, self.lp = np.log(self.x), np.log(self.ppl)
        self.reason = "interp requested"

    @staticmethod
    def _piecewise(u: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Linear interpolation on increasing ``xs`` with linear extension beyond both ends."""
        i = np.clip(np.searchsorted(xs, u) - 1, 0, len(xs) - 2)
        t = (u - xs[i]) / (xs[i + 1] - xs[i])
        return ys[i] + t * (ys[i + 1] - ys[i])

    def _mlpe(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self._piecewise(np.log(x), self.lx, self.lp))

    def _mlte(self, ppl: np.ndarray) -> np.ndarray:
        # log PPL decreases in log x: flip both so the abscissa increases
        return np.exp(self._piecewise(np.log(ppl), self.lp[::-1], self.lx[::-1]))


@dataclass
class PowerLawFit(ScalingReference):
    """The paper's fit 1/PPL(x) = c − a·x^(−b) (a, b, c > 0)."""

    a: float
    b: float
    c: float
    x: np.ndarray
    ppl: np.ndarray
    residuals: np.ndarray  # relative PPL residuals (fit − measured) / measured
    converged: bool = True
    degenerate: bool = False
    method: str = "power_law"
    reason: str = "fit requested"
    stderr: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))

    @property
    def max_residual(self) -> float:
        return float(np.max(np.abs(self.residuals)))

    def _mlpe(self, x: np.ndarray) -> np.ndarray:
        inv = self.c - self.a * x ** (-self.b)
        with np.errstate(divide="ignore"):
            return np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), np.inf)

    def _mlte(self, ppl: np.ndarray) -> np.ndarray:
        # x = ((c − 1/PPL) / a)^(−1/b); a PPL at or below the asymptote 1/c is never reached
        gap = self.c - 1.0 / ppl
        with np.errstate(over="ignore", divide="ignore"):
            return np.where(gap > 0, (np.maximum(gap, 1e-300) / self.a) ** (-1.0 / self.b), np.inf)


def _law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return c - a * x ** (-b)


def fit_power_law(x: Any, ppl: Any) -> PowerLawFit:
    """Fit 1/PPL = c − a·x^(−b) with ``scipy.optimize.curve_fit`` (needs >= 3 points).

    Fits 1/PPL rather than PPL, as the paper does. ``degenerate`` is set when b < 1e-2: the
    curve is then 1/PPL ≈ (c − a) + a·b·ln x and its inverse is numerically meaningless.
    """
    xs, ps = _points(x, ppl)
    if xs.size < 3:
        raise MetricError(f"scaling fit needs >= 3 monolingual points, got {xs.size}")
    y = 1.0 / ps
    # Start value: for fixed b the law is linear in (a, c), so scan b and solve least squares.
    best = None
    for b0 in np.geomspace(1e-3, 5.0, 60):
        design = np.stack([-(xs ** (-b0)), np.ones_like(xs)], axis=1)
        (a0, c0), *_ = np.linalg.lstsq(design, y, rcond=None)
        if a0 > 0 and c0 > 0:
            err = float(np.sum((design @ np.array([a0, c0]) - y) ** 2))
            if best is None or err < best[0]:
                best = (err, a0, b0, c0)
    p0 = best[1:] if best else (y.max() - y.min() + 1e-6, 0.5, 2 * y.max())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # inf covariance: flagged below
            popt, pcov = curve_fit(
                _law,
                xs,
                y,
                p0=p0,
                bounds=([1e-12, 1e-12, 1e-12], [np.inf, 20.0, np.inf]),
                maxfev=20000,
            )
    except (RuntimeError, ValueError) as exc:
        raise MetricError(f"scaling fit did not converge: {exc}") from exc
    a, b, c = (float(v) for v in popt)
    if not np.all(np.isfinite(popt)):
        raise MetricError(f"scaling fit did not converge: parameters {popt}")
    inv = _law(xs, a, b, c)
    fitted = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-300), np.inf)
    with np.errstate(invalid="ignore"):
        stderr = np.sqrt(np.diag(pcov))
    return PowerLawFit(
        a=a,
        b=b,
        c=c,
        x=xs,
        ppl=ps,
        residuals=(fitted - ps) / ps,
        converged=True,
        degenerate=b < DEGENERATE_B,
        stderr=stderr,
    )


def _as_points(points: Any) -> tuple[np.ndarray, np.ndarray]:
    """Accept {x: ppl}, a sequence of (x, ppl) pairs, or a pair of arrays (xs, ppls)."""
    if isinstance(points, Mapping):
        return np.array(list(points.keys()), float), np.array(list(points.values()), float)
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 2 and arr.shape[1] == 2 and arr.shape[0] != 2:
        return arr[:, 0], arr[:, 1]
    if arr.ndim == 2 and arr.shape[0] == 2:
        return arr[0], arr[1]
    raise MetricError("scaling points must be {x: ppl}, (x, ppl) pairs or (xs, ppls)")


def choose_reference(
    points: Mapping[float, float] | Sequence[Any] | np.ndarray,
    method: Literal["auto", "fit", "interp"] = "auto",
) -> ScalingReference:
    """Build the monolingual reference; ``.method`` and ``.reason`` say which and why.

    ``auto`` uses the power-law fit only if it converges, is not degenerate (b >= 1e-2) and
    matches every measured PPL within 5 %; otherwise log–log interpolation.
    """
    x, ppl = _as_points(points)
    if method == "interp":
        return LogLogInterp(x, ppl)
    if method == "fit":
        return fit_power_law(x, ppl)
    if method != "auto":
        raise MetricError(f"unknown scaling method {method!r} (auto, fit, interp)")
    try:
        fit = fit_power_law(x, ppl)
    except MetricError as exc:
        why = str(exc)
    else:
        if fit.degenerate:
            why = f"power-law fit degenerate (b={fit.b:.2g} < {DEGENERATE_B:g})"
        elif fit.max_residual >= MAX_FIT_RESIDUAL:
            why = f"power-law fit residual {fit.max_residual:.1%} >= {MAX_FIT_RESIDUAL:.0%}"
        else:
            fit.reason = f"auto: fit ok (b={fit.b:.3g}, max residual {fit.max_residual:.1%})"
            return fit
    ref = LogLogInterp(x, ppl)
    ref.reason = f"auto: {why}; using log-log interpolation"
    return ref


def token_efficiency(
    ppl: Any,
    tokens_lang: Any,
    budget_tokens: float,
    reference: ScalingReference,
    dim: str = "language",
) -> xr.Dataset:
    """TEff = MLTE(ppl)·T / tokens_lang, with MLPE at tokens_lang/T and an extrapolation flag.

    ``ppl`` and ``tokens_lang`` broadcast against each other: scalars give 0-d variables,
    DataArrays keep their dims, 1-D arrays get the dim ``dim``. ``extrapolated`` is True where
    MLTE or MLPE lies outside the measured monolingual range; callers should warn on it.
    """
    if not budget_tokens > 0:
        raise MetricError(f"token efficiency needs budget_tokens > 0, got {budget_tokens}")

    def as_da(v: Any, name: str) -> xr.DataArray:
        if isinstance(v, xr.DataArray):
            return v.astype(float)
        arr = np.asarray(v, dtype=float)
        if arr.ndim > 1:
            raise MetricError(f"token efficiency: {name} must be a scalar, 1-D or a DataArray")
        return xr.DataArray(arr, dims=() if arr.ndim == 0 else (dim,))

    p, n = xr.broadcast(as_da(ppl, "ppl"), as_da(tokens_lang, "tokens_lang"))
    if np.any(~(n.values > 0)):
        raise MetricError("token efficiency needs tokens_lang > 0")
    mlte_x, ext_t = reference.mlte(p.values)
    mlpe_v, ext_p = reference.mlpe(n.values / budget_tokens)

    def wrap(v: Any, definition: str) -> xr.DataArray:
        return xr.DataArray(
            np.asarray(v), dims=p.dims, coords=p.coords, attrs={"definition": definition}
        )

    mlte_tok = np.asarray(mlte_x) * budget_tokens
    ds = xr.Dataset(
        {
            "teff": wrap(mlte_tok / n.values, "MLTE divided by the language's training tokens"),
            "mlte": wrap(mlte_tok, "monolingual tokens needed to reach the observed PPL"),
            "mlte_frac": wrap(mlte_x, "MLTE as a fraction of the budget T"),
            "mlpe": wrap(mlpe_v, "PPL a monolingual model reaches on the language's tokens"),
            "extrapolated": wrap(
                np.asarray(ext_t) | np.asarray(ext_p),
                "MLTE or MLPE lies outside the measured monolingual range",
            ),
            "ppl": wrap(p.values, "observed PPL of the language in the multilingual run"),
            "tokens_lang": wrap(n.values, "training tokens of the language in the run"),
        }
    )
    ds.attrs.update(reference.describe())
    ds.attrs["budget_tokens"] = float(budget_tokens)
    ds.attrs["definition"] = "token efficiency TEff = MLTE / tokens of the language (paper §3.2)"
    if isinstance(reference, PowerLawFit):
        ds.attrs.update(a=reference.a, b=reference.b, c=reference.c)
    return ds


class Efficiency(Family):
    """Token efficiency against monolingual references (`probekit teff`): computed from the
    stored perplexities of the run and its references, never from checkpoints."""

    name = "efficiency"
    command = "teff"
    variables = (
        Variable("teff", "token efficiency (TEff)"),
        Variable("mlte", "monolingual token equivalent (MLTE)"),
        Variable("mlte_frac", "MLTE as a fraction of the budget"),
        Variable("mlpe", "monolingual perplexity equivalent (MLPE)"),
        Variable("extrapolated", "outside the measured reference range"),
        Variable("tokens_lang", "training tokens of the language"),
    )
    needs = Needs()

    def applies(self, series) -> str | None:  # noqa: ANN001 - computed by teff, not the driver
        return "token efficiency is computed by `probekit teff` from stored perplexities"

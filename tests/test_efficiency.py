import numpy as np
import pytest
import xarray as xr

from probekit.errors import MetricError
from probekit.metrics.efficiency import (
    LogLogInterp,
    PowerLawFit,
    choose_reference,
    fit_power_law,
    token_efficiency,
)

# research/feasibility2.md: mono PPL at 0.1/0.2/0.3/0.5/1.0 of the budget
FEAS2 = {0.1: 37.05, 0.2: 28.08, 0.3: 18.85, 0.5: 13.91, 1.0: 10.70}


def synthetic(a=0.02, b=0.5, c=0.1, noise=1e-4, n=8, lo=0.05, hi=1.0):
    x = np.geomspace(lo, hi, n)
    ppl = 1.0 / (c - a * x ** (-b))
    rng = np.random.default_rng(0)
    return x, ppl * (1 + noise * rng.standard_normal(n))


@pytest.mark.parametrize("abc,lo,hi", [((0.02, 0.5, 0.1), 0.05, 1.0), ((2.0, 0.5, 0.1), 1e3, 1e5)])
def test_fit_recovers_parameters(abc, lo, hi):
    x, ppl = synthetic(*abc, lo=lo, hi=hi)
    fit = fit_power_law(x, ppl)
    assert fit.converged and not fit.degenerate and fit.method == "power_law"
    np.testing.assert_allclose([fit.a, fit.b, fit.c], abc, rtol=0.01)
    assert fit.max_residual < 1e-3
    assert fit.x_range == pytest.approx((lo, hi))


@pytest.mark.parametrize("method", ["fit", "interp"])
def test_mlte_inverts_mlpe(method):
    pts = synthetic() if method == "fit" else (list(FEAS2), list(FEAS2.values()))
    ref = choose_reference(pts, method=method)
    xs = np.array([0.1, 0.15, 0.25, 0.4, 0.9])
    ppl, ext = ref.mlpe(xs)
    assert not ext.any()
    back, ext2 = ref.mlte(ppl)
    np.testing.assert_allclose(back, xs, rtol=1e-8)
    assert not ext2.any()
    # and the other way round, scalars stay scalars
    x1, flag = ref.mlte(float(ppl[2]))
    assert isinstance(x1, float) and flag is False
    assert ref.mlpe(x1).value == pytest.approx(ppl[2])


def test_interp_hits_points_and_flags_out_of_range():
    ref = LogLogInterp(list(FEAS2), list(FEAS2.values()))
    np.testing.assert_allclose(ref.mlpe(np.array(list(FEAS2))).value, list(FEAS2.values()))
    val, ext = ref.mlpe(2.0)
    assert ext is True and val < FEAS2[1.0]  # extended, not clamped, and flagged
    val, ext = ref.mlte(9.0)  # better than the best mono run
    assert ext is True and val > 1.0
    assert ref.in_range(0.3) and not ref.in_range(0.05)
    assert list(ref.in_range(np.array([0.05, 0.5]))) == [False, True]


def test_degenerate_fit_on_feasibility2_and_auto_picks_interp():
    fit = fit_power_law(list(FEAS2), list(FEAS2.values()))
    assert fit.degenerate and fit.b < 1e-2
    ref = choose_reference(FEAS2)
    assert ref.method == "interp" and "degenerate" in ref.reason


def test_auto_picks_fit_when_good():
    ref = choose_reference(synthetic())
    assert isinstance(ref, PowerLawFit) and "fit ok" in ref.reason


def test_teff_feasibility2():
    T = 4.9e6
    ref = choose_reference(FEAS2)
    ds = token_efficiency(21.08, 0.1 * T, T, ref)
    assert float(ds.teff) == pytest.approx(2.64, abs=0.06)  # feasibility2: 2.64 (interp)
    assert float(ds.mlpe) == pytest.approx(37.05)
    assert float(ds.mlte) == pytest.approx(float(ds.teff) * 0.1 * T)
    assert not bool(ds.extrapolated) and ds.attrs["method"] == "interp"
    # the degenerate fit gives a different number (feasibility2: 2.31), and says so
    dsf = token_efficiency(21.08, 0.1 * T, T, choose_reference(FEAS2, method="fit"))
    assert dsf.attrs["method"] == "power_law" and 2.1 < float(dsf.teff) < 2.5
    # the 2B run: EN1 PPL 9.26 is better than the best mono point -> flagged
    ds2 = token_efficiency(np.array([9.26, 16.61]), np.array([0.9, 0.1]) * 2 * T, T, ref)
    assert ds2.teff.dims == ("language",)
    assert list(ds2.extrapolated.values) == [True, False]


def test_teff_keeps_dataarray_dims():
    ref = choose_reference(FEAS2, method="interp")
    ppl = xr.DataArray([13.26, 21.08], dims="language", coords={"language": ["EN1", "EN2"]})
    ds = token_efficiency(ppl, xr.DataArray([0.5, 0.1], dims="language") * 1e6, 1e6, ref)
    assert list(ds.language.values) == ["EN1", "EN2"]
    assert float(ds.teff.sel(language="EN1")) == pytest.approx(1.13, abs=0.05)


def test_bad_input():
    with pytest.raises(MetricError, match=">= 2"):
        LogLogInterp([0.1], [30.0])
    with pytest.raises(MetricError, match="strictly decrease"):
        LogLogInterp([0.1, 0.2, 0.3], [30.0, 31.0, 20.0])
    with pytest.raises(MetricError, match=">= 3"):
        fit_power_law([0.1, 0.2], [30.0, 20.0])
    with pytest.raises(MetricError, match="unknown scaling method"):
        choose_reference(FEAS2, method="spline")
    with pytest.raises(MetricError, match="PPL values > 1"):
        LogLogInterp([0.1, 0.2], [30.0, 20.0]).mlte(0.5)
    with pytest.raises(MetricError, match="budget_tokens"):
        token_efficiency(20.0, 1.0, 0.0, LogLogInterp([0.1, 0.2], [30.0, 20.0]))
    with pytest.raises(MetricError, match="fractions but"):
        LogLogInterp([0.1, 0.2], [30.0])

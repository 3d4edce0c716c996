"""The `calibrated` family: permutation-null calibration of the similarity measures and the
neighbour measures (mutual k-NN, CKNNA), on planted ground truths and on a tiny run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probekit
from probekit.analysis import AlignOptions
from probekit.checkpoints import list_checkpoints, load_checkpoint
from probekit.cli.main import cli
from probekit.errors import MetricError, ProbekitError
from probekit.metrics import FAMILIES, families_for, resolve
from probekit.metrics.calibration import (
    MEASURES,
    NullSample,
    PreparedSample,
    null_calibrate,
    permutations,
    plan_sample,
)
from probekit.metrics.similarity import SimilarityAccumulator
from tests.oracles import cka_debiased_gram

M = {m: i for i, m in enumerate(MEASURES)}


def _pair_rows(rng, n, d, shared):
    """Rows of two 'languages' sharing the first `shared` coordinates (same values)."""
    z = rng.standard_normal((n, shared))
    x = np.concatenate([z, rng.standard_normal((n, d - shared))], 1)
    y = np.concatenate([z, rng.standard_normal((n, d - shared))], 1)
    return x, y


# --------------------------------------------------------------------- the null on planted data


@pytest.mark.parametrize("d", [8, 32, 128, 512])
def test_independent_matrices_calibrate_to_zero_within_the_nulls_spread(d):
    rng = np.random.default_rng(d)
    n, k = 96, 8
    x, y = rng.standard_normal((2, n, d)), rng.standard_normal((2, n, d))
    out = null_calibrate(x, y, n_perm=60, k=k, seed=1)
    spread = out["cal_null_sd"] / (1 - out["cal_null_mean"])  # the null's sd in score units
    assert np.all(np.isfinite(out["cal_score"]))
    assert np.all(np.abs(out["cal_score"]) <= 4 * spread + 1e-9), (out["cal_score"], spread)
    # the null is where chance is, not 0: k/(n-1) shared neighbours, 1/n retrieval hits
    np.testing.assert_allclose(out["cal_null_mean"][:, M["mknn"]], k / (n - 1), rtol=0.15)
    np.testing.assert_allclose(out["cal_null_mean"][:, M["retrieval_acc"]], 1 / n, rtol=0.5)
    assert np.all(out["cal_p"] > 0.01)  # nothing is significant


def test_token_rows_with_slots_calibrate_to_zero():
    """Token rows: s rows per pair; the null shuffles pairs and within-pair positions."""
    rng = np.random.default_rng(7)
    m, s, d = 24, 6, 16
    x = rng.standard_normal((1, m * s, d)) + rng.standard_normal((1, m, 1, d)).repeat(s, 2).reshape(
        1, m * s, d
    )  # tokens of one sequence are alike, as in text
    y = rng.standard_normal((1, m * s, d))
    p1, p2 = x.reshape(1, m, s, d).mean(2), y.reshape(1, m, s, d).mean(2)
    out = null_calibrate(x, y, p1, p2, slots=s, n_perm=60, k=5)
    spread = out["cal_null_sd"] / (1 - out["cal_null_mean"])
    assert np.all(np.abs(out["cal_score"]) <= 4 * spread + 1e-9)


def test_block_permutations_keep_each_sequences_rows_together():
    perms = list(permutations(5, 3, 4, seed=0))
    for perm in perms:
        assert sorted(perm) == list(range(15))
        blocks = perm.reshape(5, 3) // 3
        assert np.all(blocks == blocks[:, :1])  # a pair's rows face one other pair's rows
    assert not all(np.array_equal(perms[0], p) for p in perms[1:])


def test_planted_shared_subspace_rises_with_its_dimension():
    rng = np.random.default_rng(0)
    n, d = 128, 64
    scores = []
    for r in (0, 4, 16, 40, 64):
        x, y = _pair_rows(rng, n, d, r)
        scores.append(null_calibrate(x, y, n_perm=30, k=10)["cal_score"][0])
    scores = np.array(scores)  # [r, measure]
    assert np.all(np.diff(scores, axis=0) > -0.03), scores  # never falls (beyond noise)
    assert np.all(scores[-2] - scores[0] > 0.25), scores
    np.testing.assert_allclose(scores[-1, [M["hidden_cos"], M["cka"], M["mknn"]]], 1.0)
    assert abs(scores[0]).max() < 0.1


# --------------------------------------------------------------------- the measures' definitions


def _mknn_ref(x, y, k):
    """Huh et al. 2024: mean over i of |N_k^X(i) ∩ N_k^Y(i)| / k on L2-normalised rows."""
    ux = x / np.linalg.norm(x, axis=1, keepdims=True)
    uy = y / np.linalg.norm(y, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(x)):
        nx = sorted((j for j in range(len(x)) if j != i), key=lambda j: -ux[i] @ ux[j])[:k]
        ny = sorted((j for j in range(len(x)) if j != i), key=lambda j: -uy[i] @ uy[j])[:k]
        total += len(set(nx) & set(ny)) / k
    return total / len(x)


def _hsic_u_loops(a, b):
    """Song et al. 2012 unbiased HSIC, written out with loops (diagonals ignored)."""
    n = len(a)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    tr = sum(a[i, j] * b[j, i] for i, j in off)
    sa = sum(a[i, j] for i, j in off)
    sb = sum(b[i, j] for i, j in off)
    ab = sum(a[i, j] * b[j, l] for i, j in off for l in range(n) if l != j)
    return (tr + sa * sb / ((n - 1) * (n - 2)) - 2 * ab / (n - 2)) / (n * (n - 3))


def _cknna_ref(x, y, k):
    """CKNNA as Huh et al.'s released code defines it (platonic-rep metrics.py): unbiased
    HSIC of the linear kernels masked to the pairs that are neighbours in both spaces."""
    ux = x / np.linalg.norm(x, axis=1, keepdims=True)
    uy = y / np.linalg.norm(y, axis=1, keepdims=True)
    kx, ly = ux @ ux.T, uy @ uy.T
    n = len(x)

    def nbrs(g):
        m = np.zeros((n, n))
        for i in range(n):
            for j in sorted((j for j in range(n) if j != i), key=lambda j: -g[i, j])[:k]:
                m[i, j] = 1.0
        return m

    mx, my = nbrs(kx), nbrs(ly)
    both = mx * my
    num = _hsic_u_loops(both * kx, both * ly)
    return num / np.sqrt(_hsic_u_loops(mx * kx, mx * kx) * _hsic_u_loops(my * ly, my * ly))


@pytest.mark.parametrize("shared", [0, 3, 8])
def test_mutual_knn_and_cknna_equal_plain_references(shared):
    rng = np.random.default_rng(shared)
    x, y = _pair_rows(rng, 18, 10, shared)
    out = null_calibrate(x, y, n_perm=2, k=4)["cal_raw"][0]
    assert out[M["mknn"]] == pytest.approx(_mknn_ref(x, y, 4), abs=1e-12)
    assert out[M["cknna"]] == pytest.approx(_cknna_ref(x, y, 4), abs=1e-10)
    # and the permuted scores are the measures of the permuted rows
    perm = next(permutations(18, 1, 1, seed=5))
    out_p = null_calibrate(x, y[perm], n_perm=2, k=4)["cal_raw"][0]
    assert out_p[M["mknn"]] == pytest.approx(_mknn_ref(x, y[perm], 4), abs=1e-12)


@pytest.mark.parametrize("d", [6, 40])  # primal (d <= n_fit) and dual (d > n_fit) ridge
def test_similarity_measures_match_the_similarity_family_on_the_same_rows(d):
    """cosine, debiased CKA, linear-map R² and retrieval on the sample are
    SimilarityAccumulator's definitions: the same numbers on the same tokens."""
    rng = np.random.default_rng(d)
    m, s, L = 12, 3, 2
    x = rng.standard_normal((L, m * s, d))
    y = 0.7 * x + rng.standard_normal((L, m * s, d))
    acc = SimilarityAccumulator(L, d, aligned=True)
    h1 = torch.from_numpy(x.reshape(L, m, s, d))
    h2 = torch.from_numpy(y.reshape(L, m, s, d))
    mask = torch.ones((m, s), dtype=torch.bool)
    acc.update(h1, mask, h2, mask, torch.arange(m))
    ref = acc.result()
    p1, p2 = x.reshape(L, m, s, d).mean(2), y.reshape(L, m, s, d).mean(2)
    raw = null_calibrate(x, y, p1, p2, slots=s, n_perm=2, k=3)["cal_raw"]
    np.testing.assert_allclose(raw[:, M["hidden_cos"]], ref["hidden_cos"], atol=1e-10)
    np.testing.assert_allclose(raw[:, M["cka"]], ref["cka"], atol=1e-10)
    np.testing.assert_allclose(raw[:, M["linmap_r2"]], ref["linmap_r2"], atol=1e-8)
    np.testing.assert_allclose(
        raw[:, M["retrieval_acc"]], ref["retrieval_acc"].mean("direction"), atol=1e-12
    )
    for layer in range(L):
        assert raw[layer, M["cka"]] == pytest.approx(cka_debiased_gram(x[layer], y[layer]))


def test_memory_does_not_grow_with_permutations():
    import tracemalloc

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 2, 96, 24))
    peaks = []
    for n_perm in (4, 64):
        tracemalloc.start()
        null_calibrate(x, y, n_perm=n_perm, k=5)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.1 * peaks[0] + 64 * 2 * 6 * 8 * 2, peaks


# --------------------------------------------------------------------- sample and bad inputs


def test_sample_plan_is_bounded_and_gathers_the_planned_rows():
    pairs, pos = plan_sample([32] * 100, aligned=True, max_rows=40)
    assert len(pairs) == 40 and all(len(p) == 1 for p in pos.values())
    pairs, pos = plan_sample([32, 20, 32, 32], aligned=True, max_rows=64)
    assert pairs == [0, 1, 2, 3] and {len(p) for p in pos.values()} == {16}
    pairs, pos = plan_sample([9] * 10, aligned=False, max_rows=4)
    assert pos is None and len(pairs) == 4 and pairs[0] == 0 and pairs[-1] == 9
    # the sample takes exactly the planned tokens and the pooled means over real tokens
    h = torch.randn(3, 2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sample = NullSample(3, 4, [0, 1], {0: np.array([0, 2]), 1: np.array([1, 4])})
    sample.update(np.array([0, 1]), ((h, mask), (2 * h, mask)))
    x, y, p1, _ = sample.arrays()
    np.testing.assert_allclose(x[:, 1], h[:, 0, 2].double())
    np.testing.assert_allclose(y[:, 3], 2 * h[:, 1, 4].double())
    np.testing.assert_allclose(p1[:, 0], h[:, 0, :3].double().mean(1))


def test_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 20, 5))
    with pytest.raises(MetricError, match="null-permutations.*>= 2"):
        null_calibrate(x, y, n_perm=1)
    with pytest.raises(MetricError, match="knn-k 20: larger than the sample"):
        null_calibrate(x, y, n_perm=2, k=20)
    for bad in ({"null_permutations": 1}, {"knn_k": 0}, {"null_sample": 2}):
        with pytest.raises(ProbekitError) as err:
            AlignOptions(**bad).validated()
        assert "\n" not in str(err.value)
    assert "calibrated" not in {f.name for f in families_for("align")}
    assert [f.name for f in resolve("cal_score", "align")] == ["calibrated"]


# --------------------------------------------------------------------- end to end


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def copied(tiny_run: Path, tmp_path_factory) -> Path:
    """tiny_run whose final checkpoint gives EN2's tokens EN1's embedding and output rows:
    at that checkpoint both languages' states are identical (a planted full alignment)."""
    out = tmp_path_factory.mktemp("calibrated") / "copy"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    info = list_checkpoints(out)[-1]
    model = load_checkpoint(info)
    v = model.config.vocab_size // 2
    with torch.no_grad():
        model.transformer.wte.weight[v:] = model.transformer.wte.weight[:v]
        model.lm_head.weight[v:] = model.lm_head.weight[:v]
    model.save_pretrained(info.path)
    return out


ARGS = ("--pairs", 12, "--seq-len", 32, "--batch-size", 6, "--quiet")
OPTS = AlignOptions(n_pairs=12, seq_len=32, batch_size=6, null_permutations=20)


def test_align_calibrated_end_to_end(copied: Path):
    res = _cli("align", copied, "--metrics", "calibrated", *ARGS, "--null-permutations", 20)
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(copied)
    for var in FAMILIES["calibrated"].variables:
        assert cube[var.name].dims == ("step", "layer", "cal_measure"), var.name
    assert list(cube["cal_measure"].values) == list(MEASURES)
    steps = [c.step for c in list_checkpoints(copied)]
    assert list(cube["step"].values) == steps
    assert np.all(np.isfinite(cube["cal_raw"].values))
    assert cube.attrs["cal_n_rows"] == 12 * 32 and cube.attrs["cal_slots_per_pair"] == 32
    final = cube.sel(step=steps[-1])
    # identical states: every measure at its maximum, far above the null
    exact = [m for m in MEASURES if m != "linmap_r2"]  # ridge keeps R² just below 1
    np.testing.assert_allclose(final["cal_raw"].sel(cal_measure=exact), 1.0, atol=1e-9)
    np.testing.assert_allclose(final["cal_score"].sel(cal_measure=exact), 1.0, atol=1e-9)
    assert np.all(final["cal_raw"].sel(cal_measure="linmap_r2") > 0.99)
    np.testing.assert_allclose(final["cal_p"], 1 / 21)
    assert np.all(final["cal_null_q"] >= final["cal_null_mean"])
    # an untrained model's languages share nothing but positions: its calibrated scores are
    # far from the copied checkpoint's
    first = cube.sel(step=steps[0])["cal_score"].sel(cal_measure="mknn")
    assert float(first.mean()) < 0.9


def test_report_draws_raw_null_and_calibrated_per_layer(copied: Path, tmp_path: Path):
    from probekit.report.calibration_charts import calibration_chart
    from probekit.report.html import build_charts, write_report

    cube = probekit.open_cube(copied)
    if "cal_score" not in cube:  # this test alone: compute the family first
        probekit.align(copied, metrics="calibrated", options=OPTS, progress=False)
        cube = probekit.open_cube(copied)
    spec = calibration_chart({"copy": cube}).to_dict()
    rows = spec["data"]["values"]
    assert {r["measure"] for r in rows} == set(MEASURES)
    assert {r["kind"] for r in rows} == {"raw", "null mean", "calibrated"}
    assert {r["step"] for r in rows} == {int(cube["step"].values[-1])}
    rendered, _ = build_charts({"copy": cube})
    names = [r.name for r in rendered]
    assert "calibration_chart" in names and not any(n.startswith("variable_cal") for n in names)
    page = write_report({"copy": cube}, tmp_path / "report", png=False).read_text()
    assert "permutation null" in page


def test_align_calibrated_bad_options_are_one_line(copied: Path):
    for args, msg in (
        (("--knn-k", 100000), "--knn-k 100000: larger than the calibration sample"),
        (("--null-permutations", 1), "--null-permutations: expected an integer >= 2"),
    ):
        res = _cli("align", copied, "--metrics", "calibrated", "--steps", 0, *ARGS, *args)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and msg in lines[0], res.output


# --------------------------------------------------------------------- oracle: the package


def test_matches_calibrated_similarity_package():
    """Gröger et al.'s own `calibrate` (calibrated-similarity 0.1.1), fed our permutations and
    a plain reference measure, gives our critical value, p-value and thresholded score."""
    cs = pytest.importorskip("calibrated_similarity")
    rng = np.random.default_rng(3)
    m, s, d, k, n_perm = 16, 3, 12, 4, 50
    x, y = _pair_rows(rng, m * s, d, 4)
    p1, p2 = x.reshape(m, s, d).mean(1), y.reshape(m, s, d).mean(1)
    ours = null_calibrate(x, y, p1, p2, slots=s, n_perm=n_perm, k=k, seed=11)
    refs = {
        "cka": lambda a, b: cka_debiased_gram(a.numpy(), b.numpy()),
        "mknn": lambda a, b: _mknn_ref(a.numpy(), b.numpy(), k),
    }
    for name, sim in refs.items():
        perms = iter(list(permutations(m, s, n_perm, seed=11)))

        def perm_fn(n, device, perms=perms):
            return torch.as_tensor(next(perms))

        score, p, tau = cs.calibrate(
            torch.from_numpy(x), torch.from_numpy(y), sim, K=n_perm, perm_fn=perm_fn
        )
        j = M[name]
        assert float(tau) == pytest.approx(ours["cal_null_q"][0, j], abs=1e-6)
        assert float(p) == pytest.approx(ours["cal_p"][0, j], abs=1e-6)
        assert float(score) == pytest.approx(ours["cal_score_sig"][0, j], abs=1e-5)


@pytest.mark.parametrize("d", [5, 60])  # feature-space and n x n CKA, primal and dual ridge
def test_each_permuted_score_is_the_measure_of_the_permuted_rows(d):
    """The null re-indexes matrices built once; it must equal scoring permuted data afresh."""
    rng = np.random.default_rng(d)
    m, s = 10, 4
    x, y = _pair_rows(rng, m * s, d, 2)
    x, y = x[None], y[None]
    p1, p2 = x.reshape(1, m, s, d).mean(2), y.reshape(1, m, s, d).mean(2)
    prep = PreparedSample(x, y, p1, p2, s, 5)
    for perm in permutations(m, s, 3, seed=2):
        pairs = perm[::s] // s
        fresh = PreparedSample(x, y[:, perm], p1, p2[:, pairs], s, 5)
        ident = fresh.scores(np.arange(m * s), np.arange(m))
        np.testing.assert_allclose(prep.scores(perm, pairs), ident, atol=1e-10)

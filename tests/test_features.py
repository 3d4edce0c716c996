"""The features family: a TopK dictionary shared by both languages, per checkpoint.

Planted ground truth: a synthetic activation stream built from known shared and
language-specific directions, which the dictionary must recover and classify; a clone
stream (L2 states equal L1's) where every alive feature is shared; a stream whose residual
space is split by language where none is. Then determinism, identity matching, bad inputs
and one end-to-end `probekit align RUN --metrics features`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from probekit.dictionary import (
    DEAD,
    SHARED,
    SPECIFIC_1,
    SPECIFIC_2,
    FeatureStats,
    TopKTrainer,
    match,
    train_dictionary,
)
from probekit.errors import MetricError
from probekit.options import AnalysisOptions, OptionError

D = 32


def _planted(n_shared=12, n_spec=6, active=3, seed=0, split=False):
    """Directions and a stream maker: a token of language `side` is `active` of its
    language's directions (the shared ones and its own) with magnitudes in [1, 3], plus an
    offset and a little noise. `split`: L1's directions live in the first half of the
    coordinates, L2's in the second (nothing shared)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_shared + 2 * n_spec, D, generator=g)
    if split:
        dirs[: n_shared + n_spec, D // 2 :] = 0
        dirs[n_shared + n_spec :, : D // 2] = 0
    dirs /= dirs.norm(dim=1, keepdim=True)
    own = [list(range(n_shared, n_shared + n_spec)), list(range(n_shared + n_spec, len(dirs)))]
    sets = [list(range(n_shared)) + own[0], list(range(n_shared)) + own[1]]
    if split:  # the "shared" directions go with L1; L2 gets only its own
        sets = [list(range(n_shared + n_spec)), own[1]]

    def stream(side: int, n: int, s: int) -> torch.Tensor:
        gg = torch.Generator().manual_seed(s)
        pool = torch.tensor(sets[side])
        pick = torch.stack(
            [pool[torch.randperm(len(pool), generator=gg)[:active]] for _ in range(n)]
        )
        mag = 1 + 2 * torch.rand(n, active, generator=gg)
        x = (mag[..., None] * dirs[pick]).sum(1)
        return x + 0.01 * torch.randn(n, D, generator=gg) + 0.5

    kinds = np.array([SHARED] * n_shared + [SPECIFIC_1] * n_spec + [SPECIFIC_2] * n_spec)
    return dirs, stream, kinds


def _train(stream, steps=500, seed=0, size=64, k=4):
    chunks = lambda: [torch.cat([stream(0, 512, i), stream(1, 512, 100 + i)]) for i in range(6)]  # noqa: E731
    return train_dictionary(chunks, D, size, k, steps=steps, seed=seed)


def test_planted_directions_recovered_and_classified():
    dirs, stream, kinds = _planted()
    dic, record = _train(stream)
    assert record["steps"] == 500 and record["final_loss"] < 0.05
    cos = dirs @ dic.w_dec.T  # [planted, latent]
    best = cos.max(1)
    recovered = best.values >= 0.9
    assert recovered.float().mean() >= 0.9, best.values
    stats = FeatureStats(dic)
    stats.update(0, stream(0, 3000, 7))
    stats.update(1, stream(1, 3000, 8))
    got = stats.kinds(0.1)[best.indices.numpy()]
    assert (got[recovered.numpy()] == kinds[recovered.numpy()]).all(), (got, kinds)
    assert (stats.fve() > 0.95).all()


def test_clone_stream_every_alive_feature_shared():
    _, stream, _ = _planted()
    dic, _ = _train(stream, steps=300)
    stats = FeatureStats(dic)
    x = torch.cat([stream(0, 1500, 9), stream(1, 1500, 10)])
    stats.update_aligned(x, x.clone())  # L2's states are L1's
    kind = stats.kinds(0.1)
    assert (kind[kind != DEAD] == SHARED).all() and (kind != DEAD).sum() > 20
    assert stats.cofire() == 1.0


def test_split_residual_space_has_no_shared_features():
    _, stream, _ = _planted(split=True)
    dic, _ = _train(stream, steps=300)
    stats = FeatureStats(dic)
    stats.update(0, stream(0, 3000, 11))
    stats.update(1, stream(1, 3000, 12))
    count = np.bincount(stats.kinds(0.1), minlength=4)
    alive = count[:3].sum()
    assert alive > 20 and count[SHARED] <= 0.05 * alive, count


def test_training_is_deterministic_given_the_seed():
    _, stream, _ = _planted()
    a, _ = _train(stream, steps=60, seed=3)
    b, _ = _train(stream, steps=60, seed=3)
    c, _ = _train(stream, steps=60, seed=4)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert not torch.equal(a.w_dec, c.w_dec)


def test_matching_recovers_a_permutation():
    _, stream, _ = _planted()
    dic, _ = _train(stream, steps=60)
    perm = np.random.default_rng(0).permutation(dic.size)
    order, cos = match(dic.w_dec, dic.permuted(perm).w_dec)
    assert np.array_equal(perm[order], np.arange(dic.size)) and np.allclose(cos, 1.0)


def test_bad_shapes_are_one_line_errors():
    for bad in (
        {"features_size": 0},
        {"features_k": 0},
        {"features_layers": ()},
        {"features_tokens": 10},
        {"features_specific": 0.7},
    ):
        with pytest.raises(OptionError) as err:
            AnalysisOptions(**bad).validated()
        assert "\n" not in str(err.value)
    with pytest.raises(MetricError, match="exceed"):
        TopKTrainer(D, 4, 8, 10)
    dic, _ = _train(_planted()[1], steps=5)
    with pytest.raises(MetricError, match="64 latents over 32"):
        TopKTrainer(D, 48, 4, 10, init=dic)


def _small(**kw) -> AnalysisOptions:
    base = dict(
        n_pairs=8,
        batch_size=8,
        features_size=32,
        features_k=4,
        features_steps=20,
        features_tokens=512,
        features_top=1,
    )
    return AnalysisOptions(**(base | kw))


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr", "artifacts"))
    return out


def test_bad_runs_store_nothing(run_copy):
    import probekit
    from probekit import store
    from probekit.artifacts import stored_artifact_steps

    def align(steps, **kw):
        return probekit.align(
            run_copy, metrics="features", steps=steps, options=_small(**kw), progress=False
        )

    with pytest.raises(MetricError, match="no layer 9") as err:
        align([0], features_layers=(1, 9))
    assert "\n" not in str(err.value)
    with pytest.raises(MetricError, match="to train on"):
        align([0], max_tokens=100)  # held-out text cut to 100 tokens: too short
    assert stored_artifact_steps(run_copy, "features") == []
    assert store.read_family(run_copy, "features") is None
    align([0, 1])
    with pytest.raises(MetricError, match="32 latents over 64 dimensions"):
        align([4], features_size=48)
    assert stored_artifact_steps(run_copy, "features") == [0, 1]
    assert list(store.read_family(run_copy, "features")["step"].values) == [0, 1]


def test_align_features_end_to_end(run_copy):
    from probekit import store
    from probekit.artifacts import load_artifact
    from probekit.cli.main import cli
    from probekit.metrics.features import births_by_kind, feature_lifecycle

    args = [
        "align",
        str(run_copy),
        "--metrics",
        "features",
        "--quiet",
        "--pairs",
        "8",
        "--batch-size",
        "8",
        "--features-size",
        "32",
        "--features-k",
        "4",
        "--features-steps",
        "20",
        "--features-tokens",
        "512",
        "--features-top",
        "1",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    ds = store.read_family(run_copy, "features")
    assert list(ds["layer"].values) == [1, 2] and ds.sizes["feature"] == 32
    assert list(ds["step"].values) == [0, 1, 4, 20, 40]
    counts = ds["features_count"].values
    assert (counts.sum(-1) == 32).all()
    fve = ds["features_fve"].values
    assert np.isfinite(fve).all() and (fve < 1).all()
    assert np.isfinite(ds["features_clone_cofire"].values).all()  # clones: aligned pairs
    # warm start and matching: every later checkpoint has match cosines, the first none
    cos = ds["feature_match_cos"].values
    assert np.isnan(cos[0]).all() and np.isfinite(cos[1:]).all()
    tensors, record = load_artifact(run_copy, "features", 40)
    assert record["warm_start_step"] == 20 and record["size"] == 32
    assert tensors["layer2.w_dec"].shape == (32, 64)
    assert np.allclose(tensors["layer2.w_dec"].norm(dim=1).numpy(), 1, atol=1e-5)
    sel = ds["feature_selected"].values
    eff = ds["feature_effect"].values
    assert (np.isfinite(eff) == (sel > 0)[:, :, None, :]).all()
    life = feature_lifecycle(run_copy)
    assert not life.empty and set(life["layer"]) <= {1, 2}
    assert (life["maintenance"] > 0).all() and (life["maintenance"] <= 1).all()
    assert set(births_by_kind(life)["kind"]) <= set(ds["kind"].values)
    bad = CliRunner().invoke(cli, args[:4] + ["--features-k", "0"])
    assert bad.exit_code != 0 and "--features-k" in bad.output
    # the report's features section draws from this cube
    from probekit.report.html import build_charts

    rendered, skipped = build_charts({"run": store.open_cube(run_copy)})
    drawn = {r.name for r in rendered if r.question == "features"}
    assert drawn == {"feature_kinds_chart", "feature_effect_chart", "feature_contexts_chart"}
    assert not any(s.name.startswith("variable_feature") for s in skipped)

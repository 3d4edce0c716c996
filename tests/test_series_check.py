"""Revisions as a sample (every:N, log:K, range:A:B[:S]) and the series check (issue 30)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from test_architectures import FAST, cli_run, save_series
from test_series_layouts import make_hub_cache

import probekit
import probekit.errors
from probekit import engine
from probekit.engine import SeriesWarning
from probekit.options import OptionError
from probekit.revisions import parse_sample, parse_steps
from probekit.series_check import check_series, weights_hash

PYTHIA = [0] + [2**i for i in range(10)] + list(range(1000, 143_001, 1000))  # 154 revisions


def test_samples_of_a_pythia_series():
    assert len(PYTHIA) == 154
    every = parse_sample("every:10").pick(PYTHIA)
    assert every[:3] == [0, 512, 10_000] and every[-1] == 143_000 and len(every) == 17
    log = parse_sample("log:16").pick(PYTHIA)
    assert len(log) == 16 and log[0] == 0 and log[-1] == 143_000 and log == sorted(set(log))
    assert log[:5] == [0, 1, 4, 8, 32]  # dense where the steps are log-spaced themselves
    assert parse_sample("range:1000:5000").pick(PYTHIA) == [1000, 2000, 3000, 4000, 5000]
    assert parse_sample("range:1000:9000:4000").pick(PYTHIA) == [1000, 5000, 9000]
    assert parse_steps("0, 1000") == [0, 1000] and parse_steps("all") is None


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("every:0", "every:N needs N >= 1"),
        ("every:x", "expected every:N with non-negative integers"),
        ("log:1", "log:K needs K >= 2"),
        ("range:9:1", "range:A:B needs A <= B"),
        ("range:1", "expected range:A:B[:S]"),
        ("nth:3", "unknown sample 'nth:3'"),
        ("1000-5000", "comma-separated step numbers or a sample"),
    ],
)
def test_malformed_samples_are_one_line(bad: str, msg: str, tmp_path: Path):
    with pytest.raises(OptionError, match=re.escape(msg)):
        parse_steps(bad)
    series = save_series(tmp_path / "s", "gpt2", steps=(0,))
    res = cli_run("align", series, "--steps", bad, "--parallel", "bible:en", "bible:fr")
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and msg in lines[0], res.output


def test_align_a_sample(tmp_path: Path, monkeypatch):
    series = save_series(tmp_path / "s", "gpt2", steps=(0, 10, 20, 30))
    args = ["--parallel", "bible:en", "bible:fr", "--metrics", "similarity", *FAST]
    res = cli_run("align", series, "--revisions", "every:2", *args)
    assert res.exit_code == 0, res.output
    assert list(probekit.open_cube(series)["step"].values) == [0, 20, 30]
    opts = probekit.AlignOptions(parallel_files=("bible:en", "bible:fr"), n_pairs=8, seq_len=32)
    cube = probekit.align(series, "similarity", steps="range:5:10", options=opts, progress=False)
    assert list(cube["step"].values) == [0, 10, 20, 30]
    # a sample in AlignOptions.revisions selects the same way (one checkpoint recomputed here)
    one = opts.updated(revisions=("range:25:35",))
    computed = []
    real = engine.compute_checkpoint
    monkeypatch.setattr(
        engine, "compute_checkpoint", lambda p, step, *a: computed.append(step) or real(p, step, *a)
    )
    cube = probekit.align(series, "similarity", recompute=True, options=one, progress=False)
    assert computed == [30] and list(cube["step"].values) == [0, 10, 20, 30]
    with pytest.raises(probekit.errors.MetricError, match="a sample selects the steps"):
        probekit.align(series, "similarity", steps=[0], options=one, progress=False)
    res = cli_run("align", series, "--revisions", "range:100:200", *args)
    assert res.exit_code == 2 and "selects no checkpoint (steps 0..30)" in res.output


def _problems(res) -> list[str]:
    return [line for line in res.output.splitlines() if ": " in line and "problem(s)" not in line]


def test_a_clean_series_passes(tmp_path: Path):
    series = save_series(tmp_path / "s", "gpt_neox", steps=(0, 10, 20))
    assert check_series(series) == []
    res = cli_run("check", series)
    assert res.exit_code == 0 and "no problems found" in res.output, res.output


def test_a_duplicated_revision_is_flagged_in_one_line(tmp_path: Path):
    cache = make_hub_cache(tmp_path / "hub", revisions=("step0", "step5", "step9"))
    snaps = cache / "models--org--tiny" / "snapshots"
    # pythia#205: an early branch serving the final weights (a copy, not the same snapshot)
    shutil.copy(snaps / ("02" + "ab" * 19) / "model.safetensors", snaps / ("00" + "ab" * 19))
    res = cli_run("check", cache)
    assert res.exit_code == 1, res.output
    assert _problems(res) == [
        "step0: duplicate: weights identical to step9's (step 9; hash of sampled bytes)"
    ]
    full = check_series(cache, full=True)
    assert [(p.kind, p.where) for p in full] == [("duplicate", "step0")]
    # align says so in one warning line before computing anything, and still runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probekit.align(
            cache,
            "similarity",
            options=probekit.AlignOptions(parallel_files=("bible:en", "bible:fr"), n_pairs=8),
            progress=False,
        )
    msgs = [str(w.message) for w in caught if issubclass(w.category, SeriesWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "1 problem(s) in 3 checkpoints (1 duplicate); first: step0: duplicate" in msgs[0]


def test_a_step_out_of_order_is_flagged_in_one_line(tmp_path: Path):
    series = save_series(tmp_path / "s", "gpt2", steps=(0, 10, 20))
    # the trainer's own record disagrees with the folder's name
    (series / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    res = cli_run("check", series)
    assert res.exit_code == 1
    assert _problems(res) == ["checkpoint-10: order: step 10 but trainer_state.json says 30"]
    # token counts that fall as the step rises
    (series / "checkpoint-10" / "trainer_state.json").unlink()
    for step, tokens in ((0, 0), (10, 5000), (20, 3000)):
        (series / f"checkpoint-{step}" / "probekit.json").write_text(
            json.dumps({"step": step, "tokens": tokens})
        )
    assert [str(p) for p in check_series(series)] == [
        "checkpoint-20: order: records 3000 tokens at step 20, fewer than checkpoint-10's "
        "5000 at step 10"
    ]
    # probekit.json's step against the folder's name
    (series / "checkpoint-20" / "probekit.json").write_text(json.dumps({"step": 5}))
    assert [str(p) for p in check_series(series)] == [
        "checkpoint-20: order: named step 20 but probekit.json records 5"
    ]


def test_missing_and_unreadable_revisions(tmp_path: Path):
    cache = make_hub_cache(tmp_path / "hub", revisions=("step1", "step2", "step3"))
    model_dir = cache / "models--org--tiny"
    (model_dir / "refs" / "step4").write_text("ff" * 20)  # a ref whose snapshot never came
    weights = model_dir / "snapshots" / ("01" + "ab" * 19) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short
    (model_dir / "snapshots" / ("02" + "ab" * 19) / "model.safetensors").unlink()
    got = [
        str(p) for p in check_series(cache, revisions=["step1", "step2", "step3", "step4", "x9"])
    ]
    assert got[:2] == [
        "x9: missing: revision not in the cache",
        "step4: missing: snapshot ffffffffffff is not cached",
    ]
    assert got[2].startswith("step2: unreadable: model.safetensors: ValueError: tensor ")
    assert got[2].endswith("runs past the end of the file (cut short?)")
    assert got[3] == "step3: missing: no weight file (model.safetensors, pytorch_model.bin)"
    assert len(got) == 4


def test_sampled_hash_reads_a_bounded_part_of_each_tensor(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    big = torch.arange(1_000_000, dtype=torch.float32)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, t in ((a, big), (b, big.clone())):
        folder.mkdir()
        save_file({"w": t}, folder / "model.safetensors")
    assert weights_hash(a) == weights_hash(b) and weights_hash(a, True) == weights_hash(b, True)
    changed = big.clone()
    changed[0] += 1  # inside the first sampled block
    save_file({"w": changed}, b / "model.safetensors")
    assert weights_hash(a) != weights_hash(b)
    changed = big.clone()
    changed[500_123] += 1  # between sampled blocks: only the full hash sees it
    save_file({"w": changed}, b / "model.safetensors")
    assert weights_hash(a) == weights_hash(b) and weights_hash(a, True) != weights_hash(b, True)

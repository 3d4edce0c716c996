"""Series layouts (issue 13): checkpoint folders of other trainers, a local Hugging Face hub
cache of one model's revisions, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_architectures import FAST, cli_run, save_series, tiny_model, tokenizer

import probekit
from probekit.checkpoints import list_checkpoints
from probekit.errors import RunDirError


@pytest.mark.parametrize(
    "layout", ["checkpoint-{}", "step_{}", "global_step{}", "step{}", "step_{:06d}"]
)
def test_folder_layouts(layout: str, tmp_path: Path):
    for step in (1000, 20, 300):
        (tmp_path / layout.format(step)).mkdir()
        (tmp_path / layout.format(step) / "config.json").write_text("{}")
    (tmp_path / "runs").mkdir()  # no config.json: not a checkpoint
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 300, 1000]


def make_hub_cache(root: Path, repo: str = "org/tiny", revisions=("step10", "step2")) -> Path:
    """models--ORG--NAME with refs/<revision> naming snapshots/<hash>/, as the hub writes it;
    `main` names the same snapshot as the last revision."""
    model_dir = root / ("models--" + repo.replace("/", "--"))
    for i, rev in enumerate(revisions):
        commit = f"{i:02d}" + "ab" * 19
        snap = model_dir / "snapshots" / commit
        tiny_model("gpt_neox", seed=i).save_pretrained(snap)
        tokenizer().save_pretrained(snap)
        (model_dir / "refs").mkdir(parents=True, exist_ok=True)
        (model_dir / "refs" / rev).write_text(commit)
    (model_dir / "refs" / "main").write_text(commit)
    return root


def test_hub_cache_revisions(tmp_path: Path):
    cache = make_hub_cache(tmp_path / "hub")
    ckpts = list_checkpoints(cache)
    assert [c.step for c in ckpts] == [2, 10]  # main (no step in its name) is not listed
    assert ckpts[0].meta["revision"] == "step2" and ckpts[0].path.parent.name == "snapshots"
    assert [c.step for c in list_checkpoints(cache, "org/tiny", ["step10"])] == [10]
    with pytest.raises(RunDirError, match=r"step99 not in the cache \(cached: main, step2, step10"):
        list_checkpoints(cache, "org/tiny", ["step99"])
    with pytest.raises(RunDirError, match="org/other is not in this cache"):
        list_checkpoints(cache, "org/other")
    # the model's own folder works as well
    assert len(list_checkpoints(cache / "models--org--tiny")) == 2


def test_align_and_eval_a_hub_cache(tmp_path: Path):
    cache = make_hub_cache(tmp_path / "hub")
    res = cli_run(
        "align",
        cache,
        "--model",
        "org/tiny",
        "--revisions",
        "step2,step10",
        "--parallel",
        "bible:en",
        "bible:fr",
        "--metrics",
        "similarity",
        *FAST,
    )
    assert res.exit_code == 0, res.output
    model_dir = cache / "models--org--tiny"  # the cube lives with the model's revisions
    assert "models--org--tiny/analysis.zarr" in res.output
    cube = probekit.open_cube(model_dir)
    assert list(cube["step"].values) == [2, 10] and np.isfinite(cube["hidden_cos"]).all()
    assert cube.attrs["run_name"] == "org/tiny"
    (tmp_path / "en.txt").write_text("In the beginning God created the earth.\n" * 9)
    res = cli_run(
        "eval", cache, "--model", "org/tiny", "--test", f"en={tmp_path / 'en.txt'}", "--quiet"
    )
    assert res.exit_code == 0, res.output
    assert np.isfinite(probekit.open_cube(model_dir)["ppl"]).all()


def _one_line_error(res, msg: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in res.output, res.output


def test_bad_input_is_one_line(tmp_path: Path):
    cache = make_hub_cache(tmp_path / "hub", revisions=("step5",))
    args = ["--parallel", "bible:en", "bible:fr", "--quiet"]
    res = cli_run("align", cache, "--model", "org/tiny", "--revisions", "step7", *args)
    _one_line_error(res, "step7 not in the cache (cached: main, step5)")
    # an architecture the analysis does not know: named, with the supported ones
    odd = tmp_path / "odd" / "checkpoint-1"
    odd.mkdir(parents=True)
    (odd / "config.json").write_text(json.dumps({"model_type": "gptj", "vocab_size": 10}))
    tokenizer().save_pretrained(odd)
    res = cli_run("align", tmp_path / "odd", *args)
    _one_line_error(res, "architecture 'gptj' is not supported")
    assert "llama" in res.output and "gpt_neox" in res.output
    # a tokenizer larger than the checkpoints' vocabulary: both sizes named
    small = save_series(tmp_path / "small", "llama", steps=(1,), vocab_size=300)
    res = cli_run("align", small, *args, "--metrics", "similarity")
    _one_line_error(res, f"has {len(tokenizer())} tokens, the checkpoint's vocabulary 300")

"""`align` end to end on a tiny trained run: cube layout, reruns, copies, kills and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probekit
from probekit import store
from probekit.analysis import AlignOptions, align
from probekit.checkpoints import list_checkpoints, load_checkpoint
from probekit.cli.main import cli
from probekit.errors import MetricError

OPTS = AlignOptions(n_pairs=12, seq_len=32, batch_size=6, n_grad_pairs=4)


@pytest.fixture(scope="module")
def aligned(tiny_run: Path) -> Path:
    align(tiny_run, options=OPTS, progress=False)
    return tiny_run


def test_cube_layout_and_ranges(aligned: Path):
    cube = probekit.open_cube(aligned)
    steps = [c.step for c in list_checkpoints(aligned)]
    assert list(cube["step"].values) == steps and "tokens" in cube.coords
    for name in ("hidden_cos", "cka", "hidden_cos_centred", "linmap_r2", "procrustes_r2"):
        assert cube[name].dims == ("step", "layer"), name
        assert f"{name}_baseline" in cube
    assert cube["retrieval_acc"].dims == ("step", "layer", "direction")
    assert np.all(np.abs(cube["hidden_cos"].values) <= 1 + 1e-6)
    assert np.all((cube["retrieval_acc"].values >= 0) & (cube["retrieval_acc"].values <= 1))
    assert list(cube["layer"].values) == [0, 1, 2]  # embeddings + the nano preset's 2 blocks
    assert cube["neuron_act_prob"].dims == ("step", "layer", "language", "neuron")
    assert cube["lang_specific_frac"].dims == ("step", "layer", "language")
    assert set(cube["neuron_overlap"].dims) == {"step", "layer"}
    assert cube["grad_cos"].dims == ("step", "layer", "tensor")
    assert "attn.c_attn.weight" in cube["tensor"].values and "block" in cube["tensor"].values
    assert set(cube["embed_cos"].dims) == {"step", "matrix", "pairing"}
    assert "probe_transfer" in cube and "definition" in cube["hidden_cos"].attrs
    assert cube.attrs["mode"] == "clone" and "config" in cube.attrs


def test_rerun_computes_nothing_new(aligned: Path, monkeypatch):
    calls = []
    monkeypatch.setattr("probekit.engine.compute_checkpoint", lambda *a, **k: calls.append(a) or {})
    before = {p: p.stat().st_mtime_ns for p in (aligned / "analysis.zarr").rglob("zarr.json")}
    align(aligned, options=OPTS, progress=False)
    assert calls == []
    after = {p: p.stat().st_mtime_ns for p in (aligned / "analysis.zarr").rglob("zarr.json")}
    assert before == after


def test_recompute_and_step_subset(aligned: Path):
    final = list_checkpoints(aligned)[-1].step
    old = store.read_family(aligned, "similarity")["hidden_cos"].sel(step=final).values
    align(
        aligned, metrics="hidden_cos", steps=[final], recompute=True, options=OPTS, progress=False
    )
    new = store.read_family(aligned, "similarity")["hidden_cos"].sel(step=final).values
    np.testing.assert_allclose(old, new, atol=1e-6)  # deterministic


@pytest.fixture(scope="module")
def copied_run(tiny_run: Path, tmp_path_factory) -> Path:
    """The final checkpoint with EN2's embedding and output rows copied from EN1's."""
    out = tmp_path_factory.mktemp("copy") / "copy"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    info = list_checkpoints(out)[-1]
    model = load_checkpoint(info)
    v = model.config.vocab_size // 2
    with torch.no_grad():
        model.transformer.wte.weight[v:] = model.transformer.wte.weight[:v]
        model.lm_head.weight[v:] = model.lm_head.weight[:v]
    model.save_pretrained(info.path)
    return out


def test_copied_embeddings_give_identical_languages(copied_run: Path):
    final = list_checkpoints(copied_run)[-1].step
    cube = align(copied_run, steps=[final], options=OPTS, progress=False).sel(step=final)
    np.testing.assert_allclose(cube["hidden_cos"].values, 1.0, atol=1e-5)
    np.testing.assert_allclose(cube["cka"].values, 1.0, atol=1e-5)
    assert np.all(cube["retrieval_acc"].values == 1.0)
    blocks = cube["grad_cos"].sel(layer=slice(1, 4)).values
    np.testing.assert_allclose(blocks[~np.isnan(blocks)], 1.0, atol=1e-4)
    assert float(cube["embed_cos"].sel(matrix="input", pairing="clone")) == pytest.approx(
        1, abs=1e-6
    )
    np.testing.assert_allclose(cube["probe_transfer"].values, cube["probe_in_language"].values)
    frac = cube["lang_specific_frac"].values
    assert np.allclose(frac[~np.isnan(frac)], 0.0)  # every neuron fires alike for both


_KILL_SCRIPT = """
import sys
from probekit.analysis import AlignOptions, align
opts = AlignOptions(n_pairs=12, seq_len=32)
align(sys.argv[1], metrics="similarity", options=opts, progress=False)
"""


def test_killed_align_leaves_a_readable_store(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("analysis.zarr"))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(run)])
    deadline = time.time() + 120
    while time.time() < deadline and len(_steps(run)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = store.stored_steps(run, "similarity")
    assert 2 <= len(done) and np.isfinite(store.read_family(run, "similarity")["hidden_cos"]).all()
    cube = align(run, metrics="similarity", options=OPTS, progress=False)
    assert len(cube["step"]) == len(list_checkpoints(run))


def _steps(run: Path) -> list[int]:
    try:
        return store.stored_steps(run, "similarity")
    except Exception:  # mid-swap while the other process writes
        return []


def test_dask_workers_match_serial(aligned: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(aligned, run, ignore=shutil.ignore_patterns("analysis.zarr"))
    steps = [c.step for c in list_checkpoints(run)][-2:]
    cube = align(run, metrics="similarity", steps=steps, options=OPTS, workers=2, progress=False)
    ref = store.read_family(aligned, "similarity")
    np.testing.assert_allclose(
        cube["hidden_cos"].sel(step=steps).values,
        ref["hidden_cos"].sel(step=steps).values,
        atol=1e-6,
    )


def test_local_workers_keep_glibc_dynamic_mmap_threshold(monkeypatch):
    """dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536 (4x the page
    faults in align); probekit's own workers start without it."""
    from dask.distributed import Client

    from probekit.engine import local_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_cluster(1) as cluster, Client(cluster) as client:
        env = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
    assert list(env.values()) == [None]


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_bad_input_is_one_line_and_exit_2(aligned: Path, tmp_path: Path):
    cases = [
        (["align", str(tmp_path / "nope")], "not found"),
        (["align", str(aligned), "--metrics", "colour"], "unknown metric"),
        (["align", str(aligned), "--steps", "999999"], "no checkpoint for step"),
        (["align", str(aligned), "--pair", "EN1,EN9"], "unknown language"),
    ]
    empty = tmp_path / "empty"
    shutil.copytree(aligned, empty, ignore=shutil.ignore_patterns("analysis.zarr", "checkpoints"))
    (empty / "checkpoints").mkdir()
    cases.append((["align", str(empty)], "no checkpoints"))
    for args, msg in cases:
        res = _cli(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in res.output, res.output


def test_vocabulary_mismatch_and_foreign_store(aligned: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(aligned, run)
    info = list_checkpoints(run)[-1]
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config.from_pretrained(info.path)
    cfg.vocab_size = 77
    GPT2LMHeadModel(cfg).save_pretrained(info.path)
    res = _cli("align", str(run), "--steps", str(info.step), "--recompute")
    assert res.exit_code == 2 and "vocabulary size 77" in res.output
    # the failed recompute lost nothing: every stored step, the broken one's included
    assert len(store.stored_steps(run, "similarity")) == len(list_checkpoints(run))


def test_metrics_a_run_cannot_have(tmp_path: Path):
    from probekit.training import train

    cfg = {
        "data": {
            "mode": "pair",
            "p": 0.5,
            "sources": {"en": ["bible:web"], "fr": ["bible:segond"]},
        },
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano"},
        "train": {"steps": 4, "batch_size": 4},
        "eval": {"n_sequences": 2},
    }
    train(cfg, tmp_path / "enfr", progress=False)
    with pytest.raises(MetricError, match="clone embedding similarity needs cloned languages"):
        align(tmp_path / "enfr", metrics="embed_cos", options=OPTS, progress=False)
    cube = align(tmp_path / "enfr", metrics="hidden_cos", options=OPTS, progress=False)
    assert np.all(np.isfinite(cube["hidden_cos"].values))  # matched cosine on real pairs
    mono = dict(cfg, data={"mode": "mono", "sources": {"en": ["bible:web"]}})
    train(mono, tmp_path / "mono", progress=False)
    res = _cli("align", str(tmp_path / "mono"), "--metrics", "grad_cos")
    assert res.exit_code == 2 and "monolingual" in res.output


def test_every_command_has_help():
    for cmd in ("train", "align", "eval", "teff", "sweep", "report", "demo"):
        res = _cli(cmd, "--help")
        assert res.exit_code == 0 and "Usage" in res.output


def test_any_hf_checkpoint_series_with_parallel_text(tiny_run: Path, tmp_path: Path):
    """A folder of plain HF checkpoints (e.g. checkpoint-N from another trainer) + two texts."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from probekit.data import corpus

    series = tmp_path / "series"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(tiny_run / "tokenizer" / "tokenizer_base.json")),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    for info in list_checkpoints(tiny_run)[-2:]:
        dst = series / f"checkpoint-{info.step}"
        load_checkpoint(info).save_pretrained(dst)
        tok.save_pretrained(dst)
    verses = corpus.parallel_verses("web", "segond")[:400]
    (tmp_path / "en.txt").write_text("\n".join(v[1] for v in verses))
    (tmp_path / "fr.txt").write_text("\n".join(v[2] for v in verses))
    res = _cli(
        "align",
        str(series),
        "--parallel",
        str(tmp_path / "en.txt"),
        str(tmp_path / "fr.txt"),
        "--pairs",
        "8",
        "--seq-len",
        "32",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    cube = probekit.open_cube(series)
    assert len(cube["step"]) == 2 and np.all(np.isfinite(cube["hidden_cos"].values))
    assert "grad_cos" in cube and "embed_cos" not in cube
    res = _cli("align", str(series))  # without texts: says what is missing
    assert res.exit_code == 2 and "--parallel" in res.output

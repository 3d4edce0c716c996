"""--dtype (issue 30): bfloat16 forwards and backwards agree with float32 within the tolerances
docs/align.md documents, for every default family, on a trained nano checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit
from probekit import store
from probekit.checkpoints import cast_parameters, load_checkpoint, release_kept
from probekit.options import AnalysisOptions, OptionError

# the largest |bfloat16 - float32| allowed per family over every numeric variable and cell
# (docs/align.md, "Precision"): several times what the nano run's last checkpoint shows
TOLERANCE = {
    "similarity": 0.005,
    "neurons": 0.1,  # per-neuron firing probabilities: a token at the threshold flips
    "gradients": 0.05,
    "embeddings": 0.005,
    "probes": 0.1,  # accuracies: a prediction flips in steps of 1 / pairs
    "perplexity": 0.001,  # relative: |bf16 / f32 - 1| of ppl, ppl_char and the summed NLL
}


def _scratch(run: Path, dst: Path, step: int) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("analysis.zarr", "artifacts", "step_*"))
    shutil.copytree(
        run / "checkpoints" / f"step_{step:06d}", dst / "checkpoints" / f"step_{step:06d}"
    )
    return dst


def _analyse(run: Path, dtype: str, step: int) -> Path:
    opts = AnalysisOptions(dtype=dtype, n_pairs=16, n_grad_pairs=4, batch_size=8)
    probekit.align(run, steps=[step], options=opts, progress=False)
    probekit.evaluate(run, steps=[step], max_tokens=2048, options=opts, progress=False)
    return run


def test_bfloat16_agrees_with_float32_for_every_family(tiny_run: Path, tmp_path: Path):
    step = 40
    runs = {
        dt: _analyse(_scratch(tiny_run, tmp_path / dt, step), dt, step)
        for dt in ("float32", "bfloat16")
    }
    fams = store.families(runs["float32"])
    assert set(TOLERANCE) <= set(fams), fams
    moved = {}
    for fam in TOLERANCE:
        ref, got = (store.read_family(runs[d], fam) for d in ("float32", "bfloat16"))
        worst = 0.0
        for name in ref.data_vars:
            if ref[name].dtype.kind != "f":
                continue
            a, b = ref[name].values.astype(float), got[name].values.astype(float)
            assert (np.isfinite(a) == np.isfinite(b)).all(), f"{fam}.{name}: NaN cells moved"
            if fam == "perplexity":
                d = np.abs(b / a - 1)
            else:
                d = np.abs(a - b)
            d = d[np.isfinite(d)]
            worst = max(worst, float(d.max(initial=0.0)))
        moved[fam] = worst
    for fam, worst in moved.items():
        assert worst <= TOLERANCE[fam], (fam, worst, moved)
    # the cast happened: a family computed in bfloat16 is not float32's to the last bit
    assert moved["similarity"] > 0 and moved["gradients"] > 0 and moved["perplexity"] > 0, moved


def test_dtype_is_validated_and_casts_only_parameters(tiny_run: Path):
    with pytest.raises(OptionError, match=r"--dtype: expected float32 \| bfloat16 \| float16"):
        AnalysisOptions(dtype="float64").validated()
    ckpt = tiny_run / "checkpoints" / "step_000040"
    f32 = load_checkpoint(ckpt)
    model = load_checkpoint(ckpt, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = dict(f32.named_parameters())
    for name, p in model.named_parameters():  # round to nearest: within bfloat16's half-ulp
        assert torch.allclose(p.float(), ref[name], rtol=2**-8, atol=0), name
    if f32.get_output_embeddings().weight is f32.get_input_embeddings().weight:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert cast_parameters(model, "float32") is model
    # a kept model reads the next checkpoint into its bfloat16 tensors, cast as a fresh load
    release_kept()
    first = load_checkpoint(tiny_run / "checkpoints" / "step_000020", reuse=True, dtype="bfloat16")
    again = load_checkpoint(ckpt, reuse=True, dtype="bfloat16")
    assert again is first
    for (name, p), q in zip(again.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    release_kept()

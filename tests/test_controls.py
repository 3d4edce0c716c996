"""Controls and uncertainty: rotation-insensitive alignment, baselines, bootstrap intervals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from probekit.analysis import AlignOptions, align
from probekit.checkpoints import list_checkpoints, load_checkpoint


def _edited_copy(run: Path, out: Path, step_index: int, edit) -> int:
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("analysis.zarr"))
    info = list_checkpoints(out)[step_index]
    model = load_checkpoint(info)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(info.path)
    return info.step


def test_exact_rotation_gives_procrustes_one_and_cosine_below_one(tiny_run: Path, tmp_path: Path):
    def rotate(model):
        v = model.config.vocab_size // 2
        d = model.config.n_embd
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
        model.transformer.wpe.weight.zero_()  # layer 0 is then the token embedding alone
        model.transformer.wte.weight[v:] = model.transformer.wte.weight[:v] @ q

    step = _edited_copy(tiny_run, tmp_path / "rot", -1, rotate)
    opts = AlignOptions(n_pairs=16, seq_len=32)
    cube = align(tmp_path / "rot", metrics="similarity", steps=[step], options=opts, progress=False)
    layer0 = cube.sel(step=step, layer=0)
    assert float(layer0["procrustes_r2"]) > 0.999
    assert float(layer0["linmap_r2"]) > 0.99
    assert float(layer0["hidden_cos"]) < 0.5


def test_different_text_baseline_of_a_random_model_is_near_zero(tiny_run: Path, tmp_path: Path):
    # a random model with no positional signal: different texts share nothing
    step = _edited_copy(tiny_run, tmp_path / "rand", 0, lambda m: m.transformer.wpe.weight.zero_())
    opts = AlignOptions(n_pairs=48, seq_len=32)
    cube = align(
        tmp_path / "rand", metrics="similarity", steps=[step], options=opts, progress=False
    ).sel(step=step)
    for name in ("cka_baseline", "linmap_r2_baseline", "hidden_cos_centred_baseline"):
        assert np.all(np.abs(cube[name].values) < 0.1), (name, cube[name].values)


def test_bootstrap_intervals_shrink_as_pairs_grow(tiny_run: Path, tmp_path: Path):
    widths = {}
    final = list_checkpoints(tiny_run)[-1].step
    for n in (24, 192):
        run = tmp_path / f"r{n}"
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("analysis.zarr"))
        opts = AlignOptions(n_pairs=n, seq_len=32, ci=0.95, n_boot=200)
        cube = align(run, metrics="similarity", steps=[final], options=opts, progress=False)
        c = cube.sel(step=final)
        assert np.all(c["hidden_cos_lo"] <= c["hidden_cos"]) and np.all(
            c["hidden_cos"] <= c["hidden_cos_hi"]
        )
        widths[n] = {
            m: float((c[f"{m}_hi"] - c[f"{m}_lo"]).mean())
            for m in ("hidden_cos", "cka", "linmap_r2", "procrustes_r2")
        }
    for m in widths[24]:
        assert widths[192][m] < widths[24][m], (m, widths)


@pytest.mark.parametrize("ci", ["1.5", "0"])
def test_bad_ci_level(tiny_run: Path, ci: str):
    from click.testing import CliRunner

    from probekit.cli.main import cli

    res = CliRunner().invoke(cli, ["align", str(tiny_run), "--ci", ci])
    assert res.exit_code == 2 and "--ci" in res.output

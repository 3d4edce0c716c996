"""A notebook's view of an external checkpoint series: align and evaluate through the
Python API alone (no CLI, no engine.run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_architectures import save_series

import probekit
from probekit.analysis import AlignOptions
from probekit.data import corpus


def test_align_and_evaluate_an_external_series_from_python(tmp_path: Path):
    series = save_series(tmp_path / "ext", "gpt2", steps=(2, 5))
    for lang, col in (("en", 1), ("fr", 2)):
        verses = corpus.parallel_verses("web", "segond", "test")[:200]
        (tmp_path / f"{lang}.txt").write_text("\n".join(v[col] for v in verses))
    opts = AlignOptions(n_pairs=8, n_grad_pairs=2, seq_len=32, max_tokens=300)
    cube = probekit.align(
        series,
        metrics="similarity",
        options=opts.updated(parallel_files=("bible:en", "bible:fr")),
        progress=False,
    )
    assert sorted(int(s) for s in cube["step"].values) == [2, 5]
    assert np.isfinite(cube["cka"]).all()
    cube = probekit.evaluate(
        series,
        options=opts,
        test_files={"en": tmp_path / "en.txt", "fr": tmp_path / "fr.txt"},
        progress=False,
    )
    assert list(cube["language"].values) == ["en", "fr"]
    assert (cube["ppl"] > 1).all() and np.isfinite(cube["ppl"]).all()
    assert "cka" in probekit.open_cube(series)  # both stored in the one cube

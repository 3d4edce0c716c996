"""The cube store: append, skip, recover from a killed swap, refuse foreign versions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from probekit import store
from probekit.errors import RunDirError


def _ds(v: float) -> xr.Dataset:
    ds = xr.Dataset({"hidden_cos": (("layer",), np.full(3, v))}, coords={"layer": [0, 1, 2]})
    ds["hidden_cos"].attrs["definition"] = "test"
    return ds


def test_write_read_with_plain_xarray(tmp_path):
    for step in (10, 0, 5):
        store.write_step(tmp_path, "similarity", _ds(step), step, step * 100.0, {"run_name": "r"})
    ds = xr.open_zarr(tmp_path / "analysis.zarr", group="similarity")
    assert list(ds["step"].values) == [0, 5, 10]
    assert list(ds["tokens"].values) == [0.0, 500.0, 1000.0]
    assert ds.attrs["run_name"] == "r" and ds["hidden_cos"].attrs["definition"] == "test"
    store.write_step(tmp_path, "similarity", _ds(-1), 5, 500.0)  # replace one step
    assert float(store.read_family(tmp_path, "similarity")["hidden_cos"].sel(step=5)[0]) == -1


def test_families_merge_and_new_variables(tmp_path):
    store.write_step(tmp_path, "similarity", _ds(1), 0, 0)
    extra = _ds(2).assign(cka=(("layer",), np.ones(3)))
    store.write_step(tmp_path, "similarity", extra, 1, 10)
    ppl = xr.Dataset({"ppl": (("language",), [3.0, 4.0])}, coords={"language": ["EN1", "EN2"]})
    store.write_step(tmp_path, "perplexity", ppl, 1, 10)
    cube = store.open_cube(tmp_path)
    assert set(cube.data_vars) == {"hidden_cos", "cka", "ppl"}
    assert np.isnan(cube["cka"].sel(step=0)).all() and float(cube["cka"].sel(step=1)[0]) == 1


def test_recovers_from_a_killed_swap(tmp_path):
    store.write_step(tmp_path, "similarity", _ds(1), 0, 0)
    path = tmp_path / "analysis.zarr"
    (path / "similarity").rename(path / ".old-similarity")  # killed between the two renames
    (path / ".tmp-similarity").mkdir()
    assert store.stored_steps(tmp_path, "similarity") == [0]
    assert not (path / ".tmp-similarity").exists()


def test_incompatible_version_refused_and_untouched(tmp_path):
    store.write_step(tmp_path, "similarity", _ds(1), 0, 0)
    meta = tmp_path / "analysis.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["probekit_store_version"] = 99
    meta.write_text(json.dumps(doc))
    before = sorted(p.name for p in (tmp_path / "analysis.zarr").rglob("*"))
    with pytest.raises(RunDirError, match="incompatible"):
        store.write_step(tmp_path, "similarity", _ds(2), 1, 1)
    assert sorted(p.name for p in (tmp_path / "analysis.zarr").rglob("*")) == before


def test_open_cube_without_store_says_what_to_run(tmp_path):
    with pytest.raises(RunDirError, match="probekit align"):
        store.open_cube(tmp_path)

"""The appending store (issue 30): checkpoint k writes no file of checkpoints 1..k-1, a kill -9
at any moment leaves every finished checkpoint readable, concurrent writers of different steps
never corrupt it, and plain xarray reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from probekit import store

ROOT = Path(__file__).resolve().parents[1]


def _ds(v: float) -> xr.Dataset:
    return xr.Dataset(
        {
            "hidden_cos": (("layer",), np.full(3, v)),
            "act": (("layer", "neuron"), np.full((3, 64), v)),
            "label": (("layer",), np.array(["a", "b", "c"])),
        },
        coords={"layer": [0, 1, 2], "raw": ("layer", ["x", "y", "z"])},
    )


def _files(run: Path) -> dict[str, tuple[int, bytes]]:
    fam = run / "analysis.zarr" / "similarity"
    return {
        str(p.relative_to(fam)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in fam.rglob("*")
        if p.is_file()
    }


def test_appending_a_checkpoint_rewrites_no_earlier_chunk(tmp_path: Path):
    for k in range(5):
        store.write_step(tmp_path, "similarity", _ds(k), k * 10, k * 100.0, {"k": k})
    before = _files(tmp_path)
    store.write_step(tmp_path, "similarity", _ds(5), 50, 500.0, {"k": 5})
    after = _files(tmp_path)
    changed = {n for n in before if after[n] != before[n]}
    # only the arrays' metadata (their shape grew), the group's attributes, and the one chunk
    # of the step numbers and tokens (8 bytes a checkpoint, read whole for the index)
    coords = {"step/c/0", "tokens/c/0"}
    assert changed and all(n.endswith("zarr.json") or n in coords for n in changed), changed
    new = set(after) - set(before)
    assert new and all("/c/5" in n for n in new), new
    assert {"hidden_cos/c/5/0", "act/c/5/0/0", "label/c/5/0"} <= new
    ds = xr.open_zarr(tmp_path / "analysis.zarr", group="similarity")  # plain xarray
    assert list(ds["step"].values) == [0, 10, 20, 30, 40, 50] and ds.attrs["k"] == 5
    assert float(ds["act"].sel(step=50).max()) == 5 and list(ds["label"].values[-1]) == list("abc")
    # an earlier step, a replaced step and a new variable still go through the rewrite
    store.write_step(tmp_path, "similarity", _ds(-1), 15, 150.0)
    store.write_step(tmp_path, "similarity", _ds(-2), 50, 500.0)
    store.write_step(tmp_path, "similarity", _ds(7).assign(cka=(("layer",), np.ones(3))), 70, 7)
    ds = store.read_family(tmp_path, "similarity")
    assert list(ds["step"].values) == [0, 10, 15, 20, 30, 40, 50, 70]
    assert float(ds["hidden_cos"].sel(step=50)[0]) == -2 and np.isnan(ds["cka"].sel(step=0)).all()
    store.write_step(tmp_path, "similarity", _ds(8).assign(cka=(("layer",), np.ones(3))), 80, 8)
    assert store.stored_steps(tmp_path, "similarity")[-1] == 80


def test_a_half_done_append_is_undone(tmp_path: Path):
    for k in range(3):
        store.write_step(tmp_path, "similarity", _ds(k), k, k)
    path = tmp_path / "analysis.zarr"
    # killed mid-append: the journal written, one array already one step longer
    (tmp_path / ".analysis.append-similarity.json").write_text('{"n_steps": 3}')
    arr = zarr.open_array(str(path / "similarity" / "hidden_cos"), mode="r+")
    arr.resize((4, 3))
    arr[3] = 9.0
    ds = store.read_family(tmp_path, "similarity")
    assert list(ds["step"].values) == [0, 1, 2] and ds.sizes["step"] == 3
    assert not (tmp_path / ".analysis.append-similarity.json").exists()
    assert xr.open_zarr(path, group="similarity").sizes["step"] == 3
    store.write_step(tmp_path, "similarity", _ds(3), 3, 3)  # the next append is clean
    assert float(store.read_family(tmp_path, "similarity")["hidden_cos"].sel(step=3)[0]) == 3


_WRITER = """
import sys
import numpy as np, xarray as xr
from probekit import store
run, first, stride, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for step in range(first, first + stride * n, stride):
    ds = xr.Dataset({"hidden_cos": (("layer",), np.full(3, float(step))),
                     "act": (("layer", "neuron"), np.full((3, 64), float(step)))},
                    coords={"layer": [0, 1, 2]})
    store.write_step(run, "similarity", ds, step, step * 10.0)
    print(step, flush=True)
"""


def _writer(run: Path, first: int, stride: int, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(run), str(first), str(stride), str(n)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _check(run: Path, finished: list[int]) -> list[int]:
    ds = store.read_family(run, "similarity")
    steps = [int(s) for s in ds["step"].values]
    assert set(finished) <= set(steps), (finished, steps)  # every finished one is there
    assert steps == sorted(steps)
    for name in ("hidden_cos", "act"):
        vals = ds[name].values.reshape(len(steps), -1)
        assert (vals == np.asarray(steps, dtype=float)[:, None]).all(), name
    assert xr.open_zarr(run / "analysis.zarr", group="similarity").sizes["step"] == len(steps)
    return steps


def test_kill_9_at_any_moment_leaves_every_finished_checkpoint(tmp_path: Path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    finished: list[int] = []
    for attempt in range(4):
        proc = _writer(run, attempt * 1000, 1, 400)
        target = int(rng.integers(2, 6))
        for _ in range(target):  # a few checkpoints finished, then a kill mid-write
            finished.append(int(proc.stdout.readline()))
        time.sleep(float(rng.random()) * 0.1)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        finished += [int(x) for x in out.split()]
        _check(run, finished)
    assert proc.returncode == -signal.SIGKILL


def test_concurrent_writers_of_different_steps(tmp_path: Path):
    run = tmp_path / "run"
    procs = [_writer(run, 0, 2, 12), _writer(run, 1, 2, 12)]  # even and odd steps
    for p in procs:
        p.communicate()
        assert p.returncode == 0
    assert _check(run, list(range(24))) == list(range(24))

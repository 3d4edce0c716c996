"""align through an existing dask scheduler with two workers, each a separate process on
localhost (what `--scheduler ADDRESS` / $PROBEKIT_DASK_SCHEDULER connects to), gives the same
cube as the serial driver. Bounded in time; the processes are always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import probekit
from probekit import store
from probekit.options import AnalysisOptions

OPTS = AnalysisOptions(n_pairs=12, seq_len=32, batch_size=6, n_grad_pairs=4)
TIMEOUT = 60  # seconds for the cluster to come up


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DASK_DISTRIBUTED__WORKER__DAEMON="False")
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: stopped as a whole below
    )


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A dask scheduler and two one-thread workers, each its own process."""
    tmp_path = tmp_path_factory.mktemp("dask")
    info = tmp_path / "scheduler.json"
    procs = [
        _spawn(
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(info),
            ],
            tmp_path / "scheduler.log",
        )
    ]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not info.is_file() or not info.read_text().strip():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail(
                    "dask scheduler did not start: " + (tmp_path / "scheduler.log").read_text()
                )
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        for i in range(2):
            procs.append(
                _spawn(
                    [
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                        "--local-directory",
                        str(tmp_path / f"w{i}"),
                    ],
                    tmp_path / f"worker{i}.log",
                )
            )
        from dask.distributed import Client

        with Client(address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=TIMEOUT)
        yield address
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


def test_align_through_a_scheduler_equals_serial(tiny_run: Path, tmp_path: Path, scheduler: str):
    serial, remote = tmp_path / "serial", tmp_path / "remote"
    for d in (serial, remote):
        shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("analysis.zarr"))
    steps = [c.step for c in probekit.list_checkpoints(tiny_run)][-2:]
    fams = "similarity,gradients,neurons"
    probekit.align(serial, metrics=fams, steps=steps, options=OPTS, progress=False)
    probekit.align(
        remote, metrics=fams, steps=steps, options=OPTS, progress=False, scheduler=scheduler
    )
    for fam in fams.split(","):
        assert sorted(store.stored_steps(remote, fam)) == sorted(steps)
    a, b = store.open_cube(serial), store.open_cube(remote)
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if np.issubdtype(x.dtype, np.number):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=name)


def test_sweep_trains_and_analyses_on_the_scheduler(tmp_path: Path, scheduler: str):
    """`sweep --scheduler`: training, then analysis, as tasks; a rerun resumes (skips)."""
    from conftest import tiny_cfg

    from probekit.config import dump_config
    from probekit.sweep import _on_cluster, _train_run, analyse_run

    cfg = tmp_path / "run.toml"
    cfg.write_text(dump_config(tiny_cfg(p=0.5, steps=4, name="dask_sweep")))
    out = tmp_path / "dask_sweep"
    _on_cluster(scheduler, [(_train_run, cfg, out, None)], ["train"], progress=False)
    steps = [c.step for c in probekit.list_checkpoints(out)]
    opts = {"metrics": "similarity", "n_pairs": 8, "seq_len": 32, "eval_max_tokens": 2048}
    _on_cluster(scheduler, [(analyse_run, out, "run", opts)], ["analyse"], progress=False)
    assert sorted(store.stored_steps(out, "similarity")) == sorted(steps)
    assert sorted(store.stored_steps(out, "perplexity")) == sorted(steps)
    before = store.open_cube(out)["hidden_cos"].values
    _on_cluster(scheduler, [(analyse_run, out, "run", opts)], ["analyse again"], progress=False)
    np.testing.assert_array_equal(store.open_cube(out)["hidden_cos"].values, before)


SMALL_GRID = """
name = "w"
base = "base.toml"
[grid]
"data.p" = [0.1]
[references]
fractions = [0.1, 0.25]
controls = true
[analysis]
metrics = "similarity"
n_pairs = 8
seq_len = 32
eval_max_tokens = 2048
"""


def test_sweep_on_local_workers_equals_one_thread_serial(tmp_path: Path):
    """`sweep --workers 2` (what `demo` does): every run trained and analysed, and the numbers
    are a one-thread serial sweep's, so they do not depend on the machine's core count."""
    import torch
    from click.testing import CliRunner
    from conftest import tiny_cfg

    from probekit.cli.main import cli
    from probekit.config import dump_config
    from probekit.sweep import run_sweep

    cfg = tiny_cfg(steps=20)
    cfg.pop("name")
    cfg["train"]["batch_size"] = 10  # 10 % of it is one sequence: an exact control
    (tmp_path / "base.toml").write_text(dump_config(cfg))
    (tmp_path / "grid.toml").write_text(SMALL_GRID)
    res = CliRunner().invoke(
        cli,
        ["sweep", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "par"), "--workers", "2"],
    )
    assert res.exit_code == 0 and "TEff not computed" not in res.output, res.output
    # progress: runs done of total, printed and logged, and no cluster address unless asked
    assert "tcp://" not in res.output
    log = (tmp_path / "par" / "progress.log").read_text().splitlines()
    total = int(log[-1].split("/")[1].split()[0])
    assert total >= 2 and f"[{total}/{total} runs done]" in log[-1], log
    assert len(log) == total and all("runs done]" in line for line in log)
    assert f"[1/{total} runs done]" in res.output and "left" in log[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(tmp_path / "grid.toml", tmp_path / "ser", progress=False)
    finally:
        torch.set_num_threads(threads)
    par, ser = (tmp_path / d / "teff.csv" for d in ("par", "ser"))
    assert par.read_text() == ser.read_text()
    a, b = (store.open_cube(tmp_path / d / "w") for d in ("par", "ser"))
    for name in ("hidden_cos", "ppl"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_sweep_workers_bad_grid_is_one_line(tmp_path: Path):
    """A malformed grid fails with one line before any worker starts."""
    from click.testing import CliRunner

    from probekit.cli.main import cli

    (tmp_path / "grid.toml").write_text('base = "missing.toml"\n[grid]\n"data.p" = [0.5]\n')
    res = CliRunner().invoke(
        cli, ["sweep", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "o"), "--workers", "2"]
    )
    assert res.exit_code == 2 and "missing.toml" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written

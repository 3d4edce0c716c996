"""Benchmark: the store's cost per checkpoint along a 154-checkpoint series (issue 30).

Usage: python bench/bench_store.py [--n 154] [--before OLD_TREE/probekit/store.py]

Writes N checkpoints, one after another as `align` does, of five families shaped like a
Pythia-70m series' results (similarity: 26 variables over 7 layers and retrieval's 2
directions; neurons: 2 languages x 2,048 neurons x 6 layers; gradients: 7 layers x 20
tensors; embeddings; probes) into a fresh store, and prints the seconds `store.write_step`
took for all five at the 10th and the Nth checkpoint (median of the 5 checkpoints ending
there), and their ratio: flat (about 1) when a checkpoint's write does not rewrite the ones
before it. With --before, the same with another tree's store.py (e.g. the base commit's,
which rewrote each family group at every checkpoint), side by side in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

SIM_VARS = 26
L, LANGS, D_MLP, TENSORS = 7, ("en", "fr"), 2048, 20


def results(rng: np.random.Generator) -> dict[str, xr.Dataset]:
    layer = np.arange(L)
    sim = xr.Dataset(
        {f"sim_{i}": (("layer",), rng.random(L)) for i in range(SIM_VARS)}
        | {"retrieval_acc": (("layer", "direction"), rng.random((L, 2)))},
        coords={"layer": layer, "direction": ["l1_to_l2", "l2_to_l1"]},
    )
    neurons = xr.Dataset(
        {
            "neuron_act_prob": (("layer", "language", "neuron"), rng.random((L, 2, D_MLP))),
            "lape": (("layer", "neuron"), rng.random((L, D_MLP))),
            "neuron_overlap": (("layer",), rng.random(L)),
            "n_tokens": (("language",), np.array([8192, 8192])),
        },
        coords={"layer": layer, "language": list(LANGS), "neuron": np.arange(D_MLP)},
    )
    names = [f"t{i}" for i in range(TENSORS)]
    grads = xr.Dataset(
        {"grad_cos": (("layer", "tensor"), rng.random((L, TENSORS)))},
        coords={"layer": layer, "tensor": names, "raw": ("tensor", names)},
    )
    emb = xr.Dataset({"embed_cos": (("space",), rng.random(2))}, coords={"space": ["in", "out"]})
    probes = xr.Dataset(
        {"probe_transfer": (("layer", "direction"), rng.random((L, 2)))},
        coords={"layer": layer, "direction": ["l1_to_l2", "l2_to_l1"]},
    )
    return {
        "similarity": sim,
        "neurons": neurons,
        "gradients": grads,
        "embeddings": emb,
        "probes": probes,
    }


def load_store(path: str | None):  # noqa: ANN201 - a module
    if path is None:
        from probekit import store

        return store
    spec = importlib.util.spec_from_file_location("store_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def series_costs(store, n: int, attrs: dict) -> list[float]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    run = Path(tempfile.mkdtemp(prefix="pk-bench-store-"))
    costs = []
    try:
        for k in range(n):
            res = results(rng)
            t0 = time.perf_counter()
            for fam, ds in res.items():
                store.write_step(run, fam, ds, step=k * 1000, tokens=k * 2.1e6, attrs=attrs)
            costs.append(time.perf_counter() - t0)
        cube = xr.open_zarr(run / "analysis.zarr", group="neurons")  # plain xarray reads it
        assert cube.sizes["step"] == n
    finally:
        shutil.rmtree(run)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=154)
    ap.add_argument("--before", default=None, help="Another tree's probekit/store.py.")
    args = ap.parse_args()
    attrs = {"run_name": "bench", "mode": "external", "analysis_options": "{...}"}
    sides = [("this tree", None)] + ([("before", args.before)] if args.before else [])
    for label, path in sides:
        costs = series_costs(load_store(path), args.n, attrs)
        at10 = statistics.median(costs[5:10])
        atn = statistics.median(costs[args.n - 5 : args.n])
        print(
            f"{label:>9}: store cost per checkpoint (5 families) at the 10th "
            f"{at10 * 1e3:7.1f} ms, at the {args.n}th {atn * 1e3:7.1f} ms "
            f"(ratio {atn / at10:.2f}); total {sum(costs):.1f} s"
        )


if __name__ == "__main__":
    main()

"""Benchmark: streaming similarity vs the reference per-pair code (CPU), side by side.

Usage: python bench/bench_similarity.py [--quick] [--threads N]
1. batched hidden_cos vs a per-pair, per-layer torch loop with numpy conversion per pair;
2. scipy linear_sum_assignment vs networkx minimum_weight_full_matching (reference matching);
3. accumulator bytes after 100 vs 1000 pairs (sums stay constant; pooled retrieval grows).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import networkx as nx
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from probekit.metrics.similarity import SimilarityAccumulator


def reference_hidden_cos(h1: torch.Tensor, h2: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The reference pattern: one pair at a time, per-layer cosine, numpy conversion per pair."""
    L, B = h1.shape[:2]
    out = []
    for i in range(B):
        per_layer = []
        for l in range(L):
            a, b = h1[l, i][mask[i]], h2[l, i][mask[i]]
            per_layer.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        out.append(torch.stack(per_layer).cpu().numpy())
    return np.mean(out, 0)


def bench_cos(pairs: int, T: int, d: int, L: int, bs: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(L, pairs, T, d, generator=g)
    h2 = h1 + torch.randn(L, pairs, T, d, generator=g)
    lens = torch.randint(T // 2, T + 1, (pairs,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    t0 = time.perf_counter()
    ref = reference_hidden_cos(h1, h2, mask)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = SimilarityAccumulator(L, d, metrics=("hidden_cos",), aligned=True)
    for s in range(0, pairs, bs):
        sl = slice(s, s + bs)
        acc.update(h1[:, sl], mask[sl], h2[:, sl], mask[sl], torch.arange(pairs)[sl])
    new = acc.result().hidden_cos.values
    t_new = time.perf_counter() - t0
    return t_ref, t_new, float(np.abs(ref - new).max())


def nx_matching(sim: np.ndarray) -> float:
    """The reference matching: full bipartite nx.Graph with weight = -sim."""
    n1, n2 = sim.shape
    g = nx.Graph()
    for i in range(n1):
        for j in range(n2):
            g.add_edge(("a", i), ("b", j), weight=-sim[i, j])
    m = nx.bipartite.minimum_weight_full_matching(g, top_nodes=[("a", i) for i in range(n1)])
    return float(sum(sim[u[1], v[1]] for u, v in m.items() if u[0] == "a"))


def bench_matching(n: int, k: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    t_nx = t_sp = 0.0
    diff = 0.0
    for _ in range(k):
        sim = rng.uniform(-1, 1, (n, n))
        t0 = time.perf_counter()
        w_nx = nx_matching(sim)
        t_nx += time.perf_counter() - t0
        t0 = time.perf_counter()
        r, c = linear_sum_assignment(sim, maximize=True)
        w_sp = float(sim[r, c].sum())
        t_sp += time.perf_counter() - t0
        diff = max(diff, abs(w_nx - w_sp))
    return t_nx, t_sp, diff


def bench_memory(pair_counts: list[int], T: int, d: int, L: int, bs: int) -> list[tuple]:
    rows = []
    for n in pair_counts:
        g = torch.Generator().manual_seed(1)
        acc = SimilarityAccumulator(L, d, aligned=True, n_groups=20)
        tracemalloc.start()
        for s in range(0, n, bs):
            b = min(bs, n - s)
            h1 = torch.randn(L, b, T, d, generator=g)
            h2 = h1 + torch.randn(L, b, T, d, generator=g)
            m = torch.ones(b, T, dtype=torch.bool)
            acc.update(h1, m, h2, m, torch.arange(s, s + b))
            del h1, h2
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append((n, acc.nbytes_sums, acc.nbytes - acc.nbytes_sums, peak))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    pairs, T, d, L = (50, 64, 128, 3) if q else (200, 128, 256, 5)
    n_match, k_match = (128, 2) if q else (512, 3)

    print(f"torch threads: {torch.get_num_threads()}")
    bench_cos(4, 8, 8, 2, bs=2)  # warm up torch kernels / threads for both paths
    # the brief's size is memory-bandwidth bound (both paths stream every element once); the
    # second size is per-call-overhead bound (short sequences, many layers), where batching pays
    for P, TT, dd, LL in ((pairs, T, d, L), (pairs * 2, 16, 64, 13)):
        print(f"1. hidden_cos, {P} pairs x {TT} tokens x d={dd} x {LL} layers (aligned)")
        t_ref, t_new, diff = bench_cos(P, TT, dd, LL, bs=50)
        print(
            f"   reference loop {t_ref:8.3f} s | batched {t_new:8.3f} s | speedup "
            f"{t_ref / t_new:6.1f}x | max |diff| {diff:.2e}"
        )
        assert diff < 1e-5

    print(f"2. matching, {k_match} matrices {n_match}x{n_match}")
    t_nx, t_sp, diff = bench_matching(n_match, k_match)
    print(
        f"   networkx       {t_nx:8.3f} s | scipy   {t_sp:8.3f} s | speedup "
        f"{t_nx / t_sp:6.0f}x | max |weight diff| {diff:.2e}"
    )
    assert diff < 1e-6

    mp = (100, 1000)
    md, mL, mT = (32, 3, 16) if q else (64, 5, 32)
    print(f"3. memory, all metrics, n_groups=20, d={md}, {mL} layers, {mT} tokens, batches of 50")
    print("   pairs | sums (bytes) | pooled retrieval (bytes) | tracemalloc peak (bytes)")
    for n, sums, pooled, peak in bench_memory(list(mp), mT, md, mL, bs=50):
        print(f"   {n:5d} | {sums:12d} | {pooled:24d} | {peak:12d}")
    per_cell = 3 * 13 * 768 * 768 * 8
    print(
        f"   (d=768, 13 layers, all metrics: {per_cell / 1e6:.0f} MB of d x d sums per cell; "
        f"x20 groups x2 streams = {40 * per_cell / 1e9:.1f} GB)"
    )


if __name__ == "__main__":
    main()

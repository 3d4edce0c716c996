"""Benchmark: batched gradient alignment vs the reference two-backward loop (CPU), side by side.

Usage: python bench/bench_gradients.py [--quick] [--threads 1] [--pairs 32] [--seq 128] [--dots]

For each setting (the `nano`, `tiny`, `cpu` presets with vocab 1024 = clones of a 512-piece
BPE, T=128, and one wider setting) it times, interleaved and best of --repeat:
  * reference : gradient_alignment_reference (tests/oracles.py), two full backward passes per
                pair, every parameter gradient flattened (the authors' loop);
  * batched   : probekit.metrics.gradients.gradient_alignment (hooks + activation-only backward,
                ghost / explicit per-tensor inner products), chunk 16 and chunk 32;
  * vmap      : a candidate (NOT in probekit): torch.func per-example gradients,
                vmap(grad(loss)) over a chunk of sequences without an attention mask (right
                padding + causal attention: real tokens never see pads, pad targets carry no
                loss), then the same per-tensor dots / QKV split / block sums / _finish.
Every method's per-tensor cosines must agree with the reference to 1e-4.

``--dots`` instead times the two ways of forming one weight's per-pair inner products
(``_dots_linear``: ghost Grams vs explicit per-sequence gradients) for each linear layer shape
of the tiny and cpu presets (16 pairs, T=128), and names the one "auto" picks.

Threads: default 1. On the shared 2-core box two torch threads thrash whenever another job runs
(measured up to 40x slower per small op), which makes any timing meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the reference loop is a test-only oracle: it lives in the repo's tests/oracles.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np
import torch
import torch.nn.functional as F
from oracles import gradient_alignment_reference

from probekit.metrics import gradients as G
from probekit.metrics.gradients import gradient_alignment
from probekit.training import build_model


def param_key(name: str, n_layers: int) -> tuple[int, str]:
    """Map a GPT2LMHeadModel parameter name to (layer, tensor)."""
    if name.startswith("transformer.h."):
        rest = name[len("transformer.h.") :]
        lay, t = rest.split(".", 1)
        return int(lay) + 1, t
    if name == "lm_head.weight":
        return n_layers + 1, name
    t = name[len("transformer.") :]
    return (0 if t.startswith(("wte", "wpe")) else n_layers + 1), t


def qkv_split(key: tuple[int, str], g: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    lay, t = key
    if not t.startswith("attn.c_attn"):
        return {}
    kind = t.rsplit(".", 1)[1]
    parts = g.chunk(3, dim=-1)  # Conv1D weight [in, 3d] / bias [3d]: columns q | k | v
    return {(lay, f"attn.{p}.{kind}"): parts[i] for i, p in enumerate("qkv")}


def vmap_alignment(model, ids1, mask1, ids2, mask2, chunk_size: int = 16):
    """Per-example gradients with torch.func; same output as gradient_alignment."""
    from torch.func import functional_call, grad, vmap

    G._check_model(model)
    G._check_inputs(ids1, mask1, ids2, mask2)
    n_layers = len(model.transformer.h)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    keys = [param_key(n, n_layers) for n in names]

    def loss(p, ids, mask):
        # no attention mask: right padding + causal attention, so real positions never attend
        # to pads, and pad targets are excluded from the loss -> identical gradients
        # inputs_embeds (looked up here, so wte still gets its gradient): HF's pad-token
        # warning check on input_ids is data-dependent control flow, which vmap refuses
        emb = p["transformer.wte.weight"][ids[None]]
        logits = functional_call(model, p, args=(), kwargs={"inputs_embeds": emb}).logits[0]
        valid = (mask[1:] & mask[:-1]).to(logits.dtype)
        ce = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
        return (ce * valid).sum() / valid.sum()

    per_ex = vmap(grad(loss), in_dims=(None, 0, 0))
    stats: dict = {}

    def add(key, dots):
        lst = stats.setdefault(key, [[], [], []])
        for i, v in enumerate(dots):
            lst[i].append(v.numpy())

    with G._eval_mode(model):
        for lo in range(0, ids1.shape[0], chunk_size):
            sl = slice(lo, lo + chunk_size)
            g1 = per_ex(params, ids1[sl], mask1[sl].bool())
            g2 = per_ex(params, ids2[sl], mask2[sl].bool())
            block: dict = {}
            for n, key in zip(names, keys, strict=True):
                dots = G._dots_vec(g1[n], g2[n])
                add(key, dots)
                acc = block.setdefault(key[0], [0, 0, 0])
                for i in range(3):
                    acc[i] = acc[i] + dots[i]
                for k2, s1 in qkv_split(key, g1[n]).items():
                    add(k2, G._dots_vec(s1, qkv_split(key, g2[n])[k2]))
            for lay, dots in block.items():
                add((lay, "block"), dots)
    merged = {k: [np.concatenate(x) for x in v] for k, v in stats.items()}
    return G._to_dataarray(G._finish(merged), n_layers, ids1.shape[0], "vmap per-example")


def data(n: int, t: int, vocab: int, seed: int = 1):
    half = vocab // 2
    g = torch.Generator().manual_seed(seed)
    ids1 = torch.randint(1, half, (n, t), generator=g)
    ids2 = ids1 + half  # cloned language: same tokens, disjoint ids
    lens = torch.randint(t // 2, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    ids1[~mask] = 0
    ids2[~mask] = 0
    return ids1, mask, ids2, mask


def bench(name: str, model_cfg: dict, vocab: int, n: int, t: int, repeat: int, vm: bool):
    model = build_model(model_cfg, vocab, seed=0).eval()
    n_par = sum(p.numel() for p in model.parameters())
    ids1, m1, ids2, m2 = data(n, t, vocab)
    methods = {
        "reference": lambda: gradient_alignment_reference(model, ids1, m1, ids2, m2),
        "batched c16": lambda: gradient_alignment(model, ids1, m1, ids2, m2, chunk_size=16),
        "batched c32": lambda: gradient_alignment(model, ids1, m1, ids2, m2, chunk_size=32),
    }
    if vm:
        methods["vmap c16"] = lambda: vmap_alignment(model, ids1, m1, ids2, m2, 16)
        methods["vmap c8"] = lambda: vmap_alignment(model, ids1, m1, ids2, m2, 8)
    # warm-up on 2 pairs
    gradient_alignment(model, ids1[:2], m1[:2], ids2[:2], m2[:2])
    if vm:
        vmap_alignment(model, ids1[:2], m1[:2], ids2[:2], m2[:2])
    best, res = {}, {}
    for _ in range(repeat):  # interleaved, best of: robust to a busy shared machine
        for k, f in methods.items():
            t0 = time.perf_counter()
            res[k] = f()
            best[k] = min(best.get(k, 1e9), time.perf_counter() - t0)
    ref = res["reference"]
    rows = []
    for k in methods:
        diff = float(np.nanmax(np.abs(res[k].values - ref.values)))
        same_nan = bool((np.isnan(res[k].values) == np.isnan(ref.values)).all())
        assert diff <= 1e-4 and same_nan, (name, k, diff, same_nan)
        rows.append((name, n_par, k, best[k], best["reference"] / best[k], diff))
    return rows


def bench_dots(t: int, repeat: int) -> None:
    """Ghost vs explicit inner products per layer shape, and the one "auto" picks."""
    print(f"_dots_linear, 16 pairs x T={t}, best of {repeat} (interleaved), ms")
    print(f"{'d':>4s} {'in':>5s} {'out':>5s} {'split':>5s} | {'ghost':>7s} {'explicit':>8s} | auto")
    rng = torch.Generator().manual_seed(0)
    for d in (128, 256):  # tiny, cpu: c_attn (split q/k/v), c_proj, c_fc, mlp.c_proj, lm_head
        shapes = ((d, 3 * d, 3), (d, d, 1), (d, 4 * d, 1), (4 * d, d, 1), (d, 512, 1))
        for n_in, n_out, splits in shapes:
            a1, a2 = (torch.randn(16, t, n_in, generator=rng) for _ in range(2))
            e1, e2 = (torch.randn(16, t, n_out, generator=rng) for _ in range(2))
            best = {"ghost": float("inf"), "explicit": float("inf")}
            for _ in range(repeat):
                for m in best:
                    t0 = time.perf_counter()
                    G._dots_linear(a1, e1, a2, e2, splits=splits, method=m)
                    best[m] = min(best[m], time.perf_counter() - t0)
            pick = G._dots_method(16, t, t, n_in, n_out)
            print(
                f"{d:4d} {n_in:5d} {n_out:5d} {splits:5d} | {best['ghost'] * 1e3:7.2f} "
                f"{best['explicit'] * 1e3:8.2f} | {pick}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=0, help="pairs (default 32, quick 16)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=0, help="best of (default 3, quick 1)")
    ap.add_argument("--no-vmap", action="store_true")
    ap.add_argument("--dots", action="store_true", help="ghost vs explicit per layer shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dots:
        bench_dots(args.seq, args.repeat or 5)
        return
    n = args.pairs or (16 if args.quick else 32)
    rep = args.repeat or (1 if args.quick else 3)
    t, v = args.seq, args.vocab
    settings = [
        ("nano", {"preset": "nano", "context": t}),
        ("tiny", {"preset": "tiny", "context": t}),
        ("cpu", {"preset": "cpu", "context": t}),
    ]
    if not args.quick:
        settings.append(
            (
                "wide 6x512",
                {
                    "preset": "cpu",
                    "n_layer": 6,
                    "n_embd": 512,
                    "n_head": 8,
                    "n_inner": 2048,
                    "context": t,
                },
            )
        )
    print(
        f"gradient alignment, vocab {v}, {n} pairs x T={t} (lengths T/2..T), "
        f"{torch.get_num_threads()} torch thread(s), best of {rep} (interleaved)"
    )
    print(
        f"{'setting':11s} {'params':>9s} | {'method':12s} | {'time s':>7s} | "
        f"{'vs ref':>6s} | max|dcos|"
    )
    for name, cfg in settings:
        for row in bench(name, cfg, v, n, t, rep, not args.no_vmap):
            nm, npar, k, sec, sp, diff = row
            print(f"{nm:11s} {npar:9d} | {k:12s} | {sec:7.2f} | {sp:5.1f}x | {diff:.1e}")


if __name__ == "__main__":
    main()

"""Gradient alignment between parallel sequences of two languages (paper §3.4, Figs. 11-13).

For each pair (L1 sequence, L2 sequence) the loss is the mean-token cross-entropy of one sequence
(pad targets ignored). For every parameter tensor P we take cos(grad_P L1, grad_P L2) and average
the cosine over pairs.

Fast path (``gradient_alignment``): one forward/backward per chunk and language, with hooks that
record each layer's input activations and output gradients. Per-sequence gradients are never
needed in full: for a GPT-2 ``Conv1D`` (y = x W + b) the gradient of sequence i is
g_i = sum_t a_t^T d_t, so <g_1, g_2> = sum_{t,s} (a1_t . a2_s)(d1_t . d2_s) (the "ghost" inner
product); we use that or the explicit per-sequence gradient, whichever costs fewer flops.
Biases, LayerNorms and embeddings have their own closed forms (see ``_dots_*``). Sequences in a
batch do not interact (causal attention with a padding mask), so the per-position output
gradients of a summed batch loss are exactly the per-sequence ones.

Reference: ``gradient_alignment_reference`` in tests/oracles.py, an independent
two-backward-per-pair loop (test-only oracle; tests and bench/ compare this module to it).

Output ``grad_cos`` dims (layer, tensor):
  - layer 1..L: block tensors named as under ``transformer.h.{l}`` (``ln_1.weight``,
    ``attn.c_attn.weight``, ...), plus the paper's split of the fused QKV projection
    (``attn.q.weight``, ``attn.k.bias``, ...: column slices of ``attn.c_attn``), plus ``block``:
    one cosine over all parameters of the block (QKV splits not double counted).
  - layer 0: ``wte.weight``, ``wpe.weight`` and ``block`` (both together).
  - layer L+1: ``ln_f.weight``, ``ln_f.bias``, ``lm_head.weight`` and ``block``.
  Cells that do not exist (e.g. ``wte.weight`` at layer 3) are NaN. The paper's 16-tensor mean
  uses ``PAPER_TENSORS`` over layers 1..L. ``attn.k.bias`` is NaN: its gradient is zero up to
  rounding (see ``ZERO_TOL``); the paper's K.bias row is rounding noise. For cloned languages
  ``wte``/``lm_head`` gradients touch (mostly) disjoint rows, so their cosine is ~0 by
  construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from probekit.errors import MetricError
from probekit.hooks import pad_batch
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable

BLOCK_TENSORS = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]
QKV_TENSORS = [f"attn.{p}.{w}" for p in "qkv" for w in ("weight", "bias")]
EMBED_TENSORS = ["wte.weight", "wpe.weight"]
FINAL_TENSORS = ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
TENSORS = BLOCK_TENSORS + QKV_TENSORS + EMBED_TENSORS + FINAL_TENSORS + ["block"]
# The 16 per-block tensors of the paper's heat-maps (Q/K/V split, fused c_attn excluded).
PAPER_TENSORS = [t for t in BLOCK_TENSORS if not t.startswith("attn.c_attn")] + QKV_TENSORS

_DEFINITION = (
    "Cosine between the loss gradients (mean-token CE, pad ignored) of an L1 sequence and its "
    "parallel L2 sequence for one parameter tensor, averaged over pairs."
)


def _check_model(model: torch.nn.Module) -> None:
    if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        raise MetricError("gradient alignment needs a transformers GPT2LMHeadModel")
    # a tied lm_head is fine: the hooks see the input use (wte's output) and the output use
    # (lm_head's input) of the shared matrix separately, reported as wte.weight / lm_head.weight
    known = {
        f"transformer.h.{lay}.{t}" for lay in range(len(model.transformer.h)) for t in BLOCK_TENSORS
    }
    known |= {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    }
    extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in known]
    if extra:
        raise MetricError(f"unsupported parameters for gradient alignment: {extra[:5]}")


def _check_inputs(ids1, mask1, ids2, mask2) -> None:
    for name, ids, mask in (("1", ids1, mask1), ("2", ids2, mask2)):
        if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
            raise MetricError(
                f"ids{name}/mask{name} must both be [N, T], got "
                f"{tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        n_targets = (mask[:, 1:].bool() & mask[:, :-1].bool()).sum(1)
        if (n_targets == 0).any():
            raise MetricError(f"a sequence of language {name} has fewer than 2 real tokens")
    if ids1.shape[0] != ids2.shape[0] or ids1.shape[0] == 0:
        raise MetricError(
            f"need the same positive number of L1 and L2 sequences, got "
            f"{ids1.shape[0]} and {ids2.shape[0]}"
        )


def _seq_losses(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-token CE of each sequence [B]; a target counts when it and its context are real."""
    mask = mask.bool()
    # the loss in float32 whatever the model computes in (--dtype); a no-op for float32
    logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()
    valid = (mask[:, 1:] & mask[:, :-1]).to(logits.dtype)
    # over [B * (T-1), V] rows, as HF's own loss: a third of the time of the class axis
    # strided through [B, V, T-1]
    lg = logits[:, :-1]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (ce.view(valid.shape) * valid).sum(1) / valid.sum(1)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    # No dropout: the gradients must be deterministic functions of the weights. Grad mode is
    # forced on so that callers inside torch.no_grad() (e.g. an analysis loop) still work.
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was)


def _to_dataarray(
    cos: dict[tuple[int, str], float], n_layers: int, n_pairs: int, method: str
) -> xr.DataArray:
    data = np.full((n_layers + 2, len(TENSORS)), np.nan)
    for (lay, t), v in cos.items():
        data[lay, TENSORS.index(t)] = v
    return xr.DataArray(
        data,
        dims=("layer", "tensor"),
        coords={"layer": np.arange(n_layers + 2), "tensor": TENSORS},
        name="grad_cos",
        attrs={
            "definition": _DEFINITION,
            "n_pairs": int(n_pairs),
            "loss": "mean-token cross-entropy per sequence, pad targets ignored",
            "layers": "0 = wte/wpe, 1..L = blocks, L+1 = ln_f/lm_head",
            "paper_tensors": ",".join(PAPER_TENSORS),
            "method": method,
        },
    )


# A tensor whose gradient norm is below ZERO_TOL x its block's gradient norm is treated as having
# zero gradient: its cosine is undefined (NaN) for that pair. This catches attn.k.bias, whose
# gradient is exactly zero in exact arithmetic (a constant added to every key score of a query
# cancels in the softmax), so any cosine computed from it only measures rounding noise.
ZERO_TOL = 1e-6
# The same in bfloat16 / float16 forwards and backwards (--dtype), whose rounding is 2**16
# (2**13) times float32's: on the nano checkpoint the key bias' relative gradient norm is 2e-10
# in float32, 3e-6 in bfloat16, 7e-7 in float16, the smallest real one (attn.q.bias) 7e-4.
ZERO_TOL_REDUCED = 1e-4


def zero_tol(model: torch.nn.Module) -> float:
    """ZERO_TOL for a model computing in float32 or float64, else ZERO_TOL_REDUCED."""
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return ZERO_TOL if dt in (torch.float32, torch.float64) else ZERO_TOL_REDUCED


def _finish(stats: dict[tuple[int, str], list[np.ndarray]], tol: float = ZERO_TOL) -> dict:
    cos = {}
    for key, (d, a, b) in stats.items():
        ba, bb = stats[(key[0], "block")][1:]
        zero = (a <= tol**2 * ba) | (b <= tol**2 * bb)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(zero, np.nan, d / np.sqrt(a * b))
        cos[key] = float(np.nanmean(c)) if np.isfinite(c).any() else float("nan")
    return cos


# ---------------------------------------------------------------------------------------------
# Fast path


class _Recorder:
    """Forward hooks that keep each module's input (detached) and output (for autograd.grad)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        tr = model.transformer
        mods: dict[str, torch.nn.Module] = {
            "wte": tr.wte,
            "wpe": tr.wpe,
            "ln_f": tr.ln_f,
            "lm_head": model.lm_head,
        }
        for lay, blk in enumerate(tr.h):
            for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                mods[f"{lay + 1}:{sub}"] = blk.get_submodule(sub)
        for name, mod in mods.items():
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(mod, args, out):
            self.inputs[name] = args[0].detach()
            self.outputs[name] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _ln_hat(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    """The normalised input (x - mean) / sqrt(var + eps) that the LayerNorm scales: its own
    fused kernel without the affine part (a tenth of the time of mean and var apart)."""
    return F.layer_norm(x, x.shape[-1:], eps=ln.eps)


def _gram_dots(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """[B, T1, d], [B, T2, d] -> [B, T1, T2] of row inner products."""
    return torch.bmm(x1, x2.transpose(1, 2))


def _bdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products [B, ...] x [B, ...] -> [B] (float64 result). torch's vectorised
    reduction keeps many float32 partial sums: measured against the float64 oracle it is as
    exact as float64 dots, where a batched GEMV's single running float32 sum lost 5e-5 of a
    cosine over 65k-term dots, and 5x faster than that GEMV."""
    return torch.linalg.vecdot(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)).double()


def _dots_vec(v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence gradients given explicitly as [B, ...]."""
    v1, v2 = v1.flatten(1), v2.flatten(1)
    return _bdot(v1, v2), _bdot(v1, v1), _bdot(v2, v2)


def _dots_method(bsz: int, t1: int, t2: int, n_in: int, n_out: int) -> str:
    """ "ghost" or "explicit": the cheaper way to form one weight's per-pair inner products."""
    explicit = (t1 + t2) * n_in * n_out + 3 * n_in * n_out
    ghost = (t1 * t2 + t1 * t1 + t2 * t2) * (n_in + n_out)
    grad_bytes = bsz * n_in * n_out * 4
    # Explicit per-sequence gradients cost B x in x out floats per side; above ~256 MB (e.g. a
    # 32k-vocabulary lm_head) the ghost Grams, whose memory is B x T1 x T2, are taken.
    if grad_bytes > 256 * 2**20:
        return "ghost"
    # Measured on CPU (bench/bench_gradients.py --dots): explicit gradients of up to 4 MiB per
    # side stay in cache and run at the Gram GEMMs' speed per flop; larger ones are
    # memory-bound (written, then read back) and run at about half of it.
    slow = 1 if grad_bytes <= 4 * 2**20 else 2
    return "explicit" if slow * explicit <= ghost else "ghost"


def _dots_linear(
    a1: torch.Tensor,
    d1: torch.Tensor,
    a2: torch.Tensor,
    d2: torch.Tensor,
    splits: int = 1,
    method: str = "auto",
) -> list[tuple[torch.Tensor, ...]]:
    """Dots of g = sum_t a_t^T d_t ([in, out]); returns the full tensor then each of ``splits``
    equal column blocks when splits > 1 (the full dots are the blocks' sums). Ghost or
    explicit, whichever is expected to be faster."""
    bsz, t1, n_in = a1.shape
    t2, n_out = a2.shape[1], d1.shape[-1]
    pieces = list(zip(d1.chunk(splits, -1), d2.chunk(splits, -1), strict=True))
    if method == "explicit" or (
        method == "auto" and _dots_method(bsz, t1, t2, n_in, n_out) == "explicit"
    ):
        a1t, a2t = a1.transpose(1, 2), a2.transpose(1, 2)
        parts = [_dots_vec(torch.bmm(a1t, e1), torch.bmm(a2t, e2)) for e1, e2 in pieces]
    else:
        ga = (_gram_dots(a1, a2), _gram_dots(a1, a1), _gram_dots(a2, a2))
        parts = [
            tuple(
                _bdot(x, y)
                for x, y in zip(
                    ga, (_gram_dots(e1, e2), _gram_dots(e1, e1), _gram_dots(e2, e2)), strict=True
                )
            )
            for e1, e2 in pieces
        ]
    if splits == 1:
        return parts
    return [tuple(sum(p[i] for p in parts) for i in range(3)), *parts]


def _dots_embedding(
    i1: torch.Tensor, e1: torch.Tensor, i2: torch.Tensor, e2: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Embedding rows: g = sum_t onehot(i_t) d_t^T, so
    <g1, g2> = sum_{t,s} [i1_t == i2_s] d1_t . d2_s."""

    def one(ia, ea, ib, eb):
        same = (ia[:, :, None] == ib[:, None, :]).to(ea.dtype)
        return _bdot(same, _gram_dots(ea, eb))

    return one(i1, e1, i2, e2), one(i1, e1, i1, e1), one(i2, e2, i2, e2)


def _capture(model, ids, mask):
    """One forward/backward; returns masked inputs / output-grads per recorded module."""
    rec = _Recorder(model)
    try:
        losses = _seq_losses(model, ids, mask)
        names = list(rec.outputs)
        outs = [rec.outputs[n] for n in names]
        # wpe's output is [1, T, d], broadcast over the batch: its grad would be summed over
        # sequences, so positions use the grad at wte's output (h = wte + wpe).
        keep = [n for n in names if n != "wpe"]
        grads = torch.autograd.grad(losses.sum(), [outs[names.index(n)] for n in keep])
    finally:
        rec.remove()
    m = mask.bool()[:, :, None].to(ids.device)
    full = bool(m.all())

    def clean(x: torch.Tensor) -> torch.Tensor:
        # Output-grads at pad positions are zero already (no loss term reads them); zeroing
        # them explicitly keeps the sums exact whatever the attention kernel does there.
        x = x.detach().float()
        return x if full else torch.where(m, x, 0.0)

    gr = {n: clean(g) for n, g in zip(keep, grads, strict=True)}
    # Inputs need no masking: every product pairs them with a (zeroed) output-grad.
    ins = {n: x.float() for n, x in rec.inputs.items() if n not in ("wte", "wpe")}
    pos = rec.inputs["wpe"].expand(ids.shape[0], -1)
    return {"ids": ids, "pos": pos, "grads": gr, "ins": ins}


def gradient_alignment(
    model: torch.nn.Module,
    ids1: torch.Tensor,
    mask1: torch.Tensor,
    ids2: torch.Tensor,
    mask2: torch.Tensor,
    chunk_size: int = 16,
    method: str = "auto",
) -> xr.DataArray:
    """Per-tensor gradient cosine of parallel L1/L2 sequences, averaged over pairs.

    ids1/mask1: [N, T] L1 token ids and attention mask (True/1 = real token); ids2/mask2:
    [N, T'] the parallel L2 sequences. Pairs are processed ``chunk_size`` at a time (memory:
    activations of 2 x chunk_size sequences plus, per weight, at most 2 x chunk_size gradients).
    ``method`` ("auto", "ghost", "explicit") picks how weight-gradient inner products are
    formed; "auto" picks per tensor by a flop/memory estimate (both are exact).
    Returns ``grad_cos`` (layer, tensor); see the module docstring for the layout.
    """
    _check_model(model)
    _check_inputs(ids1, mask1, ids2, mask2)
    if method not in ("auto", "ghost", "explicit"):
        raise MetricError(f"unknown method {method!r}; use auto, ghost or explicit")
    if chunk_size < 1:
        raise MetricError(f"chunk_size must be >= 1, got {chunk_size}")
    tr = model.transformer
    n_layers = len(tr.h)
    stats: dict[tuple[int, str], list[list[np.ndarray]]] = {}

    def add(key, dots):
        lst = stats.setdefault(key, [[], [], []])
        for i, v in enumerate(dots):
            lst[i].append(v.detach().cpu().numpy())

    with _eval_mode(model):
        for lo in range(0, ids1.shape[0], chunk_size):
            sl = slice(lo, lo + chunk_size)
            c1 = _capture(model, ids1[sl], mask1[sl])
            c2 = _capture(model, ids2[sl], mask2[sl])
            block: dict[int, list[torch.Tensor]] = {}

            def put(lay, t, dots, to_block=True, block=block):
                add((lay, t), dots)
                if to_block:
                    acc = block.setdefault(lay, [0, 0, 0])
                    for i in range(3):
                        acc[i] = acc[i] + dots[i]

            g1, g2, x1, x2 = c1["grads"], c2["grads"], c1["ins"], c2["ins"]
            put(0, "wte.weight", _dots_embedding(c1["ids"], g1["wte"], c2["ids"], g2["wte"]))
            put(0, "wpe.weight", _dots_embedding(c1["pos"], g1["wte"], c2["pos"], g2["wte"]))
            for lay in range(1, n_layers + 1):
                blk = tr.h[lay - 1]
                for ln in ("ln_1", "ln_2"):
                    n = f"{lay}:{ln}"
                    mod = blk.get_submodule(ln)
                    h1, h2 = _ln_hat(x1[n], mod), _ln_hat(x2[n], mod)
                    # LayerNorm: grad_gamma = sum_t xhat_t * d_t, grad_beta = sum_t d_t.
                    put(lay, f"{ln}.weight", _dots_vec((h1 * g1[n]).sum(1), (h2 * g2[n]).sum(1)))
                    put(lay, f"{ln}.bias", _dots_vec(g1[n].sum(1), g2[n].sum(1)))
                for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                    n = f"{lay}:{sub}"
                    qkv = sub == "attn.c_attn"
                    w = _dots_linear(
                        x1[n], g1[n], x2[n], g2[n], splits=3 if qkv else 1, method=method
                    )
                    b1, b2 = g1[n].sum(1), g2[n].sum(1)
                    put(lay, f"{sub}.weight", w[0])
                    put(lay, f"{sub}.bias", _dots_vec(b1, b2))
                    if qkv:
                        for i, p in enumerate("qkv"):
                            put(lay, f"attn.{p}.weight", w[1 + i], to_block=False)
                            put(
                                lay,
                                f"attn.{p}.bias",
                                _dots_vec(b1.chunk(3, -1)[i], b2.chunk(3, -1)[i]),
                                to_block=False,
                            )
            fin = n_layers + 1
            h1, h2 = _ln_hat(x1["ln_f"], tr.ln_f), _ln_hat(x2["ln_f"], tr.ln_f)
            put(fin, "ln_f.weight", _dots_vec((h1 * g1["ln_f"]).sum(1), (h2 * g2["ln_f"]).sum(1)))
            put(fin, "ln_f.bias", _dots_vec(g1["ln_f"].sum(1), g2["ln_f"].sum(1)))
            # lm_head (Linear, weight [V, d]): g = sum_t dlogits_t^T h_t -> same as Conv1D.
            put(
                fin,
                "lm_head.weight",
                _dots_linear(
                    x1["lm_head"], g1["lm_head"], x2["lm_head"], g2["lm_head"], method=method
                )[0],
            )
            for lay, dots in block.items():
                add((lay, "block"), dots)
    merged = {k: [np.concatenate(x) for x in v] for k, v in stats.items()}
    return _to_dataarray(
        _finish(merged, zero_tol(model)),
        n_layers,
        ids1.shape[0],
        f"batched hooks, per-tensor inner products ({method})",
    )


# ---------------------------------------------------------------------------------------------
# Any architecture: explicit per-sequence gradients


@contextmanager
def _untied(model: torch.nn.Module):
    """Give a tied output projection its own copy of the matrix for the duration, so the
    gradients of its input use and its output use are told apart; restored afterwards."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        yield False
        return
    shared = out.weight
    out.weight = torch.nn.Parameter(shared.detach().clone())
    try:
        yield True
    finally:
        out.weight = shared


def _n_heads(config) -> int:  # noqa: ANN001 - a transformers config
    for key in ("num_attention_heads", "n_head"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise MetricError("cannot split the fused QKV projection: the config names no head count")


def _sequence_grads(model, params, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The loss gradient of one sequence (its real tokens only) for every parameter."""
    real = ids[mask.bool()][None]
    loss = _seq_losses(model, real, torch.ones_like(real, dtype=torch.bool))[0]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def gradient_alignment_general(
    model: torch.nn.Module,
    view,  # noqa: ANN001 - a probekit.model_view.ModelView
    ids1: torch.Tensor,
    mask1: torch.Tensor,
    ids2: torch.Tensor,
    mask2: torch.Tensor,
) -> xr.DataArray:
    """``grad_cos`` (layer 0..L+1, tensor) for any causal LM the model view knows: two
    backward passes per pair (one per sequence), exact, float64 inner products.

    ``tensor`` holds canonical names (``attn.q.weight``, ``mlp.gate.weight``, ``norm1.weight``,
    ..., see ``probekit.model_view.CANONICAL_TENSORS``) plus ``block``; the coordinate ``raw``
    gives each one's parameter name in the model (block-relative inside blocks). A fused QKV
    projection is reported whole (``attn.qkv``) and split per head into q, k, v. With tied
    embeddings ``embed.weight`` is the gradient through the input use and ``lm_head.weight``
    through the output use of the one shared matrix.
    """
    _check_inputs(ids1, mask1, ids2, mask2)
    n_heads = None
    stats: dict[tuple[int, str], list[list[float]]] = {}
    raw: dict[str, str] = {}
    with _eval_mode(model), _untied(model) as tied:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        keys = [view.canonical(n) for n, _ in named]
        params = [p for _, p in named]
        for (lay, canon, _), (name, _) in zip(keys, named, strict=True):
            raw.setdefault(canon, name if lay in (0, view.n_layers + 1) else _block_rel(name))
        for i in range(ids1.shape[0]):
            g1 = _sequence_grads(model, params, ids1[i], mask1[i])
            g2 = _sequence_grads(model, params, ids2[i], mask2[i])
            block: dict[int, list[float]] = {}
            for (lay, canon, fused), (name, _), a, b in zip(keys, named, g1, g2, strict=True):
                dots = _dots64(a, b)
                _add(stats, (lay, canon), dots)
                acc = block.setdefault(lay, [0.0, 0.0, 0.0])
                for j in range(3):
                    acc[j] += dots[j]
                if fused:
                    n_heads = n_heads or _n_heads(model.config)
                    kind = canon.rsplit(".", 1)[1]
                    pa = a.reshape(n_heads, 3, -1, *a.shape[1:])
                    pb = b.reshape(n_heads, 3, -1, *b.shape[1:])
                    for j, part in enumerate("qkv"):
                        key = f"attn.{part}.{kind}"
                        raw.setdefault(key, f"{_block_rel(name)}[{part}]")
                        _add(stats, (lay, key), _dots64(pa[:, j], pb[:, j]))
            for lay, dots in block.items():
                _add(stats, (lay, "block"), dots)
            del g1, g2
    merged = {k: [np.asarray(x) for x in v] for k, v in stats.items()}
    cos = _finish(merged, zero_tol(model))
    tensors = list(dict.fromkeys(t for _, t in cos if t != "block")) + ["block"]
    data = np.full((view.n_layers + 2, len(tensors)), np.nan)
    for (lay, t), v in cos.items():
        data[lay, tensors.index(t)] = v
    return xr.DataArray(
        data,
        dims=("layer", "tensor"),
        coords={
            "layer": np.arange(view.n_layers + 2),
            "tensor": tensors,
            "raw": ("tensor", [raw.get(t, "") for t in tensors]),
        },
        name="grad_cos",
        attrs={
            "definition": _DEFINITION,
            "n_pairs": int(ids1.shape[0]),
            "loss": "mean-token cross-entropy per sequence, pad targets ignored",
            "layers": "0 = embeddings, 1..L = blocks, L+1 = final norm / head",
            "method": "explicit per-sequence gradients (two backward passes per pair)",
            "architecture": view.arch,
            "tied_embeddings": int(tied),
        },
    )


def _block_rel(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[idx + 1 :]) if idx is not None else name


def _dots64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    return float(a @ b), float(a @ a), float(b @ b)


def _add(stats: dict, key: tuple[int, str], dots) -> None:  # noqa: ANN001
    lst = stats.setdefault(key, [[], [], []])
    for j in range(3):
        lst[j].append(float(dots[j]))


def mean_paper_tensors(grad_cos: xr.DataArray) -> float:
    """The paper's "Mean": unweighted mean over PAPER_TENSORS x blocks 1..L (NaN cells, i.e.
    attn.k.bias, skipped). Other architectures: over their block tensors (canonical names,
    a fused QKV counted as its q, k, v split)."""
    # blocks only: layer 0 (embeddings) and, where present, L+1 (ln_f, lm_head) hold none of
    # the paper's tensors, so their cells are NaN and drop out of the mean either way
    names = PAPER_TENSORS
    if "raw" in grad_cos.coords:  # other architectures: every block tensor, QKV as split
        names = [
            t
            for t in grad_cos["tensor"].values
            if t != "block" and not str(t).startswith("attn.qkv")
        ]
    sub = grad_cos.sel(layer=grad_cos.layer >= 1, tensor=names)
    val = float(sub.mean())
    return val if not math.isnan(val) else float("nan")


class Gradients(Family):
    """Cosine between the loss gradients of parallel L1 and L2 sequences, per parameter tensor
    and layer; the final norm and head have their own `head_tensor` dimension."""

    name = "gradients"
    variables = (
        Variable("grad_cos", "gradient cosine", _DEFINITION),
        Variable("grad_cos_head", "gradient cosine of the final norm and head"),
    )
    needs = Needs(gradients=True)

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        par = ctx.series.parallel
        n = min(ctx.options.n_grad_pairs, len(par))
        dev = next(ctx.model.parameters()).device
        ids1, m1, ids2, m2 = (
            t.to(dev) for t in (*pad_batch(par.ids1[:n]), *pad_batch(par.ids2[:n]))
        )
        with torch.enable_grad():
            if type(ctx.model).__name__ == "GPT2LMHeadModel":  # the fast ghost path
                da = gradient_alignment(ctx.model, ids1, m1, ids2, m2)
            else:
                da = gradient_alignment_general(ctx.model, ctx.view, ids1, m1, ids2, m2)
        # the final norm and head sit at layer L+1 there; keep them out of the shared
        # `layer` axis (0..L), where they would leave every other metric a NaN row
        head = int(da["layer"].max())
        ds = da.sel(layer=slice(0, head - 1)).to_dataset(name="grad_cos")
        final = da.sel(layer=head).drop_vars("layer").dropna("tensor", how="all")
        if "raw" in final.coords:  # the head's raw names travel on its own dimension
            final = final.rename(raw="head_raw")
        ds["grad_cos_head"] = final.rename(tensor="head_tensor")
        ds["grad_cos_head"].attrs["definition"] = (
            "gradient cosine of the final LayerNorm and LM head"
        )
        return ds

"""Slow, independent reference implementations that tests (and bench/) compare the library to.

They are written from the metrics' definitions, not from the library's code: they import only
public constants from probekit (``TENSORS``, ``ZERO_TOL``), so a bug in a library helper cannot
hide by being shared with its oracle.

* ``gradient_alignment_reference``: per-tensor gradient cosine of parallel sequences with two
  ``torch.autograd.grad`` calls per pair (probekit.metrics.gradients.gradient_alignment).
* ``cka_debiased_gram`` / ``cka_biased_gram``: linear CKA from n x n Gram matrices
  (probekit.metrics.similarity's streaming ``cka`` / ``cka_biased``).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from probekit.metrics.gradients import TENSORS, ZERO_TOL

# ------------------------------------------------------------------------- gradient alignment

_BLOCK_PARAM = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def _layer_and_tensor(name: str, n_layers: int) -> tuple[int, str]:
    """GPT2LMHeadModel parameter name -> (layer, tensor): layer 0 = wte/wpe, 1..L = blocks,
    L+1 = ln_f/lm_head."""
    m = _BLOCK_PARAM.fullmatch(name)
    if m:
        lay, tensor = int(m.group(1)) + 1, m.group(2)
    elif name in ("transformer.wte.weight", "transformer.wpe.weight"):
        lay, tensor = 0, name.removeprefix("transformer.")
    elif name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        lay, tensor = n_layers + 1, name.removeprefix("transformer.")
    elif name == "lm_head.weight":
        lay, tensor = n_layers + 1, name
    else:
        raise ValueError(f"oracle: unexpected parameter {name}")
    if tensor not in TENSORS or tensor.startswith(("attn.q.", "attn.k.", "attn.v.")):
        raise ValueError(f"oracle: unexpected parameter {name}")
    return lay, tensor


def _qkv_columns(tensor: str, grad: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """attn.c_attn (GPT-2 Conv1D, y = x W + b; W [d, 3d], b [3d]) -> its q | k | v columns."""
    if not tensor.startswith("attn.c_attn."):
        return {}
    kind = tensor.removeprefix("attn.c_attn.")  # weight / bias
    assert grad.shape[-1] == 3 * width, (tensor, tuple(grad.shape), width)
    return {
        f"attn.{part}.{kind}": grad[..., i * width : (i + 1) * width]
        for i, part in enumerate("qkv")
    }


def _sequence_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets of ONE sequence [T] that are real and whose previous
    token (the context position that predicts them) is real too."""
    mask = mask.bool()
    logits = model(input_ids=ids[None], attention_mask=mask[None].long()).logits[0]  # [T, V]
    logp = F.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]  # [T-1]
    counted = mask[1:] & mask[:-1]
    if not counted.any():
        raise ValueError("oracle: a sequence has fewer than 2 real tokens")
    return -logp[counted].mean()


def _pair_grads(model, params, ids, mask) -> list[torch.Tensor]:
    loss = _sequence_loss(model, ids, mask)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return [
        (torch.zeros_like(p) if g is None else g).detach().double()
        for (_, p), g in zip(params, grads, strict=True)
    ]


def gradient_alignment_reference(
    model: torch.nn.Module,
    ids1: torch.Tensor,
    mask1: torch.Tensor,
    ids2: torch.Tensor,
    mask2: torch.Tensor,
) -> xr.DataArray:
    """Reference loop: per pair, the full gradient of each sequence's loss (two autograd calls),
    then a float64 cosine per flattened parameter tensor, per q/k/v column slice of the fused
    attn.c_attn, and per layer over all of the layer's parameters together ("block", q/k/v not
    counted twice). A tensor whose gradient norm is <= ZERO_TOL x its layer's gradient norm on
    either side gets no cosine for that pair. Cosines are averaged over the pairs that have one.

    Same layout as gradient_alignment: (layer 0..L+1, tensor = TENSORS), NaN where the tensor
    does not exist or no pair has a cosine.
    """
    if ids1.shape[0] != ids2.shape[0] or ids1.shape[0] == 0:
        raise ValueError("oracle: need the same positive number of L1 and L2 sequences")
    if model.lm_head.weight is model.transformer.wte.weight:
        raise ValueError("oracle: tied lm_head / wte")
    n_layers = model.config.n_layer
    width = model.config.n_embd
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    where = [_layer_and_tensor(n, n_layers) for n, _ in params]
    per_pair: dict[tuple[int, str], list[float]] = {}
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.enable_grad():
            for i in range(ids1.shape[0]):
                g1 = _pair_grads(model, params, ids1[i], mask1[i])
                g2 = _pair_grads(model, params, ids2[i], mask2[i])
                vecs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
                layer_parts: dict[int, tuple[list, list]] = {}
                for (lay, tensor), a, b in zip(where, g1, g2, strict=True):
                    vecs[(lay, tensor)] = (a.flatten(), b.flatten())
                    parts = layer_parts.setdefault(lay, ([], []))
                    parts[0].append(a.flatten())
                    parts[1].append(b.flatten())
                    qa, qb = _qkv_columns(tensor, a, width), _qkv_columns(tensor, b, width)
                    for part in qa:
                        vecs[(lay, part)] = (qa[part].flatten(), qb[part].flatten())
                for lay, (pa, pb) in layer_parts.items():
                    vecs[(lay, "block")] = (torch.cat(pa), torch.cat(pb))
                for (lay, tensor), (a, b) in vecs.items():
                    ba, bb = vecs[(lay, "block")]
                    zero = a.norm() <= ZERO_TOL * ba.norm() or b.norm() <= ZERO_TOL * bb.norm()
                    cos = float("nan") if zero else float(a @ b / (a.norm() * b.norm()))
                    per_pair.setdefault((lay, tensor), []).append(cos)
    finally:
        model.train(was_training)
    data = np.full((n_layers + 2, len(TENSORS)), np.nan)
    for (lay, tensor), values in per_pair.items():
        v = np.asarray(values)
        if np.isfinite(v).any():
            data[lay, TENSORS.index(tensor)] = np.nanmean(v)
    return xr.DataArray(
        data,
        dims=("layer", "tensor"),
        coords={"layer": np.arange(n_layers + 2), "tensor": list(TENSORS)},
        name="grad_cos",
        attrs={"n_pairs": int(ids1.shape[0]), "method": "reference loop (tests/oracles.py)"},
    )


# ------------------------------------------------------------------------ CKA from Gram matrices


def _hsic_u_gram(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    t = np.trace(k @ l)
    t += (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    t -= 2.0 * (one @ k @ l @ one) / (n - 2)
    return float(t / (n * (n - 3)))


def cka_debiased_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA from n x n Gram matrices (unbiased HSIC, Song et al. 2012; O(n^2)
    memory). Needs n >= 4."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0] or x.shape[0] < 4:
        raise ValueError("debiased CKA needs the same n >= 4 rows in X and Y")
    k, l = x @ x.T, y @ y.T
    return _hsic_u_gram(k, l) / np.sqrt(_hsic_u_gram(k, k) * _hsic_u_gram(l, l))


def cka_biased_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) (Kornblith et al. 2019)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))

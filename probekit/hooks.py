"""Activations through TransformerLens 4's `TransformerBridge` over a Hugging Face model.

Layer convention: 0 = the embeddings' output (`blocks.0.hook_resid_pre`),
l = 1..L the residual stream after block l (`blocks.{l-1}.hook_resid_post`),
before the final LayerNorm, as in the paper. Only the hooks asked for are cached.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a mistaken hub lookup fails fast, never hangs


def _hf_tokenizer(tokenizer):
    """A transformers tokenizer for the bridge, without a BOS token.

    With a BOS token the bridge re-loads the tokenizer by name (a hub lookup); ids are
    passed to it directly, so it never tokenizes anything and needs no BOS.
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF tokenizer or tokenizers'
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>"
    )


def load_bridge(model: torch.nn.Module, tokenizer, device: str = "cpu"):
    """Wrap an in-memory HF causal LM in a TransformerBridge, offline."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        "local", hf_model=model, tokenizer=_hf_tokenizer(tokenizer), device=device
    )


def residual_hook_names(n_layers: int) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def mlp_hook_names(n_layers: int) -> list[str]:
    return [f"blocks.{i}.mlp.hook_post" for i in range(n_layers)]


@dataclass
class Activations:
    resid: torch.Tensor | None  # [L + 1, B, T, d_model]
    mlp: torch.Tensor | None  # [L, B, T, d_mlp]
    mask: torch.Tensor  # [B, T] True at real tokens


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; causal attention means real tokens never see pads."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


@torch.no_grad()
def run_activations(
    bridge,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n_layers: int,
    resid: bool = True,
    mlp: bool = False,
) -> Activations:
    """One batch through the bridge, caching only the residual and/or MLP hooks asked for."""
    wanted = set(residual_hook_names(n_layers) if resid else []) | set(
        mlp_hook_names(n_layers) if mlp else []
    )
    device = next(bridge.parameters()).device
    _, cache = bridge.run_with_cache(ids.to(device), names_filter=lambda name: name in wanted)
    r = (
        torch.stack([cache[n] for n in residual_hook_names(n_layers)]).float().cpu()
        if resid
        else None
    )
    m = torch.stack([cache[n] for n in mlp_hook_names(n_layers)]).float().cpu() if mlp else None
    del cache
    return Activations(r, m, mask)


def iter_pair_activations(
    bridge,
    ids1: list[np.ndarray],
    ids2: list[np.ndarray],
    n_layers: int,
    batch_size: int,
    resid: bool = True,
    mlp: bool = False,
    pad_id: int = 0,
) -> Iterator[tuple[np.ndarray, Activations, Activations]]:
    """Batches of parallel pairs: (pair indices, L1 activations, L2 activations)."""
    for start in range(0, len(ids1), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ids1)))
        a1 = run_activations(
            bridge, *pad_batch([ids1[i] for i in idx], pad_id), n_layers, resid, mlp
        )
        a2 = run_activations(
            bridge, *pad_batch([ids2[i] for i in idx], pad_id), n_layers, resid, mlp
        )
        yield idx, a1, a2

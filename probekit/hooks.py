"""Activations through TransformerLens 4's `TransformerBridge` over a Hugging Face model.

Layer convention: 0 = the embeddings' output (`blocks.0.hook_resid_pre`),
l = 1..L the residual stream after block l (`blocks.{l-1}.hook_resid_post`),
before the final LayerNorm, as in the paper. Only the hooks asked for are cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probekit.model_view import ModelView


def _hf_tokenizer(tokenizer):
    """A transformers tokenizer for the bridge, without a BOS token.

    With a BOS token the bridge re-loads the tokenizer by name (a hub lookup); ids are
    passed to it directly, so it never tokenizes anything and needs no BOS.
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF tokenizer or tokenizers'
    vocab = backend.get_vocab()
    special = {"pad_token": "<pad>", "eos_token": "<|endoftext|>"}
    # a foreign vocabulary keeps its own specials: no token is added to it
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in special.items() if v in vocab}
    )


def load_bridge(
    model: torch.nn.Module,
    tokenizer,
    view: ModelView,
    device: str = "cpu",
    path: str | Path | None = None,
):
    """Wrap an in-memory HF causal LM in a TransformerBridge, offline, and check that it
    sees the shape the model view expects.

    The bridge picks its adapter from `config.architectures` and reads
    `config.name_or_path`; a model built in memory (not read from a folder) has neither, so
    both are filled in from the model's class and `path` first. Should the in-memory boot
    still fail and `path` (the checkpoint folder) be known, the bridge boots from the folder
    (GPT-2, GPT-NeoX, Llama, Qwen2, OLMo, OLMo 2, BLOOM boot either way). `path` defaults
    to the folder the model was read from.
    """
    from transformer_lens.model_bridge import TransformerBridge

    config = model.config
    if path is None and getattr(config, "name_or_path", None):
        path = config.name_or_path if Path(config.name_or_path).is_dir() else None
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    if not getattr(config, "name_or_path", None):
        config.name_or_path = str(path) if path else "local"
    try:
        bridge = TransformerBridge.boot_transformers(
            "local", hf_model=model, tokenizer=_hf_tokenizer(tokenizer), device=device
        )
    except Exception as exc:  # noqa: BLE001 - any failure: try the folder, else one line
        if path is None:
            raise _boot_error(config, exc) from None
        try:
            bridge = TransformerBridge.boot_transformers(str(path), device=device)
        except Exception as exc2:  # noqa: BLE001
            raise _boot_error(config, exc2) from None
    view.check_bridge(bridge)
    return bridge


def _boot_error(config, exc: Exception) -> Exception:
    from probekit.errors import RunDirError
    from probekit.model_view import ARCHITECTURES

    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return RunDirError(
        f"the TransformerBridge cannot boot architecture "
        f"{getattr(config, 'model_type', None)!r} ({type(exc).__name__}: {first}); "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


FINAL_NORM_HOOK = "ln_final.hook_in"  # the bridge's input to the final norm, after every block


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
    view: ModelView,
    resid: bool = True,
    mlp: bool = False,
) -> Activations:
    """One batch through the bridge, caching only the residual and/or MLP hooks asked for."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    wanted = set(view.resid_hooks if resid else []) | set(view.mlp_hooks if mlp else [])
    device = next(bridge.parameters()).device

    def stop(tensor: torch.Tensor, hook) -> None:  # noqa: ANN001 - a HookPoint
        raise StopAtLayerException(tensor)

    # every cached hook has fired once the final norm is entered: the norm and the unembedding
    # (58 % of a Pythia-70m forward's flops, 7 % of a tiny one's) are skipped
    final = bridge.hook_dict.get(FINAL_NORM_HOOK)
    handle = final.add_hook(stop) if final is not None else None
    try:
        _, cache = bridge.run_with_cache(ids.to(device), names_filter=lambda name: name in wanted)
    finally:
        if handle is not None:
            handle.hook.remove()
    r = torch.stack([cache[n] for n in view.resid_hooks]).float().cpu() if resid else None
    m = torch.stack([cache[n] for n in view.mlp_hooks]).float().cpu() if mlp else None
    del cache
    return Activations(r, m, mask)

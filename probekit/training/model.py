"""Model presets and the GPT-2 builder.

The model is a stock `transformers` GPT-2 (pre-LN, learned positions, GELU) with an
untied output head and no dropout, close to the paper's Languini GPT (research/paper.md
§2.4). Checkpoints are plain `save_pretrained` folders anyone can load.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel

from probekit.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "build_model", "count_params"]  # PRESETS lives in probekit.config


def build_model(
    model: ModelConfig | dict, vocab_size: int, seed: int | None = None
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (std 0.02, scaled residual projections, as HF does).

    `model` is a resolved [model] section, or its raw fields (e.g. {"preset": "nano"}).
    """
    import torch

    m = ModelConfig.from_dict(model) if isinstance(model, dict) else model
    config = GPT2Config(
        vocab_size=int(vocab_size),
        n_positions=m.context,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_inner=m.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # the paper's output projection is separate
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if seed is not None:
        torch.manual_seed(seed)  # init is the first draw from the seeded generator
    gpt = GPT2LMHeadModel(config)
    if gpt.lm_head.weight.data_ptr() == gpt.transformer.wte.weight.data_ptr():
        raise RuntimeError("lm_head is tied to wte although tie_word_embeddings=False")
    return gpt


def count_params(model: Any, non_embedding: bool = False) -> int:
    """Parameter count; non_embedding drops wte, wpe and lm_head (for 6·N·tokens FLOPs)."""
    skip = ("transformer.wte.", "transformer.wpe.", "lm_head.") if non_embedding else ()
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))

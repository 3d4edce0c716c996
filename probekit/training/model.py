"""Model presets and the model builders (GPT-2, Llama-style).

The default model is a stock `transformers` GPT-2 (pre-LN, learned positions, GELU) with an
untied output head and no dropout, close to the paper's Languini GPT (research/paper.md
§2.4). `model.arch = "llama"` builds a stock `LlamaForCausalLM` instead (rotary positions,
RMSNorm, SwiGLU MLP, no biases, untied head, no dropout) at the same preset sizes. Checkpoints
are plain `save_pretrained` folders anyone can load.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from probekit.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "build_model", "count_params"]  # PRESETS lives in probekit.config


def build_model(model: ModelConfig | dict, vocab_size: int, seed: int | None = None) -> Any:
    """A freshly initialised GPT-2 (std 0.02, scaled residual projections, as HF does), or a
    Llama-style model for model.arch = "llama" (std 0.02 everywhere, as HF does).

    `model` is a resolved [model] section, or its raw fields (e.g. {"preset": "nano"}).
    """
    import torch

    m = ModelConfig.from_dict(model) if isinstance(model, dict) else model
    if m.arch == "llama":
        return _build_llama(m, vocab_size, seed)
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


def _build_llama(m: ModelConfig, vocab_size: int, seed: int | None) -> LlamaForCausalLM:
    import torch

    config = LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=m.n_embd,
        intermediate_size=m.n_inner,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_head,  # plain multi-head attention, as GPT-2
        hidden_act="silu",
        max_position_embeddings=m.context,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if seed is not None:
        torch.manual_seed(seed)
    llama = LlamaForCausalLM(config)
    if llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is tied to embed_tokens although tie_word_embeddings=False")
    return llama


def count_params(model: Any, non_embedding: bool = False) -> int:
    """Parameter count; non_embedding drops the token (and GPT-2's position) embeddings and
    lm_head (for 6·N·tokens FLOPs)."""
    skip = (
        ("transformer.wte.", "transformer.wpe.", "model.embed_tokens.", "lm_head.")
        if non_embedding
        else ()
    )
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))

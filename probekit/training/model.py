"""Model presets and the GPT-2 builder.

The model is a stock `transformers` GPT-2 (pre-LN, learned positions, GELU) with an
untied output head and no dropout, close to the paper's Languini GPT (research/paper.md
§2.4). Checkpoints are plain `save_pretrained` folders anyone can load.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel

from probekit.errors import ConfigError

# name: (n_layer, n_embd, n_head, n_inner, context)
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_embd=64, n_head=2, n_inner=256, context=64),  # tests
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, context=128),  # quick CPU demo
    "cpu": dict(n_layer=4, n_embd=256, n_head=4, n_inner=1024, context=128),  # feasibility2.md
    # paper presets; mini deviates: GPT-2's attention width is n_embd, so 8 heads of 64
    # (the paper uses 8 x 32 = 256). See docs/training.md.
    "mini": dict(n_layer=4, n_embd=512, n_head=8, n_inner=2048, context=512),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, context=512),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_inner=4096, context=512),
}

MODEL_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "n_layer": None,  # None: take the preset's value
    "n_embd": None,
    "n_head": None,
    "n_inner": None,
    "context": None,
}


def validate_model_section(d: dict) -> dict:
    """Fill the [model] section from its preset and check it; raises ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError("model: expected a table")
    for key in d:
        if key not in MODEL_DEFAULTS:
            known = ", ".join(MODEL_DEFAULTS)
            raise ConfigError(f"model.{key}: unknown field (known: {known})")
    preset = d.get("preset", MODEL_DEFAULTS["preset"])
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    out: dict[str, Any] = {"preset": preset}
    for key, default in PRESETS[preset].items():
        value = d.get(key)
        if value is None or value == "":  # dump_config writes None as ""
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}: expected a positive integer, got {value!r}")
        out[key] = value
    if out["n_embd"] % out["n_head"]:
        raise ConfigError(
            f"model.n_head: {out['n_head']} does not divide model.n_embd = {out['n_embd']}"
        )
    return out


def build_model(model_cfg: dict, vocab_size: int, seed: int | None = None) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (std 0.02, scaled residual projections, as HF does)."""
    import torch

    m = validate_model_section(model_cfg)
    config = GPT2Config(
        vocab_size=int(vocab_size),
        n_positions=m["context"],
        n_embd=m["n_embd"],
        n_layer=m["n_layer"],
        n_head=m["n_head"],
        n_inner=m["n_inner"],
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
    model = GPT2LMHeadModel(config)
    if model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr():
        raise RuntimeError("lm_head is tied to wte although tie_word_embeddings=False")
    return model


def count_params(model: Any, non_embedding: bool = False) -> int:
    """Parameter count; non_embedding drops wte, wpe and lm_head (for 6·N·tokens FLOPs)."""
    skip = ("transformer.wte.", "transformer.wpe.", "lm_head.") if non_embedding else ()
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))

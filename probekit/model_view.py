"""What the analysis needs to know of a checkpoint's architecture, in one object.

Families never read architecture-specific config fields or module paths: the driver
builds a `ModelView` from the checkpoint's Hugging Face config (checked against the
TransformerBridge's own config once the bridge is booted) and hands it to them. A new
architecture is one row of `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from probekit.errors import MetricError, RunDirError


@dataclass(frozen=True)
class _Arch:
    n_layers: str
    d_model: str
    d_mlp: str | None  # None: 4 x d_model
    context: str | None  # None: no learned/rotary limit recorded (ALiBi)
    blocks: str  # module path of the block list
    final_norm: str  # module path of the norm before the unembedding


_LLAMA_LIKE = _Arch(
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "model.layers",
    "model.norm",
)

# Hugging Face config.model_type -> where its sizes and modules are.
ARCHITECTURES: dict[str, _Arch] = {
    "gpt2": _Arch(
        "n_layer", "n_embd", "n_inner", "n_positions", "transformer.h", "transformer.ln_f"
    ),
    "gpt_neox": _Arch(
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "max_position_embeddings",
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
    ),
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "bloom": _Arch("n_layer", "hidden_size", None, None, "transformer.h", "transformer.ln_f"),
}


# Canonical parameter-tensor names across architectures (the gradient family's `tensor`
# coordinate). Block-relative module path -> canonical module name; a parameter keeps its
# suffix (`.weight`, `.bias`): Llama's `self_attn.q_proj.weight` is `attn.q.weight`. A fused
# QKV projection (GPT-NeoX, BLOOM: heads x (q, k, v) x head_dim output rows) is reported whole
# as `attn.qkv` and split into `attn.q` / `attn.k` / `attn.v`. Modules outside blocks map the
# full path. A parameter no table names keeps its raw name (nothing is dropped). GPT-2 keeps
# its own names (`ln_1`, `attn.c_attn`, ...) through the gradient family's fast path.
_LLAMA_TENSORS = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.in",
    "mlp.down_proj": "mlp.out",
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
}
_LLAMA_OUTSIDE = {"model.embed_tokens": "embed", "model.norm": "norm_f", "lm_head": "lm_head"}
CANONICAL_TENSORS: dict[str, tuple[dict[str, str], dict[str, str], tuple[str, ...]]] = {
    # arch: (block modules, modules outside blocks, fused QKV modules split per head)
    "gpt2": (
        {
            "ln_1": "norm1",
            "attn.c_attn": "attn.qkv",
            "attn.c_proj": "attn.o",
            "ln_2": "norm2",
            "mlp.c_fc": "mlp.in",
            "mlp.c_proj": "mlp.out",
        },
        {
            "transformer.wte": "embed",
            "transformer.wpe": "pos_embed",
            "transformer.ln_f": "norm_f",
            "lm_head": "lm_head",
        },
        (),
    ),
    "gpt_neox": (
        {
            "input_layernorm": "norm1",
            "post_attention_layernorm": "norm2",
            "attention.query_key_value": "attn.qkv",
            "attention.dense": "attn.o",
            "mlp.dense_h_to_4h": "mlp.in",
            "mlp.dense_4h_to_h": "mlp.out",
        },
        {
            "gpt_neox.embed_in": "embed",
            "gpt_neox.final_layer_norm": "norm_f",
            "embed_out": "lm_head",
        },
        ("attention.query_key_value",),
    ),
    "llama": (_LLAMA_TENSORS, _LLAMA_OUTSIDE, ()),
    "qwen2": (_LLAMA_TENSORS, _LLAMA_OUTSIDE, ()),
    "olmo": (_LLAMA_TENSORS, _LLAMA_OUTSIDE, ()),
    # OLMo 2 normalises each sublayer's output: its two norms are the blocks' only norms
    "olmo2": (
        _LLAMA_TENSORS
        | {"post_attention_layernorm": "norm1", "post_feedforward_layernorm": "norm2"},
        _LLAMA_OUTSIDE,
        (),
    ),
    "bloom": (
        {
            "input_layernorm": "norm1",
            "post_attention_layernorm": "norm2",
            "self_attention.query_key_value": "attn.qkv",
            "self_attention.dense": "attn.o",
            "mlp.dense_h_to_4h": "mlp.in",
            "mlp.dense_4h_to_h": "mlp.out",
        },
        {
            "transformer.word_embeddings": "embed",
            "transformer.word_embeddings_layernorm": "embed_norm",
            "transformer.ln_f": "norm_f",
            "lm_head": "lm_head",
        },
        ("self_attention.query_key_value",),
    ),
}


# The hook vocabulary: what a family may name in ``Needs.activations``. Each kind is one
# TransformerBridge hook per block ({l} = 0..L-1), read as a tuple of L tensors, except
# "resid", the residual stream at layers 0..L stacked as one [L + 1, B, T, d] tensor (the
# shared layer convention). A family may also name any hook the bridge exposes: a name with
# "{l}" is read per block (a tuple), a plain name as one tensor.
HOOK_KINDS: dict[str, tuple[str, str]] = {
    "resid": ("", "residual stream at layers 0..L (embeddings output, then after each block)"),
    "resid_pre": ("blocks.{l}.hook_resid_pre", "residual stream entering each block"),
    "resid_mid": ("blocks.{l}.hook_resid_mid", "residual stream between attention and MLP"),
    "attn_pattern": ("blocks.{l}.attn.hook_pattern", "attention probabilities [B, heads, T, T]"),
    "attn_out": ("blocks.{l}.hook_attn_out", "attention output added to the residual stream"),
    "mlp_in": ("blocks.{l}.mlp.hook_in", "the MLP's input (after its norm)"),
    "mlp_pre": ("blocks.{l}.mlp.hook_pre", "MLP hidden units before the nonlinearity"),
    "mlp": ("blocks.{l}.mlp.hook_post", "MLP hidden units after the nonlinearity (neurons)"),
    "mlp_out": ("blocks.{l}.hook_mlp_out", "MLP output added to the residual stream"),
}
# (architecture, kind) -> why the architecture has no such activation
_UNAVAILABLE = {
    ("gpt_neox", "resid_mid"): "GPT-NeoX adds attention and MLP to the same residual (parallel "
    "residual): there is no stream between them",
}


def check_hook_kind(kind: str) -> None:
    """A one-line error unless ``kind`` is a known kind or a TransformerLens hook name."""
    if kind in HOOK_KINDS or (kind.startswith(("blocks.", "hook_")) and "hook_" in kind):
        return
    raise MetricError(
        f"unknown activation {kind!r} (known: {', '.join(HOOK_KINDS)}, or a TransformerLens "
        "hook name such as blocks.{l}.attn.hook_z)"
    )


@dataclass(frozen=True)
class ModelView:
    """Layers, widths, hook names and per-layer parameter groups of one checkpoint."""

    arch: str
    n_layers: int
    d_model: int
    d_mlp: int
    context: int | None
    vocab_size: int
    blocks: str  # module path of the block list, e.g. transformer.h
    final_norm_path: str  # module path of the final norm, e.g. transformer.ln_f

    @classmethod
    def from_config(cls, config: Any) -> ModelView:
        arch = getattr(config, "model_type", None)
        spec = ARCHITECTURES.get(arch)
        if spec is None:
            raise RunDirError(
                f"architecture {arch!r} is not supported by the analysis "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        d_model = int(getattr(config, spec.d_model))
        d_mlp = getattr(config, spec.d_mlp, None) if spec.d_mlp else None
        context = getattr(config, spec.context, None) if spec.context else None
        return cls(
            arch=arch,
            n_layers=int(getattr(config, spec.n_layers)),
            d_model=d_model,
            d_mlp=int(d_mlp or 4 * d_model),
            context=int(context) if context else None,
            vocab_size=int(config.vocab_size),
            blocks=spec.blocks,
            final_norm_path=spec.final_norm,
        )

    @property
    def resid_hooks(self) -> list[str]:
        """Residual stream at layers 0..L: the embeddings' output, then after each block."""
        return ["blocks.0.hook_resid_pre"] + [
            f"blocks.{i}.hook_resid_post" for i in range(self.n_layers)
        ]

    @property
    def mlp_hooks(self) -> list[str]:
        """MLP hidden activations of blocks 1..L (after the nonlinearity)."""
        return self.hook_names("mlp")

    def unavailable(self, kind: str) -> str | None:
        """None when this architecture provides the activation ``kind``, else the reason."""
        check_hook_kind(kind)
        return _UNAVAILABLE.get((self.arch, kind))

    def hook_names(self, kind: str) -> list[str]:
        """The bridge hooks that make up the activation ``kind`` (see HOOK_KINDS)."""
        why = self.unavailable(kind)
        if why is not None:
            raise MetricError(f"activation {kind!r} is not available for {self.arch}: {why}")
        if kind == "resid":
            return self.resid_hooks
        template = HOOK_KINDS[kind][0] if kind in HOOK_KINDS else kind
        if "{l}" not in template:
            return [template]
        return [template.format(l=i) for i in range(self.n_layers)]

    def layer_of(self, parameter: str) -> int | None:
        """The layer a parameter belongs to: l for block l's (1..L), None outside blocks."""
        prefix = self.blocks + "."
        if not parameter.startswith(prefix):
            return None
        return int(parameter[len(prefix) :].split(".", 1)[0]) + 1

    def param_groups(self, model: Any) -> dict[int, list[str]]:
        """Parameter names per block layer 1..L, in the model's order."""
        groups: dict[int, list[str]] = {lay: [] for lay in range(1, self.n_layers + 1)}
        for name, _ in model.named_parameters():
            lay = self.layer_of(name)
            if lay is not None:
                groups[lay].append(name)
        return groups

    def canonical(self, parameter: str) -> tuple[int, str, bool]:
        """(layer, canonical tensor name, fused QKV?) of a model parameter: layer 0 for the
        embeddings, 1..L for block l, L + 1 for the final norm and the head."""
        block, outside, fused = CANONICAL_TENSORS.get(self.arch, ({}, {}, ()))
        lay = self.layer_of(parameter)
        if lay is not None:
            rel = parameter[len(self.blocks) + 1 :].split(".", 1)[1]
            mods = block
        else:
            rel, mods = parameter, outside
        module, _, suffix = rel.rpartition(".")
        name = mods.get(module)
        if lay is None:
            head = name in ("norm_f", "lm_head") or module == self.final_norm_path
            lay = self.n_layers + 1 if head else 0
        return lay, (f"{name}.{suffix}" if name else rel), module in fused

    def final_norm(self, model: Any) -> Any:
        """The norm the last residual stream passes through before the unembedding."""
        return model.get_submodule(self.final_norm_path)

    def unembedding(self, model: Any) -> Any:
        """The output projection (the LM head; the input embedding where weights are tied)."""
        return model.get_output_embeddings()

    def decode(self, model: Any, resid: Any) -> Any:
        """Logits of residual states [..., d_model] through the model's own final norm and
        unembedding (the logit lens; at the last layer, the model's own logits)."""
        return self.unembedding(model)(self.final_norm(model)(resid))

    def check_bridge(self, bridge: Any) -> None:
        """The booted bridge must see the same shape as the config did."""
        cfg = bridge.cfg
        seen = (int(cfg.n_layers), int(cfg.d_model))
        if seen != (self.n_layers, self.d_model):
            raise RunDirError(
                f"the TransformerBridge sees {seen[0]} layers of width {seen[1]}, the "
                f"checkpoint's config {self.n_layers} x {self.d_model}"
            )

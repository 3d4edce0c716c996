"""What the analysis needs to know of a checkpoint's architecture, in one object.

Families never read architecture-specific config fields or module paths: the driver
builds a `ModelView` from the checkpoint's Hugging Face config (checked against the
TransformerBridge's own config once the bridge is booted) and hands it to them. A new
architecture is one row of `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from probekit.errors import RunDirError


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
        return [f"blocks.{i}.mlp.hook_post" for i in range(self.n_layers)]

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

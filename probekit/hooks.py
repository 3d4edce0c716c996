"""Activations through TransformerLens 4's `TransformerBridge` over a Hugging Face model.

Layer convention: 0 = the embeddings' output (`blocks.0.hook_resid_pre`),
l = 1..L the residual stream after block l (`blocks.{l-1}.hook_resid_post`),
before the final LayerNorm, as in the paper. Only the hooks asked for are cached.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probekit import checkpoints
from probekit.model_view import HOOK_KINDS, ModelView


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
            "local",
            hf_model=model,
            tokenizer=_hf_tokenizer(tokenizer),
            device=device,
            dtype=_param_dtype(model),  # the bridge's cfg.dtype: the model's (--dtype)
        )
    except Exception as exc:  # noqa: BLE001 - any failure: try the folder, else one line
        if path is None:
            raise _boot_error(config, exc) from None
        try:
            bridge = TransformerBridge.boot_transformers(
                str(path), device=device, dtype=_param_dtype(model)
            )
        except Exception as exc2:  # noqa: BLE001
            raise _boot_error(config, exc2) from None
    view.check_bridge(bridge)
    return bridge


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# A checkpoint's bridge is re-used for the next checkpoint of the same architecture when that is
# exact: booting costs ~0.1 s (a tenth of a tiny checkpoint's align) whatever the model's size,
# so only models the loader keeps too (checkpoints.KEEP_MAX_BYTES) are kept (memory: one copy).
_UNEMBED_BIAS = "unembed._original_component.bias"  # zeros the bridge adds to a bias-free head


@dataclass
class _Booted:
    key: str
    bridge: object
    tensors: dict[str, torch.Tensor]  # the wrapped model's own state, refreshed in place


_booted: _Booted | None = None


def bridge_for(model: torch.nn.Module, tokenizer, view: ModelView, device: str = "cpu"):
    """A TransformerBridge with ``model``'s weights: the bridge this process booted for an
    earlier checkpoint of the same architecture with the weights copied into it, or a new one.

    Re-use is exact only where every tensor the bridge computes with is one of the wrapped
    model's own (GPT-2's split q/k/v are views of its fused weight; GPT-NeoX's and BLOOM's are
    copies): that is checked once at boot, and a model whose bridge holds a copy of a weight
    is booted afresh at every checkpoint. A model the loader would keep
    (``checkpoints.small_enough_to_keep``) gets a bridge over a copy of it; a bigger one is
    wrapped in place (``load_bridge``) and never kept."""
    global _booted
    key = _bridge_key(model, tokenizer, device)
    state = model.state_dict()
    booted = _booted
    if booted is not None and booted.key == key:
        same = state.keys() == booted.tensors.keys() and all(
            state[k].shape == t.shape and state[k].dtype == t.dtype
            for k, t in booted.tensors.items()
        )
        if same:
            with torch.no_grad():
                for k, t in booted.tensors.items():
                    t.copy_(state[k])
            return booted.bridge
    _booted = None  # the old bridge's model is freed before a new one boots
    if not checkpoints.small_enough_to_keep(model, state):
        return load_bridge(model, tokenizer, view, device=device)  # rewraps `model` in place
    # a small model's bridge wraps a copy: the caller's model stays a plain HF model (the
    # loader may hand it out again for the next checkpoint)
    model = copy.deepcopy(model)
    tensors = model.state_dict(keep_vars=True)
    own = {t.untyped_storage().data_ptr() for t in tensors.values()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}  # e.g. rotary inv_freq
    bridge = load_bridge(model, tokenizer, view, device=device)
    if _only_own_tensors(bridge, own):
        _booted = _Booted(key, bridge, tensors)
    return bridge


def release_bridge() -> None:
    """Drop the bridge kept for re-use (and the model weights it holds)."""
    global _booted
    _booted = None


def _bridge_key(model: torch.nn.Module, tokenizer, device: str) -> str:
    import json

    cfg = {k: v for k, v in model.config.to_dict().items() if "name_or_path" not in k}
    return json.dumps([str(device), id(tokenizer), cfg], sort_keys=True, default=str)


def _only_own_tensors(bridge, own: set[int]) -> bool:
    """True when every parameter and buffer of the bridge is stored in the wrapped model's
    tensors (a weight copied at boot would go stale), bar the zero bias it adds to the head."""
    for name, t in [*bridge.named_parameters(), *bridge.named_buffers()]:
        if t.untyped_storage().data_ptr() in own:
            continue
        if not (name.endswith(_UNEMBED_BIAS) and not bool(t.any())):
            return False
    return True


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


class Activations(Mapping[str, Any]):
    """One batch's activations: a mapping from the kinds a family declared (``Needs.activations``,
    see ``model_view.HOOK_KINDS``) to tensors, and the batch's mask [B, T] (True at real
    tokens). "resid" is one [L + 1, B, T, d_model] tensor; a per-block kind is a tuple of L
    tensors, not stacked (stacking would copy ~17 MB per tiny batch of MLP units for a family
    that reads them a layer at a time)."""

    def __init__(self, tensors: dict[str, Any], mask: torch.Tensor):
        self._tensors = dict(tensors)
        self.mask = mask

    def __getitem__(self, kind: str) -> Any:
        try:
            return self._tensors[kind]
        except KeyError:
            raise KeyError(
                f"activation {kind!r} was not read for this batch (read: "
                f"{', '.join(self._tensors) or 'none'}); declare it in Needs.activations"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def resid(self) -> torch.Tensor | None:
        """The residual stream at layers 0..L, [L + 1, B, T, d_model] (None when not read)."""
        return self._tensors.get("resid")

    @property
    def mlp(self) -> tuple[torch.Tensor, ...] | None:
        """MLP hidden units after the nonlinearity, L tensors [B, T, d_mlp] (None when not read)."""
        return self._tensors.get("mlp")


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
    kinds: Iterable[str] = ("resid",),
) -> Activations:
    """One batch through the bridge, caching only the hooks of the activation kinds asked for
    (float32, on the CPU)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    kinds = list(dict.fromkeys(kinds))
    names = {kind: view.hook_names(kind) for kind in kinds}
    wanted = {n for hooks in names.values() for n in hooks}
    missing = sorted(wanted - set(bridge.hook_dict))
    if missing:
        from probekit.errors import MetricError

        raise MetricError(
            f"the TransformerBridge of this {view.arch} checkpoint has no hook {missing[0]!r}"
        )
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
    out: dict[str, Any] = {}
    for kind, hooks in names.items():
        if kind == "resid":
            out[kind] = torch.stack([cache[n] for n in hooks]).float().cpu()
        elif len(hooks) == 1 and "{l}" not in (HOOK_KINDS.get(kind, (kind,))[0]):
            out[kind] = cache[hooks[0]].float().cpu()
        else:
            out[kind] = tuple(cache[n].float().cpu() for n in hooks)
    del cache
    return Activations(out, mask)

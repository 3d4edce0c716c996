"""Activation patching between cloned languages: does L2 at layer l carry what L1 carries?

For each parallel pair (token-aligned clones) and a few positions t of the L2 text, the L2
forward is run with its residual stream at layer l, position t replaced by L1's state of the
same text at the same position (`same_text`), or by L1's state at position t of the next
pair's text (`different_text`, the baseline); `none` is the unpatched L2 forward. The loss is
the clone-collapsed next-token cross-entropy at t: -log of the probability of the true next
token in any language (L1's prediction of the L1 token counts as right). Then

    patch_kept(l) = (CE_different_text - CE_same_text) / (CE_different_text - CE_none)

1 = patching L1's state is as good as L2's own, 0 = as bad as a different text's state.

One position per row is patched (patching every position of a layer would make the rest of
the forward exactly L1's run, whatever the layer). Layer convention 0..L as elsewhere: 0
replaces block 1's input (the embeddings' output), l >= 1 the output of block l.

Implementation: plain PyTorch forward hooks on the Hugging Face block modules
(`ModelView.blocks`). This is a one-call family, which the driver runs before it boots its
TransformerBridge (the boot rewraps the modules in place), so the model is still the plain HF
model here: no second bridge and no copy of the model are needed.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from probekit.hooks import pad_batch
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable
from probekit.metrics.lens import collapse_map, needs_vocabulary
from probekit.series import Series

POSITIONS = 4  # patched positions per pair (evenly spaced over the sequence)
CONDITIONS = ["none", "same_text", "different_text"]

_DEFINITIONS = {
    "patch_ce": "clone-collapsed next-token cross-entropy (nats) at patched positions of the "
    "L2 text: none = L2's own forward, same_text = L1's state of the same text patched in at "
    "the layer and position, different_text = L1's state of the next pair's text",
    "patch_kept": "(CE_different_text - CE_same_text) / (CE_different_text - CE_none): 1 = "
    "L1's state of the same text is as good as L2's own, 0 = as bad as a different text's; NaN "
    "where CE_different_text <= CE_none (the baseline is no worse than L2's own state)",
}


def _blocks(ctx: CheckpointContext):
    return ctx.model.get_submodule(ctx.view.blocks)


def _out_hidden(output):
    return output[0] if isinstance(output, tuple) else output


def capture_states(ctx: CheckpointContext, ids: torch.Tensor) -> torch.Tensor:
    """Residual stream [L+1, B, T, d] (layer 0 = input of the first block) of one forward."""
    blocks = _blocks(ctx)
    states: list[torch.Tensor] = []

    def pre(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach())

    def post(_module, _args, output):
        states.append(_out_hidden(output).detach())

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post) for b in blocks]
    try:
        ctx.model.base_model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(states)


def patched_logits(
    ctx: CheckpointContext,
    ids: torch.Tensor,
    layer: int,
    rows: torch.Tensor,
    pos: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Logits [n, V] at (rows, pos) of `ids` with the residual stream at `layer` (0..L) at
    those rows and positions replaced by `values` [n, d]."""
    blocks = _blocks(ctx)

    def patch(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        at = (rows.to(hidden.device), pos.to(hidden.device))
        hidden[at] = values.to(hidden.device, hidden.dtype)
        return hidden

    if layer == 0:

        def hook(_module, args, kwargs):
            if args:
                return (patch(args[0]), *args[1:]), kwargs
            return args, kwargs | {"hidden_states": patch(kwargs["hidden_states"])}

        handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (patch(output[0]), *output[1:])
            return patch(output)

        handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        return logits_at(ctx, ids, rows, pos)
    finally:
        handle.remove()


def logits_at(
    ctx: CheckpointContext, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Logits [n, V] at the given rows and positions only (the head is applied to those
    final states alone: full [B, T, V] logits would dominate memory for large vocabularies)."""
    hidden = ctx.model.base_model(ids, use_cache=False)[0]  # after the final norm
    return ctx.view.unembedding(ctx.model)(hidden[rows.to(hidden.device), pos.to(hidden.device)])


def collapsed_ce(logits: torch.Tensor, target: torch.Tensor, canon: torch.Tensor) -> torch.Tensor:
    """-log P(true next token in any language) per row: logits [n, V], target [n]."""
    p = torch.softmax(logits.double(), -1)
    pc = torch.zeros_like(p).scatter_add_(1, canon.expand_as(p), p)
    return -torch.log(pc.gather(1, canon[target][:, None])[:, 0].clamp_min(1e-300))


def _positions(length: int, k: int) -> np.ndarray:
    """k positions t (each with a next token) spread over a sequence of `length` tokens."""
    if length < 2:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, length - 2, num=min(k, length - 1)).round().astype(np.int64))


@torch.no_grad()
def patching(ctx: CheckpointContext, positions: int = POSITIONS) -> xr.Dataset:
    par, opts, view = ctx.series.parallel, ctx.options, ctx.view
    device = opts.device
    canon = torch.as_tensor(collapse_map(getattr(ctx.series, "vocab", None), view.vocab_size))
    n_layer = view.n_layers + 1
    ce_sum = np.zeros((n_layer, len(CONDITIONS)))
    count = 0
    other1 = par.ids1[1:] + par.ids1[:1]  # L1 text of pair i + 1
    for start in range(0, len(par), opts.batch_size):
        idx = range(start, min(start + opts.batch_size, len(par)))
        ids1, _ = pad_batch([par.ids1[i] for i in idx])
        ids2, _ = pad_batch([par.ids2[i] for i in idx])
        ido, _ = pad_batch([other1[i] for i in idx])
        spots = [
            _positions(min(len(par.ids1[i]), len(par.ids2[i]), len(other1[i])), positions)
            for i in idx
        ]
        s1 = capture_states(ctx, ids1.to(device))
        so = capture_states(ctx, ido.to(device))
        for k in range(max(len(t) for t in spots)):
            # the k-th position of every pair: rows cut after it (causal: later tokens
            # cannot change the prediction at t), one patched row per pair
            rows = [r for r, t in enumerate(spots) if k < len(t)]
            rows_t = torch.as_tensor(rows)
            pos_t = torch.as_tensor([int(spots[r][k]) for r in rows])
            target = ids2[rows_t, pos_t + 1]
            rep = ids2[rows_t, : int(pos_t.max()) + 1].to(device)
            n = len(rows)
            clean = logits_at(ctx, rep, torch.arange(n), pos_t).float().cpu()
            ce_sum[:, 0] += float(collapsed_ce(clean, target, canon).sum())
            both = torch.cat([rep, rep])  # same_text rows, then different_text rows
            sel, pos2, target2 = torch.arange(2 * n), torch.cat([pos_t, pos_t]), target.repeat(2)
            for lay in range(n_layer):
                at = (rows_t.to(s1.device), pos_t.to(s1.device))
                values = torch.cat([s1[lay][at], so[lay][at]])
                out = patched_logits(ctx, both, lay, sel, pos2, values).float().cpu()
                loss = collapsed_ce(out, target2, canon)
                ce_sum[lay, 1] += float(loss[:n].sum())
                ce_sum[lay, 2] += float(loss[n:].sum())
            count += n
    ce = ce_sum / max(count, 1)
    gap = ce[:, 2] - ce[:, 0]  # how much worse a different text's state is than L2's own
    with np.errstate(divide="ignore", invalid="ignore"):
        # undefined (NaN) where a different text's state is no worse than L2's own
        kept = np.where(gap > 0, (ce[:, 2] - ce[:, 1]) / gap, np.nan)
    ds = xr.Dataset(
        {
            "patch_ce": (("layer", "condition"), ce),
            "patch_kept": (("layer",), kept),
        },
        coords={"layer": np.arange(n_layer), "condition": CONDITIONS},
        attrs={
            "definition": "activation patching L1 -> L2 of the residual stream at one position "
            "per row, aligned positions of cloned parallel text, clone-collapsed target",
            "positions_per_pair": int(positions),
            "n_positions": int(count),
            "baseline": "different_text: L1 state of pair i + 1 at the same position",
        },
    )
    for name, text in _DEFINITIONS.items():
        ds[name].attrs["definition"] = text
    return ds


class Patching(Family):
    """Activation patching of L1's residual state into L2's forward, per layer: the share of
    L2's clone-collapsed next-token loss kept, against a different text's state."""

    name = "patching"
    command = "causal"  # computed when named: probekit align RUN --metrics patching
    variables = (
        Variable("patch_ce", "patched next-token cross-entropy", _DEFINITIONS["patch_ce"]),
        Variable("patch_kept", "share of L2's loss kept by L1's state", _DEFINITIONS["patch_kept"]),
    )
    needs = Needs(weights=True, parallel=True)

    def applies(self, series: Series) -> str | None:
        why = needs_vocabulary(series)
        if why is None and series.mode != "clone":
            why = (
                f"{series.run_dir}: patching needs token-aligned parallel text (cloned "
                f"languages); this is a {series.mode} run"
            )
        return why

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        return patching(ctx)

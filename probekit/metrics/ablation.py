"""Neuron ablation: are the language-specific MLP neurons causally specific? (LAPE's check)

1. Neurons are selected on the series' parallel pairs with `NeuronAccumulator` (the `neurons`
   family's statistics and its default rule: LAPE < 0.3 nats, and the language's activation
   probability >= the 95th percentile of all of them), per language of the compared pair.
2. For each such language the selected neurons are zeroed at `blocks.{l}.mlp.hook_post`
   (the MLP's post-nonlinearity output: the neuron contributes nothing downstream), and every
   language's test perplexity is measured on a short prefix of its held-out stream
   (`ABLATION_TOKENS` tokens, non-overlapping windows of the analysis sequence length).
3. The control ablates as many neurons, drawn at random (seeded) from the same layers among
   the neurons selected for no language.

Activation-based selection can mistake frequent firing for causal importance; the random
control is what makes the number readable. This is a one-call family: it boots its own
TransformerBridge on a deep copy of the checkpoint (the driver's bridge is booted later, on the
original model, and the boot rewraps modules in place).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import torch
import xarray as xr

from probekit.hooks import load_bridge, pad_batch, run_activations
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable
from probekit.metrics.lens import needs_vocabulary
from probekit.metrics.neurons import NeuronAccumulator
from probekit.metrics.perplexity import sliding_window_nll
from probekit.series import Series

ABLATION_TOKENS = 4096  # test tokens per language and ablation
SELECTIONS = ["specific", "random"]
MAX_ENTROPY = 0.3
ASSIGN_QUANTILE = 0.95

_DEFINITIONS = {
    "ablation_ppl": "test perplexity of `language` (non-overlapping windows of the analysis "
    "sequence length, first ABLATION_TOKENS tokens) with the MLP neurons specific to "
    "`ablated_language` zeroed (specific), or as many random neurons of the same layers (random)",
    "ablation_ppl_clean": "the same test perplexity without ablation",
    "ablation_dppl": "ablation_ppl - ablation_ppl_clean: the perplexity increase the ablation "
    "causes",
    "ablation_n_neurons": "MLP neurons per block selected as specific to the language (LAPE < "
    "0.3 nats and activation probability >= the 95th percentile) and ablated",
}


class _Hooked(torch.nn.Module):
    """A bridge with fixed forward hooks, shaped like an HF LM (`.logits`) for perplexity."""

    def __init__(self, bridge, hooks: list):
        super().__init__()
        self.bridge, self.hooks = bridge, hooks
        self.eval()  # perplexity restores the mode it found: keep that eval (no dropout)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bridge.run_with_hooks(ids, fwd_hooks=self.hooks))


def zero_hooks(view, masks: np.ndarray) -> list:
    """fwd_hooks zeroing the neurons masks[l - 1] (bool [L, d_mlp]) of each block l."""
    hooks = []
    for lay, name in enumerate(view.mlp_hooks):
        idx = torch.as_tensor(np.flatnonzero(masks[lay]))
        if len(idx) == 0:
            continue

        def fn(act, hook, idx=idx):
            act = act.clone()
            act[..., idx.to(act.device)] = 0.0
            return act

        hooks.append((name, fn))
    return hooks


def specific_neurons(ds: xr.Dataset) -> np.ndarray:
    """bool [L, language, d_mlp]: neurons the `neurons` family's default rule assigns to each
    language (LAPE < 0.3 and p >= the 95th percentile of all activation probabilities)."""
    p = ds["neuron_act_prob"].values
    lape = ds["lape"].values
    thr = float(np.quantile(p.ravel(), ASSIGN_QUANTILE, method="lower"))
    ok = ~np.isnan(lape) & (np.nan_to_num(lape, nan=np.inf) < MAX_ENTROPY)
    return ok[:, None, :] & (p >= thr) & (p > 0)


def random_like(masks: np.ndarray, exclude: np.ndarray, seed: int) -> np.ndarray:
    """As many neurons per layer as `masks`, drawn among those not in `exclude`."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(masks)
    for lay in range(masks.shape[0]):
        pool = np.flatnonzero(~exclude[lay])
        k = min(int(masks[lay].sum()), len(pool))
        out[lay, rng.choice(pool, size=k, replace=False)] = True
    return out


def heldout_ppl(bridge, hooks: list, texts: dict, window: int, device: str) -> dict[str, float]:
    model = _Hooked(bridge, hooks)
    out = {}
    for lang, ids in texts.items():
        nll, n = sliding_window_nll(model, ids, window, stride=window, device=device)
        out[lang] = float(np.exp(nll / n))
    return out


@torch.no_grad()
def ablation(ctx: CheckpointContext, seed: int = 0) -> xr.Dataset:
    series, opts, view = ctx.series, ctx.options, ctx.view
    bridge = load_bridge(copy.deepcopy(ctx.model), series.tokenizer, view, device=opts.device)
    pair = list(series.pair)
    par = series.parallel
    acc = NeuronAccumulator(view.n_layers, view.d_mlp, pair, threshold=opts.neuron_threshold)
    for start in range(0, len(par), opts.batch_size):
        idx = range(start, min(start + opts.batch_size, len(par)))
        for lang, seqs in zip(pair, (par.ids1, par.ids2), strict=True):
            act = run_activations(bridge, *pad_batch([seqs[i] for i in idx]), view, ["mlp"])
            acc.update(lang, act.mlp, act.mask)
    masks = specific_neurons(acc.result())  # [L, lang, N]
    any_specific = masks.any(1)

    texts = {lang: ids[:ABLATION_TOKENS] for lang, (ids, _) in series.test_texts().items()}
    langs = list(texts)
    window = series.seq_len
    clean = heldout_ppl(bridge, [], texts, window, opts.device)
    ppl = np.zeros((len(pair), len(SELECTIONS), len(langs)))
    for a in range(len(pair)):
        chosen = {
            "specific": masks[:, a],
            "random": random_like(masks[:, a], any_specific, seed + a),
        }
        for s, sel in enumerate(SELECTIONS):
            res = heldout_ppl(bridge, zero_hooks(view, chosen[sel]), texts, window, opts.device)
            ppl[a, s] = [res[lang] for lang in langs]
    base = np.array([clean[lang] for lang in langs])
    ds = xr.Dataset(
        {
            "ablation_ppl": (("ablated_language", "selection", "language"), ppl),
            "ablation_ppl_clean": (("language",), base),
            "ablation_dppl": (("ablated_language", "selection", "language"), ppl - base),
            "ablation_n_neurons": (
                ("ablated_language", "layer"),
                masks.sum(-1).T.astype(np.int64),
            ),
        },
        coords={
            "ablated_language": pair,
            "selection": SELECTIONS,
            "language": langs,
            "layer": np.arange(1, view.n_layers + 1),
        },
        attrs={
            "definition": "zero-ablation of language-specific MLP neurons (selected on the "
            "parallel pairs) against as many random neurons of the same layers; test "
            "perplexity of every language",
            "ablation": "zero at blocks.l.mlp.hook_post",
            "test_tokens": int(min(len(t) for t in texts.values())),
            "window": int(window),
            "stride": int(window),
            "seed": int(seed),
        },
    )
    for name, text in _DEFINITIONS.items():
        ds[name].attrs["definition"] = text
    del bridge
    return ds


class Ablation(Family):
    """Zero the MLP neurons specific to a language and measure every language's test
    perplexity, against ablating as many random neurons of the same layers."""

    name = "ablation"
    command = "causal"  # computed when named: probekit align RUN --metrics ablation
    variables = (
        Variable(
            "ablation_ppl", "test perplexity with neurons ablated", _DEFINITIONS["ablation_ppl"]
        ),
        Variable("ablation_ppl_clean", "test perplexity without ablation"),
        Variable(
            "ablation_dppl", "perplexity increase under ablation", _DEFINITIONS["ablation_dppl"]
        ),
        Variable("ablation_n_neurons", "language-specific neurons ablated"),
    )
    needs = Needs(weights=True, parallel=True, test_tokens=True)

    def applies(self, series: Series) -> str | None:
        why = needs_vocabulary(series)
        if why is not None:
            return why
        try:
            series.test_texts()
        except Exception as exc:  # noqa: BLE001 - any reason is the one-line answer
            return str(exc).splitlines()[0]
        return None

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        return ablation(ctx)

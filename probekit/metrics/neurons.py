"""Shared-neuron statistics (LAPE, Tang et al. 2024; overlap of top-k active neurons).

Activations are the MLP post-nonlinearity output, ``blocks.{l}.mlp.hook_post`` on a
TransformerLens ``TransformerBridge`` (the same tensor as ``model.transformer.h[l].mlp.act``'s
output on a ``GPT2LMHeadModel``). A neuron "fires" on a token when its activation is
``> threshold`` (default 0.0, the LAPE ``over_zero`` convention). GPT-2's ``gelu_new`` can be
slightly negative (down to about -0.17), so "> 0" means "on the positive branch", not "non-zero".

The accumulator only keeps per-(layer, language, neuron) counts and activation sums plus a token
count per language, so its memory does not depend on how many tokens are fed through it.

Layer coordinate: blocks are numbered 1..L (``layer`` = 0 is the embedding output elsewhere in
the cube; MLP neurons only exist in blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import xarray as xr

from probekit.errors import MetricError
from probekit.kernels import column_sums, fired_counts
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable

Selection = Literal["max_entropy", "top_rate", "top_rate_per_layer"]


class NeuronAccumulator:
    """Streaming counts of how often each MLP neuron fires, per language.

    ``update`` takes ``acts`` of shape [n_layers, B, T, d_mlp] (or a sequence of n_layers tensors
    [B, T, d_mlp]) and a bool ``mask`` [B, T] of real (non-pad) tokens.
    """

    def __init__(
        self,
        n_layers: int,
        d_mlp: int,
        languages: Sequence[str],
        threshold: float = 0.0,
    ) -> None:
        if n_layers < 1 or d_mlp < 1:
            raise MetricError(f"need n_layers >= 1 and d_mlp >= 1, got {n_layers}, {d_mlp}")
        languages = list(languages)
        if len(languages) < 2 or len(set(languages)) != len(languages):
            raise MetricError(f"need at least two distinct languages, got {languages}")
        self.n_layers = n_layers
        self.d_mlp = d_mlp
        self.languages = languages
        self.threshold = float(threshold)
        # int64 counts: exact, and constant memory whatever the number of tokens.
        self.counts = torch.zeros(n_layers, len(languages), d_mlp, dtype=torch.int64)
        # float64 sums of activations: only used to break ties when ranking top-k neurons.
        self.act_sum = torch.zeros(n_layers, len(languages), d_mlp, dtype=torch.float64)
        self.tokens = torch.zeros(len(languages), dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays (independent of the tokens seen)."""
        return sum(t.numel() * t.element_size() for t in (self.counts, self.act_sum, self.tokens))

    @torch.no_grad()
    def update(
        self,
        language: str,
        acts: torch.Tensor | Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of MLP activations of ``language``; pad tokens (mask False) are skipped."""
        if language not in self.languages:
            raise MetricError(f"unknown language {language!r}; expected one of {self.languages}")
        li = self.languages.index(language)
        layers = list(acts) if not isinstance(acts, torch.Tensor) else list(acts.unbind(0))
        if len(layers) != self.n_layers:
            raise MetricError(f"acts has {len(layers)} layers, accumulator has {self.n_layers}")
        pads = mask is not None and not bool(mask.all())  # none: no gathered copy of the batch
        for lay, a in enumerate(layers):
            if a.dim() != 3 or a.shape[-1] != self.d_mlp:
                raise MetricError(
                    f"acts of layer {lay + 1} has shape {tuple(a.shape)}, "
                    f"expected [B, T, {self.d_mlp}]"
                )
            if mask is not None and tuple(mask.shape) != tuple(a.shape[:2]):
                raise MetricError(
                    f"mask shape {tuple(mask.shape)} does not match acts {tuple(a.shape[:2])}"
                )
            if pads:
                flat = a[mask.to(device=a.device, dtype=torch.bool)]
            else:
                flat = a.reshape(-1, self.d_mlp)
            flat = flat.detach()
            self.counts[lay, li] += fired_counts(flat, self.threshold).to("cpu", torch.int64)
            self.act_sum[lay, li] += column_sums(flat)
            if lay == 0:
                self.tokens[li] += flat.shape[0]

    def result(
        self,
        top_k: int | None = None,
        lape_top_rate: float = 0.01,
        filter_quantile: float | None = 0.95,
        assign_quantile: float = 0.95,
        selection: Selection = "max_entropy",
        max_entropy: float = 0.3,
        pair: tuple[str, str] | None = None,
    ) -> xr.Dataset:
        """Activation probabilities, LAPE, language-specific fractions and top-k overlap.

        selection:
          - "max_entropy" (default): a neuron is language-specific when its LAPE < ``max_entropy``
            nats (0.3 for 2 languages ~ a 92:8 split of normalised probabilities; the maximum is
            log 2 = 0.693). Informative with 2 languages, where a top-rate rule fixes the
            selected fraction by construction.
          - "top_rate": LAPE's rule, the lowest-entropy ``lape_top_rate`` fraction of all neurons
            of all layers (global, as in the official ``identify.py``).
          - "top_rate_per_layer": the same fraction taken within each layer.
        Candidates must pass LAPE's filter: some language's p >= the ``filter_quantile`` of all p
        (all layers, languages, neurons); ``None`` disables it. A selected neuron is assigned to
        every language whose p >= the ``assign_quantile`` of all p. (LAPE uses ">"; ">=" gives
        the same result unless values tie at the quantile, and keeps saturated neurons with p = 1.)
        Neurons that never fire in any language have undefined LAPE (NaN) and are never selected.
        """
        if (self.tokens == 0).any():
            empty = [
                lang for lang, n in zip(self.languages, self.tokens.tolist(), strict=True) if n == 0
            ]
            raise MetricError(f"no tokens accumulated for language(s) {empty}")
        if selection not in ("max_entropy", "top_rate", "top_rate_per_layer"):
            raise MetricError(f"unknown selection rule {selection!r}")
        if not 0.0 < lape_top_rate <= 1.0:
            raise MetricError(f"lape_top_rate must be in (0, 1], got {lape_top_rate}")
        n_layers, _n_lang, d = self.n_layers, len(self.languages), self.d_mlp
        k = int(top_k) if top_k is not None else max(1, round(0.1 * d))
        if not 1 <= k <= d:
            raise MetricError(f"top_k must be in [1, {d}], got {k}")

        p = (self.counts.double() / self.tokens.double()[None, :, None]).numpy()  # [L, lang, N]
        tot = p.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            pn = p / tot
            plogp = np.where(pn > 0, pn * np.log(np.where(pn > 0, pn, 1.0)), 0.0)
        lape = -plogp.sum(1)  # [L, N]
        lape[tot[:, 0, :] == 0] = np.nan

        allp = p.ravel()
        candidate = ~np.isnan(lape)
        if filter_quantile is not None:
            fthr = float(np.quantile(allp, filter_quantile, method="lower"))
            candidate &= (p >= fthr).any(1) & (p.max(1) > 0)
        if selection == "max_entropy":
            selected = candidate & (np.nan_to_num(lape, nan=np.inf) < max_entropy)
        else:
            ent = np.where(candidate, lape, np.inf)
            selected = np.zeros_like(candidate)
            if selection == "top_rate":
                n_sel = min(int(round(ent.size * lape_top_rate)), int(candidate.sum()))
                idx = np.argsort(ent, axis=None, kind="stable")[:n_sel]
                selected.ravel()[idx] = True
            else:
                n_sel = int(round(d * lape_top_rate))
                for lay in range(n_layers):
                    m = min(n_sel, int(candidate[lay].sum()))
                    selected[lay, np.argsort(ent[lay], kind="stable")[:m]] = True
        athr = float(np.quantile(allp, assign_quantile, method="lower"))
        assigned = selected[:, None, :] & (p >= athr) & (p > 0)  # [L, lang, N]
        frac = assigned.sum(-1) / d

        # Top-k sets per language, ranked by p with mean activation as the tie-breaker.
        a, b = pair if pair is not None else (self.languages[0], self.languages[1])
        if a not in self.languages or b not in self.languages or a == b:
            raise MetricError(f"pair {pair} must name two languages of {self.languages}")
        mean_act = (self.act_sum / self.tokens.double()[None, :, None]).numpy()
        jac = np.empty(n_layers)
        coef = np.empty(n_layers)
        for lay in range(n_layers):
            sets = []
            for lang in (a, b):
                li = self.languages.index(lang)
                order = np.lexsort((-mean_act[lay, li], -p[lay, li]))
                sets.append(set(order[:k].tolist()))
            inter = len(sets[0] & sets[1])
            jac[lay] = inter / len(sets[0] | sets[1])
            coef[lay] = inter / k
        chance = k / (2 * d - k)

        layer = np.arange(1, n_layers + 1)
        coords = {"layer": layer, "language": self.languages, "neuron": np.arange(d)}
        params = {
            "threshold": self.threshold,
            "top_k": k,
            "selection": selection,
            "max_entropy": max_entropy,
            "lape_top_rate": lape_top_rate,
            "filter_quantile": -1.0 if filter_quantile is None else filter_quantile,
            "assign_quantile": assign_quantile,
            "pair": f"{a},{b}",
        }
        ds = xr.Dataset(
            {
                "neuron_act_prob": (("layer", "language", "neuron"), p),
                "lape": (("layer", "neuron"), lape),
                "lang_specific_frac": (("layer", "language"), frac),
                "neuron_overlap": (("layer",), jac),
                "neuron_overlap_coef": (("layer",), coef),
                "neuron_overlap_chance": (("layer",), np.full(n_layers, chance)),
                "n_tokens": (("language",), self.tokens.numpy().copy()),
            },
            coords=coords,
            attrs=params,
        )
        ds["neuron_act_prob"].attrs["definition"] = (
            f"Fraction of a language's non-pad tokens on which the MLP neuron's post-activation "
            f"(blocks.l.mlp.hook_post) is > {self.threshold}."
        )
        ds["lape"].attrs["definition"] = (
            "Language activation probability entropy: entropy (nats) of the neuron's activation "
            "probabilities normalised over languages; NaN if it never fires."
        )
        ds["lang_specific_frac"].attrs["definition"] = (
            f"Fraction of the layer's neurons that are selected as language-specific "
            f"({selection}) and assigned to the language (LAPE filter and assignment)."
        )
        ds["neuron_overlap"].attrs["definition"] = (
            f"Jaccard index of the top-{k} neurons by activation probability of {a} and {b}."
        )
        ds["neuron_overlap_coef"].attrs["definition"] = (
            f"Overlap coefficient |A∩B|/min(|A|,|B|) of the top-{k} neuron sets of {a} and {b}."
        )
        ds["neuron_overlap_chance"].attrs["definition"] = (
            "Expected Jaccard index k/(2N-k) of two random k-sets out of N neurons."
        )
        ds["n_tokens"].attrs["definition"] = "Non-pad tokens accumulated per language."
        for v in ds.data_vars.values():
            v.attrs.update(params)
        return ds


class _NeuronRun:
    def __init__(self, ctx: CheckpointContext):
        self.pair = ctx.series.pair
        self.acc = NeuronAccumulator(
            ctx.view.n_layers,
            ctx.view.d_mlp,
            languages=list(self.pair),
            threshold=ctx.options.neuron_threshold,
        )
        self.top_k = max(1, int(round(ctx.options.neuron_top_frac * ctx.view.d_mlp)))

    def update(self, batch: PairBatch) -> None:
        self.acc.update(self.pair[0], batch.l1.mlp, batch.l1.mask)
        self.acc.update(self.pair[1], batch.l2.mlp, batch.l2.mask)

    def result(self) -> xr.Dataset:
        return self.acc.result(top_k=self.top_k)


class Neurons(Family):
    """Which MLP neurons fire for which language (LAPE), and how much the languages' most
    active neurons overlap, per block."""

    name = "neurons"
    variables = (
        Variable("neuron_act_prob", "neuron activation probability"),
        Variable("lape", "language activation probability entropy"),
        Variable("lang_specific_frac", "language-specific neuron fraction"),
        Variable("neuron_overlap", "top-k active neuron overlap (Jaccard)"),
        Variable("neuron_overlap_coef", "top-k active neuron overlap coefficient"),
        Variable("neuron_overlap_chance", "top-k neuron overlap expected by chance"),
        Variable("n_tokens", "tokens seen per language"),
    )
    needs = Needs(activations=frozenset({"mlp"}))

    def start(self, ctx: CheckpointContext) -> _NeuronRun:
        return _NeuronRun(ctx)

"""The logit lens over training: which language does each layer "think in"?

Each layer's residual stream (layer 0 = the embeddings' output, 1..L = after block l, the
shared convention) is decoded through the model's own final norm and unembedding
(`ModelView.decode`; at layer L that is the model's own logits). Per layer and input language
of the parallel pairs the family stores

* `lens_ce`: cross-entropy (nats) of the true next token under the lens distribution;
* `lens_mass`: the share of next-token probability on each language's vocabulary
  (`vocab_language`: the run's languages, plus `shared` for ids several languages use:
  padding, <|endoftext|>, anchors);
* `lens_acc` / `lens_acc_collapsed`: top-1 accuracy, plain and clone-collapsed (the argmax
  counts when it is the right token in any language: ids are mapped through the clone map
  before comparing; for disjoint real vocabularies both are the same).

The helpers `vocab_buckets` and `collapse_map` (model id -> language bucket / canonical id)
are shared with the patching family.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from probekit.hooks import pad_batch
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable
from probekit.series import Series

SHARED = "shared"
_CHUNK_ELEMENTS = 1 << 23  # logits decoded at once (positions x vocabulary): 64 MB in float64

_DEFINITIONS = {
    "lens_ce": "logit lens: mean cross-entropy (nats) of the true next token when the layer's "
    "residual stream is decoded by the model's own final norm and unembedding",
    "lens_mass": "logit lens: mean share of next-token probability on each language's "
    "vocabulary ids (shared: ids of several languages, padding, <|endoftext|>, anchors)",
    "lens_acc": "logit lens: share of positions whose argmax is the true next token",
    "lens_acc_collapsed": "logit lens: share of positions whose argmax is the true next token "
    "in any language (ids mapped through the clone map before comparing)",
}


def needs_vocabulary(series: Series) -> str | None:
    """None for a probekit run with two or more languages, else the one-line reason."""
    if getattr(series, "vocab", None) is None:
        return (
            f"{series.run_dir}: needs the run's vocabulary (which ids belong to which "
            "language); an external checkpoint series has none"
        )
    if len(series.languages) < 2:
        return f"{series.run_dir}: a monolingual run has no second language to compare"
    return None


def vocab_buckets(vocab, size: int) -> tuple[np.ndarray, list[str]]:
    """model id -> bucket index, and the bucket names (the languages, then `shared`).

    An id used by exactly one language belongs to it; ids of several languages (padding,
    <|endoftext|>, anchored pieces, a joint vocabulary) and ids no language uses are shared.
    """
    langs = list(vocab.languages)
    owners = np.zeros((size, len(langs)), dtype=bool)
    for j, lang in enumerate(langs):
        ids = np.asarray(vocab.to_model[lang])
        owners[ids[ids < size], j] = True
    bucket = np.full(size, len(langs), dtype=np.int64)
    single = owners.sum(1) == 1
    bucket[single] = owners[single].argmax(1)
    return bucket, langs + [SHARED]


def collapse_map(vocab, size: int) -> np.ndarray:
    """model id -> canonical id: every clone of a piece maps to the first language's id.

    Languages with their own tokenizer (real pairs) keep their ids (identity)."""
    canon = np.arange(size, dtype=np.int64)
    if vocab is None:
        return canon
    first = vocab.languages[0]
    key = vocab.tokenizer_of[first]
    base = np.asarray(vocab.to_model[first])
    for lang in vocab.languages[1:]:
        if vocab.tokenizer_of[lang] == key:
            ids = np.asarray(vocab.to_model[lang])
            canon[ids] = base
    return canon


def next_token_targets(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [B, T] and the mask [B, T-1] of positions that have a real next token."""
    ids, mask = pad_batch(seqs)
    return ids, mask[:, 1:] & mask[:, :-1]


def batch_targets(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The true next tokens [n] of a batch's real positions, and the mask [B, T-1] that picks
    those positions' states out of ``resid[..., :-1]``."""
    ids, valid = next_token_targets(seqs)
    return ids[:, 1:][valid], valid


class _LensRun:
    def __init__(self, ctx: CheckpointContext):
        series = ctx.series
        self.ctx = ctx
        self.pair = list(series.pair)
        par = series.parallel
        self.seqs = (par.ids1, par.ids2)
        size = ctx.view.vocab_size
        bucket, self.buckets = vocab_buckets(series.vocab, size)
        self.onehot = torch.zeros(size, len(self.buckets), dtype=torch.float64)
        self.onehot[torch.arange(size), torch.as_tensor(bucket)] = 1.0
        self.canon = torch.as_tensor(collapse_map(series.vocab, size))
        n_layer = ctx.view.n_layers + 1
        self.ce = np.zeros((n_layer, 2))
        self.mass = np.zeros((n_layer, 2, len(self.buckets)))
        self.acc = np.zeros((n_layer, 2))
        self.acc_c = np.zeros((n_layer, 2))
        self.count = np.zeros(2)

    @torch.no_grad()
    def update(self, batch: PairBatch) -> None:
        for side, act in enumerate((batch.l1, batch.l2)):
            target, valid = batch_targets([self.seqs[side][i] for i in batch.index])
            n = int(target.numel())
            if n == 0:
                continue
            self.count[side] += n
            chunk = max(1, _CHUNK_ELEMENTS // self.onehot.shape[0])  # rows of [n, V] at once
            for lay in range(act.resid.shape[0]):
                states = act.resid[lay, :, :-1][valid]  # [n, d]
                for lo in range(0, n, chunk):
                    self._add(lay, side, states[lo : lo + chunk], target[lo : lo + chunk])

    def _add(self, lay: int, side: int, states: torch.Tensor, target: torch.Tensor) -> None:
        model, view = self.ctx.model, self.ctx.view
        logits = view.decode(model, states.to(self.ctx.options.device)).float().cpu()
        logp = torch.log_softmax(logits.double(), -1)
        self.ce[lay, side] -= float(logp.gather(1, target[:, None]).sum())
        self.mass[lay, side] += (logp.exp() @ self.onehot).sum(0).numpy()
        top = logits.argmax(-1)
        self.acc[lay, side] += float((top == target).sum())
        self.acc_c[lay, side] += float((self.canon[top] == self.canon[target]).sum())

    def result(self) -> xr.Dataset:
        count = np.maximum(self.count, 1)
        layer = np.arange(self.ce.shape[0])
        ds = xr.Dataset(
            {
                "lens_ce": (("layer", "language"), self.ce / count),
                "lens_mass": (
                    ("layer", "language", "vocab_language"),
                    self.mass / count[None, :, None],
                ),
                "lens_acc": (("layer", "language"), self.acc / count),
                "lens_acc_collapsed": (("layer", "language"), self.acc_c / count),
            },
            coords={"layer": layer, "language": self.pair, "vocab_language": self.buckets},
            attrs={
                "definition": "logit lens: each layer's residual stream decoded by the model's "
                "own final norm and unembedding, over the parallel pairs' next tokens",
                "n_targets": [int(c) for c in self.count],
            },
        )
        for name, text in _DEFINITIONS.items():
            ds[name].attrs["definition"] = text
        return ds


class Lens(Family):
    """The logit lens per layer and input language: next-token loss, the share of probability
    on each language's vocabulary, and clone-collapsed accuracy."""

    name = "lens"
    command = "causal"  # computed when named: probekit align RUN --metrics lens
    variables = (
        Variable("lens_ce", "logit-lens next-token cross-entropy", _DEFINITIONS["lens_ce"]),
        Variable(
            "lens_mass", "logit-lens probability mass per vocabulary", _DEFINITIONS["lens_mass"]
        ),
        Variable("lens_acc", "logit-lens top-1 accuracy", _DEFINITIONS["lens_acc"]),
        Variable(
            "lens_acc_collapsed",
            "logit-lens clone-collapsed accuracy",
            _DEFINITIONS["lens_acc_collapsed"],
        ),
    )
    needs = Needs(activations=frozenset({"resid"}))

    def applies(self, series: Series) -> str | None:
        return needs_vocabulary(series)

    def start(self, ctx: CheckpointContext) -> _LensRun:
        return _LensRun(ctx)

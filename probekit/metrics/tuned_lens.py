"""The tuned lens per checkpoint, beside the logit lens (Belrose et al. 2023, arXiv 2303.08112).

The logit lens (`probekit.metrics.lens`) decodes every layer's residual stream with the final
norm and unembedding, which misreads early layers whose basis is not yet the output's. The
tuned lens first maps layer l's state through an affine translator ``h -> W_l h + b_l``
trained so that the translated state, decoded the same way, predicts what the model's final
layer predicts (KL to the final next-token distribution). Layer L's translator is the
identity: there the reading is the model's own logits.

Per checkpoint:

1. Training text: the held-out test text of every language of the series (`Series.test_texts`,
   which the parallel pairs the readings score are not drawn from), the same number of tokens
   per language (``lens_tokens``; all languages cut to the shortest), cut into the analysis
   sequence length. A fifth as many further tokens per language are the validation split of
   the stopping rule.
2. Translators: initialised at the previous checkpoint's stored translators (the warm start,
   ``probekit.artifacts.previous_artifact_step``), else at the identity with zero bias (cold);
   Adam on the sum over layers of the mean KL(final || translated), minibatches of
   ``BATCH_TOKENS`` drawn with a generator seeded by ``lens_seed``. Every ``EVAL_EVERY`` steps
   the validation KL is measured; training stops once it has not improved by a relative
   ``lens_tol`` for ``lens_patience`` evaluations, or after ``lens_steps`` steps, and keeps the
   best translators seen. Deterministic given the seed (CPU).
3. Stored: ``RUN/artifacts/tuned_lens/step_N.safetensors`` (``weight`` [L+1, d, d], ``bias``
   [L+1, d], the last layer the identity) with the training record (tokens per language,
   steps, initial and final validation KL, seed, the step it was warm-started from).
4. Readings over the parallel pairs, both lenses side by side (dimension ``lens``: logit,
   tuned): next-token CE, KL to the final distribution, top-1 accuracy (plain and
   clone-collapsed), vocabulary mass per language, the logit-vs-tuned disagreement, the
   latent-language layer and, for cloned languages, the rare language's mass on the frequent
   language's ids.

Under dask, checkpoints run out of order on several workers: a checkpoint whose predecessor's
translators are not stored yet trains cold, and its record says so (``warm_start_step`` null).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from probekit.artifacts import artifact_path, load_artifact, previous_artifact_step, save_artifact
from probekit.errors import MetricError, ProbekitError, RunDirError
from probekit.hooks import load_bridge, pad_batch, run_activations
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable
from probekit.metrics.lens import batch_targets, collapse_map, vocab_buckets
from probekit.series import Series

FAMILY = "tuned_lens"
LENSES = ("logit", "tuned")
BATCH_TOKENS = 512  # training positions per Adam step (all languages mixed)
EVAL_EVERY = 10  # steps between two validation measurements of the stopping rule
VAL_SHARE = 4  # validation tokens per language = lens_tokens / VAL_SHARE
MIN_TOKENS = 16  # fewer held-out tokens in a language than this: a one-line error
_CHUNK_ELEMENTS = 1 << 21  # positions x vocabulary decoded at once in the readings

_DEFINITIONS = {
    "tuned_ce": "mean cross-entropy (nats) of the true next token of the parallel pairs when "
    "the layer's residual stream is decoded by the final norm and unembedding, directly "
    "(lens=logit) or after the layer's trained affine translator (lens=tuned)",
    "tuned_kl": "mean KL(final || lens) (nats) from the model's own next-token distribution "
    "to the layer's lens distribution; 0 at the last layer",
    "tuned_acc": "share of positions whose lens argmax is the true next token",
    "tuned_acc_collapsed": "share of positions whose lens argmax is the true next token in "
    "any language (ids mapped through the clone map before comparing)",
    "tuned_mass": "mean share of the lens's next-token probability on each language's "
    "vocabulary ids (shared: ids of several languages, padding, <|endoftext|>, anchors)",
    "tuned_disagreement": "mean KL(tuned || logit) (nats) between the two lenses' readings "
    "of the same state",
    "tuned_latent_layer": "first layer at which the input language's own vocabulary holds "
    "more than half of the lens's mean probability mass; NaN when no layer does",
    "tuned_dominant_mass": "cloned languages: the share of lens probability the rare "
    "language's input puts on the frequent language's ids (the 'thinks in the dominant "
    "language' reading)",
    "tuned_fit_kl": "the tuned lens's own validation KL(final || tuned) per layer, on the "
    "held-out training text's validation split (language-balanced)",
    "tuned_fit_steps": "Adam steps the tuned lens trained for at this checkpoint (stopping "
    "rule on the validation KL)",
    "tuned_warm_start": "the step whose stored translators this checkpoint's training "
    "started from; -1 for a cold start (identity)",
}


@dataclass(frozen=True)
class LensBudget:
    """How a tuned lens trains; the defaults are AnalysisOptions' (CPU-affordable)."""

    tokens: int = 4096  # training tokens per language
    max_steps: int = 500
    patience: int = 2  # validation evaluations without improvement before stopping
    tol: float = 0.03  # relative improvement of the validation KL that counts
    lr: float = 1e-2
    seed: int = 0
    batch: int = BATCH_TOKENS
    eval_every: int = EVAL_EVERY

    @classmethod
    def from_options(cls, opts: Any) -> LensBudget:
        return cls(
            tokens=opts.lens_tokens,
            max_steps=opts.lens_steps,
            patience=opts.lens_patience,
            tol=float(opts.lens_tol),
            lr=float(opts.lens_lr),
            seed=opts.lens_seed,
        )


@dataclass
class Translators:
    """One affine map per layer: ``weight`` [L+1, d, d], ``bias`` [L+1, d]; h -> W h + b."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def identity(cls, n_layers: int, d: int) -> Translators:
        eye = torch.eye(d).expand(n_layers + 1, d, d).clone()
        return cls(eye, torch.zeros(n_layers + 1, d))

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w, b = self.weight[layer].to(h), self.bias[layer].to(h)
        return h @ w.T + b

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}


def check_shapes(tensors: dict[str, torch.Tensor], n_layers: int, d: int, where: str) -> None:
    """Stored translators must fit the checkpoint: [L+1, d, d] and [L+1, d]."""
    want = {"weight": (n_layers + 1, d, d), "bias": (n_layers + 1, d)}
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    if got != want:
        raise RunDirError(
            f"{where}: stored {FAMILY} translators {got} do not fit the checkpoint "
            f"({n_layers + 1} layers of width {d}: {want}); remove that file to train afresh"
        )


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def heldout_kl(
    tr: Translators, states: torch.Tensor, decode: Callable, chunk: int = 1024
) -> np.ndarray:
    """Mean KL(final || tuned) per layer [L+1] over states [L+1, n, d] (layer L: 0)."""
    n_layer, n = states.shape[0], states.shape[1]
    total = np.zeros(n_layer)
    for lo in range(0, n, chunk):
        final = torch.log_softmax(decode(states[-1, lo : lo + chunk]).float(), -1)
        for lay in range(n_layer - 1):
            x = tr.apply(lay, states[lay, lo : lo + chunk])
            logq = torch.log_softmax(decode(x).float(), -1)
            total[lay] += float(_kl_rows(final, logq).double().sum())
    return total / max(n, 1)


def train_translators(
    train: torch.Tensor,
    val: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    budget: LensBudget,
    init: Translators | None = None,
) -> tuple[Translators, dict[str, Any]]:
    """Translators for layers 0..L-1 of states [L+1, n, d] (layer L is the identity), trained
    by KL to ``decode(states[L])``, stopped on the validation states' KL; -> (best, record).

    Gradients are taken with ``torch.autograd.grad`` for the translators only, so nothing
    accumulates in the model's own parameters through ``decode``."""
    n_layer, n, d = train.shape
    n_tr = n_layer - 1
    start = init or Translators.identity(n_tr, d)
    device = train.device
    eye = torch.eye(d, device=device)
    # trained as the identity plus a correction (the translator's natural zero)
    delta = (start.weight[:n_tr].to(device) - eye).clone().requires_grad_(True)
    bias = start.bias[:n_tr].to(device).clone().requires_grad_(True)
    opt = torch.optim.Adam([delta, bias], lr=budget.lr)
    gen = torch.Generator().manual_seed(int(budget.seed))

    def current() -> Translators:
        w = torch.cat([(delta.detach() + eye), eye[None]]).cpu()
        b = torch.cat([bias.detach(), torch.zeros(1, d, device=device)]).cpu()
        return Translators(w.clone(), b.clone())

    best = current()
    first = heldout_kl(best, val, decode)
    best_kl, best_layers, best_step = float(first.sum()), first, 0
    bad, step, stopped = 0, 0, "max_steps"
    while step < budget.max_steps:
        idx = torch.randint(n, (min(budget.batch, n),), generator=gen).to(device)
        with torch.no_grad():
            target = torch.log_softmax(decode(train[-1, idx]).float(), -1)
        with torch.enable_grad():  # the driver streams under no_grad
            loss = train.new_zeros(())
            for lay in range(n_tr):
                x = train[lay, idx] @ (delta[lay] + eye).T + bias[lay]
                loss = loss + _kl_rows(target, torch.log_softmax(decode(x).float(), -1)).mean()
            g_delta, g_bias = torch.autograd.grad(loss, [delta, bias])
        delta.grad, bias.grad = g_delta, g_bias
        opt.step()
        step += 1
        if step % budget.eval_every == 0 or step == budget.max_steps:
            now = current()
            layers = heldout_kl(now, val, decode)
            kl = float(layers.sum())
            if kl < best_kl * (1 - budget.tol):
                best, best_kl, best_layers, best_step, bad = now, kl, layers, step, 0
            else:
                bad += 1
                if bad >= budget.patience:
                    stopped = "converged"
                    break
    record = {
        "steps": step,
        "best_step": best_step,
        "stopped": stopped,
        "initial_kl": float(first.sum() / max(n_tr, 1)),
        "final_kl": float(best_kl / max(n_tr, 1)),  # mean over the trained layers
        "final_kl_per_layer": [float(x) for x in best_layers],
        "seed": int(budget.seed),
        "lr": float(budget.lr),
        "tol": float(budget.tol),
        "patience": int(budget.patience),
        "batch_tokens": int(min(budget.batch, n)),
        "eval_every": int(budget.eval_every),
    }
    return best, record


def lens_languages(series: Series) -> list[str]:
    """The languages the lens trains on: every language of a probekit run, the compared
    pair of an external series."""
    return (
        list(series.languages) if getattr(series, "vocab", None) is not None else list(series.pair)
    )


def balanced_heldout(series: Series, tokens: int) -> tuple[dict[str, tuple], dict[str, Any]]:
    """language -> (training ids, validation ids), equal lengths in every language.

    The test split of each language (not the parallel pairs the readings score). A language
    with fewer tokens than asked cuts every language to its length (still balanced)."""
    texts = series.test_texts()
    langs = lens_languages(series)
    missing = [lang for lang in langs if lang not in texts]
    if missing:
        raise MetricError(
            f"{series.run_dir}: {FAMILY} needs held-out text in every language; none for "
            f"{', '.join(missing)} (external series: --test LANG=FILE per language)"
        )
    want_val = max(tokens // VAL_SHARE, 1)
    have = min(len(texts[lang][0]) for lang in langs)
    if have < MIN_TOKENS:
        short = min(langs, key=lambda lang: len(texts[lang][0]))
        raise MetricError(
            f"{series.run_dir}: {FAMILY}: only {have} held-out tokens in {short} "
            f"(needs at least {MIN_TOKENS})"
        )
    if have >= tokens + want_val:
        n_tr, n_val = tokens, want_val
    else:  # all languages cut to the shortest, the same train/validation proportion
        n_val = max(have // (VAL_SHARE + 1), 1)
        n_tr = have - n_val
    out = {}
    for lang in langs:
        ids = np.asarray(texts[lang][0])
        out[lang] = (ids[:n_tr], ids[n_tr : n_tr + n_val])
    info = {"languages": langs, "tokens_per_language": int(n_tr), "val_tokens": int(n_val)}
    return out, info


def _chunks(ids: np.ndarray, length: int) -> list[np.ndarray]:
    return [ids[s : s + length] for s in range(0, len(ids), length) if len(ids[s : s + length])]


@torch.no_grad()
def heldout_states(ctx: CheckpointContext, bridge, seqs: list[np.ndarray]) -> torch.Tensor:
    """Residual states [L+1, n, d] of every real position of these sequences."""
    out = []
    bs = ctx.options.batch_size
    for lo in range(0, len(seqs), bs):
        ids, mask = pad_batch(seqs[lo : lo + bs])
        act = run_activations(bridge, ids, mask, ctx.view, ["resid"])
        out.append(act.resid[:, act.mask])
    return torch.cat(out, 1)


def _heldout_bridge(ctx: CheckpointContext):
    """The driver's bridge for a model the process keeps (``bridge_for`` wraps a copy and the
    driver's next call reuses it); a bigger model is wrapped in place by the driver, so the
    held-out forwards boot on a copy, as ablation does."""
    from probekit.checkpoints import small_enough_to_keep
    from probekit.hooks import bridge_for

    series, device = ctx.series, ctx.options.device
    if small_enough_to_keep(ctx.model):
        return bridge_for(ctx.model, series.tokenizer, ctx.view, device=device)
    return load_bridge(copy.deepcopy(ctx.model), series.tokenizer, ctx.view, device=device)


def fit_checkpoint(ctx: CheckpointContext, step: int) -> tuple[Translators, dict[str, Any]]:
    """Train (warm or cold) the translators of one checkpoint; nothing is stored here."""
    series, view = ctx.series, ctx.view
    budget = LensBudget.from_options(ctx.options)
    n_layers, d = view.n_layers, view.d_model
    texts, info = balanced_heldout(series, budget.tokens)
    prev = previous_artifact_step(series.run_dir, FAMILY, step)
    init = None
    if prev is not None:
        tensors, _ = load_artifact(series.run_dir, FAMILY, prev)
        check_shapes(tensors, n_layers, d, str(artifact_path(series.run_dir, FAMILY, prev)))
        init = Translators(tensors["weight"].float(), tensors["bias"].float())
    bridge = _heldout_bridge(ctx)
    seq_len = series.seq_len
    train = [heldout_states(ctx, bridge, _chunks(tr, seq_len)) for tr, _ in texts.values()]
    val = [heldout_states(ctx, bridge, _chunks(va, seq_len)) for _, va in texts.values()]
    device = ctx.options.device
    train_s, val_s = torch.cat(train, 1).to(device), torch.cat(val, 1).to(device)
    del train, val

    def decode(x: torch.Tensor) -> torch.Tensor:
        return view.decode(ctx.model, x)

    tr, record = train_translators(train_s, val_s, decode, budget, init)
    record |= info | {"step": int(step), "warm_start_step": prev, "family": FAMILY}
    return tr, record


class _TunedRun:
    def __init__(self, ctx: CheckpointContext, step: int):
        self.ctx = ctx
        self.step = step
        self.tr, self.record = fit_checkpoint(ctx, step)
        series = ctx.series
        self.pair = list(series.pair)
        par = series.parallel
        self.seqs = (par.ids1, par.ids2)
        size = ctx.view.vocab_size
        self.vocab = getattr(series, "vocab", None)
        if self.vocab is not None:
            bucket, self.buckets = vocab_buckets(self.vocab, size)
            self.onehot = torch.zeros(size, len(self.buckets), dtype=torch.float64)
            self.onehot[torch.arange(size), torch.as_tensor(bucket)] = 1.0
        else:
            self.buckets, self.onehot = [], None
        self.canon = torch.as_tensor(collapse_map(self.vocab, size))
        shape = (len(LENSES), ctx.view.n_layers + 1, 2)
        self.ce, self.kl = np.zeros(shape), np.zeros(shape)
        self.acc, self.acc_c = np.zeros(shape), np.zeros(shape)
        self.mass = np.zeros(shape + (len(self.buckets),))
        self.dis = np.zeros(shape[1:])
        self.count = np.zeros(2)

    @torch.no_grad()
    def update(self, batch: PairBatch) -> None:
        device = self.ctx.options.device
        for side, act in enumerate((batch.l1, batch.l2)):
            target, valid = batch_targets([self.seqs[side][i] for i in batch.index])
            n = int(target.numel())
            if n == 0:
                continue
            self.count[side] += n
            states = act.resid[:, :, :-1][:, valid]  # [L+1, n, d]
            chunk = max(1, _CHUNK_ELEMENTS // self.ctx.view.vocab_size)
            for lo in range(0, n, chunk):
                self._add(side, states[:, lo : lo + chunk].to(device), target[lo : lo + chunk])

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ctx.view.decode(self.ctx.model, x).float().cpu()
        return torch.log_softmax(logits.double(), -1)

    def _add(self, side: int, states: torch.Tensor, target: torch.Tensor) -> None:
        final = self._decode(states[-1])
        for lay in range(states.shape[0]):
            logit = final if lay == states.shape[0] - 1 else self._decode(states[lay])
            tuned = (
                final
                if lay == states.shape[0] - 1
                else self._decode(self.tr.apply(lay, states[lay]))
            )
            for k, logq in enumerate((logit, tuned)):
                self.ce[k, lay, side] -= float(logq.gather(1, target[:, None]).sum())
                self.kl[k, lay, side] += float(_kl_rows(final, logq).sum())
                top = logq.argmax(-1)
                self.acc[k, lay, side] += float((top == target).sum())
                self.acc_c[k, lay, side] += float((self.canon[top] == self.canon[target]).sum())
                if self.onehot is not None:
                    self.mass[k, lay, side] += (logq.exp() @ self.onehot).sum(0).numpy()
            self.dis[lay, side] += float(_kl_rows(tuned, logit).sum())

    def result(self) -> xr.Dataset:
        count = np.maximum(self.count, 1)
        n_layer = self.ce.shape[1]
        dims = ("lens", "layer", "language")
        fit = np.asarray(self.record["final_kl_per_layer"])
        prev = self.record["warm_start_step"]
        data = {
            "tuned_ce": (dims, self.ce / count),
            "tuned_kl": (dims, self.kl / count),
            "tuned_acc": (dims, self.acc / count),
            "tuned_acc_collapsed": (dims, self.acc_c / count),
            "tuned_disagreement": (("layer", "language"), self.dis / count),
            "tuned_fit_kl": (("layer",), fit),
            "tuned_fit_steps": ((), float(self.record["steps"])),
            "tuned_warm_start": ((), float(-1 if prev is None else prev)),
        }
        coords: dict[str, Any] = {
            "lens": list(LENSES),
            "layer": np.arange(n_layer),
            "language": self.pair,
        }
        if self.onehot is not None:
            mass = self.mass / count[None, None, :, None]
            data["tuned_mass"] = (dims + ("vocab_language",), mass)
            coords["vocab_language"] = self.buckets
            data["tuned_latent_layer"] = (("lens", "language"), self._latent(mass))
            dominant = self._dominant(mass)
            if dominant is not None:
                data["tuned_dominant_mass"] = (("lens", "layer"), dominant)
        ds = xr.Dataset(
            data,
            coords=coords,
            attrs={
                "definition": "logit and tuned lens side by side over the parallel pairs' "
                "next tokens; the tuned lens's translators are trained per checkpoint on "
                "language-balanced held-out text",
                "n_targets": [int(c) for c in self.count],
                "training_languages": list(self.record["languages"]),
                "training_tokens_per_language": int(self.record["tokens_per_language"]),
            },
        )
        for name, text in _DEFINITIONS.items():
            if name in ds:
                ds[name].attrs["definition"] = text
        if "tuned_dominant_mass" in ds:
            ds["tuned_dominant_mass"].attrs |= self._rare_frequent()
        # stored last: a failure above leaves no artifact without its readings
        save_artifact(self.ctx.series.run_dir, FAMILY, self.step, self.tr.tensors(), self.record)
        return ds

    def _latent(self, mass: np.ndarray) -> np.ndarray:
        out = np.full((len(LENSES), 2), np.nan)
        for side, lang in enumerate(self.pair):
            own = mass[:, :, side, self.buckets.index(lang)]  # [lens, layer]
            for k in range(len(LENSES)):
                hit = np.flatnonzero(own[k] > 0.5)
                if hit.size:
                    out[k, side] = float(hit[0])
        return out

    def _rare_frequent(self) -> dict[str, str]:
        """The rare language of a cloned pair: the config's `p` is the second language's
        share (as in report.findings); balanced or scheduled runs: the second language."""
        cfg = getattr(self.ctx.series, "cfg", None)
        p = getattr(getattr(cfg, "data", None), "p", 0.5)
        try:
            p = float(p)
        except (TypeError, ValueError):
            p = 0.5
        rare, freq = (self.pair[0], self.pair[1]) if p > 0.5 else (self.pair[1], self.pair[0])
        return {"rare_language": rare, "frequent_language": freq}

    def _dominant(self, mass: np.ndarray) -> np.ndarray | None:
        if self.ctx.series.mode != "clone":
            return None
        names = self._rare_frequent()
        side = self.pair.index(names["rare_language"])
        return mass[:, :, side, self.buckets.index(names["frequent_language"])]


class TunedLens(Family):
    """The tuned lens beside the logit lens per layer and input language: next-token loss,
    KL to the final distribution, vocabulary mass, disagreement, latent-language layer."""

    name = FAMILY
    command = "causal"  # computed when named: probekit align RUN --metrics tuned_lens
    variables = (
        Variable(
            "tuned_ce", "next-token cross-entropy, logit vs tuned lens", _DEFINITIONS["tuned_ce"]
        ),
        Variable(
            "tuned_kl",
            "KL to the final distribution, logit vs tuned lens",
            _DEFINITIONS["tuned_kl"],
        ),
        Variable("tuned_acc", "top-1 accuracy, logit vs tuned lens", _DEFINITIONS["tuned_acc"]),
        Variable(
            "tuned_acc_collapsed",
            "clone-collapsed top-1 accuracy, logit vs tuned lens",
            _DEFINITIONS["tuned_acc_collapsed"],
        ),
        Variable(
            "tuned_mass",
            "probability mass per vocabulary, logit vs tuned lens",
            _DEFINITIONS["tuned_mass"],
        ),
        Variable(
            "tuned_disagreement",
            "KL between the tuned and the logit lens",
            _DEFINITIONS["tuned_disagreement"],
        ),
        Variable(
            "tuned_latent_layer",
            "latent-language layer, logit vs tuned lens",
            _DEFINITIONS["tuned_latent_layer"],
        ),
        Variable(
            "tuned_dominant_mass",
            "rare language's mass on the frequent language's ids",
            _DEFINITIONS["tuned_dominant_mass"],
        ),
        Variable("tuned_fit_kl", "tuned lens validation KL", _DEFINITIONS["tuned_fit_kl"]),
        Variable("tuned_fit_steps", "tuned lens training steps", _DEFINITIONS["tuned_fit_steps"]),
        Variable(
            "tuned_warm_start", "tuned lens warm-start step", _DEFINITIONS["tuned_warm_start"]
        ),
    )
    needs = Needs(activations=frozenset({"resid"}), test_tokens=True)

    def applies(self, series: Series) -> str | None:
        if len(series.languages) < 2:
            return f"{series.run_dir}: a monolingual run has no second language to compare"
        try:
            balanced_heldout(series, 1)  # every language has held-out text (cached)
        except ProbekitError as exc:
            return str(exc)
        return None

    def start(self, ctx: CheckpointContext) -> _TunedRun:
        if ctx.step is None:  # the driver sets it; a hand-made context must too
            raise MetricError(f"{FAMILY}: the checkpoint context carries no step")
        return _TunedRun(ctx, int(ctx.step))


__all__ = [
    "FAMILY",
    "LENSES",
    "LensBudget",
    "Translators",
    "TunedLens",
    "balanced_heldout",
    "check_shapes",
    "fit_checkpoint",
    "heldout_kl",
    "train_translators",
]

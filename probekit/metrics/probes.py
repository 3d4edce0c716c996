"""Cross-lingual probe transfer: the probing analogue of "fine-tune on EN1, test on EN2".

Per layer, a linear probe (StandardScaler + LogisticRegression, both fitted on the training
language only) is trained on one language's train split and scored on the OTHER language's test
split (``probe_transfer``) and on its own test split (``probe_in_language``, the reference
point). If the model encodes the property the same way in both languages, transfer approaches
in-language accuracy; if not, it falls toward ``probe_chance``.

Example::

    ds = probe_transfer(h_en1, token_labels(pieces1), h_en2, token_labels(pieces2), paired=True)
    ds.probe_transfer.sel(direction="L1->L2")
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import xarray as xr
from sklearn import config_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probekit.errors import MetricError
from probekit.metrics.base import CheckpointContext, Family, Needs, PairBatch, Variable

__all__ = [
    "WORD_START",
    "WORD_CONT",
    "PUNCT",
    "DIGIT",
    "OTHER",
    "TOKEN_CLASSES",
    "token_labels",
    "probe_transfer",
    "Probes",
]

# Token classes of token_labels()
WORD_START = 0  # a piece with a letter that begins a word (byte-level BPE: leading 'Ġ' = space)
WORD_CONT = 1  # a piece with a letter that continues a word (no leading space)
PUNCT = 2  # only punctuation/symbols (after the leading space)
DIGIT = 3  # digits, possibly with punctuation, no letters (e.g. "12", " 3", "1.")
OTHER = 4  # whitespace-only (newline 'Ċ'), empty, or special tokens such as <pad>
TOKEN_CLASSES = ("word_start", "word_cont", "punct", "digit", "other")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char standing for each byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decode_piece(piece: str) -> str:
    dec = _byte_decoder()
    raw = b"".join(bytes([dec[ch]]) if ch in dec else ch.encode() for ch in piece)
    # a piece may hold part of a multi-byte char: it becomes U+FFFD, counted as a letter below
    return raw.decode("utf-8", errors="replace")


def _classify(text: str) -> int:
    core = text.strip()
    if not core:
        return OTHER
    has_letter = any(ch.isalpha() or ch == "\ufffd" for ch in core)
    if has_letter:
        return WORD_START if text[0].isspace() else WORD_CONT
    if any(ch.isdigit() for ch in core):
        return DIGIT
    if all(unicodedata.category(ch)[0] in "PS" for ch in core):
        return PUNCT
    return OTHER


def token_labels(pieces: Sequence[str], byte_level: bool = True) -> np.ndarray:
    """Class (WORD_START, WORD_CONT, PUNCT, DIGIT, OTHER = 0..4) of each token piece.

    ``pieces`` are the tokenizer's piece strings, one per token. With ``byte_level`` they are
    byte-level BPE pieces ('Ġ' = space, 'Ċ' = newline) and are decoded to text first; otherwise
    they are taken as text. Pieces shaped ``<...>`` (``<pad>``, ``<|endoftext|>``) are OTHER.
    """
    out = np.empty(len(pieces), dtype=np.int64)
    for i, piece in enumerate(pieces):
        if not isinstance(piece, str):
            raise MetricError(f"token_labels needs piece strings, got {type(piece).__name__}")
        if len(piece) > 2 and piece.startswith("<") and piece.endswith(">"):
            out[i] = OTHER
            continue
        out[i] = _classify(_decode_piece(piece) if byte_level else piece)
    return out


def _check(feats: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats)
    labels = np.asarray(labels)
    if feats.ndim != 3:
        raise MetricError(f"probe features {name} must be [layer, item, dim], got {feats.shape}")
    if labels.shape != (feats.shape[1],):
        raise MetricError(
            f"probe labels {name} must have shape ({feats.shape[1]},), got {labels.shape}"
        )
    if not np.all(np.isfinite(feats)):
        raise MetricError(f"probe features {name} contain NaN or inf")
    return feats, labels


def _split(n: int, test_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    n_test = int(round(test_frac * n))
    if n_test < 1 or n - n_test < 2:
        raise MetricError(f"probe split: {n} items with test_frac={test_frac} leaves a split empty")
    return perm[n_test:], perm[:n_test]


def _accuracy(clf, feats: np.ndarray, labels: np.ndarray) -> float:  # noqa: ANN001
    """clf.score's number (the mean of prediction == label) without the label-type checks of
    sklearn's accuracy_score, which took half as long as the fit itself."""
    return float(np.mean(clf.predict(feats) == labels))


def probe_transfer(
    feats1: np.ndarray,
    labels1: np.ndarray,
    feats2: np.ndarray,
    labels2: np.ndarray,
    seed: int = 0,
    test_frac: float = 0.3,
    C: float = 1.0,
    max_iter: int = 200,
    paired: bool = False,
) -> xr.Dataset:
    """Per-layer probe accuracy across languages (``probe_transfer``) and within (reference).

    ``feats*`` are [n_layers+1, items, d] (layer 0 = embeddings output), ``labels*`` one class per
    item. With ``paired=True`` (token-aligned parallel data, e.g. clones) item i of L1 and L2 are
    translations: both languages use the same train/test indices, so no test item's translation
    was seen in training. Returns ``probe_transfer`` and ``probe_in_language`` (layer, direction)
    and ``probe_chance`` (direction): the target test split's rate of the training majority class.
    """
    feats1, labels1 = _check(feats1, labels1, "L1")
    feats2, labels2 = _check(feats2, labels2, "L2")
    if feats1.shape[0] != feats2.shape[0] or feats1.shape[2] != feats2.shape[2]:
        raise MetricError(
            f"probe features disagree in layers or width: {feats1.shape} vs {feats2.shape}"
        )
    if not 0 < test_frac < 1:
        raise MetricError(f"probe test_frac must be in (0, 1), got {test_frac}")
    rng = np.random.default_rng(seed)
    tr1, te1 = _split(feats1.shape[1], test_frac, rng)
    if paired:
        if feats1.shape[1] != feats2.shape[1]:
            raise MetricError(
                f"paired probes need as many L1 as L2 items: {feats1.shape[1]} vs {feats2.shape[1]}"
            )
        tr2, te2 = tr1, te1  # translations of L1 test items stay out of L2 training
    else:
        tr2, te2 = _split(feats2.shape[1], test_frac, rng)
    data = {
        "L1->L2": (feats1, labels1, tr1, te1, feats2, labels2, te2),
        "L2->L1": (feats2, labels2, tr2, te2, feats1, labels1, te1),
    }
    n_layers = feats1.shape[0]
    transfer = np.zeros((n_layers, 2))
    in_lang = np.zeros((n_layers, 2))
    chance = np.zeros(2)
    for j, (src_f, src_y, tr, te, tgt_f, tgt_y, tgt_te) in enumerate(data.values()):
        classes, counts = np.unique(src_y[tr], return_counts=True)
        if len(classes) < 2:
            raise MetricError("probe training split has a single class; nothing to learn")
        chance[j] = float(np.mean(tgt_y[tgt_te] == classes[np.argmax(counts)]))
        for layer in range(n_layers):
            clf = make_pipeline(
                StandardScaler(),
                LogisticRegression(C=C, max_iter=max_iter, random_state=seed),
            )
            # the features were checked finite above and the parameters are ours: sklearn's
            # own checks, repeated at every call, are skipped (same fits, a tenth less time)
            with (
                warnings.catch_warnings(),
                config_context(assume_finite=True, skip_parameter_validation=True),
            ):
                # an unconverged probe is still a valid (slightly weaker) probe
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(src_f[layer][tr], src_y[tr])
                in_lang[layer, j] = _accuracy(clf, src_f[layer][te], src_y[te])
                transfer[layer, j] = _accuracy(clf, tgt_f[layer][tgt_te], tgt_y[tgt_te])
    coords = {"layer": np.arange(n_layers), "direction": list(data)}
    params = {
        "seed": seed,
        "test_frac": test_frac,
        "C": C,
        "max_iter": max_iter,
        "paired": int(paired),  # int: netCDF/zarr attrs cannot hold bools
        "probe": "StandardScaler + LogisticRegression fitted on the source language",
    }
    ds = xr.Dataset(
        {
            "probe_transfer": (("layer", "direction"), transfer),
            "probe_in_language": (("layer", "direction"), in_lang),
            "probe_chance": ("direction", chance),
        },
        coords=coords,
    )
    ds["probe_transfer"].attrs["definition"] = (
        "accuracy on the other language's test split of a probe trained on the source language"
    )
    ds["probe_in_language"].attrs["definition"] = (
        "accuracy on the source language's own held-out test split"
    )
    ds["probe_chance"].attrs["definition"] = (
        "accuracy of always predicting the source training split's majority class on the target"
    )
    for name in ds.data_vars:
        ds[name].attrs.update(params)
    ds.attrs.update(params)
    ds.attrs["definition"] = "cross-lingual linear-probe transfer per layer"
    return ds


class _ProbeRun:
    """Keeps each sequence's mean-pooled residual state per layer; fits at the end."""

    def __init__(self, ctx: CheckpointContext):
        self.labels = ctx.series.parallel.labels
        self.pooled: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])

    def update(self, batch: PairBatch) -> None:
        for a, dst in zip((batch.l1, batch.l2), self.pooled, strict=True):
            m = a.mask[None, :, :, None].float()
            dst.append(((a.resid * m).sum(2) / m.sum(2)).numpy())

    def result(self) -> xr.Dataset:
        f1, f2 = (np.concatenate(p, axis=1) for p in self.pooled)
        return probe_transfer(f1, self.labels, f2, self.labels, seed=0, paired=True)


class Probes(Family):
    """A linear probe of the parallel text's book label, fitted on one language's pooled states
    and scored on the other's, per layer."""

    name = "probes"
    variables = (
        Variable("probe_transfer", "cross-language probe accuracy"),
        Variable("probe_in_language", "in-language probe accuracy"),
        Variable("probe_chance", "probe majority-class accuracy"),
    )
    needs = Needs(activations=frozenset({"resid"}))

    def applies(self, series) -> str | None:  # noqa: ANN001 - a probekit.series.Series
        if series.mode == "external" and not getattr(series, "labelled", False):
            return "probes need labelled parallel data (--parallel bible:en bible:fr); none here"
        return None

    def start(self, ctx: CheckpointContext) -> _ProbeRun:
        return _ProbeRun(ctx)

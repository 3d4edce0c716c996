"""Per-language perplexity with a sliding window (paper §3.1).

A language's test set is one 1-D token stream (documents joined with a separator). Windows of
``window`` input tokens move along it by ``stride``; each window is scored only on its last
``scored_tail`` targets, so every scored token sees at least ``window - scored_tail`` tokens of
context (except in the first window, which scores all of its targets so the stream's start is
counted too). With the default ``scored_tail == stride`` every target is scored exactly once.
Targets equal to ``pad_id`` are never scored.

Example::

    res = perplexity(model, tokens, n_chars=len(text), window=128)
    res["ppl"], res["ppl_char"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from probekit.errors import MetricError
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable
from probekit.series import DEFAULT_MAX_TOKENS, Series

__all__ = ["sliding_window_nll", "perplexity", "perplexity_dataarray", "Perplexity"]

# Without --max-tokens, a checkpoint other than the final one (which TEff reads) scores every
# 4th window of its 65,536 test tokens per language: 16,384 targets spread evenly over the
# same text, a quarter of the cost. Relative standard error of the perplexity on the tiny
# demo (bench/bench_eval_se.py, block bootstrap): 1.3-1.5 % (0.7-0.9 % for all 65,536); a
# prefix of the same size would be biased by 2-8 % (the text's start is easier than its rest).
INTERMEDIATE_EVERY = 4


def _plan_windows(n: int, window: int, stride: int, tail: int) -> list[tuple[int, int, int]]:
    """(start, first_scored_target, last_scored_target) per window; targets are stream indices.

    Window ``s`` feeds tokens ``[s, s+window)`` and predicts targets ``s+1 .. s+window``.
    """
    last_target = n - 1
    w = min(window, last_target)  # a stream shorter than one window: one short window
    plan = [(0, 1, w)]  # the first window scores all its targets: the stream start is counted
    end = w
    s = 0
    while end < last_target:
        s += stride
        if s + w > last_target:
            # Final window: shift it back so it is full (no padding needed, more context);
            # it scores only the targets no earlier window scored.
            s = last_target - w
            plan.append((s, max(end + 1, last_target - tail + 1), last_target))
            break
        lo = max(end + 1, s + w - tail + 1)  # == end+1 when tail == stride
        plan.append((s, lo, s + w))
        end = s + w
    return plan


def sliding_window_nll(
    model: torch.nn.Module,
    tokens: np.ndarray,
    window: int,
    stride: int | None = None,
    scored_tail: int | None = None,
    batch_size: int = 16,
    pad_id: int | None = 0,
    device: str | torch.device = "cpu",
    every: int = 1,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and number of scored targets over one token stream.

    ``every`` > 1 scores only every ``every``-th window of the plan (the first included): a
    sample of the targets spread evenly over the stream, each with its full context, at
    1/every of the cost (a prefix of the stream would be a biased sample of a text).

    ``model(input_ids).logits`` must be a causal LM's logits (HF ``*LMHeadModel``). Each target
    is scored at most once; with ``scored_tail == stride`` (the default) exactly once, except
    targets equal to ``pad_id`` (``None``: score everything). ``scored_tail < stride`` skips the
    targets between tails. Logits are evaluated in fp32 under ``torch.no_grad``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise MetricError(f"perplexity needs a 1-D token stream, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise MetricError(f"perplexity needs integer token ids, got dtype {tokens.dtype}")
    if len(tokens) < 2:
        raise MetricError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    if window < 1:
        raise MetricError(f"perplexity window must be >= 1, got {window}")
    stride = max(1, window // 4) if stride is None else stride
    scored_tail = stride if scored_tail is None else scored_tail
    if not 1 <= stride <= window:
        raise MetricError(f"perplexity stride must be in [1, window={window}], got {stride}")
    if not 1 <= scored_tail <= stride:
        # tail > stride would score tokens twice; the paper uses tail == stride
        raise MetricError(
            f"perplexity scored_tail must be in [1, stride={stride}], got {scored_tail}"
        )
    if batch_size < 1:
        raise MetricError(f"perplexity batch_size must be >= 1, got {batch_size}")
    if every < 1:
        raise MetricError(f"perplexity every must be >= 1, got {every}")

    plan = _plan_windows(len(tokens), window, stride, scored_tail)[::every]
    w = min(window, len(tokens) - 1)
    stream = torch.as_tensor(tokens.astype(np.int64))
    total = 0.0
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(plan), batch_size):
                chunk = plan[b0 : b0 + batch_size]
                starts = torch.tensor([s for s, _, _ in chunk])
                idx = starts[:, None] + torch.arange(w + 1)[None, :]  # [B, w+1]
                seqs = stream[idx]
                inputs, targets = seqs[:, :-1], seqs[:, 1:]
                # Mask of scored positions: target index t sits at column t - s - 1.
                cols = torch.arange(w)[None, :] + starts[:, None] + 1  # target stream index
                lo = torch.tensor([a for _, a, _ in chunk])[:, None]
                hi = torch.tensor([b for _, _, b in chunk])[:, None]
                mask = (cols >= lo) & (cols <= hi)
                if pad_id is not None:
                    mask &= targets != pad_id
                if not mask.any():
                    continue
                logits = model(inputs.to(device)).logits
                # Select scored positions before the softmax: keeps memory at O(scored * V).
                sel = logits[mask.to(logits.device)].float()
                nll = F.cross_entropy(sel, targets[mask].to(sel.device), reduction="sum")
                total += float(nll)
                count += int(mask.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise MetricError("perplexity: no token was scored (stream is all padding?)")
    return total, count


def perplexity(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_chars: int,
    window: int,
    stride: int | None = None,
    scored_tail: int | None = None,
    batch_size: int = 16,
    pad_id: int | None = 0,
    device: str | torch.device = "cpu",
    every: int = 1,
) -> dict[str, Any]:
    """Token PPL = exp(mean NLL) and per-character PPL = exp(total NLL / n_chars).

    ``n_chars`` is the character count of the text behind the tokens; per-character PPL is
    the one comparable across tokenizers (EN vs FR), token PPL is the paper's column. With
    ``every`` > 1 (a spread sample of the windows) the characters are scaled to the scored
    share of the targets.
    """
    if n_chars < 1:
        raise MetricError(f"perplexity needs n_chars >= 1, got {n_chars}")
    stride_ = max(1, window // 4) if stride is None else stride
    tail_ = stride_ if scored_tail is None else scored_tail
    nll, n = sliding_window_nll(
        model,
        tokens,
        window,
        stride_,
        tail_,
        batch_size=batch_size,
        pad_id=pad_id,
        device=device,
        every=every,
    )
    if every > 1:
        targets = np.asarray(tokens)[1:]
        total = int((targets != pad_id).sum()) if pad_id is not None else len(targets)
        n_chars = max(1, int(round(n_chars * n / max(total, 1))))
    return {
        "ppl": math.exp(nll / n),
        "ppl_char": math.exp(nll / n_chars),
        "nll": nll,
        "n_tokens": n,
        "n_chars": int(n_chars),
        "window": int(window),
        "stride": int(stride_),
        "scored_tail": int(tail_),
    }


def perplexity_dataarray(results: Mapping[str, Mapping[str, Any]]) -> xr.Dataset:
    """Stack ``perplexity()`` results per language into a Dataset with a ``language`` dim."""
    if not results:
        raise MetricError("perplexity_dataarray needs at least one language")
    langs = list(results)
    need = ("ppl", "ppl_char", "nll", "n_tokens", "n_chars")
    for lang in langs:
        missing = [k for k in need if k not in results[lang]]
        if missing:
            raise MetricError(f"perplexity result for {lang!r} lacks {', '.join(missing)}")
    params = {}
    for key in ("window", "stride", "scored_tail"):
        vals = {results[lang].get(key) for lang in langs}
        if len(vals) > 1:
            # mixing window settings would make the languages' PPLs incomparable
            raise MetricError(f"perplexity results disagree on {key}: {sorted(map(str, vals))}")
        (v,) = vals
        if v is not None:
            params[key] = int(v)

    def col(key: str, dtype: type) -> np.ndarray:
        return np.array([results[lang][key] for lang in langs], dtype=dtype)

    coords = {"language": langs}
    ds = xr.Dataset(
        {
            "ppl": ("language", col("ppl", float)),
            "ppl_char": ("language", col("ppl_char", float)),
            "nll_tokens": ("language", col("nll", float)),
            "n_tokens": ("language", col("n_tokens", np.int64)),
            "n_chars": ("language", col("n_chars", np.int64)),
        },
        coords=coords,
    )
    ds["ppl"].attrs["definition"] = "exp of the mean next-token NLL over the language's test stream"
    ds["ppl_char"].attrs["definition"] = "exp of the summed token NLL divided by the text's chars"
    ds["nll_tokens"].attrs["definition"] = "summed next-token NLL in nats over scored tokens"
    ds["n_tokens"].attrs["definition"] = "number of scored (non-padding) target tokens"
    ds["n_chars"].attrs["definition"] = "number of characters of the scored text"
    for name in ds.data_vars:
        ds[name].attrs.update(params)
    ds.attrs["definition"] = (
        "per-language perplexity with a sliding window scored on each window's last tokens"
    )
    ds.attrs.update(params)
    return ds


class Perplexity(Family):
    """Each language's test perplexity (per token and per character), sliding window."""

    name = "perplexity"
    command = "eval"
    variables = (
        Variable("ppl", "test perplexity"),
        Variable("ppl_char", "test perplexity per character"),
        Variable("nll_tokens", "summed test NLL"),
        Variable("n_tokens", "scored test tokens"),
        Variable("n_chars", "characters of the scored test text"),
    )
    needs = Needs(test_tokens=True)

    def applies(self, series: Series) -> str | None:
        try:
            series.test_texts()
        except MetricError as exc:
            return str(exc)
        return None

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        opts = ctx.options
        # the default: the final checkpoint (TEff's) scores every window of its test tokens,
        # the others every INTERMEDIATE_EVERY-th window (spread over the same tokens)
        every = INTERMEDIATE_EVERY if opts.max_tokens is None and not ctx.final else 1
        results = {
            lang: perplexity(
                ctx.model,
                ids,
                chars,
                window=ctx.series.context,
                stride=opts.stride,
                scored_tail=opts.tail,
                device=opts.device,
                every=every,
            )
            for lang, (ids, chars) in ctx.series.test_texts().items()
        }
        ds = perplexity_dataarray(results)
        limit = DEFAULT_MAX_TOKENS if opts.max_tokens is None else opts.max_tokens
        ds["ppl"].attrs["max_tokens"] = int(limit)
        ds["ppl"].attrs["window_every"] = int(every)
        return ds

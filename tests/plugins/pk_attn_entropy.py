"""A third-party metric family in one module: the entropy of each head's attention, per language.

Published to probekit through an entry point of its package (tests/test_plugin_family.py
writes the package's metadata)::

    [project.entry-points."probekit.families"]
    attn_entropy = "pk_attn_entropy:AttentionEntropy"
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from probekit.metrics import CheckpointContext, Family, Needs, PairBatch, Variable


class _Run:
    def __init__(self, ctx: CheckpointContext):
        self.pair = list(ctx.series.pair)
        self.sums: np.ndarray | None = None
        self.count = np.zeros(2)

    def update(self, batch: PairBatch) -> None:
        for side, act in enumerate((batch.l1, batch.l2)):
            pattern = act["attn_pattern"]  # L tensors [B, heads, T, T]
            ent = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(-1) for p in pattern])
            tot = (ent * act.mask[None, :, None, :]).sum((1, 3)).double().numpy()  # [L, heads]
            if self.sums is None:
                self.sums = np.zeros((2, *tot.shape))
            self.sums[side] += tot
            self.count[side] += float(act.mask.sum())

    def result(self) -> xr.Dataset:
        mean = self.sums / self.count[:, None, None]  # [language, block, head]
        ds = xr.Dataset(
            {"attn_entropy": (("language", "block", "head"), mean)},
            coords={"language": self.pair, "block": np.arange(1, mean.shape[1] + 1)},
        )
        ds["attn_entropy"].attrs["definition"] = "mean entropy (nats) of each head's attention"
        return ds


class AttentionEntropy(Family):
    name = "attn_entropy"
    variables = (
        Variable("attn_entropy", "attention entropy per head", "mean entropy of attention"),
    )
    needs = Needs(activations=frozenset({"attn_pattern"}))

    def start(self, ctx: CheckpointContext) -> _Run:
        return _Run(ctx)

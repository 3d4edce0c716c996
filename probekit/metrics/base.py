"""The one shape every metric family has, and what the driver hands it.

A family declares its name, the variables it writes, what it needs of a checkpoint
(weights, activations of which hooks, gradients, test tokens), whether it applies to a
series, and computes either in one call (`compute(ctx)`) or as an accumulator
(`start(ctx)` -> `update(batch)` per batch of parallel pairs -> `result()`). Every
family returns a step-less `xarray.Dataset` with the shared layer convention:
0 = embeddings output, 1..L = after each block; anything else (a final norm, the head)
gets its own dimension. The driver (`probekit.engine`) adds `step` and writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import xarray as xr

from probekit.hooks import Activations
from probekit.model_view import ModelView
from probekit.options import AnalysisOptions
from probekit.series import Series


@dataclass(frozen=True)
class Variable:
    """One variable a family writes to the cube."""

    name: str
    title: str  # what a reader calls it (report headings, CLI help)
    definition: str = ""  # one line; the family's result attrs carry the full definition


@dataclass(frozen=True)
class Needs:
    """What a family needs of each checkpoint; the driver provides exactly that."""

    activations: frozenset[str] = frozenset()  # hook kinds over the parallel pairs: resid, mlp
    baseline: bool = False  # also L2 activations of a different text (pair i with i + 1)
    gradients: bool = False  # backward passes through the checkpoint
    test_tokens: bool = False  # each language's held-out test stream
    weights: bool = False  # the weights alone


@dataclass
class CheckpointContext:
    """One loaded checkpoint and everything a family may read about its series."""

    model: Any  # the Hugging Face causal LM, in eval mode
    view: ModelView
    series: Series
    options: AnalysisOptions
    final: bool = True  # the series' last checkpoint (eval scores it on more test tokens)
    step: int | None = None  # the checkpoint's step (per-checkpoint artifacts are named by it)


@dataclass
class PairBatch:
    """Activations of one batch of parallel pairs (one forward per language)."""

    index: np.ndarray  # positions of the pairs in the series' parallel set
    l1: Activations
    l2: Activations
    l2_other: Activations | None = None  # L2 text of pair i + 1 (the different-text baseline)


class Accumulator(Protocol):
    def update(self, batch: PairBatch) -> None: ...

    def result(self) -> xr.Dataset: ...


class Family:
    """Base of every metric family; subclasses set the class attributes and one of
    `compute` or `start`."""

    name: ClassVar[str]
    variables: ClassVar[tuple[Variable, ...]]
    needs: ClassVar[Needs]
    command: ClassVar[str] = "align"  # which command computes it by default (align, eval, teff)

    def applies(self, series: Series) -> str | None:
        """None when the family can be computed for this series, else the one-line reason."""
        return None

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        raise NotImplementedError(f"{self.name} is computed by an accumulator")

    def start(self, ctx: CheckpointContext) -> Accumulator:
        raise NotImplementedError(f"{self.name} is computed in one call")

    @property
    def streamed(self) -> bool:
        return bool(self.needs.activations)

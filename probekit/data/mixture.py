"""Language mixtures: which language each training sequence is in, and its tokens.

Every training sequence picks its language independently. The choice for global
sequence n is a pure function of (seed, n), drawn from a counter-based generator
of its own (never torch's global RNG), so the same config gives the same stream
on any machine, on any number of ranks, and after a restart from any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probekit.config import parse_schedule_spec

BLOCK = 1 << 16  # sequences per generator block


@dataclass(frozen=True)
class Schedule:
    """Share of the second language (or of all clones) as a function of progress in [0, 1]."""

    kind: str  # constant | stages | linear
    fractions: tuple[float, ...]  # stage ends (cumulative), for stages
    values: tuple[float, ...]

    def share(self, progress: np.ndarray) -> np.ndarray:
        progress = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
        if self.kind == "constant":
            return np.full(progress.shape, self.values[0])
        if self.kind == "linear":
            return self.values[0] + (self.values[1] - self.values[0]) * progress
        idx = np.searchsorted(np.asarray(self.fractions), progress, side="right")
        return np.asarray(self.values)[np.minimum(idx, len(self.values) - 1)]

    @property
    def mean_share(self) -> float:
        """The share averaged over training (the paper assumed 50 % for its schedules)."""
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "linear":
            return (self.values[0] + self.values[1]) / 2
        widths = np.diff((0.0,) + self.fractions)
        return float(np.dot(widths, self.values))


def parse_schedule(spec: str | dict | float) -> Schedule:
    """'0.1_0.9' (equal stages), 'linear:0.1:0.9' (ramp), {fractions=[..], p=[..]} or a share;
    the syntax is checked in probekit.config, which validates data.schedule on loading."""
    return Schedule(*parse_schedule_spec(spec))


def language_weights(share: np.ndarray, n_langs: int) -> np.ndarray:
    """[len(share), n_langs] probabilities: L1 gets 1 - share, the others split share equally."""
    w = np.empty((len(share), n_langs))
    w[:, 0] = 1.0 - share
    w[:, 1:] = (share / max(n_langs - 1, 1))[:, None]
    return w


class MixtureStream:
    """The seeded sequence stream of a run: ids [count, seq_len + 1] and language index."""

    def __init__(
        self,
        languages: list[str],
        chunks: list[np.ndarray],
        to_model: list[np.ndarray],
        shared_source: bool,
        total_sequences: int,
        seq_len: int,
        seed: int,
        schedule: Schedule | None = None,
        weights: list[float] | None = None,
    ):
        self.languages = languages
        self.to_model = to_model
        self.shared_source = shared_source  # clones read one base stream in turn
        self.total = max(int(total_sequences), 1)
        self.seq_len = seq_len
        self.seed = seed
        self.schedule = schedule or Schedule("constant", (1.0,), (0.0,))
        self.weights = np.asarray(weights, dtype=np.float64) if weights else None
        self._chunks = chunks  # per source: base-id token arrays
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._block_counts: dict[int, np.ndarray] = {}

    # --- language choice -------------------------------------------------
    def _uniform(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count)
        pos = 0
        while pos < count:
            n = start + pos
            block, off = divmod(n, BLOCK)
            take = min(BLOCK - off, count - pos)
            out[pos : pos + take] = np.random.default_rng([self.seed, 0x5EED, block]).random(BLOCK)[
                off : off + take
            ]
            pos += take
        return out

    def weights_at(self, index: np.ndarray) -> np.ndarray:
        n = len(self.languages)
        if self.weights is not None:
            return np.broadcast_to(self.weights, (len(index), n))
        return language_weights(self.schedule.share(index / self.total), n)

    def languages_of(self, start: int, count: int) -> np.ndarray:
        index = np.arange(start, start + count)
        cum = np.cumsum(self.weights_at(index), axis=1)
        u = self._uniform(start, count)
        return np.minimum((u[:, None] >= cum).sum(axis=1), len(self.languages) - 1)

    def language_counts(self, n: int) -> np.ndarray:
        """Number of sequences of each language among the first n."""
        k = len(self.languages)
        full, rest = divmod(n, BLOCK)
        counts = np.zeros(k, dtype=np.int64)
        for block in range(full):  # whole blocks are counted once and cached
            if block not in self._block_counts:
                langs = self.languages_of(block * BLOCK, BLOCK)
                self._block_counts[block] = np.bincount(langs, minlength=k)
            counts += self._block_counts[block]
        if rest:
            counts += np.bincount(self.languages_of(full * BLOCK, rest), minlength=k)
        return counts

    # --- tokens ------------------------------------------------------------
    def _n_chunks(self, source: int) -> int:
        return max((len(self._chunks[source]) - 1) // self.seq_len, 1)

    def _chunk(self, source: int, j: int) -> np.ndarray:
        n = self._n_chunks(source)
        epoch, pos = divmod(j, n)
        key = (source, epoch)
        if key not in self._perm_cache:
            self._perm_cache[key] = np.random.default_rng(
                [self.seed, 0xDA7A, source, epoch]
            ).permutation(n)
        start = int(self._perm_cache[key][pos]) * self.seq_len
        out = self._chunks[source][start : start + self.seq_len + 1]
        if len(out) < self.seq_len + 1:  # a corpus shorter than one sequence: pad
            out = np.pad(out, (0, self.seq_len + 1 - len(out)))
        return out

    def sequences(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sequences [start, start + count): (model ids, language index)."""
        langs = self.languages_of(start, count)
        if self.shared_source:
            ordinal = np.arange(start, start + count)
            source = np.zeros(count, dtype=np.int64)
        else:  # each language reads its own text: its position is its own sequence count
            before = self.language_counts(start)
            ordinal = np.empty(count, dtype=np.int64)
            for li in range(len(self.languages)):
                sel = langs == li
                ordinal[sel] = before[li] + np.arange(sel.sum())
            source = langs
        ids = np.stack(
            [
                self.to_model[li][self._chunk(int(s), int(j))]
                for li, s, j in zip(langs, source, ordinal, strict=True)
            ]
        )
        return ids, langs

    def repeat_warning(self, total_sequences: int | None = None) -> str | None:
        total = self.total if total_sequences is None else total_sequences
        counts = [total] if self.shared_source else self.language_counts(total).tolist()
        names = ["corpus"] if self.shared_source else self.languages
        parts = [
            f"{name} {c / self._n_chunks(i):.2f} epochs"
            for i, (name, c) in enumerate(zip(names, counts, strict=True))
            if c > self._n_chunks(i)
        ]
        if not parts:
            return None
        return "the corpus is smaller than the budget, data repeats: " + ", ".join(parts)

"""A checkpoint series as the analysis sees it: checkpoints, languages, parallel and test data.

Two kinds: a probekit run directory (`RunSeries`: its config, tokenizer and shipped or user
corpora give languages, parallel pairs and test streams), and any folder of Hugging Face
checkpoint folders given two line-aligned texts (`ExternalSeries`). Both are built once
per process and read lazily: `eval` never builds parallel pairs, `align` never reads test
streams.
"""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from probekit.checkpoints import CheckpointInfo, list_checkpoints
from probekit.errors import MetricError, RunDirError
from probekit.options import AnalysisOptions

DEFAULT_MAX_TOKENS = 65_536  # test tokens per language and checkpoint; 0 scores the whole split
DEFAULT_SEQ_LEN = 128


class Series:
    """What every series offers the driver and the families."""

    run_dir: Path
    mode: str  # clone | pair | mono | external
    vocab_mode: str
    options: AnalysisOptions
    context: int
    tokenizer: Any

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.run_dir)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def languages(self) -> list[str]:
        raise NotImplementedError

    @cached_property
    def pair(self) -> tuple[str, str]:
        langs = self.languages
        if len(langs) < 2:
            raise MetricError(f"{self.run_dir}: a monolingual run has no second language to align")
        pair = tuple(self.options.pair) if self.options.pair else (langs[0], langs[1])
        for lang in pair:
            if lang not in langs:
                raise MetricError(f"unknown language {lang!r} (this run has: {', '.join(langs)})")
        return pair  # type: ignore[return-value]

    @cached_property
    def seq_len(self) -> int:
        asked = self.options.seq_len
        if asked is not None and asked > self.context:
            print(
                f"note: --seq-len {asked} exceeds the model's context; using {self.context}",
                flush=True,
            )
        return min(asked or min(self.context, DEFAULT_SEQ_LEN), self.context)

    @cached_property
    def parallel(self) -> Any:
        """The parallel pairs (a probekit.data.ParallelSet), built on first use."""
        raise NotImplementedError

    def clone_pairs(self) -> np.ndarray:
        """[n, 2] model ids of cloned token pairs of the compared languages (none: empty)."""
        return np.zeros((0, 2), dtype=np.int64)

    def token_frequency(self, model_ids: np.ndarray) -> np.ndarray:
        raise MetricError(f"{self.run_dir}: token frequencies need the training corpus")

    def test_texts(self) -> dict[str, tuple[np.ndarray, int]]:
        """language -> (test token ids, characters behind them), cut to options.max_tokens."""
        raise MetricError(
            f"{self.run_dir}: perplexity needs held-out test text; this series has none"
        )

    def check_model(self, model: Any, info: CheckpointInfo) -> None:
        """Refuse a checkpoint that does not fit the series' vocabulary."""

    def attrs(self, parallel: bool) -> dict:
        """Run attributes stored with every family's results."""
        return {
            "run_name": self.name,
            "mode": self.mode,
            "vocab_mode": self.vocab_mode,
            "languages": list(self.pair if parallel else self.languages),
        }


class RunSeries(Series):
    """A probekit run directory: config.toml, tokenizer/, checkpoints/."""

    def __init__(self, run_dir: Path, options: AnalysisOptions):
        from probekit.data import load_run_data

        self.run_dir = Path(run_dir)
        self.options = options
        self.data = load_run_data(self.run_dir)
        self.cfg = self.data.cfg
        self.vocab = self.data.vocab
        self.mode = self.cfg.data.mode
        self.vocab_mode = self.cfg.tokenizer.vocab_mode if self.mode == "pair" else self.mode
        self.context = int(self.cfg.model.context)

    @property
    def name(self) -> str:
        return self.cfg.name or self.run_dir.name

    @property
    def languages(self) -> list[str]:
        return list(self.vocab.languages)

    @cached_property
    def tokenizer(self) -> Any:
        return self.vocab.tokenizers[self.vocab.tokenizer_of[self.pair[0]]]

    @cached_property
    def parallel(self) -> Any:
        par = self.data.parallel(self.pair[0], self.pair[1], self.options.n_pairs, self.seq_len)
        if len(par) < 4:
            raise MetricError(f"only {len(par)} parallel pairs of length {self.seq_len}")
        return par

    def clone_pairs(self) -> np.ndarray:
        return self.vocab.clone_pairs(*self.pair)

    def token_frequency(self, model_ids: np.ndarray) -> np.ndarray:
        """Training occurrences of the L1 pieces behind these model ids (both clones count)."""
        counts = self.data.train_token_counts(self.pair[0])
        base = np.asarray([self.vocab.base_id(self.pair[0], int(i)) for i in model_ids])
        return counts[base]

    @cached_property
    def _test_texts(self) -> dict[str, tuple[np.ndarray, int]]:
        limit = self.options.max_tokens
        limit = DEFAULT_MAX_TOKENS if limit is None else limit
        texts = {}
        for lang in self.languages:
            ids, chars = self.data.test_tokens(lang)
            if limit and len(ids) > limit:  # a prefix; characters scaled to the same share
                chars = int(round(chars * limit / len(ids)))
                ids = ids[:limit]
            texts[lang] = (ids, chars)
        return texts

    def test_texts(self) -> dict[str, tuple[np.ndarray, int]]:
        return self._test_texts

    def check_model(self, model: Any, info: CheckpointInfo) -> None:
        if model.config.vocab_size != self.vocab.model_vocab_size:
            raise RunDirError(
                f"{info.path}: vocabulary size {model.config.vocab_size} does not match the "
                f"run's languages ({self.vocab.model_vocab_size} ids for {self.vocab.languages})"
            )

    def attrs(self, parallel: bool) -> dict:
        from probekit.config import dump_config

        d = self.cfg.data
        return super().attrs(parallel) | {
            "p": float(d.p) if not d.schedule else float("nan"),
            "schedule": str(d.schedule),
            "config": dump_config(self.cfg),
        }


class ExternalSeries(Series):
    """Any folder of Hugging Face causal-LM checkpoints, with two line-aligned text files.

    Lines are tokenized with the series' own tokenizer and packed into sequence pairs as
    for real language pairs (not token-aligned), so hidden-state cosine uses the matching.
    """

    mode = vocab_mode = "external"

    def __init__(self, path: Path, options: AnalysisOptions):
        from transformers import AutoConfig, AutoTokenizer

        self.run_dir = Path(path)
        self.options = options
        ckpts = self.checkpoints()
        src = Path(options.tokenizer) if options.tokenizer else ckpts[0].path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{src}: no usable tokenizer (pass --tokenizer DIR): {exc}") from None
        config = AutoConfig.from_pretrained(str(ckpts[0].path), local_files_only=True)
        self.context = int(getattr(config, "n_positions", 512))
        self.files = [str(f) for f in options.parallel_files or ()]

    @property
    def languages(self) -> list[str]:
        return list(self.options.pair) if self.options.pair else ["L1", "L2"]

    @cached_property
    def parallel(self) -> Any:
        from probekit.data import ParallelSet, pack_parallel, read_lines, spread

        a, b = (read_lines(f, "--parallel") for f in self.files)
        if len(a) != len(b):
            raise MetricError(f"--parallel: the files have {len(a)} and {len(b)} lines")
        enc = [self.tokenizer(lines, add_special_tokens=False)["input_ids"] for lines in (a, b)]
        e1, e2 = ([np.asarray(x, dtype=np.int64) for x in side] for side in enc)
        p1, p2, _ = pack_parallel(e1, e2, [0] * len(e1), self.seq_len)
        order = spread(len(p1), self.options.n_pairs)
        par = ParallelSet(
            [p1[i] for i in order],
            [p2[i] for i in order],
            False,
            np.zeros(len(order), dtype=int),
            ["text"],
        )
        if len(par) < 4:
            raise MetricError(
                f"--parallel: only {len(par)} sequence pairs of length "
                f"{self.seq_len} could be packed"
            )
        return par

    def check_model(self, model: Any, info: CheckpointInfo) -> None:
        par = self.parallel
        top = max(int(x.max()) for x in par.ids1 + par.ids2)
        if top >= model.config.vocab_size:
            raise RunDirError(
                f"{info.path}: token id {top} of the parallel text is outside the "
                f"model's vocabulary ({model.config.vocab_size}); wrong tokenizer?"
            )

    def attrs(self, parallel: bool) -> dict:
        return super().attrs(parallel) | {
            "p": float("nan"),
            "schedule": "",
            "parallel_files": self.files,
        }


def open_series(path: str | Path, options: AnalysisOptions) -> Series:
    """A probekit run directory, or any HF checkpoint series when parallel files are given."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory not found: {path}")
    if options.parallel_files:
        return ExternalSeries(path, options)
    if not (path / "config.toml").is_file():
        raise RunDirError(
            f"{path}: not a probekit run (no config.toml); to analyse another "
            f"checkpoint series pass --parallel L1.txt L2.txt"
        )
    return RunSeries(path, options)


@functools.lru_cache(maxsize=4)
def cached_series(path: Path, options: AnalysisOptions) -> Series:
    """One series per process (a dask worker keeps it across the checkpoints it computes)."""
    return open_series(path, options)

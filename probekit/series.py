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
DEFAULT_ALIBI_CONTEXT = 2048  # BLOOM (ALiBi) records no context limit: windows of this


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
        asked = tuple(self.options.pair) if self.options.pair else (langs[0], langs[1])
        # the config spells languages in lower case ("es"), the run names them EN, ES, ...:
        # either spelling is accepted, an exact match first
        by_case = {lang.casefold(): lang for lang in langs}
        pair = []
        for lang in asked:
            name = lang if lang in langs else by_case.get(str(lang).casefold())
            if name is None:
                raise MetricError(f"unknown language {lang!r} (this run has: {', '.join(langs)})")
            pair.append(name)
        if pair[0] == pair[1]:
            raise MetricError(f"--pair: expected two different languages, got {asked!r}")
        return tuple(pair)  # type: ignore[return-value]

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
    """Any series of Hugging Face causal-LM checkpoints: a folder of checkpoint folders or a
    local hub cache of one model's revisions (GPT-2, GPT-NeoX, Llama, Qwen2, OLMo, OLMo 2,
    BLOOM), read with its own tokenizer.

    Parallel text: two line-aligned files, or `bible:LANG` / `bible:NAME` twice for the
    shipped held-out verse-aligned books (their book is the label the probes predict).
    Lines are packed into sequence pairs as for real language pairs (not token-aligned), so
    hidden-state cosine uses the matching. With `clone_offset` V the series is a clone series
    (L2's id of a token = L1's + V): the pairs are one text in both id ranges, token-aligned,
    and the clone embedding measures apply. Test texts (`--test LANG=FILE`) feed perplexity.
    """

    mode = vocab_mode = "external"

    def __init__(self, path: Path, options: AnalysisOptions):
        from transformers import AutoConfig, AutoTokenizer

        from probekit.model_view import ModelView

        self.run_dir = Path(path)
        self.options = options
        ckpts = self.checkpoints()
        src = Path(options.tokenizer) if options.tokenizer else ckpts[0].path
        config = AutoConfig.from_pretrained(str(ckpts[0].path), local_files_only=True)
        self.view = ModelView.from_config(config)  # an unknown architecture fails here
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise RunDirError(
                f"{src}: no usable tokenizer (pass --tokenizer DIR): {first}"
            ) from None
        self.tokenizer_path = src
        self.context = int(self.view.context or DEFAULT_ALIBI_CONTEXT)
        self.files = [str(f) for f in options.parallel_files or ()]
        self.clone_offset = options.clone_offset
        if self.clone_offset:
            self.files = self.files * 2 if len(self.files) == 1 else self.files  # one text
            if self.files and self.files[0] != self.files[1]:
                raise MetricError(
                    "--clone-offset: the L2 side is the L1 text shifted, so one text is read: "
                    "give it once with --text FILE (or the same file twice to --parallel)"
                )
            if len(self.tokenizer) + self.clone_offset > self.view.vocab_size:
                raise MetricError(
                    f"--clone-offset {self.clone_offset}: the tokenizer's {len(self.tokenizer)} "
                    f"ids shifted by it exceed the model's vocabulary ({self.view.vocab_size})"
                )

    def checkpoints(self) -> list[CheckpointInfo]:
        revs = self.options.revisions
        return list_checkpoints(self.run_dir, self.options.hub_model, list(revs) if revs else None)

    @property
    def name(self) -> str:
        name = self.run_dir.name
        return name[len("models--") :].replace("--", "/") if name.startswith("models--") else name

    @property
    def labelled(self) -> bool:
        """Whether the parallel pairs carry labels a probe can predict (Bible books)."""
        return bool(self.files) and all(f.startswith("bible:") for f in self.files)

    @property
    def languages(self) -> list[str]:
        if self.options.pair:
            return list(self.options.pair)
        if self.labelled and not self.clone_offset and self.files[0] != self.files[1]:
            return [f[len("bible:") :] for f in self.files]
        if self.options.test_files and not self.files:
            return [lang for lang, _ in self.options.test_files]
        return ["L1", "L2"]

    def _encode(self, lines: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(lines, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in enc]

    def _texts(self) -> tuple[list[tuple[int, str, str]], list[str]]:
        """(group, L1 line, L2 line) and the group names."""
        from probekit.data import corpus, read_lines

        if not self.files:
            raise MetricError(
                f"{self.run_dir}: this series needs parallel text: --parallel L1.txt L2.txt, "
                "or the shipped Bible books, e.g. --parallel bible:en bible:fr"
            )
        if self.labelled:
            a, b = (f[len("bible:") :] for f in self.files)
            # a corpus language (en, fr, es, it: its default Bible) or a Bible's own name
            a, b = (x if x in corpus.BIBLES else corpus.bibles_of(x)[0] for x in (a, b))
            verses = corpus.parallel_verses(a, b)
            books = sorted({v[0] for v in verses})
            names = [corpus.book_names().get(bk, str(bk)) for bk in books]
            return [(books.index(v[0]), v[1], v[2]) for v in verses], names
        a, b = (read_lines(f, "--parallel") for f in self.files)
        if len(a) != len(b):
            raise MetricError(f"--parallel: the files have {len(a)} and {len(b)} lines")
        return [(0, x, y) for x, y in zip(a, b, strict=True)], ["text"]

    @cached_property
    def parallel(self) -> Any:
        from probekit.data import ParallelSet, pack_parallel, spread

        texts, names = self._texts()
        if self.clone_offset:
            return self._clone_parallel(texts, names)
        e1, e2 = self._encode([t[1] for t in texts]), self._encode([t[2] for t in texts])
        p1, p2, labels = pack_parallel(e1, e2, [t[0] for t in texts], self.seq_len)
        order = spread(len(p1), self.options.n_pairs)
        par = ParallelSet(
            [p1[i] for i in order],
            [p2[i] for i in order],
            False,
            np.asarray([labels[i] for i in order], dtype=int),
            names,
        )
        if len(par) < 4:
            raise MetricError(
                f"--parallel: only {len(par)} sequence pairs of length "
                f"{self.seq_len} could be packed"
            )
        return par

    def _clone_parallel(self, texts: list[tuple[int, str, str]], names: list[str]) -> Any:
        """One text (the L1 side) chunked per group; L2 = the same ids + clone_offset."""
        from probekit.data import ParallelSet, spread

        ids1, labels = [], []
        for group in sorted({t[0] for t in texts}):
            lines = [t[1] for t in texts if t[0] == group]
            stream = np.concatenate(self._encode(lines) or [np.zeros(0, dtype=np.int64)])
            for s in range(0, len(stream) - self.seq_len + 1, self.seq_len):
                ids1.append(stream[s : s + self.seq_len])
                labels.append(group)
        order = spread(len(ids1), self.options.n_pairs)
        par = ParallelSet(
            [ids1[i] for i in order],
            [ids1[i] + self.clone_offset for i in order],
            True,
            np.asarray([labels[i] for i in order], dtype=int),
            names,
        )
        if len(par) < 4:
            raise MetricError(f"--parallel: only {len(par)} sequences of length {self.seq_len}")
        return par

    def clone_pairs(self) -> np.ndarray:
        if not self.clone_offset:
            return super().clone_pairs()
        ids = np.arange(len(self.tokenizer), dtype=np.int64)
        return np.stack([ids, ids + self.clone_offset], axis=1)

    @cached_property
    def _test_texts(self) -> dict[str, tuple[np.ndarray, int]]:
        from probekit.data import read_lines

        limit = self.options.max_tokens
        limit = DEFAULT_MAX_TOKENS if limit is None else limit
        texts = {}
        for lang, file in self.options.test_files or ():
            text = "\n".join(read_lines(file, f"--test {lang}"))
            ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            chars = len(text)
            if len(ids) < 2:
                raise MetricError(f"--test {lang}={file}: fewer than 2 tokens")
            if limit and len(ids) > limit:  # a prefix; characters scaled to the same share
                chars = int(round(chars * limit / len(ids)))
                ids = ids[:limit]
            texts[lang] = (ids.astype(np.int64), chars)
        return texts

    def test_texts(self) -> dict[str, tuple[np.ndarray, int]]:
        if not self.options.test_files:
            raise MetricError(
                f"{self.run_dir}: perplexity needs held-out text: --test LANG=FILE (repeatable)"
            )
        return self._test_texts

    def check_model(self, model: Any, info: CheckpointInfo) -> None:
        n_tok, n_model = len(self.tokenizer), int(model.config.vocab_size)
        # a model's embedding may be padded past the tokenizer (Pythia: 50,277 of 50,304)
        if n_tok > n_model:
            raise RunDirError(
                f"{info.path}: the tokenizer ({self.tokenizer_path}) has {n_tok} tokens, the "
                f"checkpoint's vocabulary {n_model}: wrong tokenizer?"
            )

    def attrs(self, parallel: bool) -> dict:
        return super().attrs(parallel) | {
            "p": float("nan"),
            "schedule": "",
            "parallel_files": self.files,
            "architecture": self.view.arch,
        }


def open_series(path: str | Path, options: AnalysisOptions) -> Series:
    """A probekit run directory, or any HF checkpoint series (a folder of checkpoint folders or
    a local hub cache)."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory not found: {path}")
    if (path / "config.toml").is_file() and not (
        options.parallel_files or options.test_files or options.hub_model or options.revisions
    ):
        return RunSeries(path, options)
    return ExternalSeries(path, options)


@functools.lru_cache(maxsize=4)
def cached_series(path: Path, options: AnalysisOptions) -> Series:
    """One series per process (a dask worker keeps it across the checkpoints it computes)."""
    return open_series(path, options)

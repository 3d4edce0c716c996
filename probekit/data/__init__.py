"""Data stage: corpus -> tokenizer/vocabulary -> mixture stream, parallel and test sets.

`prepare_run_data(cfg, run_dir)` is what the trainer calls; the analysis side
calls `load_run_data(run_dir)`, which reads only what training wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from probekit.config import DataConfig, RunConfig, language_names
from probekit.data import corpus
from probekit.data.mixture import MixtureStream, Schedule
from probekit.data.vocab import (
    Vocabulary,
    clone_vocabulary,
    joint_vocabulary,
    real_vocabulary,
    train_bpe,
)
from probekit.errors import ConfigError, RunDirError

__all__ = ["RunData", "prepare_run_data", "load_run_data", "build_vocabulary", "ParallelSet"]


def _language_docs(d: DataConfig, lang: str, split: str) -> list[str]:
    return corpus.language_docs(d.sources, lang, split, d.test_sources)


def build_vocabulary(cfg: RunConfig) -> Vocabulary:
    """Train the run's tokenizer(s) on the training split and build the vocabulary map."""
    d, t = cfg.data, cfg.tokenizer
    seed = t.seed
    names = language_names(d)
    langs = d.corpus_languages
    texts = {lang: _language_docs(d, lang, "train") for lang in langs}
    for lang, docs in texts.items():
        if not docs:
            raise ConfigError(f"data.sources.{lang}: no training text")

    def bpe(docs: list[str]):
        return train_bpe(docs, t.vocab_size, t.min_frequency, seed)

    if d.mode == "clone":
        return clone_vocabulary(bpe(texts[langs[0]]), names, d.frac_clone, seed)
    if d.mode == "mono":
        return clone_vocabulary(bpe(texts[langs[0]]), names, 1.0, seed)
    if t.vocab_mode == "joint":  # one tokenizer on all languages' text, in config order
        return joint_vocabulary(bpe([doc for lang in langs for doc in texts[lang]]), names)
    return real_vocabulary([bpe(texts[lang]) for lang in langs], names, t.vocab_mode)


@dataclass
class ParallelSet:
    """Held-out parallel sequences of two languages, as model ids."""

    ids1: list[np.ndarray]
    ids2: list[np.ndarray]
    aligned: bool  # token-aligned (clones) or not (real pairs)
    labels: np.ndarray  # which book each pair comes from (for probes)
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids1)


@dataclass
class RunData:
    cfg: RunConfig
    vocab: Vocabulary
    _cache: dict = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return self.vocab.languages

    @property
    def model_vocab_size(self) -> int:
        return self.vocab.model_vocab_size

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def fingerprint(self) -> str:
        return self.vocab.fingerprint

    def corpus_language(self, lang: str) -> str:
        d = self.cfg.data
        if d.mode == "pair":
            return d.languages[self.languages.index(lang)]
        return d.base

    def _stream_of(self, corpus_lang: str, split: str) -> np.ndarray:
        """Base ids of one corpus language's split; cached on disk by tokenizer and sources."""
        key = (corpus_lang, split)
        if key not in self._cache:
            d = self.cfg.data
            pair = d.mode == "pair"
            lang = (
                self.languages[d.corpus_languages.index(corpus_lang)] if pair else self.languages[0]
            )
            specs = [d.sources[corpus_lang], d.test_sources.get(corpus_lang)]
            stamp = [(s, _mtime(s)) for s in specs[0]] + [str(specs[1])]
            digest = hashlib.sha256(
                json.dumps(
                    [
                        self.vocab.fingerprint,
                        self.vocab.tokenizer_of[lang],
                        corpus_lang,
                        split,
                        stamp,
                    ]
                ).encode()
            ).hexdigest()[:20]
            path = cache_dir() / "tokens" / f"{digest}.npz"
            if path.is_file():
                with np.load(path) as z:
                    self._cache[key] = (z["ids"], int(z["chars"]))
            else:
                docs = _language_docs(d, corpus_lang, split)
                ids, chars = self.vocab.encode_stream(docs, lang), sum(len(x) + 1 for x in docs)
                _atomic_savez(path, ids=ids, chars=np.int64(chars))
                self._cache[key] = (ids, chars)
        return self._cache[key][0]

    def train_token_counts(self, lang: str) -> np.ndarray:
        """Occurrences of each base id in a language's training text."""
        base = self._stream_of(self.corpus_language(lang), "train")
        return np.bincount(base, minlength=len(self.vocab.to_model[lang]))

    def stream(self, total_sequences: int, seq_len: int) -> MixtureStream:
        d = self.cfg.data
        names = self.languages
        to_model = [self.vocab.to_model[n] for n in names]
        chunks = [self._stream_of(lang, "train") for lang in d.corpus_languages]
        return MixtureStream(
            names,
            chunks,
            to_model,
            shared_source=d.mode != "pair",
            total_sequences=total_sequences,
            seq_len=seq_len,
            seed=self.cfg.seed,
            schedule=Schedule(*d.schedule_spec),
            weights=d.weights or None,
        )

    def test_tokens(self, lang: str) -> tuple[np.ndarray, int]:
        """The test split of a language as model ids, and its character count."""
        self.vocab._check(lang)
        clang = self.corpus_language(lang)
        base = self._stream_of(clang, "test")
        if len(base) == 0:
            raise ConfigError(f"data.sources.{clang}: no test text")
        # base ids of a pair's second language are that language's own tokenizer ids
        return self.vocab.to_language(base, lang), self._cache[(clang, "test")][1]

    def heldout(self, lang: str, n: int, seq_len: int) -> np.ndarray:
        """n evenly spaced held-out sequences [n, seq_len + 1] of one language."""
        ids, _ = self.test_tokens(lang)
        n_chunks = max((len(ids) - 1) // seq_len, 1)
        starts = np.linspace(0, n_chunks - 1, num=min(n, n_chunks)).astype(int) * seq_len
        out = np.zeros((len(starts), seq_len + 1), dtype=np.int64)
        for i, s in enumerate(starts):
            chunk = ids[s : s + seq_len + 1]
            out[i, : len(chunk)] = chunk
        return out

    def parallel(self, l1: str, l2: str, n_pairs: int, seq_len: int) -> ParallelSet:
        """Held-out parallel pairs: token-aligned clones, or packed verse pairs for real pairs."""
        self.vocab._check(l1), self.vocab._check(l2)
        d = self.cfg.data
        if d.mode == "mono":
            raise ConfigError("a monolingual run has no second language to compare")
        if d.mode == "clone":
            return self._clone_parallel(l1, l2, n_pairs, seq_len)
        return self._pair_parallel(l1, l2, n_pairs, seq_len)

    def _parallel_bible(self, corpus_lang: str) -> str | None:
        for spec in self.cfg.data.sources[corpus_lang]:
            if spec.startswith("bible:"):
                return spec[6:]
        return None

    def _clone_parallel(self, l1: str, l2: str, n_pairs: int, seq_len: int) -> ParallelSet:
        base = self.cfg.data.base
        bible = self._parallel_bible(base)
        if self.cfg.data.parallel:
            texts = [(0, line) for line in read_lines(self.cfg.data.parallel[0])]
        elif bible is not None:
            texts = [(b, t) for b, t, _ in corpus.parallel_verses(bible, bible)]
        else:  # clones of user text: the test split is held out as well
            texts = [(0, doc) for doc in _language_docs(self.cfg.data, base, "test")]
        books = sorted({b for b, _ in texts})
        ids1, ids2, labels = [], [], []
        # chunk each book's token stream into seq_len pieces; the label is the book
        for book in books:
            stream = self.vocab.encode_stream([t for b, t in texts if b == book], l1)
            for s in range(0, len(stream) - seq_len + 1, seq_len):
                chunk = stream[s : s + seq_len]
                ids1.append(self.vocab.to_language(chunk, l1))
                ids2.append(self.vocab.to_language(chunk, l2))
                labels.append(books.index(book))
        order = spread(len(ids1), n_pairs)
        names = [corpus.book_names().get(b, str(b)) if b else "text" for b in books]
        return ParallelSet(
            [ids1[i] for i in order],
            [ids2[i] for i in order],
            True,
            np.asarray([labels[i] for i in order]),
            names,
        )

    def _pair_parallel(self, l1: str, l2: str, n_pairs: int, seq_len: int) -> ParallelSet:
        d = self.cfg.data
        c1, c2 = self.corpus_language(l1), self.corpus_language(l2)
        first_two = list(d.languages[:2])
        if d.parallel and sorted([c1, c2]) == sorted(first_two):
            # the files are line-aligned text of the first two languages, in config order
            a, b = (read_lines(p) for p in d.parallel)
            if len(a) != len(b):
                raise ConfigError(f"data.parallel: files have {len(a)} and {len(b)} lines")
            if [c1, c2] != first_two:
                a, b = b, a
            verses = [(0, x, y) for x, y in zip(a, b, strict=True)]
        else:  # any two languages of the run: their first shipped Bibles, verse by verse
            b1, b2 = self._parallel_bible(c1), self._parallel_bible(c2)
            if b1 is None or b2 is None:
                raise ConfigError(
                    f"data.parallel: {c1},{c2} has no shipped Bible in both languages; real "
                    "languages on user corpora need two line-aligned files "
                    f"(data.parallel = [{first_two[0]}, {first_two[1]}])"
                )
            verses = corpus.parallel_verses(b1, b2)
        e1 = self.vocab.encode([v[1] for v in verses], l1)
        e2 = self.vocab.encode([v[2] for v in verses], l2)
        books = sorted({v[0] for v in verses})
        pairs1, pairs2, labels = pack_parallel(e1, e2, [books.index(v[0]) for v in verses], seq_len)
        order = spread(len(pairs1), n_pairs)
        names = [corpus.book_names().get(b, str(b)) if b else "text" for b in books]
        return ParallelSet(
            [pairs1[i] for i in order],
            [pairs2[i] for i in order],
            False,
            np.asarray([labels[i] for i in order]),
            names,
        )


def pack_parallel(
    e1: list[np.ndarray], e2: list[np.ndarray], groups: list[int], seq_len: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Pack consecutive aligned segments into sequence pairs of at most seq_len per side.

    As the paper did for Europarl: a segment longer than seq_len is skipped, packs never
    cross a group (book), and a pack whose shorter side is under seq_len / 4 is dropped.
    """
    pairs1, pairs2, labels = [], [], []
    cur1, cur2, cur_group = [], [], None
    min_len = max(seq_len // 4, 1)

    def flush() -> None:
        if cur1 and min(sum(map(len, cur1)), sum(map(len, cur2))) >= min_len:
            pairs1.append(np.concatenate(cur1))
            pairs2.append(np.concatenate(cur2))
            labels.append(cur_group)

    for group, x, y in zip(groups, e1, e2, strict=True):
        if len(x) > seq_len or len(y) > seq_len or not len(x) or not len(y):
            continue
        if (
            group != cur_group
            or sum(map(len, cur1)) + len(x) > seq_len
            or sum(map(len, cur2)) + len(y) > seq_len
        ):
            flush()
            cur1, cur2, cur_group = [], [], group
        cur1.append(x)
        cur2.append(y)
    flush()
    return pairs1, pairs2, labels


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $PROBEKIT_CACHE or ~/.cache/probekit."""
    return Path(os.environ.get("PROBEKIT_CACHE", Path.home() / ".cache" / "probekit"))


def _mtime(spec: str) -> float:
    p = Path(spec).expanduser()
    return p.stat().st_mtime if ":" not in spec and p.exists() else 0.0


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them if k >= n), so every book is used."""
    if k >= n:
        return list(range(n))
    return np.linspace(0, n - 1, num=k).round().astype(int).tolist()


def read_lines(path: str, field: str = "data.parallel") -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{field}: file not found: {p}")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]


def prepare_run_data(cfg: RunConfig, run_dir: Path) -> RunData:
    """Build (or reuse) the run's tokenizer in RUN_DIR/tokenizer/ and return its data."""
    tok_dir = Path(run_dir) / "tokenizer"
    if (tok_dir / "vocab_map.json").is_file():
        vocab = Vocabulary.load(tok_dir)
        if vocab.languages != language_names(cfg.data):
            raise RunDirError(
                f"{tok_dir}: tokenizer languages {vocab.languages} do not match the config"
            )
    else:
        vocab = build_vocabulary(cfg)
        vocab.save(tok_dir)
    return RunData(cfg, vocab)


def load_run_data(run_dir: Path) -> RunData:
    """The data of a finished (or running) run, from RUN_DIR/config.toml and tokenizer/."""
    from probekit.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise RunDirError(f"{run_dir}: no config.toml (is this a probekit run directory?)")
    if not (run_dir / "tokenizer" / "vocab_map.json").is_file():
        raise RunDirError(f"{run_dir}: no tokenizer/vocab_map.json")
    return RunData(load_config(run_dir / "config.toml"), Vocabulary.load(run_dir / "tokenizer"))

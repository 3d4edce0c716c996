"""Text sources: the shipped public-domain corpus and users' own plain-text files.

Shipped Bibles: English (web, kjv, bbe), French (segond, darby), Spanish (rv1909),
Italian (diodati) and Russian (synodal), all with the same verse keys in KJV versification.

Splits are fixed by book so that text used for analysis is never trained on:
Bible test books are Joshua, Ruth, Esther and Mark; the parallel (analysis) books
are John, Acts and Romans; every other book is training text. For the English
prose the test work is *Persuasion*.
"""

from __future__ import annotations

import lzma
from functools import lru_cache
from pathlib import Path

from probekit.errors import ConfigError

CORPUS_DIR = Path(__file__).parent / "corpus"
SPLITS = ("train", "test", "parallel")

BIBLES = {  # name -> (corpus language, file)
    "web": ("en", "bible_en_web.tsv.xz"),
    "kjv": ("en", "bible_en_kjv.tsv.xz"),
    "bbe": ("en", "bible_en_bbe.tsv.xz"),
    "segond": ("fr", "bible_fr_segond.tsv.xz"),
    "darby": ("fr", "bible_fr_darby.tsv.xz"),
    "rv1909": ("es", "bible_es_rv1909.tsv.xz"),
    "diodati": ("it", "bible_it_diodati.tsv.xz"),
    "synodal": ("ru", "bible_ru_synodal.tsv.xz"),
}
# Every shipped Bible has the same verse keys (KJV versification), so any two are aligned.
BIBLE_LANGUAGES = tuple(dict.fromkeys(lang for lang, _ in BIBLES.values()))  # en fr es it ru
TEST_BOOKS = frozenset({6, 8, 17, 41})  # Joshua, Ruth, Esther, Mark
PARALLEL_BOOKS = (43, 44, 45)  # John, Acts, Romans
AUSTEN = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
PROSE = {"austen": AUSTEN, "mobydick": ("mobydick",), "all": AUSTEN + ("mobydick",)}
PROSE_TEST_WORKS = frozenset({"persuasion"})
USER_TEST_EVERY = 20  # every 20th user file (or the last 5 % of a single file) is test text


def _read_tsv(name: str) -> list[list[str]]:
    path = CORPUS_DIR / name
    if not path.is_file():
        raise ConfigError(f"shipped corpus file missing: {path} (rebuild: scripts/build_corpus.py)")
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n").split("\t") for line in fh]


@lru_cache(maxsize=16)
def bible_verses(name: str) -> tuple[tuple[int, int, int, str], ...]:
    """All verses of a shipped translation as (book, chapter, verse, text)."""
    if name not in BIBLES:
        raise ConfigError(f"unknown Bible {name!r} (shipped: {', '.join(BIBLES)})")
    return tuple((int(b), int(c), int(v), t) for b, c, v, t in _read_tsv(BIBLES[name][1]))


@lru_cache(maxsize=1)
def book_names() -> dict[int, str]:
    return {int(row[0]): row[1] for row in _read_tsv("bible_books.tsv.xz")}


def book_split(book: int) -> str:
    """'train', 'test' or 'parallel': the fixed split of a Bible book (1..66, KJV order)."""
    if book in TEST_BOOKS:
        return "test"
    return "parallel" if book in PARALLEL_BOOKS else "train"


_book_split = book_split


def _bible_docs(name: str, split: str) -> list[str]:
    books: dict[int, list[str]] = {}
    for book, _, _, text in bible_verses(name):
        if _book_split(book) == split:
            books.setdefault(book, []).append(text)
    return [" ".join(verses) for _, verses in sorted(books.items())]


def _prose_docs(which: str, split: str) -> list[str]:
    if which not in PROSE:
        raise ConfigError(f"unknown prose source 'prose:{which}' (shipped: {', '.join(PROSE)})")
    works: dict[str, list[str]] = {}
    for work, _, text in _read_tsv("prose_en.tsv.xz"):
        works.setdefault(work, []).append(text)
    wanted = [w for w in PROSE[which] if (w in PROSE_TEST_WORKS) == (split == "test")]
    return [] if split == "parallel" else ["\n".join(works[w]) for w in wanted if w in works]


def _user_docs(path: Path, split: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"data source {path}: folder holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"data source not found: {path}")
    if split == "parallel":
        return []
    if len(files) >= USER_TEST_EVERY:  # whole files go to test, so no document is split
        chosen = [
            f
            for i, f in enumerate(files)
            if (i % USER_TEST_EVERY == USER_TEST_EVERY - 1) == (split == "test")
        ]
        return [f.read_text(encoding="utf-8", errors="replace") for f in chosen]
    docs = []
    for f in files:
        paras = [
            p for p in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()
        ]
        cut = len(paras) - max(1, len(paras) // USER_TEST_EVERY)
        docs.append("\n\n".join(paras[cut:] if split == "test" else paras[:cut]))
    return [d for d in docs if d]


def source_docs(spec: str, split: str) -> list[str]:
    """Documents of one source spec ('bible:web', 'prose:austen', or a path) in one split."""
    if split not in SPLITS:
        raise ValueError(split)
    if spec.startswith("bible:"):
        return _bible_docs(spec.split(":", 1)[1], split)
    if spec.startswith("prose:"):
        return _prose_docs(spec.split(":", 1)[1], split)
    return _user_docs(Path(spec).expanduser(), split)


def source_language(spec: str) -> str | None:
    """Corpus language of a shipped source, None for user paths."""
    if spec.startswith("bible:") and spec[6:] in BIBLES:
        return BIBLES[spec[6:]][0]
    return "en" if spec.startswith("prose:") else None


def language_docs(
    sources: dict[str, list[str]],
    lang: str,
    split: str,
    test_sources: dict[str, list[str]] | None = None,
) -> list[str]:
    """All documents of one corpus language in a split, following the config's
    `data.sources` (and `data.test_sources` for the test split)."""
    if split == "test" and (test_sources or {}).get(lang):
        specs = test_sources[lang]
        return [
            d
            for s in ([specs] if isinstance(specs, str) else specs)
            for d in source_docs(s, "train") + source_docs(s, "test")
        ]
    docs = [d for spec in sources[lang] for d in source_docs(spec, split)]
    for spec in sources[lang]:
        shipped = source_language(spec)
        if shipped is not None and shipped != lang:
            raise ConfigError(f"data.sources.{lang}: {spec!r} is {shipped!r} text, not {lang!r}")
    return docs


def bibles_of(lang: str) -> tuple[str, ...]:
    """Names of the shipped Bibles of one corpus language, the default first ('es' -> rv1909)."""
    names = tuple(name for name, (code, _) in BIBLES.items() if code == lang)
    if not names:
        raise ConfigError(
            f"no shipped Bible in language {lang!r} (shipped: {', '.join(BIBLE_LANGUAGES)})"
        )
    return names


def parallel_verses(
    a: str = "web", b: str = "segond", split: str = "parallel"
) -> list[tuple[int, str, str]]:
    """Verse-aligned (book, text_a, text_b) of two shipped Bibles (any languages) in one split.

    The default split is the held-out parallel books (John, Acts, Romans), in verse order.
    """
    if split not in SPLITS:
        raise ValueError(split)
    va = {(bk, c, v): t for bk, c, v, t in bible_verses(a) if _book_split(bk) == split}
    vb = {(bk, c, v): t for bk, c, v, t in bible_verses(b) if _book_split(bk) == split}
    return [(k[0], va[k], vb[k]) for k in sorted(va) if k in vb]


def language_parallel_verses(
    lang_a: str, lang_b: str, split: str = "parallel"
) -> list[tuple[int, str, str]]:
    """`parallel_verses` of the default shipped Bibles of two corpus languages ('es', 'it')."""
    return parallel_verses(bibles_of(lang_a)[0], bibles_of(lang_b)[0], split)

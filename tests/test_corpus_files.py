"""Checks on the shipped default corpus (probekit/data/corpus), read with the stdlib.

The files are produced by scripts/build_corpus.py; see probekit/data/corpus/LICENSES.md.
"""

from __future__ import annotations

import importlib.util
import lzma
import re
from functools import cache
from pathlib import Path

import pytest

from probekit.data import corpus

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "probekit" / "data" / "corpus"

BIBLE_FILES = (
    "bible_en_web.tsv.xz",
    "bible_en_kjv.tsv.xz",
    "bible_en_bbe.tsv.xz",
    "bible_fr_segond.tsv.xz",
    "bible_fr_darby.tsv.xz",
)
PROSE_WORKS = corpus.PROSE["all"]  # what the reader expects the build to provide
# Counts of the current build (31,102 KJV-versification keys minus 38 BBE placeholders).
BIBLE_ROWS = 31064
PROSE_PARAGRAPHS = {
    "emma": 2376,
    "mansfieldpark": 1841,
    "northangerabbey": 1056,
    "persuasion": 1035,
    "prideprejudice": 2126,
    "sensesensibility": 1864,
    "mobydick": 2663,
}
MAX_TOTAL_BYTES = 10_000_000


@cache
def read_rows(name: str) -> tuple[tuple[str, ...], ...]:
    raw = lzma.decompress((CORPUS / name).read_bytes())
    text = raw.decode("utf-8")  # strict: fails on invalid UTF-8
    assert text.endswith("\n"), f"{name}: missing final newline"
    assert "\r" not in text, f"{name}: carriage return"
    return tuple(tuple(line.split("\t")) for line in text[:-1].split("\n"))


def check_text(name: str, text: str) -> None:
    assert text, f"{name}: empty text field"
    assert text == text.strip(), f"{name}: untrimmed text {text[:60]!r}"
    assert "  " not in text, f"{name}: doubled space in {text[:60]!r}"
    assert not any(ch in text for ch in "\t\n\r\x0b\x0c\u00ad"), f"{name}: {text[:60]!r}"


def test_expected_files_present_and_small():
    names = {p.name for p in CORPUS.glob("*.tsv.xz")}
    assert names == {*BIBLE_FILES, "bible_books.tsv.xz", "prose_en.tsv.xz"}
    total = sum((CORPUS / n).stat().st_size for n in names)
    assert total < MAX_TOTAL_BYTES, total


def test_licenses_mention_every_file():
    lic = (CORPUS / "LICENSES.md").read_text(encoding="utf-8")
    for name in (*BIBLE_FILES, "bible_books.tsv.xz", "prose_en.tsv.xz"):
        assert name in lic
    assert "derived from the WEB" in lic
    assert "scripts/build_corpus.py" in lic


@pytest.mark.parametrize("name", BIBLE_FILES)
def test_bible_file_format(name):
    rows = read_rows(name)
    assert len(rows) == BIBLE_ROWS
    keys = []
    for row in rows:
        assert len(row) == 4, f"{name}: {row[:3]}"
        b, c, v, text = row
        assert b.isdigit() and c.isdigit() and v.isdigit(), row[:3]
        key = (int(b), int(c), int(v))
        assert 1 <= key[0] <= 66 and key[1] >= 1 and key[2] >= 1, key
        check_text(name, text)
        assert len(text) >= 3 and any(ch.isalnum() for ch in text), (key, text)
        assert "`" not in text and "[" not in text and "]" not in text, (key, text)
        keys.append(key)
    assert keys == sorted(set(keys)), f"{name}: keys not strictly sorted"
    assert {k[0] for k in keys} == set(range(1, 67))


def test_bible_files_aligned():
    key_sets = {name: [row[:3] for row in read_rows(name)] for name in BIBLE_FILES}
    first = key_sets[BIBLE_FILES[0]]
    for name, keys in key_sets.items():
        assert keys == first, f"{name} keys differ from {BIBLE_FILES[0]}"


def test_bible_spot_checks():
    web = {row[:3]: row[3] for row in read_rows("bible_en_web.tsv.xz")}
    kjv = {row[:3]: row[3] for row in read_rows("bible_en_kjv.tsv.xz")}
    seg = {row[:3]: row[3] for row in read_rows("bible_fr_segond.tsv.xz")}
    assert kjv[("1", "1", "1")] == "In the beginning God created the heaven and the earth."
    assert seg[("1", "1", "1")].startswith("Au commencement")
    assert ("43", "3", "16") in web  # John 3:16
    assert ("9", "13", "1") not in web  # BBE placeholder '***' drops the key everywhere
    assert seg[("3", "6", "2")].startswith("Lorsque")  # source: "(5:21 Lorsque ..."
    for name in BIBLE_FILES:
        texts = [row[3] for row in read_rows(name)]
        assert not [t for t in texts if re.search(r"\(\d+:\d+", t)], name


def test_bible_books():
    rows = read_rows("bible_books.tsv.xz")
    assert [int(r[0]) for r in rows] == list(range(1, 67))
    for row in rows:
        assert len(row) == 3
        check_text("bible_books", row[1])
        check_text("bible_books", row[2])
    assert rows[0][1:] == ("Genesis", "Genèse")
    assert rows[65][1:] == ("Revelation", "Apocalypse")


def test_prose_file():
    rows = read_rows("prose_en.tsv.xz")
    seen: dict[str, list[int]] = {}
    for row in rows:
        assert len(row) == 3, row[:2]
        work, idx, text = row
        assert work in PROSE_WORKS, work
        assert idx.isdigit(), row[:2]
        check_text(work, text)
        seen.setdefault(work, []).append(int(idx))
    assert list(seen) == list(PROSE_WORKS)  # grouped, in this order
    for work, idxs in seen.items():
        assert idxs == list(range(len(idxs))), work
        assert len(idxs) == PROSE_PARAGRAPHS[work], work
    words = sum(len(r[2].split()) for r in rows)
    assert 900_000 < words < 960_000, words
    moby = [r[2] for r in rows if r[0] == "mobydick"]
    assert moby[0] == "MOBY DICK; OR THE WHALE"
    assert not any("Project Gutenberg" in p and "License" in p for p in moby)
    assert moby[-1].startswith("It so chanced")


def _load_builder():
    path = REPO / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_builder_cleaning_helpers():
    bc = _load_builder()
    assert bc.clean_verse("(5:21 Lorsque") == "Lorsque"
    assert bc.clean_verse("(3:1) A\tpsalm  of\nDavid`s [own] har\u00admony ") == (
        "A psalm of David's own harmony"
    )
    assert not bc.is_real_verse(bc.clean_verse("***"))
    assert not bc.is_real_verse(bc.clean_verse("(8:1)"))
    assert bc.lines_to_paragraphs(["a", " b", "", "", "c", None, "d"]) == ["a b", "c", "d"]
    assert bc.spaced_name("SongOfSolomon") == "Song of Solomon"
    assert bc.spaced_name("1Samuel") == "1 Samuel"

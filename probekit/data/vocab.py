"""Tokenizers and the model vocabulary built from them.

A run has one base tokenizer per language (or one shared; byte-level BPE, trained locally) and a
`Vocabulary` that maps each language's base ids to model ids:

* clones: EN_i uses base id + i*V (padding never cloned; with frac_clone < 1 only
  a seeded subset of ids is cloned and the rest are shared anchor points);
* real languages (k >= 2, mode "pair"): `disjoint` offsets language i by the sizes of
  the languages before it; `anchored` gives a piece whose string exists in an earlier
  language's vocabulary that earlier id (so one string has one id in every language that
  has it); `joint` trains one tokenizer on all languages;
* mono: the identity.

`Vocabulary.lookup(id)` turns any model id back into (language, piece).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from probekit.errors import ConfigError, RunDirError

PAD, EOT = "<pad>", "<|endoftext|>"
PAD_ID, EOT_ID = 0, 1


def train_bpe(
    texts: list[str], vocab_size: int, min_frequency: int = 2, seed: int = 0
) -> Tokenizer:
    """Byte-level BPE with <pad>=0 and <|endoftext|>=1; the seed fixes the text order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    order = np.random.default_rng(seed).permutation(len(texts))
    tok.train_from_iterator((texts[i] for i in order), trainer=trainer, length=len(texts))
    return tok


def _pieces(tok: Tokenizer) -> list[str]:
    vocab = tok.get_vocab()
    pieces = [""] * len(vocab)
    for piece, i in vocab.items():
        pieces[i] = piece
    return pieces


class Vocabulary:
    """Languages, their base tokenizers, and the base-id -> model-id maps."""

    def __init__(
        self,
        languages: list[str],
        tokenizers: dict[str, Tokenizer],
        tokenizer_of: dict[str, str],
        to_model: dict[str, np.ndarray],
        mode: str,
        info: dict | None = None,
    ):
        self.languages = list(languages)
        self.tokenizers = tokenizers  # tokenizer key -> Tokenizer
        self.tokenizer_of = tokenizer_of  # language -> tokenizer key
        self.to_model = {k: np.asarray(v, dtype=np.int64) for k, v in to_model.items()}
        self.mode = mode
        self.info = info or {}
        self.model_vocab_size = int(max(int(v.max()) for v in self.to_model.values()) + 1)
        self.pad_id = PAD_ID
        self._pieces = {k: _pieces(t) for k, t in tokenizers.items()}
        # inverse map: model id -> [(language, base id)]
        self._owners: list[list[tuple[str, int]]] = [[] for _ in range(self.model_vocab_size)]
        for lang in self.languages:
            for base_id, model_id in enumerate(self.to_model[lang]):
                self._owners[model_id].append((lang, base_id))

    def _check(self, lang: str) -> None:
        if lang not in self.to_model:
            raise ConfigError(
                f"unknown language {lang!r} (this run has: {', '.join(self.languages)})"
            )

    def base_encode(self, texts: list[str], lang: str) -> list[np.ndarray]:
        self._check(lang)
        tok = self.tokenizers[self.tokenizer_of[lang]]
        return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)]

    def encode(self, texts: list[str], lang: str) -> list[np.ndarray]:
        """Model ids of each text in language `lang`."""
        return [self.to_model[lang][ids] for ids in self.base_encode(texts, lang)]

    def encode_stream(self, docs: list[str], lang: str) -> np.ndarray:
        """Base ids of documents joined by <|endoftext|> (the training/test stream)."""
        parts = []
        for ids in self.base_encode(docs, lang):
            parts += [ids, np.array([EOT_ID], dtype=np.int64)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def to_language(self, base_ids: np.ndarray, lang: str) -> np.ndarray:
        self._check(lang)
        return self.to_model[lang][base_ids]

    def lookup(self, model_id: int) -> list[tuple[str, str]]:
        """(language, piece) for every language that uses this model id."""
        if not 0 <= model_id < self.model_vocab_size:
            raise ValueError(f"id {model_id} outside the model vocabulary")
        return [
            (lang, self._pieces[self.tokenizer_of[lang]][b]) for lang, b in self._owners[model_id]
        ]

    def base_id(self, lang: str, model_id: int) -> int:
        """The base-tokenizer id behind a model id of one language."""
        for owner, base in self._owners[model_id]:
            if owner == lang:
                return base
        raise ValueError(f"id {model_id} is not a {lang} id")

    def piece(self, lang: str, model_id: int) -> str:
        return self._pieces[self.tokenizer_of[lang]][self.base_id(lang, model_id)]

    def decode(self, model_ids: np.ndarray, lang: str) -> str:
        inverse = {int(m): b for b, m in enumerate(self.to_model[lang])}
        return self.tokenizers[self.tokenizer_of[lang]].decode([inverse[int(i)] for i in model_ids])

    def clone_pairs(self, l1: str, l2: str) -> np.ndarray:
        """[n, 2] model ids (l1 id, l2 id) of pieces with distinct ids in the two languages.

        Only defined when both languages share one base tokenizer (clones); pieces
        mapped to the same id (anchors, padding) are left out.
        """
        self._check(l1), self._check(l2)
        if self.tokenizer_of[l1] != self.tokenizer_of[l2]:
            return np.zeros((0, 2), dtype=np.int64)
        a, b = self.to_model[l1], self.to_model[l2]
        keep = a != b
        return np.stack([a[keep], b[keep]], axis=1)

    def shared_ids(self, l1: str, l2: str) -> np.ndarray:
        """Model ids used by both languages (anchors), padding excluded."""
        both = np.intersect1d(self.to_model[l1], self.to_model[l2])
        return both[both != PAD_ID]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.tokenizers):
            h.update(self.tokenizers[key].to_str().encode())
        for lang in self.languages:
            h.update(lang.encode() + self.to_model[lang].tobytes())
        return h.hexdigest()[:16]

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for key, tok in self.tokenizers.items():
            tok.save(str(out / f"tokenizer_{key}.json"))
        vmap = {
            "mode": self.mode,
            "languages": self.languages,
            "tokenizer_of": self.tokenizer_of,
            "model_vocab_size": self.model_vocab_size,
            "pad_id": PAD_ID,
            "eot_id": EOT_ID,
            "to_model": {k: v.tolist() for k, v in self.to_model.items()},
            "info": self.info,
            "fingerprint": self.fingerprint,
        }
        tmp = out / "vocab_map.json.tmp"
        tmp.write_text(json.dumps(vmap))
        tmp.replace(out / "vocab_map.json")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        path = Path(path)
        try:
            vmap = json.loads((path / "vocab_map.json").read_text())
            toks = {
                k: Tokenizer.from_file(str(path / f"tokenizer_{k}.json"))
                for k in set(vmap["tokenizer_of"].values())
            }
        except (OSError, ValueError, KeyError) as exc:
            raise RunDirError(f"{path}: unreadable tokenizer/vocabulary map ({exc})") from None
        return cls(
            vmap["languages"],
            toks,
            vmap["tokenizer_of"],
            vmap["to_model"],
            vmap["mode"],
            vmap.get("info"),
        )


def clone_vocabulary(
    tok: Tokenizer, names: list[str], frac_clone: float, seed: int = 0
) -> Vocabulary:
    """EN1..ENk from one tokenizer: language i gets base id + i*V on the cloned ids."""
    size = tok.get_vocab_size()
    cloned = np.zeros(size, dtype=bool)
    candidates = np.arange(1, size)  # padding (id 0) is never cloned
    n_clone = int(round(frac_clone * len(candidates)))
    # a generator of its own, so the subset depends on the seed alone
    cloned[np.sort(np.random.default_rng([seed, 7]).choice(candidates, n_clone, replace=False))] = (
        True
    )
    base = np.arange(size)
    to_model = {name: np.where(cloned, base + i * size, base) for i, name in enumerate(names)}
    info = {
        "base_vocab_size": size,
        "frac_clone": frac_clone,
        "n_cloned": int(cloned.sum()),
        "n_shared": int(size - cloned.sum()),
    }
    return Vocabulary(names, {"base": tok}, {n: "base" for n in names}, to_model, "clone", info)


def real_vocabulary(toks: list[Tokenizer], names: list[str], mode: str) -> Vocabulary:
    """k >= 2 languages with their own tokenizers: disjoint ids or anchored shared pieces.

    The first language keeps its base ids; each later one gets fresh ids after all earlier
    ones, except padding (always 0) and, in `anchored` mode, a piece whose string an earlier
    language already has, which takes that language's id.
    """
    if len(toks) != len(names) or len(names) < 2:
        raise ValueError("real_vocabulary needs one tokenizer per language, at least two")
    v1 = toks[0].get_vocab_size()
    seen = {piece: i for i, piece in enumerate(_pieces(toks[0]))}  # piece -> model id
    maps = [np.arange(v1)]
    nxt, anchors = v1, 0
    for tok in toks[1:]:
        m = np.zeros(tok.get_vocab_size(), dtype=np.int64)
        for i, piece in enumerate(_pieces(tok)):
            if i == PAD_ID:
                m[i] = PAD_ID
            elif mode == "anchored" and piece in seen:
                m[i], anchors = seen[piece], anchors + 1
            else:
                m[i], nxt = nxt, nxt + 1
                if mode == "anchored":
                    seen[piece] = int(m[i])
        maps.append(m)
    info = {
        "vocab_sizes": [t.get_vocab_size() for t in toks],
        "n_anchored": anchors,
        "model_vocab_size": int(nxt),
    }
    return Vocabulary(
        names,
        {n.lower(): t for n, t in zip(names, toks, strict=True)},
        {n: n.lower() for n in names},
        dict(zip(names, maps, strict=True)),
        mode,
        info,
    )


def pair_vocabulary(tok1: Tokenizer, tok2: Tokenizer, names: list[str], mode: str) -> Vocabulary:
    """Two languages with their own tokenizers (`real_vocabulary` for two)."""
    return real_vocabulary([tok1, tok2], names, mode)


def joint_vocabulary(tok: Tokenizer, names: list[str]) -> Vocabulary:
    base = np.arange(tok.get_vocab_size())
    return Vocabulary(
        names,
        {"joint": tok},
        {n: "joint" for n in names},
        {n: base for n in names},
        "joint",
        {"vocab_size": len(base)},
    )

"""k >= 2 real languages in one run (mode "pair", alias "real"): config, vocabularies, mixture,
parallel pairs of any two languages, and the shipped Bibles' alignment."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from probekit.config import dump_config, load_config
from probekit.data import corpus, prepare_run_data
from probekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "fr", "es", "it", "ru"]
ONE_BIBLE = {"en": ["bible:web"], "fr": ["bible:segond"]}  # es, it, ru: shipped defaults


def real_cfg(mode: str = "disjoint", **data) -> dict:
    return {
        "seed": 0,
        "data": {"mode": "real", "languages": LANGS, "sources": ONE_BIBLE, **data},
        "tokenizer": {"vocab_size": 300, "vocab_mode": mode},
        "model": {"preset": "nano"},
    }


@pytest.fixture(scope="module")
def real5(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real5")
    out = {}
    for mode in ("disjoint", "anchored", "joint"):
        cfg = load_config(real_cfg(mode, weights=[0.4, 0.25, 0.15, 0.12, 0.08]))
        out[mode] = prepare_run_data(cfg, root / mode)
    return out


def test_real_is_pair_and_defaults_fill_shipped_sources():
    cfg = load_config(real_cfg())
    d = cfg.data
    assert d.mode == "pair" and d.corpus_languages == LANGS
    assert d.sources["es"] == ["bible:rv1909"] and d.sources["it"] == ["bible:diodati"]
    assert d.sources["ru"] == ["bible:synodal"]
    text = dump_config(cfg)
    assert 'mode = "pair"' in text and load_config(cfg).to_dict() == cfg.to_dict()
    # a two-language config that never named es/it dumps exactly as before (no es/it added)
    assert "rv1909" not in dump_config(load_config({"data": {"mode": "pair"}}))


@pytest.mark.parametrize(
    "data, field",
    [
        ({"languages": ["en"]}, r"data\.languages"),
        ({"languages": ["en", "fr", "en"]}, r"data\.languages"),
        ({"languages": ["en", "pt"]}, r"data\.sources\.pt"),
        ({"weights": [0.5, 0.5, 0.5, 0.5, 0.5]}, r"data\.weights"),
        ({"weights": [0.5, 0.5]}, r"data\.weights"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field) as exc:
        load_config(real_cfg(**data))
    assert "\n" not in str(exc.value)


def test_five_language_shares_match_the_weights(real5):
    data = real5["disjoint"]
    weights = [0.4, 0.25, 0.15, 0.12, 0.08]
    stream = data.stream(20_000, 64)
    shares = stream.language_counts(20_000) / 20_000
    assert np.all(np.abs(shares - weights) < 0.01), shares
    _, langs = stream.sequences(0, 20_000)
    assert np.all(np.abs(np.bincount(langs, minlength=5) / 20_000 - weights) < 0.01)
    # p alone: the first language keeps 1 - p, the others split p equally
    cfg = load_config(real_cfg(p=0.4))
    from probekit.data import RunData

    s = RunData(cfg, data.vocab).stream(20_000, 64)
    want = [0.6, 0.1, 0.1, 0.1, 0.1]
    assert np.all(np.abs(s.language_counts(20_000) / 20_000 - want) < 0.01)


def test_each_language_reads_its_own_text(real5):
    data = real5["disjoint"]
    vocab = data.vocab
    ids, langs = data.stream(400, 64).sequences(0, 400)
    for li, lang in enumerate(vocab.languages):
        own = set(vocab.to_model[lang].tolist())
        rows = ids[langs == li]
        assert len(rows) and set(np.unique(rows).tolist()) <= own
    text = vocab.decode(data.heldout("ES", 1, 64)[0][:40], "ES")
    assert any(w in text.lower() for w in (" de ", " y ", " que ", " el ", " la "))
    text = vocab.decode(data.heldout("RU", 1, 64)[0][:40], "RU")
    assert sum("а" <= ch <= "я" for ch in text.lower()) > len(text) // 3  # Cyrillic


def test_disjoint_ids_do_not_overlap(real5):
    vocab = real5["disjoint"].vocab
    assert vocab.model_vocab_size == 1 + 5 * 299
    for a, b in itertools.combinations(vocab.languages, 2):
        assert vocab.shared_ids(a, b).size == 0


def test_anchored_ids_are_shared_exactly_where_the_pieces_match(real5):
    vocab = real5["anchored"].vocab
    pieces = {lang: vocab._pieces[vocab.tokenizer_of[lang]] for lang in vocab.languages}
    for a, b in itertools.combinations(vocab.languages, 2):
        ma, mb = vocab.to_model[a], vocab.to_model[b]
        same_id = ma[:, None] == mb[None, :]
        same_piece = (
            np.asarray(pieces[a], dtype=object)[:, None]
            == np.asarray(pieces[b], dtype=object)[None, :]
        )
        assert np.array_equal(same_id, same_piece), (a, b)
    # within one language ids stay distinct
    for lang in vocab.languages:
        assert len(set(vocab.to_model[lang].tolist())) == len(vocab.to_model[lang])
    assert vocab.model_vocab_size < real5["disjoint"].vocab.model_vocab_size


def test_joint_vocabulary_is_one_tokenizer(real5):
    vocab = real5["joint"].vocab
    assert vocab.model_vocab_size == 300
    assert len(set(vocab.tokenizer_of.values())) == 1


def test_parallel_pairs_of_any_two_languages(real5):
    data = real5["anchored"]
    for a, b in (("ES", "IT"), ("IT", "EN"), ("FR", "ES"), ("RU", "EN")):
        par = data.parallel(a, b, 6, 64)
        assert not par.aligned and len(par) == 6
        ta = data.vocab.decode(par.ids1[0], a)
        want = data.vocab.decode(data.vocab.encode([ta], a)[0], a)
        assert ta == want
    # ES,IT and IT,ES are the same pairs, swapped
    p1, p2 = data.parallel("ES", "IT", 4, 64), data.parallel("IT", "ES", 4, 64)
    assert all(np.array_equal(x, y) for x, y in zip(p1.ids1, p2.ids2, strict=True))


def test_shipped_bibles_have_the_same_verse_keys_per_split():
    for split in corpus.SPLITS:
        keys = {
            name: {
                (bk, c, v)
                for bk, c, v, _ in corpus.bible_verses(name)
                if corpus.book_split(bk) == split
            }
            for name in corpus.BIBLES
        }
        first = keys["web"]
        assert first
        for name, k in keys.items():
            assert k == first, (split, name)
    # and the parallel verses of the languages' default Bibles are aligned one to one
    parallel = {k for k in (corpus.bible_verses("web")) if corpus.book_split(k[0]) == "parallel"}
    assert len(corpus.language_parallel_verses("es", "it")) == len(parallel)


def test_five_language_run_trains_and_aligns_any_pair(tmp_path, capsys):
    from probekit.analysis import align
    from probekit.options import AnalysisOptions
    from probekit.training import train

    cfg = real_cfg("anchored", p=0.4)
    cfg.update(train={"steps": 6, "batch_size": 8}, eval={"n_sequences": 4})
    cfg["checkpoints"] = {"steps": [3]}
    run = train(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "language shares over the run: EN" in err and "IT" in err
    log = [r for r in __import__("probekit").checkpoints.read_train_log(run) if "eval" in r]
    assert set(log[-1]["eval"]) == {"EN", "FR", "ES", "IT", "RU"}
    opts = AnalysisOptions(pair=("ES", "RU"), n_pairs=8)
    cube = align(run, metrics="similarity", steps=[6], options=opts, progress=False)
    assert "'pair': ('ES', 'RU')" in str(cube.attrs["analysis_options"])
    assert np.isfinite(cube["hidden_cos"].sel(step=6).values).all()


def test_sweep_control_of_a_five_language_run(tmp_path: Path):
    """The update-matched control of a k-language run trains the minority language on its
    own share of the batch: p split over the k - 1 other languages."""
    from probekit.sweep import expand_grid

    base = ROOT / "examples" / "real5_main60.toml"
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'name = "g"\nbase = "{base}"\n[grid]\n"data.p" = [0.3]\n'
        "[references]\nfractions = [1.0]\ncontrols = true\n"
    )
    ctrl = next(r for r in expand_grid(grid) if r.kind == "control")
    assert ctrl.raw["data"]["mode"] == "mono" and ctrl.raw["data"]["base"] == "fr"
    assert ctrl.raw["train"]["batch_size"] == 2  # 20 * 0.4 / 4

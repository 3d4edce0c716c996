"""Run configuration: TOML in, a resolved and validated dict out.

Every field has a default here (or in the section owner's validator), so the
`config.toml` a run writes is the complete recipe for reproducing it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from probekit.errors import ConfigError

DATA_DEFAULTS: dict[str, Any] = {
    "mode": "clone",  # clone | pair | mono
    "base": "en",  # corpus language of clone / mono runs
    "languages": ["en", "fr"],  # the two corpus languages of a pair run
    "clones": 1,  # cloned languages besides the original (clone mode)
    "frac_clone": 1.0,
    "p": 0.5,  # share of the second language (clone mode: of all clones together)
    "weights": [],  # explicit per-language shares; overrides p
    "schedule": "",  # "" | "0.1_0.9" | "linear:0.1:0.9" | {fractions=[...], p=[...]}
    "sources": {
        "en": ["bible:web", "bible:kjv", "bible:bbe"],
        "fr": ["bible:segond", "bible:darby"],
    },
    "test_sources": {},  # per language; default: the held-out books/part of `sources`
    "parallel": [],  # two line-aligned files (L1, L2) for user corpora
}

TOKENIZER_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "vocab_mode": "disjoint",  # pair mode: disjoint | anchored | joint
    "min_frequency": 2,
    "seed": 0,  # BPE text order and cloned subset; not the run seed, so seeds share a tokenizer
}

MODES = ("clone", "pair", "mono")
VOCAB_MODES = ("disjoint", "anchored", "joint")
RESULT_SECTIONS = ("seed", "data", "tokenizer", "model", "train")


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"{where}.{key}: unknown field (known: {known})")
        if isinstance(defaults[key], dict) and key != "sources" and isinstance(value, dict):
            out[key] = _merge(defaults[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _check_share(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0 or math.isnan(float(value)):
        raise ConfigError(f"{field}: {value} is outside [0, 1]")
    return float(value)


def validate_data_section(data: dict) -> dict:
    data = _merge(DATA_DEFAULTS, data, "data")
    if data["mode"] not in MODES:
        raise ConfigError(f"data.mode: unknown mode {data['mode']!r} (known: {', '.join(MODES)})")
    data["p"] = _check_share(data["p"], "data.p")
    data["frac_clone"] = _check_share(data["frac_clone"], "data.frac_clone")
    if not isinstance(data["clones"], int) or data["clones"] < 1:
        raise ConfigError(f"data.clones: expected an integer >= 1, got {data['clones']!r}")
    if data["mode"] == "clone" and data["frac_clone"] < 1.0 and data["clones"] > 1:
        raise ConfigError(
            "data.frac_clone: partial cloning is supported for two languages only "
            f"(data.clones = {data['clones']})"
        )
    if data["mode"] == "pair":
        langs = data["languages"]
        if not isinstance(langs, list) or len(langs) != 2 or langs[0] == langs[1]:
            raise ConfigError(
                f"data.languages: a pair run needs two distinct languages, got {langs!r}"
            )
    needed = _corpus_languages(data)
    for lang in needed:
        if lang not in data["sources"] or not data["sources"][lang]:
            raise ConfigError(f"data.sources.{lang}: no sources for language {lang!r}")
    for lang, srcs in data["sources"].items():
        if isinstance(srcs, str):
            data["sources"][lang] = [srcs]
    if data["weights"]:
        w = data["weights"]
        if len(w) != len(language_names(data)) or any(
            isinstance(x, bool) or not isinstance(x, int | float) or x < 0 for x in w
        ):
            raise ConfigError(
                f"data.weights: expected {len(language_names(data))} non-negative shares, got {w!r}"
            )
        if abs(sum(w) - 1.0) > 1e-6:
            raise ConfigError(f"data.weights: shares must sum to 1, got {sum(w):.4f}")
    if data["schedule"]:
        from probekit.data.mixture import parse_schedule

        parse_schedule(data["schedule"])  # raises ConfigError naming data.schedule
    if data["parallel"] and len(data["parallel"]) != 2:
        raise ConfigError("data.parallel: expected two line-aligned files [L1, L2]")
    return data


def validate_tokenizer_section(tok: dict, data: dict) -> dict:
    tok = _merge(TOKENIZER_DEFAULTS, tok, "tokenizer")
    if not isinstance(tok["vocab_size"], int) or not 260 <= tok["vocab_size"] <= 1_000_000:
        raise ConfigError(
            f"tokenizer.vocab_size: expected an integer >= 260 (bytes + specials), "
            f"got {tok['vocab_size']!r}"
        )
    if tok["vocab_mode"] not in VOCAB_MODES:
        raise ConfigError(
            f"tokenizer.vocab_mode: unknown mode {tok['vocab_mode']!r} "
            f"(known: {', '.join(VOCAB_MODES)})"
        )
    return tok


def _corpus_languages(data: dict) -> list[str]:
    return list(data["languages"]) if data["mode"] == "pair" else [data["base"]]


def language_names(data: dict) -> list[str]:
    """Model-level language names: EN1..ENk for clones, EN/FR for pairs, EN for mono."""
    if data["mode"] == "clone":
        return [f"{data['base'].upper()}{i + 1}" for i in range(data["clones"] + 1)]
    if data["mode"] == "pair":
        return [lang.upper() for lang in data["languages"]]
    return [data["base"].upper()]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {item!r}: malformed key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        path, value = _parse_override(item)
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return cfg


def read_toml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML ({exc})") from None


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a TOML config (or take a dict), apply `key=value` overrides, fill every default."""
    raw = copy.deepcopy(source) if isinstance(source, dict) else read_toml(Path(source))
    raw = apply_overrides(raw, overrides)
    known = {
        "seed",
        "name",
        "data",
        "tokenizer",
        "model",
        "train",
        "checkpoints",
        "eval",
        "probekit",
    }
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown config section (known: {', '.join(sorted(known))})")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    cfg: dict[str, Any] = {"seed": seed, "name": str(raw.get("name", ""))}
    cfg["data"] = validate_data_section(raw.get("data", {}))
    cfg["tokenizer"] = validate_tokenizer_section(raw.get("tokenizer", {}), cfg["data"])
    from probekit.training.model import validate_model_section
    from probekit.training.trainer import validate_train_sections

    cfg["model"] = validate_model_section(raw.get("model", {}))
    for section in ("train", "checkpoints", "eval"):
        cfg[section] = raw.get(section, {})
    cfg = validate_train_sections(cfg)
    cfg.pop("probekit", None)
    return cfg


def config_fingerprint(cfg: dict) -> str:
    """Hash of what changes a run's result (not checkpoint/eval/progress settings)."""
    core = {k: cfg.get(k) for k in RESULT_SECTIONS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two configs differ (for error messages)."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_fields(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return '""'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_config(cfg: dict) -> str:
    """TOML text of a (resolved) config; sections become tables."""
    lines = [f"{_key(k)} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for section, body in cfg.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{_key(section)}]")
        for k, v in body.items():
            lines.append(f"{_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"

"""Run configuration: TOML in, a resolved and validated `RunConfig` out.

A run config is one typed section per TOML table (`cfg.data.mode`, `cfg.train.steps`, ...).
Every field has its default here and every derived value (steps from a token budget,
warm-up, checkpoint and eval intervals, the model preset's sizes) is resolved on loading,
so the `config.toml` a run writes is the complete recipe for reproducing it. This module
imports nothing from probekit.data or probekit.training: both import it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from probekit.errors import ConfigError

# name: (n_layer, n_embd, n_head, n_inner, context)
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_embd=64, n_head=2, n_inner=256, context=64),  # tests
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, context=128),  # quick CPU demo
    "cpu": dict(n_layer=4, n_embd=256, n_head=4, n_inner=1024, context=128),  # feasibility2.md
    # paper presets; mini deviates: GPT-2's attention width is n_embd, so 8 heads of 64
    # (the paper uses 8 x 32 = 256). See docs/training.md.
    "mini": dict(n_layer=4, n_embd=512, n_head=8, n_inner=2048, context=512),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, context=512),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_inner=4096, context=512),
}
# Llama-style models (SwiGLU MLP): intermediate size ~ 8d/3, a multiple of 8, so that the MLP's
# 3 * d * i parameters match GPT-2's 2 * d * 4d (see docs/training.md for the counts)
ARCHS = ("gpt2", "llama")


def llama_inner(n_embd: int) -> int:
    """SwiGLU intermediate size matched to GPT-2's 4d MLP: round(8d/3) to a multiple of 8."""
    return max(8, int(round(8 * n_embd / 3 / 8)) * 8)


MODES = ("clone", "pair", "mono")
MODE_ALIASES = {"real": "pair"}  # "real" reads as "pair" (k >= 2 real languages)
VOCAB_MODES = ("disjoint", "anchored", "joint")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
RESULT_SECTIONS = ("seed", "data", "tokenizer", "model", "train")
SECTIONS = ("seed", "name", "data", "tokenizer", "model", "train", "checkpoints", "eval")


# --- field checks ------------------------------------------------------------------------
def _fields(cls: type, given: Any, where: str) -> dict:
    """The given table with unknown keys refused; "" in a field whose default is None reads
    as unset (dump_config writes None as "")."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: expected a table")
    unset_ok = {f.name: f.default is None for f in dataclasses.fields(cls)}
    for key in given:
        if key not in unset_ok:
            close = difflib.get_close_matches(str(key), list(unset_ok), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown field ({hint}known: {', '.join(unset_ok)})")
    return {k: (None if unset_ok[k] and v == "" else v) for k, v in given.items()}


def _int(value: Any, name: str, lo: int = 0) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # tokens = 1.2e9 reads as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return value


def _num(value: Any, name: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _share(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0 or math.isnan(float(value)):
        raise ConfigError(f"{name}: {value} is outside [0, 1]")
    return float(value)


def _choice(value: Any, name: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ConfigError(f"{name}: unknown {what} {value!r} (known: {', '.join(known)})")
    return value


def _source_table(value: Any, name: str) -> dict[str, list[str]]:
    """{language: [source, ...]}; a single source may be given as a string."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table of per-language source lists")
    out = {}
    for lang, srcs in value.items():
        srcs = [srcs] if isinstance(srcs, str) else srcs
        if not isinstance(srcs, list) or not all(isinstance(s, str) for s in srcs):
            raise ConfigError(f"{name}.{lang}: expected a list of sources, got {srcs!r}")
        out[lang] = srcs
    return out


# --- schedules ---------------------------------------------------------------------------
class ScheduleSpec(NamedTuple):
    """A parsed `data.schedule`: kind (constant | stages | linear), stage ends, shares."""

    kind: str
    fractions: tuple[float, ...]
    values: tuple[float, ...]


def parse_schedule_spec(spec: str | dict | float) -> ScheduleSpec:
    """'0.1_0.9' (equal stages), 'linear:0.1:0.9' (ramp), {fractions=[..], p=[..]} or a share."""
    name = "data.schedule"

    def share(x: object) -> float:
        try:
            value = float(x)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {x!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}: share {value} is outside [0, 1]")
        return value

    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return ScheduleSpec("constant", (1.0,), (share(spec),))
    if isinstance(spec, dict):
        fr, vals = spec.get("fractions"), spec.get("p")
        if not isinstance(fr, list) or not isinstance(vals, list) or len(fr) != len(vals) or not fr:
            raise ConfigError(f"{name}: expected {{fractions=[...], p=[...]}} of equal length")
        fr = [share(f) for f in fr]
        if any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"{name}: stage fractions must be positive and sum to 1")
        return ScheduleSpec(
            "stages", tuple(itertools.accumulate(fr)), tuple(share(v) for v in vals)
        )
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{name}: cannot parse {spec!r}")
    m = re.fullmatch(r"linear:([^:]+):([^:]+)", spec)
    if m:
        return ScheduleSpec("linear", (1.0,), (share(m.group(1)), share(m.group(2))))
    parts = spec.split("_")
    if not all(re.fullmatch(r"\d*\.?\d+", p) for p in parts):
        raise ConfigError(
            f"{name}: cannot parse {spec!r} (expected e.g. '0.1_0.9' or 'linear:0.1:0.9')"
        )
    k = len(parts)
    return ScheduleSpec(
        "stages", tuple((i + 1) / k for i in range(k)), tuple(share(p) for p in parts)
    )


# --- sections ----------------------------------------------------------------------------
def _default_sources() -> dict[str, list[str]]:
    return {"en": ["bible:web", "bible:kjv", "bible:bbe"], "fr": ["bible:segond", "bible:darby"]}


# Shipped default sources of languages outside the default table: filled in only for a
# language a run uses and the config gives no sources for (so existing configs dump unchanged).
SHIPPED_SOURCES: dict[str, list[str]] = {
    **_default_sources(),
    "es": ["bible:rv1909"],
    "it": ["bible:diodati"],
    "ru": ["bible:synodal"],
}


@dataclass
class DataConfig:
    """[data]: the corpus languages and how training sequences mix them."""

    mode: str = "clone"  # clone | pair (alias: real) | mono
    base: str = "en"  # corpus language of clone / mono runs
    languages: list[str] = field(default_factory=lambda: ["en", "fr"])  # a pair run's k >= 2
    clones: int = 1  # cloned languages besides the original (clone mode)
    frac_clone: float = 1.0
    p: float = 0.5  # share of all languages but the first together (split equally)
    weights: list[float] = field(default_factory=list)  # explicit per-language shares
    schedule: str | dict = ""  # "" | "0.1_0.9" | "linear:0.1:0.9" | {fractions=[...], p=[...]}
    sources: dict[str, list[str]] = field(default_factory=_default_sources)
    test_sources: dict[str, list[str]] = field(default_factory=dict)  # default: held-out part
    parallel: list[str] = field(default_factory=list)  # two line-aligned files (L1, L2)

    @classmethod
    def from_dict(cls, given: Any) -> DataConfig:
        d = cls(**_fields(cls, given, "data"))
        d.mode = MODE_ALIASES.get(d.mode, d.mode) if isinstance(d.mode, str) else d.mode
        _choice(d.mode, "data.mode", MODES + tuple(MODE_ALIASES), "mode")
        d.p = _share(d.p, "data.p")
        d.frac_clone = _share(d.frac_clone, "data.frac_clone")
        if isinstance(d.clones, bool) or not isinstance(d.clones, int) or d.clones < 1:
            raise ConfigError(f"data.clones: expected an integer >= 1, got {d.clones!r}")
        if d.mode == "clone" and d.frac_clone < 1.0 and d.clones > 1:
            raise ConfigError(
                "data.frac_clone: partial cloning is supported for two languages only "
                f"(data.clones = {d.clones})"
            )
        if d.mode == "pair" and (
            not isinstance(d.languages, list)
            or len(d.languages) < 2
            or not all(isinstance(x, str) and x for x in d.languages)
            or len(set(d.languages)) != len(d.languages)
        ):
            raise ConfigError(
                "data.languages: a pair (real) run needs at least two distinct languages, "
                f"got {d.languages!r}"
            )
        d.sources = _source_table(d.sources, "data.sources")
        d.test_sources = _source_table(d.test_sources, "data.test_sources")
        for lang in d.corpus_languages:
            if not d.sources.get(lang) and lang in SHIPPED_SOURCES:
                d.sources[lang] = list(SHIPPED_SOURCES[lang])  # a shipped language's Bible
            if not d.sources.get(lang):
                raise ConfigError(
                    f"data.sources.{lang}: no sources for language {lang!r} (shipped: "
                    f"{', '.join(SHIPPED_SOURCES)}; give data.sources.{lang} = [FILE or FOLDER])"
                )
        if d.weights:
            n = len(language_names(d))
            if (
                not isinstance(d.weights, list)
                or len(d.weights) != n
                or any(
                    isinstance(x, bool) or not isinstance(x, int | float) or x < 0
                    for x in d.weights
                )
            ):
                raise ConfigError(
                    f"data.weights: expected {n} non-negative shares, got {d.weights!r}"
                )
            if abs(sum(d.weights) - 1.0) > 1e-6:
                raise ConfigError(f"data.weights: shares must sum to 1, got {sum(d.weights):.4f}")
        if d.schedule:
            parse_schedule_spec(d.schedule)
        if d.parallel and len(d.parallel) != 2:
            raise ConfigError(
                "data.parallel: expected two line-aligned files [L1, L2] (of the first two "
                "languages)"
            )
        return d

    @property
    def corpus_languages(self) -> list[str]:
        """The corpus languages the run reads: a pair's two, else the base language."""
        return list(self.languages) if self.mode == "pair" else [self.base]

    @property
    def schedule_spec(self) -> ScheduleSpec:
        """The share of all languages but the first over training: the schedule, else p."""
        return parse_schedule_spec(self.schedule if self.schedule else self.p)


@dataclass
class TokenizerConfig:
    """[tokenizer]: the BPE every language's text is cut with."""

    vocab_size: int = 512
    vocab_mode: str = "disjoint"  # pair mode: disjoint | anchored | joint (any k languages)
    min_frequency: int = 2
    seed: int = 0  # BPE text order and cloned subset; not the run seed, so seeds share it

    @classmethod
    def from_dict(cls, given: Any) -> TokenizerConfig:
        t = cls(**_fields(cls, given, "tokenizer"))
        if (
            isinstance(t.vocab_size, bool)
            or not isinstance(t.vocab_size, int)
            or not 260 <= t.vocab_size <= 1_000_000
        ):
            raise ConfigError(
                f"tokenizer.vocab_size: expected an integer >= 260 (bytes + specials), "
                f"got {t.vocab_size!r}"
            )
        _choice(t.vocab_mode, "tokenizer.vocab_mode", VOCAB_MODES, "mode")
        for name in ("min_frequency", "seed"):
            value = getattr(t, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"tokenizer.{name}: expected an integer >= 0, got {value!r}")
        return t


@dataclass
class ModelConfig:
    """[model]: a GPT-2 (or Llama-style) preset; any size field given replaces the preset's.

    arch = "llama" keeps the preset's layers, width, heads and context and takes the SwiGLU
    intermediate size `llama_inner(n_embd)` for n_inner (about 8d/3), so both architectures
    have about the same parameter count. `arch` is left out of to_dict() (config.toml, the
    fingerprint) when it is "gpt2", so GPT-2 runs written before it existed stay the same.
    """

    preset: str = "tiny"
    n_layer: int | None = None  # None: the preset's value
    n_embd: int | None = None
    n_head: int | None = None
    n_inner: int | None = None
    context: int | None = None
    arch: str = "gpt2"  # gpt2 | llama

    @classmethod
    def from_dict(cls, given: Any) -> ModelConfig:
        m = cls(**_fields(cls, given, "model"))
        _choice(m.preset, "model.preset", tuple(PRESETS), "preset")
        _choice(m.arch, "model.arch", ARCHS, "architecture")
        for name, default in PRESETS[m.preset].items():
            if name == "n_inner" and m.arch == "llama" and m.n_inner is None:
                n_embd = m.n_embd if isinstance(m.n_embd, int) else PRESETS[m.preset]["n_embd"]
                default = llama_inner(n_embd)
            value = default if getattr(m, name) is None else getattr(m, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}: expected a positive integer, got {value!r}")
            setattr(m, name, value)
        if m.n_embd % m.n_head:
            raise ConfigError(f"model.n_head: {m.n_head} does not divide model.n_embd = {m.n_embd}")
        return m


@dataclass
class TrainConfig:
    """[train]: budget, batch and optimiser. tokens and steps: give one (neither: 1000 steps);
    the other is derived, so a loaded config has both."""

    batch_size: int = 20  # sequences per optimiser step, global (all ranks, all micro-batches)
    grad_accum: int = 1
    tokens: int | None = None  # token budget
    steps: int | None = None  # optimiser steps
    lr: float = 2e-3
    warmup_steps: int | None = None  # None: 5 % of steps, at least 1
    min_lr_frac: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: off (the paper clips nothing)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda

    @classmethod
    def from_dict(cls, given: Any, context: int) -> TrainConfig:
        t = cls(**_fields(cls, given, "train"))
        t.batch_size = _int(t.batch_size, "train.batch_size", 1)
        t.grad_accum = _int(t.grad_accum, "train.grad_accum", 1)
        if t.batch_size % t.grad_accum:
            raise ConfigError(
                f"train.grad_accum: {t.grad_accum} does not divide "
                f"train.batch_size = {t.batch_size}"
            )
        per_step = t.batch_size * context
        tokens = None if t.tokens is None else _int(t.tokens, "train.tokens", 1)
        steps = None if t.steps is None else _int(t.steps, "train.steps", 1)
        if tokens is not None and steps is not None and steps != math.ceil(tokens / per_step):
            raise ConfigError(
                f"train.steps: {steps} conflicts with train.tokens = {tokens} "
                f"({math.ceil(tokens / per_step)} steps of {per_step} tokens); set one of them"
            )
        if steps is None:
            steps = 1000 if tokens is None else math.ceil(tokens / per_step)
        t.steps, t.tokens = steps, steps * per_step
        t.lr = _num(t.lr, "train.lr", 0.0, 10.0)
        if t.warmup_steps is None:
            t.warmup_steps = max(1, round(0.05 * steps))
        t.warmup_steps = _int(t.warmup_steps, "train.warmup_steps", 0)
        t.min_lr_frac = _num(t.min_lr_frac, "train.min_lr_frac", 0.0, 1.0)
        if not isinstance(t.betas, list | tuple) or len(t.betas) != 2:
            raise ConfigError(f"train.betas: expected two numbers, got {t.betas!r}")
        t.betas = [_num(b, "train.betas", 0.0, 0.999999) for b in t.betas]
        t.eps = _num(t.eps, "train.eps", 0.0, 1.0)
        t.weight_decay = _num(t.weight_decay, "train.weight_decay", 0.0, 10.0)
        t.grad_clip = _num(t.grad_clip, "train.grad_clip", 0.0)
        _choice(t.precision, "train.precision", PRECISIONS, "precision")
        if not isinstance(t.compile, bool):
            raise ConfigError(f"train.compile: expected true or false, got {t.compile!r}")
        _choice(t.device, "train.device", DEVICES, "device")
        return t


@dataclass
class CheckpointConfig:
    """[checkpoints]: which steps keep their weights."""

    log_spaced: int = 6  # log-spaced checkpoints before the first regular one
    every: int | None = None  # None: steps // 8
    steps: list[int] = field(default_factory=list)  # explicit steps; replace log_spaced/every
    keep_state: int = 2  # newest checkpoints that keep optimiser/RNG state (for resume)

    @classmethod
    def from_dict(cls, given: Any, steps: int) -> CheckpointConfig:
        c = cls(**_fields(cls, given, "checkpoints"))
        c.log_spaced = _int(c.log_spaced, "checkpoints.log_spaced")
        c.every = _int(max(1, steps // 8) if c.every is None else c.every, "checkpoints.every", 1)
        if not isinstance(c.steps, list):
            raise ConfigError(f"checkpoints.steps: expected a list of steps, got {c.steps!r}")
        c.steps = sorted({_int(s, "checkpoints.steps") for s in c.steps})
        c.keep_state = _int(c.keep_state, "checkpoints.keep_state", 1)
        return c


@dataclass
class EvalConfig:
    """[eval]: held-out loss and train-loss logging during training."""

    interval: int | None = None  # None: steps // 10
    n_sequences: int = 16  # held-out sequences per language
    log_interval: int | None = None  # None: steps // 100

    @classmethod
    def from_dict(cls, given: Any, steps: int) -> EvalConfig:
        e = cls(**_fields(cls, given, "eval"))
        e.interval = _int(
            max(1, steps // 10) if e.interval is None else e.interval, "eval.interval", 1
        )
        e.n_sequences = _int(e.n_sequences, "eval.n_sequences")
        e.log_interval = _int(
            max(1, steps // 100) if e.log_interval is None else e.log_interval,
            "eval.log_interval",
            1,
        )
        return e


@dataclass
class RunConfig:
    """A resolved run config; `load_config` makes one, `dump_config` writes it as TOML."""

    seed: int
    name: str
    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    train: TrainConfig
    checkpoints: CheckpointConfig
    eval: EvalConfig

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Validate raw TOML tables and fill every default; raises ConfigError."""
        for key in raw:
            if key not in SECTIONS and key != "probekit":  # [probekit]: written-by, ignored
                raise ConfigError(f"{key}: unknown config section (known: {', '.join(SECTIONS)})")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        data = DataConfig.from_dict(raw.get("data", {}))
        tokenizer = TokenizerConfig.from_dict(raw.get("tokenizer", {}))
        model = ModelConfig.from_dict(raw.get("model", {}))
        train = TrainConfig.from_dict(raw.get("train", {}), model.context)
        return cls(
            seed=seed,
            name=str(raw.get("name", "")),
            data=data,
            tokenizer=tokenizer,
            model=model,
            train=train,
            checkpoints=CheckpointConfig.from_dict(raw.get("checkpoints", {}), train.steps),
            eval=EvalConfig.from_dict(raw.get("eval", {}), train.steps),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, in config.toml's order (a deep copy); model.arch only
        when it is not the default gpt2 (GPT-2 configs and fingerprints predate the field)."""
        d = dataclasses.asdict(self)
        if d["model"].get("arch") == "gpt2":
            del d["model"]["arch"]
        return d


def language_names(data: DataConfig) -> list[str]:
    """Model-level language names: EN1..ENk for clones, EN/FR/.. for real languages, EN mono."""
    if data.mode == "clone":
        return [f"{data.base.upper()}{i + 1}" for i in range(data.clones + 1)]
    if data.mode == "pair":
        return [lang.upper() for lang in data.languages]
    return [data.base.upper()]


# --- reading -----------------------------------------------------------------------------
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
    """A copy of raw config tables with `key.path=value` overrides set."""
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


def load_config(
    source: str | Path | dict | RunConfig, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a TOML config (or take raw tables or a RunConfig), apply `key=value` overrides,
    fill every default and check every field."""
    if isinstance(source, RunConfig):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raw = read_toml(Path(source))
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of what changes a run's result (not checkpoint/eval/progress settings)."""
    d = cfg.to_dict()
    core = {k: d[k] for k in RESULT_SECTIONS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two config dicts differ (for error messages)."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_fields(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


# --- writing -----------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    """One TOML value (inline tables for dicts); None is written as "" (read back as unset)."""
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
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return '""'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_config(cfg: RunConfig | dict) -> str:
    """TOML text of a resolved config (or of raw config tables); sections become tables."""
    body = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    lines = [f"{_key(k)} = {toml_value(v)}" for k, v in body.items() if not isinstance(v, dict)]
    for section, table in body.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"\n[{_key(section)}]")
        for k, v in table.items():
            lines.append(f"{_key(k)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"

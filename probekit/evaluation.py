"""`eval` and `teff`: per-language perplexity of every checkpoint, and token efficiency.

TEff (paper §3.2) compares a language's perplexity in a multilingual run with
monolingual reference runs trained on fractions of the budget: MLTE is how many
monolingual tokens that perplexity is worth, TEff = MLTE / tokens of the language
actually seen, counted from the run's own checkpoints (schedules included).
The update-matched control (a monolingual run on the minority language's tokens
with the multilingual run's number of optimiser steps) is reported beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from probekit import engine, store
from probekit.checkpoints import CheckpointInfo, list_checkpoints
from probekit.errors import MetricError, RunDirError
from probekit.metrics import FAMILIES
from probekit.options import AnalysisOptions
from probekit.series import DEFAULT_MAX_TOKENS

__all__ = ["evaluate", "token_efficiency", "teff_table", "seed_summary", "DEFAULT_MAX_TOKENS"]


def evaluate(
    run_dir: str | Path,
    steps: list[int] | str | None = None,
    stride: int | None = None,
    tail: int | None = None,
    max_tokens: int | None = None,
    recompute: bool = False,
    device: str | None = None,
    progress: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    options: AnalysisOptions | None = None,
    test_files: dict[str, str] | None = None,
) -> xr.Dataset:
    """Test perplexity per language for every (or the chosen) checkpoint -> `ppl` in the cube.

    A call of the one driver with the perplexity family; `max_tokens` (default 65,536, 0 for
    all) test tokens per language are scored with a sliding window of the model's context.
    `options` carries what a foreign series needs (`test_files`, `tokenizer`, hub revisions);
    the keyword arguments given here override its fields. `test_files` ({language: file},
    as `--test LANG=FILE`) is a foreign series' held-out text.
    """
    given = {"stride": stride, "tail": tail, "max_tokens": max_tokens, "device": device}
    if test_files:
        given["test_files"] = tuple((str(k), str(v)) for k, v in dict(test_files).items())
    options = (options or AnalysisOptions()).updated(
        **{k: v for k, v in given.items() if v is not None}
    )
    return engine.run(
        run_dir,
        [FAMILIES["perplexity"]],
        steps=steps,
        recompute=recompute,
        options=options,
        workers=workers,
        scheduler=scheduler,
        progress=progress,
        explicit=True,
        label="eval",
    )


@dataclass
class RunFacts:
    """What TEff needs to know of a run, read from its directory."""

    path: Path
    name: str
    mode: str
    languages: list[str]
    corpus_language: dict[str, str]
    model_key: str
    tokenizer_key: dict[str, str]  # language -> hash of its base tokenizer
    budget: float  # total training tokens of the full run
    steps: int
    final: CheckpointInfo
    seed: int
    p: float
    schedule: str
    vocab_mode: str

    @property
    def group(self) -> str:
        """The run's name without its seed, to pool seeds."""
        return re.sub(r"[_-]?s(eed)?\d+$", "", self.name)


def run_facts(run_dir: Path) -> RunFacts:
    from probekit.data import load_run_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    data = load_run_data(run_dir)
    cfg, vocab = data.cfg, data.vocab
    ckpts = list_checkpoints(run_dir)
    m = cfg.model
    arch = "" if m.arch == "gpt2" else f"{m.arch}:"  # GPT-2 and Llama references never mix
    model_key = f"{arch}{m.preset}:{m.n_layer}x{m.n_embd}:ctx{m.context}"
    tok_key = {
        lang: hashlib.sha256(
            vocab.tokenizers[vocab.tokenizer_of[lang]].to_str().encode()
        ).hexdigest()[:12]
        for lang in vocab.languages
    }
    t = cfg.train
    return RunFacts(
        path=run_dir,
        name=cfg.name or run_dir.name,
        mode=cfg.data.mode,
        languages=vocab.languages,
        corpus_language={lang: data.corpus_language(lang) for lang in vocab.languages},
        model_key=model_key,
        tokenizer_key=tok_key,
        budget=float(t.steps * t.batch_size * m.context),
        steps=int(t.steps),
        final=ckpts[-1],
        seed=int(cfg.seed),
        p=float(cfg.data.p),
        schedule=str(cfg.data.schedule),
        vocab_mode=cfg.tokenizer.vocab_mode if cfg.data.mode == "pair" else cfg.data.mode,
    )


def _final_ppl(facts: RunFacts, lang: str) -> float:
    """Final-checkpoint test PPL as stored; teff never evaluates a run behind the user's back."""
    if facts.final.step not in store.stored_steps(facts.path, "perplexity"):
        raise MetricError(
            f"{facts.path}: no perplexity stored for its final step {facts.final.step}; "
            f"run `probekit eval {facts.path} --steps {facts.final.step}`"
        )
    ds = store.read_family(facts.path, "perplexity")
    return float(ds["ppl"].sel(step=facts.final.step, language=lang))


def _references_for(facts: RunFacts, lang: str, refs: list[RunFacts]) -> list[RunFacts]:
    clang = facts.corpus_language[lang]
    same_lang = [r for r in refs if r.corpus_language[r.languages[0]] == clang]
    if not same_lang:
        raise MetricError(
            f"no monolingual reference runs for language {clang!r} (needed by {facts.name}/{lang})"
        )
    same_model = [r for r in same_lang if r.model_key == facts.model_key]
    if not same_model:
        raise MetricError(
            f"reference runs for {clang!r} are of another preset "
            f"({same_lang[0].model_key}, run {facts.name} is {facts.model_key})"
        )
    same_tok = [
        r for r in same_model if r.tokenizer_key[r.languages[0]] == facts.tokenizer_key[lang]
    ]
    if not same_tok:
        raise MetricError(
            f"reference runs for {clang!r} use another tokenizer than {facts.name}/{lang} "
            f"(TEff compares perplexities per token of one tokenizer)"
        )
    return same_tok


def scaling_reference(
    facts: RunFacts, lang: str, refs: list[RunFacts], method: str = "auto"
) -> tuple[Any, dict]:
    """The monolingual scaling reference of one language, and what to store about it.

    References of the run's own seed are used where they exist (every seed pooled, geometric
    mean per fraction, otherwise). The power-law fit is always attempted and recorded
    (parameters, residuals), even when `auto` falls back to log-log interpolation because
    the fit degenerates.
    """
    from probekit.metrics.efficiency import choose_reference, fit_power_law

    chosen = _references_for(facts, lang, refs)
    # the run's own seed where references exist for it; otherwise every seed, pooled
    chosen = [r for r in chosen if r.seed == facts.seed] or chosen
    by_x: dict[float, list[float]] = {}
    for r in chosen:
        by_x.setdefault(r.budget / facts.budget, []).append(_final_ppl(r, r.languages[0]))
    points = {x: math.exp(sum(map(math.log, v)) / len(v)) for x, v in by_x.items()}
    try:
        reference = choose_reference(points, method=method)
    except MetricError as exc:  # a table of several languages must say which curve broke
        raise MetricError(
            f"{lang} references of {facts.name} ({len(points)} budgets): {exc}; "
            "leave out the reference that breaks it or add seeds (pooled per budget)"
        ) from None
    info: dict[str, Any] = reference.describe() | {
        "x": sorted(points),
        "ppl": [points[x] for x in sorted(points)],
        "runs": [str(r.path) for r in sorted(chosen, key=lambda r: r.budget)],
        "seeds": sorted({r.seed for r in chosen}),
    }
    try:
        fit = fit_power_law(list(points), list(points.values()))
        info["fit"] = {
            "a": fit.a,
            "b": fit.b,
            "c": fit.c,
            "degenerate": bool(fit.degenerate),
            "residuals": [float(r) for r in fit.residuals],
        }
    except MetricError as exc:
        info["fit"] = {"error": str(exc)}
    return reference, info


def token_efficiency(
    run_dir: str | Path,
    references: list[str | Path],
    method: str = "auto",
    store_result: bool = True,
) -> xr.Dataset:
    """TEff, MLTE and MLPE of every language at every evaluated checkpoint of a run."""
    from probekit.metrics.efficiency import token_efficiency as teff_of

    facts = run_facts(Path(run_dir))
    refs = [run_facts(Path(r)) for r in references]
    for r in refs:
        if r.mode != "mono":
            raise MetricError(f"reference {r.path} is not a monolingual run (mode {r.mode})")
    if "perplexity" not in store.families(facts.path):
        raise MetricError(
            f"{facts.path}: no perplexity stored; run `probekit eval {facts.path}` first"
        )
    ppl = store.read_family(facts.path, "perplexity")
    ckpts = {c.step: c for c in list_checkpoints(facts.path)}
    parts, infos = [], {}
    for lang in facts.languages:
        reference, infos[lang] = scaling_reference(facts, lang, refs, method)
        steps = [
            int(s)
            for s in ppl["step"].values
            if int(s) in ckpts and ckpts[int(s)].tokens_per_language.get(lang, 0) > 0
        ]
        if not steps:
            continue
        n_lang = xr.DataArray(
            [ckpts[s].tokens_per_language[lang] for s in steps], dims="step", coords={"step": steps}
        )
        p = (
            ppl["ppl"]
            .sel(step=steps, language=lang)
            .drop_vars(["language", "tokens"], errors="ignore")
        )
        ds = teff_of(p, n_lang, facts.budget, reference)
        ds = ds.expand_dims(language=[lang])
        ds["teff"].attrs["method"] = reference.method
        parts.append(ds)
    if not parts:
        raise MetricError(f"{facts.path}: no evaluated checkpoint has training tokens")
    out = xr.concat(parts, dim="language", combine_attrs="override")
    out["extrapolated"] = out["extrapolated"].astype(bool)
    out.attrs["references"] = json.dumps(infos)
    if store_result:
        for step in out["step"].values:
            one = out.sel(step=step).drop_vars(["step"], errors="ignore")
            store.write_step(
                facts.path,
                "efficiency",
                one,
                int(step),
                ckpts[int(step)].tokens,
                {"teff_references": json.dumps(infos)},
            )
    return out


def teff_table(
    run_dirs: list[str | Path],
    references: list[str | Path],
    controls: list[str | Path] = (),
    method: str = "auto",
) -> pd.DataFrame:
    """The paper's Table 1 at the final step: PPL and TEff per language, plus the control."""
    refs = [Path(r) for r in references]
    ref_facts = [run_facts(r) for r in refs]
    ctrl_facts = [run_facts(Path(c)) for c in controls]
    rows = []
    for run in run_dirs:
        facts = run_facts(Path(run))
        ds = token_efficiency(run, refs, method=method)
        final = ds.isel(step=-1)
        for lang in facts.languages:
            if lang not in ds["language"].values:
                continue
            f = final.sel(language=lang)
            row = {
                "run": facts.name,
                "group": facts.group,
                "seed": facts.seed,
                "mode": facts.mode,
                "vocab": facts.vocab_mode,
                "p": facts.p if not facts.schedule else math.nan,
                "schedule": facts.schedule,
                "language": lang,
                "tokens": float(f["tokens_lang"]),
                "ppl": float(f["ppl"]),
                "mlpe": float(f["mlpe"]),
                "mlte": float(f["mlte"]),
                "teff": float(f["teff"]),
                "method": json.loads(ds.attrs["references"])[lang]["method"],
                "extrapolated": bool(f["extrapolated"]),
            }
            ctrl = _matching_control(facts, lang, float(f["tokens_lang"]), ctrl_facts)
            if ctrl is not None:
                c_ppl = _final_ppl(ctrl, ctrl.languages[0])
                reference, _ = scaling_reference(facts, lang, ref_facts, method)
                c_tokens = float(ctrl.final.tokens)
                mlte_c = float(reference.mlte(c_ppl).value) * facts.budget
                row.update(
                    control=ctrl.name,
                    control_ppl=c_ppl,
                    teff_control=mlte_c / c_tokens,
                    transfer=float(f["mlte"]) / mlte_c,
                )
            rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and table["extrapolated"].any():
        warnings.warn(
            "some TEff values lie outside the measured reference range (extrapolated=True)",
            stacklevel=2,
        )
    return table


def _matching_control(
    facts: RunFacts, lang: str, tokens: float, ctrls: list[RunFacts]
) -> RunFacts | None:
    """A mono control of the same language, preset and step count, nearest in tokens."""
    clang = facts.corpus_language[lang]
    cands = [
        c
        for c in ctrls
        if c.corpus_language[c.languages[0]] == clang
        and c.model_key == facts.model_key
        and c.steps == facts.steps
    ]
    if not cands:
        return None
    same_seed = [c for c in cands if c.seed == facts.seed] or cands
    best = min(same_seed, key=lambda c: abs(math.log(max(c.final.tokens, 1) / max(tokens, 1))))
    return best if abs(math.log(max(best.final.tokens, 1) / max(tokens, 1))) < 0.5 else None


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread across seeds of PPL and TEff, per run group and language."""
    cols = [c for c in ("ppl", "teff", "teff_control", "transfer") if c in table]
    g = table.groupby(["group", "language"])[cols]
    out = g.agg(["mean", "std", "count"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    return out.reset_index()

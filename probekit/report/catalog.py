"""What the report knows about each cube variable: its human title and the question it answers.

`VARIABLES` is the ONE table the report reads: a plain dict keyed by variable name. A
variable's `question` picks the page section it is drawn in; `title` is the text readers see
in place of the variable name; `control` names the variable (or constant) it is read against.
What the report says beyond that (a title, the family that fills a variable) comes from the
metric registry (`probekit.metrics`), so a newly registered family's variables appear on the
page, under "Other measures" with the generic chart, without this table being edited.

Variables the table does not list are still placed when their name starts with one of the
`PREFIXES` (`lens_*`, `patch_*`, `ablation_*`): the section of their question appears as soon
as a cube carries such variables, drawn with the generic chart.
"""

from __future__ import annotations

from typing import Any

from probekit.metrics import FAMILIES, family_of

# Sections of the page, in page order: id -> title and a two-line "how to read this".
QUESTIONS: dict[str, dict[str, str]] = {
    "gain": {
        "title": "Does the rare language gain?",
        "read": "Perplexity and token efficiency (TEff) of each language over training tokens, "
        "and at the end of each run across the share p. TEff = 1 means as good as a monolingual "
        "model on the same tokens; above 1 the language gains from the other one, and above "
        "its dashed update-matched control the gain is more than extra optimiser updates.",
    },
    "representations": {
        "title": "Are the representations shared?",
        "read": "How alike the two languages' hidden states are on parallel text, per layer "
        "(0 = embeddings) and over training. Read each measure against its dashed "
        "different-text baseline: only the distance above it is shared content.",
    },
    "machinery": {
        "title": "Is the machinery shared?",
        "read": "Whether both languages use the same MLP neurons (against the dashed chance "
        "overlap), push the weights the same way (gradient cosine, 0 = unrelated) and give a "
        "token and its clone the same embedding (clone pairs against all pairs).",
    },
    "layers": {
        "title": "Which language does each layer think in, and what do interventions change?",
        "read": "Logit-lens readouts per layer, and how the other language's loss moves when "
        "activations are patched or components ablated. Drawn from the cube's lens_*, patch_* "
        "and ablation_* variables.",
    },
    "features": {
        "title": "Which features does each language use, and when are they born?",
        "read": "A sparse dictionary of the residual stream shared by both languages, per "
        "checkpoint (`probekit align RUN --metrics features`): how many of its features fire on "
        "both languages (shared), on one only (specific) or on neither (dead), what removing a "
        "feature does to each language's loss against random features, and the contexts the "
        "top features fire on.",
    },
    "other": {
        "title": "Other measures",
        "read": "Variables the report has no question for yet, drawn per layer or over "
        "training tokens.",
    },
}

# Every variable the report draws or summarises: name -> title, question, and its control.
VARIABLES: dict[str, dict[str, Any]] = {
    # token efficiency and perplexity
    "ppl": {"title": "perplexity", "question": "gain", "higher_is": "worse"},
    "ppl_char": {"title": "perplexity per character", "question": "gain", "higher_is": "worse"},
    "mlpe": {"title": "monolingual perplexity equivalent (MLPE)", "question": "gain"},
    "mlte": {"title": "monolingual token equivalent (MLTE)", "question": "gain"},
    "teff": {
        "title": "token efficiency (TEff)",
        "question": "gain",
        "control": "teff_control",
        "chance": 1.0,
    },
    "teff_control": {"title": "TEff of the update-matched control", "question": "gain"},
    "transfer": {"title": "transfer ratio (MLTE / MLTE of the control)", "question": "gain"},
    # representations
    "hidden_cos": {
        "title": "hidden-state cosine",
        "question": "representations",
        "control": "hidden_cos_baseline",
    },
    "hidden_cos_centred": {
        "title": "centred hidden-state cosine",
        "question": "representations",
        "control": "hidden_cos_centred_baseline",
    },
    "cka": {"title": "linear CKA", "question": "representations", "control": "cka_baseline"},
    "linmap_r2": {
        "title": "linear-map R²",
        "question": "representations",
        "control": "linmap_r2_baseline",
    },
    "procrustes_r2": {
        "title": "Procrustes R²",
        "question": "representations",
        "control": "procrustes_r2_baseline",
    },
    "retrieval_acc": {
        "title": "translation retrieval accuracy",
        "question": "representations",
        "control": "retrieval_acc_baseline",
    },
    "probe_transfer": {
        "title": "probe accuracy across languages",
        "question": "representations",
        "control": "probe_in_language",
    },
    "probe_in_language": {"title": "probe accuracy in-language", "question": "representations"},
    # null-calibrated similarity (`probekit align RUN --metrics calibrated`; dims layer,
    # cal_measure; drawn together by report/calibration_charts.py)
    "cal_score": {
        "title": "null-calibrated similarity score",
        "question": "representations",
        "control": "cal_null_mean",
        "chance": 0.0,
    },
    "cal_raw": {"title": "raw similarity on the calibration sample", "question": "representations"},
    "cal_null_mean": {"title": "permutation-null mean", "question": "representations"},
    "cal_null_sd": {"title": "permutation-null standard deviation", "question": "representations"},
    "cal_null_q": {"title": "permutation-null 95 % critical value", "question": "representations"},
    "cal_p": {"title": "permutation p-value", "question": "representations"},
    "cal_score_sig": {
        "title": "calibrated score above the null's 95 % critical value",
        "question": "representations",
    },
    # machinery
    "neuron_overlap": {
        "title": "MLP neuron overlap (Jaccard)",
        "question": "machinery",
        "control": "neuron_overlap_chance",
    },
    "neuron_overlap_chance": {"title": "neuron overlap by chance", "question": "machinery"},
    "lang_specific_frac": {
        "title": "language-specific neuron fraction",
        "question": "machinery",
        "higher_is": "less shared",
    },
    "neuron_act_prob": {"title": "neuron activation probability", "question": "machinery"},
    "grad_cos": {"title": "gradient cosine", "question": "machinery", "chance": 0.0},
    "embed_cos": {"title": "embedding cosine (clone vs all pairs)", "question": "machinery"},
    "embed_cos_by_freq": {
        "title": "clone-pair embedding cosine by frequency",
        "question": "machinery",
    },
    # which language each layer thinks in; what interventions change (families lens,
    # patching, ablation: `probekit align RUN --metrics lens,patching,ablation`)
    "lens_ce": {"title": "logit-lens cross-entropy (nats)", "question": "layers"},
    "lens_acc": {"title": "logit-lens top-1 accuracy", "question": "layers"},
    "lens_acc_collapsed": {
        "title": "logit-lens top-1 accuracy, clones collapsed",
        "question": "layers",
    },
    "lens_mass": {
        "title": "logit-lens probability mass per vocabulary language",
        "question": "layers",
    },
    "patch_ce": {"title": "cross-entropy with L1 states patched into L2", "question": "layers"},
    "patch_kept": {
        "title": "patching: share of L2's own quality kept by L1's state",
        "question": "layers",
    },
    "ablation_ppl": {
        "title": "perplexity with language-specific neurons ablated",
        "question": "layers",
    },
    "ablation_dppl": {"title": "perplexity increase from ablation", "question": "layers"},
    "ablation_ppl_clean": {"title": "perplexity without ablation", "question": "layers"},
    "ablation_n_neurons": {"title": "ablated neurons per layer", "question": "layers"},
    # the tuned lens beside the logit lens (`probekit align RUN --metrics tuned_lens`)
    "tuned_ce": {"title": "cross-entropy (nats), logit vs tuned lens", "question": "layers"},
    "tuned_kl": {
        "title": "KL to the final distribution, logit vs tuned lens",
        "question": "layers",
    },
    "tuned_acc": {"title": "top-1 accuracy, logit vs tuned lens", "question": "layers"},
    "tuned_acc_collapsed": {
        "title": "top-1 accuracy, clones collapsed, logit vs tuned lens",
        "question": "layers",
    },
    "tuned_mass": {
        "title": "probability mass per vocabulary language, logit vs tuned lens",
        "question": "layers",
    },
    "tuned_disagreement": {"title": "KL(tuned || logit lens)", "question": "layers"},
    "tuned_latent_layer": {
        "title": "latent-language layer (own vocabulary > half the mass)",
        "question": "layers",
    },
    "tuned_dominant_mass": {
        "title": "rare language's lens mass on the frequent language's ids",
        "question": "layers",
    },
    "tuned_fit_kl": {"title": "tuned-lens validation KL per layer", "question": "layers"},
    "tuned_fit_steps": {"title": "tuned-lens training steps", "question": "layers"},
    "tuned_warm_start": {"title": "tuned-lens warm-start step", "question": "layers"},
}

# A variable the table does not list but whose name starts with one of these (a new variable
# of these families) lands in that question.
PREFIXES: dict[str, str] = {
    "lens_": "layers",
    "patch_": "layers",
    "ablation_": "layers",
    "tuned_": "layers",
}

# The `probekit align --metrics` family that fills a prefixed variable.
PREFIX_FAMILY: dict[str, str] = {
    "lens_": "lens",
    "patch_": "patching",
    "ablation_": "ablation",
    "tuned_": "tuned_lens",
}
PREFIXES |= {"feature_": "features", "features_": "features"}  # drawn by report.feature_charts
PREFIX_FAMILY |= {"feature_": "features", "features_": "features"}

# Variables that only accompany another one (drawn with it, never on their own).
COMPANION_SUFFIXES = ("_baseline", "_lo", "_hi", "_count", "_chance", "_coef")

# Which `probekit` command fills a missing variable (for the list of charts not drawn).
FIX: dict[str, str] = {
    "ppl": "probekit eval RUN_DIR",
    "teff": "probekit teff RUN_DIR --reference MONO_RUN",
    "neuron_overlap": "probekit align RUN_DIR --metrics neurons",
    "lang_specific_frac": "probekit align RUN_DIR --metrics neurons",
    "embed_cos_by_freq": "probekit align RUN_DIR --metrics embeddings",
    "probe_transfer": "probekit align RUN_DIR --metrics probes",
}


def question_of(var: str) -> str | None:
    """The question (section id) a variable belongs to, or None if the report ignores it.
    A registered family's variable without a question of its own goes to "other"."""
    if var in VARIABLES:
        return VARIABLES[var]["question"]
    for prefix, q in PREFIXES.items():
        if var.startswith(prefix):
            return q
    return "other" if family_of(var) is not None else None


def title_of(var: str) -> str:
    """Human title of a variable: this table's, else the registry's, else its name."""
    if var in VARIABLES:
        return VARIABLES[var]["title"]
    fam = family_of(var)
    titles = {v.name: v.title for v in fam.variables} if fam is not None else {}
    return titles.get(var, var.replace("_", " "))


def fix_command(var: str, run: str = "RUN_DIR") -> str:
    """The command that fills `var` for `run`."""
    fam = next((f for p, f in PREFIX_FAMILY.items() if var.startswith(p)), None)
    if fam is None:
        found = family_of(var)
        fam = found.name if found is not None else var
    command = "eval" if fam in FAMILIES and FAMILIES[fam].command == "eval" else "align"
    default = f"probekit {command} RUN_DIR" + (" --metrics " + fam if command == "align" else "")
    return FIX.get(var, default).replace("RUN_DIR", run)


def is_companion(var: str) -> bool:
    return var.endswith(COMPANION_SUFFIXES)


# Bookkeeping a family stores for its own arithmetic (how much text was scored, summed NLL,
# tokens seen): kept in the cube, never charted under "Other measures".
BOOKKEEPING = frozenset(
    {"n_tokens", "nll_tokens", "n_chars", "tokens_lang", "extrapolated", "mlte_frac"}
)


def is_bookkeeping(var: str) -> bool:
    return var in BOOKKEEPING

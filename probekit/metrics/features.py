"""Features across languages and checkpoints: a sparse dictionary of the residual stream.

Per checkpoint and chosen layer (``features_layers``; default a middle layer and the last)
a TopK sparse autoencoder (`probekit.dictionary`) is trained on the residual stream of the
held-out text of both compared languages (the same number of tokens of each, mixed in every
minibatch), so that one dictionary serves both languages. Activations are streamed: each
chunk is one forward of a batch of windows through the checkpoint's TransformerBridge, and
the trainer keeps nothing of it once its Adam steps are taken.

Over the series, identity is kept by a warm start and a matching: the dictionary of a
checkpoint starts from the previous checkpoint's stored one (``previous_artifact_step``),
and after training its latents are put in the order of the previous ones by Hungarian
matching on decoder-direction cosines. A latent whose matched cosine is >= ``STABLE_COS``
keeps its predecessor's ``feature_id``; one below gets a new id (a feature born, or a
latent the dead-latent rule moved elsewhere). Under dask, a checkpoint whose predecessor is
not stored yet trains cold and its match cosines are NaN (no identity is carried over it).

Readings, over the parallel pairs (the text both languages share):

* ``features_fve``: fraction of variance explained, per language;
* ``features_ce`` / ``features_ce_clean``: next-token cross-entropy when the layer's residual
  stream is replaced by its reconstruction (a bridge hook), and without;
* ``feature_freq``, ``feature_mean_act``: per feature and language, how often it fires
  (activation > ``features_fire``) and its mean activation where it fires;
* ``feature_kind``: shared, specific to either language (less than ``features_specific`` of
  its activation mass on the other one), or dead (never fires); ``features_count`` and
  ``features_mass`` (share of all activation mass) per kind;
* ``features_clone_cofire``: for token-aligned clone pairs, of all firings at a position in
  either language the share that fire in both, the piece and its clone;
* ``feature_effect``: causal importance, the change in mean next-token loss of each
  language when the feature's contribution (activation x decoder direction) is subtracted
  from the layer, for the ``features_top`` heaviest features of each kind
  (``feature_selected`` = 1) and as many random alive features as a control (= 2), on the
  first ``CAUSAL_PAIRS`` pairs.

Stored beside the cube: ``RUN/artifacts/features/step_N.safetensors`` (per layer the
dictionary's tensors, ``feature_id`` and ``match_cos``) with the training record (tokens,
steps, losses, seed, the warm-start step, the top features of each kind and their
top-activating contexts in each language, which the report shows).

Over training (`feature_lifecycle`): each feature's birth (first checkpoint where it is
alive and still alive under the same identity at the next one), maintenance (share of
checkpoints alive from birth to death) and death, from the cube.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from probekit.artifacts import load_artifact, previous_artifact_step, save_artifact
from probekit.checkpoints import small_enough_to_keep
from probekit.dictionary import (
    DEAD,
    SHARED,
    SPECIFIC_1,
    SPECIFIC_2,
    Dictionary,
    FeatureStats,
    TopKTrainer,
    check_shape,
    match,
)
from probekit.errors import MetricError, ProbekitError
from probekit.hooks import bridge_for, pad_batch, run_activations
from probekit.metrics.base import CheckpointContext, Family, Needs, Variable
from probekit.series import Series

FAMILY = "features"
STABLE_COS = 0.7  # matched decoder cosine at or above which a latent keeps its identity
WIDTH = 4  # default dictionary size: WIDTH x d_model
MIN_TOKENS = 256  # fewer held-out tokens per language: too short to train on
MAX_EPOCHS = 200
CAUSAL_PAIRS = 32  # parallel pairs the causal importance is measured on
N_CONTEXTS = 3  # top-activating contexts kept per feature and language
REPORT_FEATURES = 5  # features of each kind whose contexts the record keeps
CONTEXT_LEFT, CONTEXT_RIGHT = 8, 2  # tokens shown around a top-activating position
SELECTED_TOP, SELECTED_RANDOM = 1, 2

_DEFINITIONS = {
    "features_fve": "fraction of the layer's residual-stream variance over the parallel pairs "
    "that the dictionary's reconstruction explains",
    "features_ce": "next-token cross-entropy (nats) of the parallel pairs with the layer's "
    "residual stream replaced by the dictionary's reconstruction",
    "features_ce_clean": "next-token cross-entropy (nats) of the parallel pairs, unchanged",
    "feature_freq": "share of tokens on which the feature fires (activation > features_fire)",
    "feature_mean_act": "mean activation of the feature where it fires (NaN: never)",
    "feature_kind": "0 shared, 1 specific to the first language, 2 to the second, 3 dead "
    "(specific: less than features_specific of its activation mass on the other language)",
    "features_count": "features of each kind",
    "features_mass": "share of all activation mass (both languages) on features of each kind",
    "features_clone_cofire": "token-aligned clone pairs: of all (position, feature) firings in "
    "either language, the share firing in both the piece and its clone",
    "feature_match_cos": "cosine of the feature's decoder direction with the previous "
    "checkpoint's matched feature (Hungarian matching; NaN: trained cold)",
    "feature_id": "the feature's identity over the series (kept while the matched cosine is "
    ">= 0.7)",
    "feature_effect": "increase in mean next-token loss (nats) of the language when the "
    "feature's contribution (activation x decoder direction) is removed from the layer (NaN: "
    "not measured)",
    "feature_context": "top-activating contexts of the report's top features of each kind "
    "(the token in [[ ]]; empty for the others)",
    "feature_selected": "1: a top feature of its kind by activation mass, 2: a random alive "
    "control feature, 0: not measured causally",
}


def kind_names(pair: tuple[str, str] | list[str]) -> list[str]:
    """The `kind` coordinate: shared, <L1>-specific, <L2>-specific, dead."""
    return ["shared", f"{pair[0]}-specific", f"{pair[1]}-specific", "dead"]


def feature_layers(layers: tuple[int, ...] | None, n_layers: int) -> list[int]:
    """The layers to train on (0 = embeddings, L = last block); the default is a middle and
    the last layer."""
    if layers is None:
        return sorted({max(1, n_layers // 2), n_layers})
    for lay in layers:
        if not 0 <= lay <= n_layers:
            raise MetricError(
                f"--features-layers: this model has no layer {lay} (layers 0..{n_layers})"
            )
    return sorted(set(int(x) for x in layers))


def _windows(ids: np.ndarray, length: int) -> list[np.ndarray]:
    return [ids[i : i + length] for i in range(0, len(ids) - 1, length) if len(ids[i:]) > 1]


def training_text(series: Series, tokens: int) -> tuple[dict[str, list[np.ndarray]], str]:
    """Windows of each compared language's held-out text, the same number of tokens of each;
    the parallel pairs when the series has no held-out text."""
    pair = list(series.pair)
    try:
        texts = series.test_texts()
        ids = {lang: np.asarray(texts[lang][0]) for lang in pair}
        source = "held-out test text"
    except (ProbekitError, KeyError):
        par = series.parallel
        ids = {lang: np.concatenate(s) for lang, s in zip(pair, (par.ids1, par.ids2), strict=True)}
        source = "parallel pairs (no held-out text)"
    n = min(tokens, *(len(v) for v in ids.values()))
    if n < MIN_TOKENS:
        short = min(ids, key=lambda lang: len(ids[lang]))
        raise MetricError(
            f"{series.run_dir}: {len(ids[short])} {source} tokens of {short}; features needs "
            f"at least {MIN_TOKENS} per language to train on"
        )
    return {lang: _windows(v[:n], series.seq_len) for lang, v in ids.items()}, source


def _previous(
    run_dir: Path, step: int | None, layers: list[int], size: int, d: int
) -> tuple[int | None, dict[int, tuple[Dictionary, np.ndarray, int]]]:
    """The warm start: {layer: (dictionary, feature ids, next id)} of the latest stored step
    before `step`; a one-line error when that dictionary has another width."""
    if step is None:
        return None, {}
    prev = previous_artifact_step(run_dir, FAMILY, step)
    if prev is None:
        return None, {}
    tensors, record = load_artifact(run_dir, FAMILY, prev)
    width, dim = record.get("size"), record.get("d_model")
    if width != size or dim != d:
        raise MetricError(
            f"{run_dir}: the features dictionary stored at step {prev} has {width} latents over "
            f"{dim} dimensions, this analysis asks for {size} over {d}; use the same "
            f"features_size or remove {Path(run_dir) / 'artifacts' / FAMILY}"
        )
    out = {}
    for lay in layers:
        pre = f"layer{lay}."
        if f"{pre}w_dec" not in tensors:
            continue  # a layer new to this analysis trains cold
        dic = Dictionary.from_tensors(tensors, int(record.get("k", 1)), pre)
        ids = tensors[f"{pre}feature_id"].numpy().astype(np.int64)
        out[lay] = (dic, ids, int(record.get("next_id", {}).get(str(lay), ids.max() + 1)))
    return prev, out


class _Reader:
    """Forwards of one checkpoint through its bridge: activations and next-token losses."""

    def __init__(self, ctx: CheckpointContext):
        view, opts = ctx.view, ctx.options
        # bridge_for wraps a copy of a small model (the driver's own bridge later re-uses it);
        # a big one it would rewrap in place, so it gets a copy here
        model = ctx.model if small_enough_to_keep(ctx.model) else copy.deepcopy(ctx.model)
        self.bridge = bridge_for(model, ctx.series.tokenizer, view, device=opts.device)
        self.view, self.device = view, opts.device

    def resid(self, seqs: list[np.ndarray]):
        return run_activations(self.bridge, *pad_batch(seqs), self.view, ["resid"])

    @torch.no_grad()
    def loss(self, seqs: list[np.ndarray], hooks: list) -> tuple[float, int]:
        """Summed next-token NLL and number of targets of a batch, under the given hooks."""
        ids, mask = pad_batch(seqs)
        logits = self.bridge.run_with_hooks(ids.to(self.device), fwd_hooks=hooks).float().cpu()
        valid = mask[:, 1:] & mask[:, :-1]
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[valid]
        return float(nll.sum()), int(valid.sum())


def _splice_hook(dic: Dictionary):
    def fn(act, hook):  # noqa: ANN001 - a HookPoint
        return dic.decode(dic.encode(act)).to(act.dtype)

    return fn


def _remove_hook(dic: Dictionary, feature: int):
    def fn(act, hook):  # noqa: ANN001
        return act - dic.contribution(dic.encode(act), feature).to(act.dtype)

    return fn


def _decode(series: Series, ids: np.ndarray, lang: str) -> str:
    try:
        vocab = getattr(series, "vocab", None)
        if vocab is not None:
            return vocab.decode(ids, lang)
        return series.tokenizer.decode([int(i) for i in ids])
    except Exception:  # noqa: BLE001 - a context is an illustration: ids will do
        return " ".join(str(int(i)) for i in ids)


def _context(series: Series, seq: np.ndarray, pos: int, lang: str) -> str:
    left = _decode(series, seq[max(0, pos - CONTEXT_LEFT) : pos], lang)
    tok = _decode(series, seq[pos : pos + 1], lang)
    right = _decode(series, seq[pos + 1 : pos + 1 + CONTEXT_RIGHT], lang)
    return f"{left}[[{tok}]]{right}"


@torch.no_grad()
def features(ctx: CheckpointContext) -> xr.Dataset:
    series, opts, view = ctx.series, ctx.options, ctx.view
    pair = list(series.pair)
    layers = feature_layers(opts.features_layers, view.n_layers)
    d = view.d_model
    size = opts.features_size if opts.features_size is not None else WIDTH * d
    k = opts.features_k
    check_shape(size, k)
    windows, source = training_text(series, opts.features_tokens)
    par = series.parallel
    prev_step, warm = _previous(series.run_dir, ctx.step, layers, size, d)
    reader = _Reader(ctx)
    clock = [time.perf_counter()]  # phase boundaries, kept in the record (bench/)

    # 1. train every layer's dictionary on one stream of chunks (one forward per chunk)
    seed = int(opts.features_seed)
    trainers = {
        lay: TopKTrainer(
            d,
            size,
            k,
            opts.features_steps,
            seed=seed + lay,
            init=warm[lay][0] if lay in warm else None,
        )
        for lay in layers
    }
    pool = [w for lang in pair for w in windows[lang]]
    rng = np.random.default_rng(seed)
    forwarded = 0
    for _ in range(MAX_EPOCHS):
        order = rng.permutation(len(pool))
        for lo in range(0, len(order), opts.batch_size):
            act = reader.resid([pool[i] for i in order[lo : lo + opts.batch_size]])
            forwarded += int(act.mask.sum())
            for lay, tr in trainers.items():
                tr.fit_chunk(act.resid[lay][act.mask])
            del act
            if all(tr.done for tr in trainers.values()):
                break
        if all(tr.done for tr in trainers.values()):
            break

    clock.append(time.perf_counter())

    # 2. identity: order the latents like the previous checkpoint's, carry their ids
    dics, ids, cos, next_id = {}, {}, {}, {}
    for lay, tr in trainers.items():
        dic = tr.result()
        if lay in warm:
            pdic, pids, nid = warm[lay]
            order, c = match(pdic.w_dec, dic.w_dec)
            dic = dic.permuted(order)
            new = c < STABLE_COS
            lid = pids.copy()
            lid[new] = nid + np.arange(int(new.sum()))
            nid += int(new.sum())
        else:
            c = np.full(size, np.nan)
            lid, nid = np.arange(size, dtype=np.int64), size
        dics[lay], ids[lay], cos[lay], next_id[lay] = dic, lid, c, nid

    # 3. readings over the parallel pairs
    seqs = (par.ids1, par.ids2)
    stride = max(len(s) for s in par.ids1 + par.ids2)
    stats = {lay: FeatureStats(dics[lay], opts.features_fire, N_CONTEXTS) for lay in layers}
    clean = np.zeros((2, 2))  # [language, (nll, n)]
    spliced = np.zeros((len(layers), 2, 2))
    for start in range(0, len(par), opts.batch_size):
        idx = np.arange(start, min(start + opts.batch_size, len(par)))
        acts = []
        for side in range(2):
            batch = [seqs[side][i] for i in idx]
            acts.append(reader.resid(batch))
            clean[side] += reader.loss(batch, [])
            for j, lay in enumerate(layers):
                hook = [(view.resid_hooks[lay], _splice_hook(dics[lay]))]
                spliced[j, side] += reader.loss(batch, hook)
        a1, a2 = acts
        b, t = np.nonzero(a1.mask.numpy())
        tags1 = idx[b] * stride + t
        same = a1.mask.shape == a2.mask.shape and bool((a1.mask == a2.mask).all())
        aligned = par.aligned and same
        b2, t2 = np.nonzero(a2.mask.numpy())
        tags2 = idx[b2] * stride + t2
        for lay in layers:
            x1, x2 = a1.resid[lay][a1.mask], a2.resid[lay][a2.mask]
            if aligned:
                stats[lay].update_aligned(x1, x2, tags1)
            else:
                stats[lay].update(0, x1, tags1)
                stats[lay].update(1, x2, tags2)
        del acts, a1, a2

    clock.append(time.perf_counter())
    m = size
    freq = np.stack([stats[lay].freq() for lay in layers])  # [layer, 2, m]
    mean_act = np.stack([stats[lay].mean_act() for lay in layers])
    kinds = np.stack([stats[lay].kinds(opts.features_specific) for lay in layers])  # [layer, m]
    mass = np.stack([stats[lay].mass().sum(0) for lay in layers])  # [layer, m]
    count = np.zeros((len(layers), 4), dtype=np.int64)
    kind_mass = np.zeros((len(layers), 4))
    for j in range(len(layers)):
        count[j] = np.bincount(kinds[j], minlength=4)
        total = mass[j].sum()
        for kd in range(4):
            kind_mass[j, kd] = mass[j][kinds[j] == kd].sum() / total if total > 0 else np.nan

    # 4. causal importance: top features of each kind and as many random alive ones
    selected = np.zeros((len(layers), m), dtype=np.int64)
    effect = np.full((len(layers), 2, m), np.nan)
    sub = np.arange(min(CAUSAL_PAIRS, len(par)))
    batches = [sub[lo : lo + opts.batch_size] for lo in range(0, len(sub), opts.batch_size)]
    base = np.zeros(2)
    for side in range(2):
        tot = np.zeros(2)
        for bi in batches:
            tot += reader.loss([seqs[side][i] for i in bi], [])
        base[side] = tot[0] / max(tot[1], 1)
    for j, lay in enumerate(layers):
        top: list[int] = []
        for kd in (SHARED, SPECIFIC_1, SPECIFIC_2):
            cand = np.flatnonzero(kinds[j] == kd)
            cand = cand[np.argsort(-mass[j][cand], kind="stable")][: opts.features_top]
            top += [int(f) for f in cand]
        alive = np.setdiff1d(np.flatnonzero(kinds[j] != DEAD), top)
        rnd = np.random.default_rng(seed + 1000 + lay)
        n_ctrl = min(len(top), len(alive))
        ctrl = rnd.choice(alive, size=n_ctrl, replace=False) if n_ctrl else []
        selected[j, top] = SELECTED_TOP
        selected[j, np.asarray(ctrl, dtype=np.int64)] = SELECTED_RANDOM
        for f in np.flatnonzero(selected[j]):
            hook = [(view.resid_hooks[lay], _remove_hook(dics[lay], int(f)))]
            for side in range(2):
                tot = np.zeros(2)
                for bi in batches:
                    tot += reader.loss([seqs[side][i] for i in bi], hook)
                effect[j, side, f] = tot[0] / max(tot[1], 1) - base[side]

    clock.append(time.perf_counter())

    # 5. the stored dictionary, its identities and the report's contexts
    names = kind_names(pair)
    ctx_text = np.full((len(layers), 2, m, N_CONTEXTS), "", dtype=object)
    contexts: dict[str, dict] = {}
    top_features: dict[str, dict] = {}
    for j, lay in enumerate(layers):
        st = stats[lay]
        tops = {}
        for kd in (SHARED, SPECIFIC_1, SPECIFIC_2):
            cand = np.flatnonzero(kinds[j] == kd)
            tops[names[kd]] = [
                int(f) for f in cand[np.argsort(-mass[j][cand], kind="stable")][:REPORT_FEATURES]
            ]
        top_features[str(lay)] = tops
        ctx_l = {}
        for f in sorted({f for fs in tops.values() for f in fs}):
            per = {}
            for side, lang in enumerate(pair):
                texts = []
                for a, tag in zip(st.top_act[side, f], st.top_tag[side, f], strict=True):
                    if tag < 0 or not a > opts.features_fire:
                        continue
                    i, pos = divmod(int(tag), stride)
                    texts.append(_context(series, seqs[side][i], pos, lang))
                per[lang] = texts
                ctx_text[j, side, f, : len(texts)] = texts
            ctx_l[str(f)] = per
        contexts[str(lay)] = ctx_l
    record = {
        "size": size,
        "k": k,
        "d_model": d,
        "layers": layers,
        "seed": seed,
        "training_text": source,
        "train_tokens_per_language": int(sum(len(w) for w in windows[pair[0]])),
        "forward_tokens": forwarded,
        "warm_start_step": prev_step,
        "stable_cos": STABLE_COS,
        "next_id": {str(lay): int(next_id[lay]) for lay in layers},
        "training": {str(lay): trainers[lay].record() for lay in layers},
        "languages": pair,
        "seconds": dict(
            zip(("train", "readings", "causal"), np.diff(clock).round(3).tolist(), strict=True)
        ),
        "top_features": top_features,
        "contexts": contexts,
    }
    tensors: dict[str, torch.Tensor] = {}
    for lay in layers:
        pre = f"layer{lay}."
        tensors |= dics[lay].tensors(pre)
        tensors[f"{pre}feature_id"] = torch.as_tensor(ids[lay])
        tensors[f"{pre}match_cos"] = torch.as_tensor(cos[lay], dtype=torch.float64)

    fve = np.stack([stats[lay].fve() for lay in layers])
    ce_clean = clean[:, 0] / np.maximum(clean[:, 1], 1)
    ce = spliced[..., 0] / np.maximum(spliced[..., 1], 1)
    ds = xr.Dataset(
        {
            "features_fve": (("layer", "language"), fve),
            "features_ce": (("layer", "language"), ce),
            "features_ce_clean": (("language",), ce_clean),
            "feature_freq": (("layer", "language", "feature"), freq),
            "feature_mean_act": (("layer", "language", "feature"), mean_act),
            "feature_kind": (("layer", "feature"), kinds),
            "features_count": (("layer", "kind"), count),
            "features_mass": (("layer", "kind"), kind_mass),
            "features_clone_cofire": (("layer",), [stats[lay].cofire() for lay in layers]),
            "feature_match_cos": (("layer", "feature"), np.stack([cos[lay] for lay in layers])),
            "feature_id": (("layer", "feature"), np.stack([ids[lay] for lay in layers])),
            "feature_effect": (("layer", "language", "feature"), effect),
            "feature_selected": (("layer", "feature"), selected),
            "feature_context": (
                ("layer", "language", "feature", "rank"),
                ctx_text.astype(str),
            ),
        },
        coords={
            "layer": layers,
            "language": pair,
            "feature": np.arange(m),
            "kind": names,
            "rank": np.arange(N_CONTEXTS),
        },
        attrs={
            "definition": "a TopK sparse dictionary of the residual stream per checkpoint, "
            "shared by both languages, warm-started from and matched to the previous one",
            "size": size,
            "k": k,
            "seed": seed,
            "fire": float(opts.features_fire),
            "specific": float(opts.features_specific),
            "causal_pairs": len(sub),
        },
    )
    for name, text in _DEFINITIONS.items():
        ds[name].attrs["definition"] = text
    if ctx.step is not None:  # last: an error above leaves nothing stored
        save_artifact(series.run_dir, FAMILY, ctx.step, tensors, record)
    return ds


class Features(Family):
    """A sparse dictionary of the residual stream shared by both languages, per checkpoint:
    reconstruction, shared / specific / dead features, clone co-firing, causal importance."""

    name = FAMILY
    command = "causal"  # computed when named: probekit align RUN --metrics features
    variables = tuple(
        Variable(n, t, _DEFINITIONS[n])
        for n, t in (
            ("features_fve", "dictionary: variance explained"),
            ("features_ce", "dictionary: CE with the reconstruction spliced in"),
            ("features_ce_clean", "dictionary: clean CE"),
            ("feature_freq", "feature firing frequency"),
            ("feature_mean_act", "feature mean activation"),
            ("feature_kind", "feature kind"),
            ("features_count", "features per kind"),
            ("features_mass", "activation mass per kind"),
            ("features_clone_cofire", "clone co-firing of features"),
            ("feature_match_cos", "feature match cosine"),
            ("feature_id", "feature identity"),
            ("feature_effect", "feature causal effect"),
            ("feature_selected", "features measured causally"),
            ("feature_context", "feature top-activating contexts"),
        )
    )
    needs = Needs(weights=True, test_tokens=True)

    def applies(self, series: Series) -> str | None:
        try:
            _ = series.pair
        except ProbekitError as exc:
            return str(exc).splitlines()[0]
        return None

    def compute(self, ctx: CheckpointContext) -> xr.Dataset:
        return features(ctx)


def feature_lifecycle(cube: xr.Dataset | str | Path) -> pd.DataFrame:
    """Birth, maintenance and death of every feature of a run's `features` group.

    A feature is a run of consecutive checkpoints in one latent slot under one ``feature_id``
    (a cold-started checkpoint, match cosine NaN, starts new runs). Born: the first
    checkpoint where it is alive (not dead) and alive again, under the same identity, at the
    next one. Died: the checkpoint after the last one where it is alive under that identity
    (NaN: alive at the end). Maintenance: the share of checkpoints from birth to its last
    alive one where it is alive. ``kind`` is its kind at birth. One row per feature that was
    ever born, with columns layer, feature_id, slot, birth_step, death_step, maintenance,
    kind, kind_final."""
    if not isinstance(cube, xr.Dataset):  # a run directory: its cube's group, read by xarray
        # (not through probekit.store, which sits above the metrics it stores)
        group = Path(cube) / "analysis.zarr" / FAMILY
        cube = xr.open_zarr(group.parent, group=FAMILY).load() if group.is_dir() else None
    if cube is None or "feature_id" not in cube:
        raise MetricError("no features in this cube: run `probekit align RUN --metrics features`")
    ds = cube[["feature_id", "feature_kind", "feature_match_cos"]]
    ds = ds.dropna("step", how="all", subset=["feature_id"])
    ds = ds.dropna("layer", how="all", subset=["feature_id"])  # a merged cube's other layers
    # slots no step has (a cube once written with a wider dictionary, then recomputed)
    ds = ds.dropna("feature", how="all", subset=["feature_id"])
    steps = ds["step"].values
    if len(steps) < 2:
        raise MetricError(
            f"feature lifecycle needs at least 2 checkpoints with features, got {len(steps)}"
        )
    names = [str(n) for n in cube["kind"].values]
    rows = []
    for lay in ds["layer"].values:
        fid = ds["feature_id"].sel(layer=lay).values.astype(np.int64)  # [step, slot]
        kind = ds["feature_kind"].sel(layer=lay).values.astype(np.int64)
        cos = ds["feature_match_cos"].sel(layer=lay).values
        alive = kind != DEAD
        for slot in range(fid.shape[1]):
            s = 0
            while s < len(steps):
                e = s  # the identity's run: checkpoints s..e
                while (
                    e + 1 < len(steps)
                    and fid[e + 1, slot] == fid[s, slot]
                    and not np.isnan(cos[e + 1, slot])
                ):
                    e += 1
                born = next((i for i in range(s, e) if alive[i, slot] and alive[i + 1, slot]), None)
                if born is not None:
                    last = max(i for i in range(born, e + 1) if alive[i, slot])
                    died = steps[last + 1] if last + 1 < len(steps) else np.nan
                    rows.append(
                        {
                            "layer": int(lay),
                            "feature_id": int(fid[s, slot]),
                            "slot": slot,
                            "birth_step": int(steps[born]),
                            "death_step": float(died),
                            "maintenance": float(alive[born : last + 1, slot].mean()),
                            "kind": names[kind[born, slot]],
                            "kind_final": names[kind[last, slot]],
                        }
                    )
                s = e + 1
    return pd.DataFrame(
        rows,
        columns=[
            "layer",
            "feature_id",
            "slot",
            "birth_step",
            "death_step",
            "maintenance",
            "kind",
            "kind_final",
        ],
    )


def births_by_kind(life: pd.DataFrame) -> pd.DataFrame:
    """Median and first birth step of the features of each kind, per layer: when shared
    features appear relative to language-specific ones."""
    if life.empty:
        return pd.DataFrame(columns=["layer", "kind", "n", "first_birth", "median_birth"])
    g = life.groupby(["layer", "kind"])["birth_step"]
    return pd.DataFrame(
        {"n": g.size(), "first_birth": g.min(), "median_birth": g.median()}
    ).reset_index()

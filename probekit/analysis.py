"""`align`: every metric of every checkpoint of a series, appended to the run's cube.

For each checkpoint the model is loaded once, wrapped in a TransformerBridge,
and the parallel pairs are streamed through it in batches; each metric family
keeps its own streaming accumulator, so memory does not grow with the number of
pairs. Checkpoints are independent: they can be spread over dask workers or
torchrun ranks, each writing its own steps to the store.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from probekit import store
from probekit.checkpoints import (
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint,
    select_checkpoints,
)
from probekit.errors import MetricError, ProbekitError, RunDirError

METRICS: dict[str, str] = {
    "hidden_cos": "similarity",
    "hidden_cos_centred": "similarity",
    "cka": "similarity",
    "retrieval_acc": "similarity",
    "linmap_r2": "similarity",
    "procrustes_r2": "similarity",
    "neuron_act_prob": "neurons",
    "lang_specific_frac": "neurons",
    "neuron_overlap": "neurons",
    "grad_cos": "gradients",
    "embed_cos": "embeddings",
    "embed_cos_by_freq": "embeddings",
    "probe_transfer": "probes",
}
ALIGN_FAMILIES = ("similarity", "neurons", "gradients", "embeddings", "probes")
SIMILARITY_METRICS = tuple(m for m, f in METRICS.items() if f == "similarity")


@dataclass
class AlignOptions:
    pair: tuple[str, str] | None = None  # languages compared; default the first two
    n_pairs: int = 64  # parallel pairs per checkpoint
    seq_len: int | None = None  # tokens per sequence; default min(context, 128)
    batch_size: int = 16
    n_grad_pairs: int = 16
    ci: float | None = None  # bootstrap interval level, e.g. 0.95
    n_boot: int = 1000
    device: str = "cpu"
    neuron_threshold: float = 0.0
    neuron_top_frac: float = 0.1
    parallel_files: tuple[str, str] | None = None  # any HF series: two line-aligned texts
    tokenizer: str | None = None  # any HF series: tokenizer folder (default: first checkpoint)


def resolve_metrics(metrics: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Metric or family names (or 'all') -> the families to compute, in order."""
    if metrics is None or metrics == "all" or metrics == ["all"]:
        return list(ALIGN_FAMILIES)
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    fams = []
    for name in filter(None, names):
        fam = name if name in ALIGN_FAMILIES else METRICS.get(name)
        if fam is None:
            known = ", ".join(list(METRICS) + list(ALIGN_FAMILIES) + ["all"])
            raise MetricError(f"unknown metric {name!r} (known: {known})")
        if fam not in fams:
            fams.append(fam)
    return [f for f in ALIGN_FAMILIES if f in fams]


class Series:
    """What align needs of a run: checkpoints, languages, parallel pairs, vocabulary facts."""

    def __init__(self, run_dir: Path, opts: AlignOptions):
        from probekit.data import load_run_data

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunDirError(f"run directory not found: {self.run_dir}")
        self.data = load_run_data(self.run_dir)
        self.cfg = self.data.cfg
        self.vocab = self.data.vocab
        langs = self.vocab.languages
        if len(langs) < 2:
            raise MetricError(f"{run_dir}: a monolingual run has no second language to align")
        self.pair = tuple(opts.pair) if opts.pair else (langs[0], langs[1])
        for lang in self.pair:
            if lang not in langs:
                raise MetricError(f"unknown language {lang!r} (this run has: {', '.join(langs)})")
        context = int(self.cfg["model"]["context"])
        self.seq_len = min(opts.seq_len or min(context, 128), context)
        self.parallel = self.data.parallel(self.pair[0], self.pair[1], opts.n_pairs, self.seq_len)
        if len(self.parallel) < 4:
            raise MetricError(f"only {len(self.parallel)} parallel pairs of length {self.seq_len}")
        self.tokenizer = self.vocab.tokenizers[self.vocab.tokenizer_of[self.pair[0]]]
        self.mode = self.cfg["data"]["mode"]
        self.vocab_mode = self.cfg["tokenizer"]["vocab_mode"] if self.mode == "pair" else self.mode

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.run_dir)

    @property
    def attrs(self) -> dict:
        from probekit.config import dump_config

        d = self.cfg["data"]
        return {
            "run_name": self.cfg.get("name") or self.run_dir.name,
            "mode": self.mode,
            "vocab_mode": self.vocab_mode,
            "p": float(d["p"]) if not d["schedule"] else float("nan"),
            "schedule": str(d["schedule"]),
            "languages": list(self.pair),
            "config": dump_config(self.cfg),
        }

    def check_model(self, model, info: CheckpointInfo) -> None:
        if model.config.vocab_size != self.vocab.model_vocab_size:
            raise RunDirError(
                f"{info.path}: vocabulary size {model.config.vocab_size} does not match the "
                f"run's languages ({self.vocab.model_vocab_size} ids for {self.vocab.languages})"
            )

    def clone_pairs(self) -> np.ndarray:
        return self.vocab.clone_pairs(*self.pair)

    def token_frequency(self) -> np.ndarray:
        """Occurrences of each L1 piece in the training text (both languages together)."""
        return self.data.train_token_counts(self.pair[0])


class ExternalSeries:
    """Any folder of Hugging Face causal-LM checkpoints, with two line-aligned text files.

    Lines are tokenized with the series' own tokenizer and packed into sequence pairs as
    for real language pairs (not token-aligned), so hidden-state cosine uses the matching.
    """

    mode = vocab_mode = "external"

    def __init__(self, path: Path, opts: AlignOptions):
        from transformers import AutoConfig, AutoTokenizer

        from probekit.data import ParallelSet, _read_lines, _spread, pack_parallel

        self.run_dir = Path(path)
        if not self.run_dir.is_dir():
            raise RunDirError(f"checkpoint series not found: {self.run_dir}")
        ckpts = self.checkpoints()
        src = Path(opts.tokenizer) if opts.tokenizer else ckpts[0].path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{src}: no usable tokenizer (pass --tokenizer DIR): {exc}") from None
        context = int(getattr(AutoConfig.from_pretrained(str(ckpts[0].path)), "n_positions", 512))
        self.seq_len = min(opts.seq_len or min(context, 128), context)
        a, b = (_read_lines(f, "--parallel") for f in opts.parallel_files)
        if len(a) != len(b):
            raise MetricError(f"--parallel: the files have {len(a)} and {len(b)} lines")
        enc = [self.tokenizer(lines, add_special_tokens=False)["input_ids"] for lines in (a, b)]
        e1, e2 = ([np.asarray(x, dtype=np.int64) for x in side] for side in enc)
        p1, p2, labels = pack_parallel(e1, e2, [0] * len(e1), self.seq_len)
        order = _spread(len(p1), opts.n_pairs)
        self.parallel = ParallelSet(
            [p1[i] for i in order],
            [p2[i] for i in order],
            False,
            np.zeros(len(order), dtype=int),
            ["text"],
        )
        if len(self.parallel) < 4:
            raise MetricError(
                f"--parallel: only {len(self.parallel)} sequence pairs of length "
                f"{self.seq_len} could be packed"
            )
        self.pair = tuple(opts.pair) if opts.pair else ("L1", "L2")
        self.files = [str(f) for f in opts.parallel_files]

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.run_dir)

    @property
    def attrs(self) -> dict:
        return {
            "run_name": self.run_dir.name,
            "mode": self.mode,
            "vocab_mode": self.vocab_mode,
            "p": float("nan"),
            "schedule": "",
            "languages": list(self.pair),
            "parallel_files": self.files,
        }

    def check_model(self, model, info: CheckpointInfo) -> None:
        top = max(int(x.max()) for x in self.parallel.ids1 + self.parallel.ids2)
        if top >= model.config.vocab_size:
            raise RunDirError(
                f"{info.path}: token id {top} of the parallel text is outside the "
                f"model's vocabulary ({model.config.vocab_size}); wrong tokenizer?"
            )

    def clone_pairs(self) -> np.ndarray:
        return np.zeros((0, 2), dtype=np.int64)


def make_series(path: Path, opts: AlignOptions) -> Series | ExternalSeries:
    """A probekit run directory, or any HF checkpoint series when parallel files are given."""
    if opts.parallel_files:
        return ExternalSeries(path, opts)
    if Path(path).is_dir() and not (Path(path) / "config.toml").is_file():
        raise RunDirError(
            f"{path}: not a probekit run (no config.toml); to analyse another "
            f"checkpoint series pass --parallel L1.txt L2.txt"
        )
    return Series(path, opts)


def applicable(series: Series | ExternalSeries, family: str) -> str | None:
    """Why a family cannot be computed for this run, or None."""
    if family == "probes" and series.mode == "external":
        return "probes need labelled parallel data (the shipped Bible books); not available here"
    if family == "embeddings" and len(series.clone_pairs()) == 0:
        return (
            f"clone embedding similarity needs cloned languages; this run's "
            f"{series.pair[0]}/{series.pair[1]} vocabularies are {series.vocab_mode}"
        )
    return None


def compute_checkpoint(run_dir: Path, step: int, families: list[str], opts: AlignOptions) -> dict:
    """All requested families for one checkpoint -> {family: Dataset}. Runs in any process."""
    _steady_heap()
    series = make_series(run_dir, opts)
    info = next((c for c in series.checkpoints() if c.step == step), None)
    if info is None:
        raise RunDirError(f"{run_dir}: no checkpoint for step {step}")
    model = load_checkpoint(info, device=opts.device)
    series.check_model(model, info)
    out: dict[str, xr.Dataset] = {}
    # weight-level metrics first: booting the bridge rewraps the model's modules in place
    if "gradients" in families:
        out["gradients"] = _gradients(model, series, opts)
    if "embeddings" in families:
        out["embeddings"] = _embeddings(model, series)
    if any(f in families for f in ("similarity", "neurons", "probes")):
        out |= _activation_families(model, series, families, opts)
    del model
    gc.collect()  # one checkpoint at a time: memory stays flat over a long series
    return out


def _gradients(model, series: Series, opts: AlignOptions) -> xr.Dataset:
    from probekit.hooks import pad_batch
    from probekit.metrics.gradients import gradient_alignment

    par = series.parallel
    n = min(opts.n_grad_pairs, len(par))
    ids1, m1 = pad_batch(par.ids1[:n])
    ids2, m2 = pad_batch(par.ids2[:n])
    with torch.enable_grad():
        da = gradient_alignment(model, ids1, m1, ids2, m2)
    # the final LayerNorm and head sit at layer L+1 there; keep them out of the shared
    # `layer` axis (0..L), where they would leave every other metric a NaN row
    head = int(da["layer"].max())
    ds = da.sel(layer=slice(0, head - 1)).to_dataset(name="grad_cos")
    final = da.sel(layer=head).drop_vars("layer").dropna("tensor", how="all")
    ds["grad_cos_head"] = final.rename(tensor="head_tensor")
    ds["grad_cos_head"].attrs["definition"] = "gradient cosine of the final LayerNorm and LM head"
    return ds


def _embeddings(model, series: Series) -> xr.Dataset:
    from probekit.metrics.embeddings import embedding_similarity, embedding_similarity_by_freq

    pairs = series.clone_pairs()
    base_ids = np.asarray([series.vocab.base_id(series.pair[0], int(i)) for i in pairs[:, 0]])
    freq = series.token_frequency()[base_ids]
    e = embedding_similarity(model, pairs)
    by = embedding_similarity_by_freq(model, pairs, freq)
    parts = [
        e.to_dataset(name="embed_cos") if isinstance(e, xr.DataArray) else e,
        by.to_dataset(name="embed_cos_by_freq") if isinstance(by, xr.DataArray) else by,
    ]
    return xr.merge(parts, compat="override", join="outer")


@torch.no_grad()
def _activation_families(model, series: Series, families: list[str], opts: AlignOptions) -> dict:
    """One streamed pass over the parallel pairs feeds every activation-based accumulator."""
    from probekit.hooks import iter_pair_activations, load_bridge, pad_batch, run_activations

    n_layers, d_model = model.config.n_layer, model.config.n_embd
    d_mlp = model.config.n_inner or 4 * d_model
    par = series.parallel
    bridge = load_bridge(model, series.tokenizer, device=opts.device)
    sim = neu = None
    if "similarity" in families:
        from probekit.metrics.similarity import SimilarityAccumulator

        sim = SimilarityAccumulator(
            n_layers + 1,
            d_model,
            metrics=SIMILARITY_METRICS,
            aligned=par.aligned,
            n_groups=20 if opts.ci else None,
        )
    if "neurons" in families:
        from probekit.metrics.neurons import NeuronAccumulator

        neu = NeuronAccumulator(
            n_layers, d_mlp, languages=list(series.pair), threshold=opts.neuron_threshold
        )
    want_resid = sim is not None or "probes" in families
    pooled1, pooled2 = [], []
    shifted2 = par.ids2[1:] + par.ids2[:1]  # different-text baseline: pair i with i + 1
    for idx, a1, a2 in iter_pair_activations(
        bridge, par.ids1, par.ids2, n_layers, opts.batch_size, want_resid, neu is not None
    ):
        pidx = torch.as_tensor(idx)
        if sim is not None:
            sim.update(a1.resid, a1.mask, a2.resid, a2.mask, pidx)
            b2 = run_activations(bridge, *pad_batch([shifted2[i] for i in idx]), n_layers)
            sim.update_baseline(a1.resid, a1.mask, b2.resid, b2.mask, pidx)
        if neu is not None:
            neu.update(series.pair[0], a1.mlp, a1.mask)
            neu.update(series.pair[1], a2.mlp, a2.mask)
        if "probes" in families:
            for a, dst in ((a1, pooled1), (a2, pooled2)):
                m = a.mask[None, :, :, None].float()
                dst.append(((a.resid * m).sum(2) / m.sum(2)).numpy())
    out = {}
    if sim is not None:
        out["similarity"] = sim.result(ci=opts.ci, n_boot=opts.n_boot, seed=0)
    if neu is not None:
        out["neurons"] = neu.result(top_k=max(1, int(round(opts.neuron_top_frac * d_mlp))))
    if "probes" in families:
        from probekit.metrics.probes import probe_transfer

        f1, f2 = np.concatenate(pooled1, axis=1), np.concatenate(pooled2, axis=1)
        out["probes"] = probe_transfer(f1, par.labels, f2, par.labels, seed=0, paired=True)
    del bridge
    return out


def _steady_heap() -> None:
    """Keep glibc from growing its mmap threshold, so big per-batch float64 temporaries are
    returned to the OS instead of fragmenting the heap under the small arrays that stay alive
    (without this, peak RSS grew with the number of pairs while the data did not)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: a fixed value disables the adaptation
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _selected(series: Series, steps: list[int] | None) -> list[CheckpointInfo]:
    ckpts = select_checkpoints(series.checkpoints(), steps, series.run_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return ckpts[rank::world] if world > 1 else ckpts  # torchrun: each rank its own steps


def align(
    run_dir: str | Path,
    metrics: str | list[str] | None = None,
    steps: list[int] | None = None,
    recompute: bool = False,
    options: AlignOptions | None = None,
    workers: int = 0,
    progress: bool = True,
    strict: bool = False,
) -> xr.Dataset:
    """Compute metrics for every (or the chosen) checkpoint and return the run's cube.

    Already stored checkpoints are skipped unless `recompute`. `workers` > 0 spreads
    checkpoints over a local dask.distributed cluster. Families a run cannot have are
    an error when named explicitly (or `strict`), and skipped with a note otherwise.
    """
    opts = options or AlignOptions()
    run_dir = Path(run_dir)
    _steady_heap()
    if opts.device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        opts = replace(opts, device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")  # a GPU per rank
    if run_dir.is_dir():
        store.check_version(run_dir)
    explicit = metrics not in (None, "all", ["all"])
    families = resolve_metrics(metrics)
    series = make_series(run_dir, opts)
    todo_fams = []
    for fam in families:
        why = applicable(series, fam)
        if why is None:
            todo_fams.append(fam)
        elif explicit or strict:
            raise MetricError(why)
        else:
            print(f"note: skipping {fam}: {why}")
    ckpts = _selected(series, steps)
    # --recompute overwrites each step as its new result arrives: a failure keeps the old one
    done = {fam: set() if recompute else set(store.stored_steps(run_dir, fam)) for fam in todo_fams}
    jobs = [(c, [f for f in todo_fams if c.step not in done[f]]) for c in ckpts]
    jobs = [(c, fams) for c, fams in jobs if fams]
    attrs = series.attrs | {"align_options": str(asdict(opts))}

    def save(info: CheckpointInfo, result: dict) -> None:
        for fam, ds in result.items():
            store.write_step(run_dir, fam, ds, info.step, info.tokens, attrs)

    if workers and jobs:
        _run_dask(run_dir, jobs, opts, workers, save, progress)
    else:
        from tqdm.auto import tqdm

        for info, fams in tqdm(
            jobs, desc=f"align {run_dir.name}", unit="ckpt", disable=not progress
        ):
            save(info, compute_checkpoint(run_dir, info.step, fams, opts))
    if not jobs and progress:
        print(f"{run_dir}: every selected checkpoint already stored (use --recompute to redo)")
    return store.open_cube(run_dir)


def _run_dask(run_dir: Path, jobs: list, opts: AlignOptions, workers: int, save, progress: bool):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ProbekitError(
            "--workers needs dask.distributed: pip install 'dask[distributed]'"
        ) from None
    from tqdm.auto import tqdm

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = {
            client.submit(compute_checkpoint, run_dir, info.step, fams, opts, pure=False): info
            for info, fams in jobs
        }
        for fut in tqdm(
            as_completed(futures), total=len(futures), desc="align", disable=not progress
        ):
            save(futures[fut], fut.result())  # the driver writes: one writer, results as they come

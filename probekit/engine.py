"""The one driver behind every command that reads checkpoints (`align`, `eval`, ...).

It owns checkpoint selection, skip / recompute, the progress bar, dask (a local cluster or
an existing scheduler) and torchrun, and the run attributes. For each checkpoint it loads
the model once, runs the one-call families, then streams the parallel pairs through one
TransformerBridge in batches — one forward per language and batch for every activation
family together (plus the different-text baseline when a family asks for it) — and hands
each family's step-less Dataset to the store. The series and its parallel and test data
are built once per process. Checkpoints are independent: a failure keeps every result
already written.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from probekit import store
from probekit.checkpoints import CheckpointInfo, load_checkpoint, release_kept, select_checkpoints
from probekit.errors import MetricError, ProbekitError, RunDirError
from probekit.heap import release_heap, steady_heap
from probekit.hooks import Activations, bridge_for, pad_batch, release_bridge, run_activations
from probekit.metrics import FAMILIES, CheckpointContext, Family, PairBatch
from probekit.model_view import ModelView, check_hook_kind
from probekit.options import AnalysisOptions
from probekit.revisions import Sample, is_sample, parse_sample
from probekit.series import Series, cached_series

SCHEDULER_ENV = "PROBEKIT_DASK_SCHEDULER"


def run(
    path: str | Path,
    families: Sequence[Family],
    steps: list[int] | str | Sample | None = None,
    recompute: bool = False,
    options: AnalysisOptions | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
    explicit: bool = False,
    label: str = "align",
) -> xr.Dataset:
    """Compute `families` for every (or the chosen) checkpoint of a series; return its cube.

    Stored checkpoints are skipped unless `recompute`. A family the series cannot have is an
    error when `explicit` (the user named it), else skipped with a one-line note. `workers`
    spreads checkpoints over a local dask cluster, `scheduler` (or $PROBEKIT_DASK_SCHEDULER)
    over an existing one; under torchrun each rank takes its share of the checkpoints.
    `steps`: step numbers, or a sample of the series (`every:N`, `log:K`, `range:A:B[:S]`;
    probekit.revisions), which `options.revisions` may also hold.
    """
    opts = (options or AnalysisOptions()).validated()
    if opts.revisions and len(opts.revisions) == 1 and is_sample(opts.revisions[0]):
        if steps:
            raise MetricError("revisions: a sample selects the steps; leave out steps")
        steps, opts = parse_sample(opts.revisions[0], "revisions"), opts.updated(revisions=None)
    path = Path(path)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise MetricError(f"--workers: expected an integer >= 0, got {workers!r}")
    if opts.device.startswith("cuda") and _world() > 1:  # a GPU per torchrun rank
        opts = opts.updated(device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    if path.is_dir():
        store.check_version(path)
    series = cached_series(path, opts)
    todo: list[Family] = []
    for fam in families:
        why = fam.applies(series)
        if why is None:
            todo.append(fam)
        elif explicit:
            raise MetricError(why)
        else:
            print(f"note: skipping {fam.name}: {why}")
    selected = ckpts = select_checkpoints(series.checkpoints(), steps, series.run_dir)
    parallel = check_needs(todo, series, ckpts)  # fail before any checkpoint is loaded
    if _world() > 1:
        ckpts = ckpts[int(os.environ.get("RANK", 0)) :: _world()]
    if recompute:  # a damaged family is rebuilt by recomputing every checkpoint of it
        for fam in todo:
            try:
                store.read_family(path, fam.name)
            except store.DamagedFamily:
                if steps is not None:
                    raise
                store.discard_family(path, fam.name)
                print(f"note: {fam.name}: damaged results discarded; rebuilding every checkpoint")
    # --recompute overwrites each step as its new result arrives: a failure keeps the old one
    done = {f.name: set() if recompute else set(store.stored_steps(path, f.name)) for f in todo}
    jobs = [(c, [f.name for f in todo if c.step not in done[f.name]]) for c in ckpts]
    jobs = [(c, names) for c, names in jobs if names]
    if jobs and int(os.environ.get("RANK", 0)) == 0:
        _warn_series(selected)
    attrs = series.attrs(parallel) | {"analysis_options": str(opts.describe())}

    def save(info: CheckpointInfo, result: dict[str, xr.Dataset]) -> None:
        for name, ds in result.items():
            store.write_step(path, name, ds, info.step, info.tokens, attrs)

    scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if jobs and (workers or scheduler):
        _run_dask(path, jobs, opts, workers, scheduler, save, progress, label)
    elif jobs:
        from tqdm.auto import tqdm

        try:
            for info, names in tqdm(
                jobs, desc=f"{label} {series.name}", unit="ckpt", disable=not progress
            ):
                try:
                    result = compute_checkpoint(path, info.step, names, opts)
                except NonFiniteCheckpoint as exc:
                    print(f"warning: {exc}", flush=True)
                    continue
                save(info, result)
        finally:
            release_kept()  # the models kept for the next checkpoint
            release_bridge()
    elif progress:
        print(f"{path}: every selected checkpoint already stored (use --recompute to redo)")
    return store.open_cube(path)


def compute_checkpoint(
    path: str | Path, step: int, names: Sequence[str | Family], options: AnalysisOptions
) -> dict[str, xr.Dataset]:
    """The families (by name, or the Family objects themselves) for one checkpoint ->
    {family: Dataset}. Runs in any process: a dask worker is handed the objects, so a family
    registered only in the driver's process (a notebook's) is computed there too."""
    steady_heap()  # this process now reuses freed buffers (the driver's or a worker's)
    series = cached_series(Path(path), options)
    info = next((c for c in series.checkpoints() if c.step == step), None)
    if info is None:
        raise RunDirError(f"{path}: no checkpoint for step {step}")
    fams = [n if isinstance(n, Family) else _registered(n) for n in names]
    # what lives now (the series, imported modules) outlives this checkpoint: the collection
    # below then scans only what this checkpoint created (a full one took ~0.5 s per step)
    gc.freeze()
    model = load_checkpoint(info, device=options.device, reuse=True, dtype=options.dtype)
    series.check_model(model, info)
    _check_finite(model, info)
    final = step == series.checkpoints()[-1].step
    ctx = CheckpointContext(
        model, ModelView.from_config(model.config), series, options, final, step=step
    )
    # one-call families first: booting the bridge rewraps the model's modules in place
    out = {f.name: f.compute(ctx) for f in fams if not f.streamed}
    streamed = [f for f in fams if f.streamed]
    if streamed:
        out |= _stream_pairs(ctx, streamed)
    del model, ctx
    gc.collect()  # one checkpoint at a time: memory stays flat over a long series
    release_heap()
    return out


@torch.no_grad()
def _stream_pairs(ctx: CheckpointContext, families: list[Family]) -> dict[str, xr.Dataset]:
    """One pass over the parallel pairs feeds every activation family's accumulator.

    Two forwards per batch (L1, L2). The different-text baseline pairs L1 of pair i with L2
    of pair i + 1 (the last pair with pair 0): those L2 activations are already computed, so
    batch k is handed over once batch k + 1's L2 side exists (at most two batches alive).
    """
    series, opts = ctx.series, ctx.options
    baseline = any(f.needs.baseline for f in families)
    kinds = set().union(*(f.needs.activations for f in families))
    if baseline:
        kinds.add("resid")  # the different-text baseline is built from the residual stream
    runs = {f.name: f.start(ctx) for f in families}
    forward = _activation_runner(ctx, sorted(kinds))
    par = series.parallel

    def hand_over(idx: np.ndarray, a1: Activations, a2: Activations, nxt: Activations) -> None:
        other = _rows([(a2, r) for r in range(1, len(idx))] + [(nxt, 0)]) if baseline else None
        batch = PairBatch(idx, a1, a2, other)
        for acc in runs.values():
            acc.update(batch)

    first = pending = None
    for start in range(0, len(par), opts.batch_size):
        idx = np.arange(start, min(start + opts.batch_size, len(par)))
        a1 = forward([par.ids1[i] for i in idx])
        a2 = forward([par.ids2[i] for i in idx])
        if baseline and first is None:
            first = _rows([(a2, 0)])  # the last pair's baseline partner (wrap-around)
        if pending is not None:
            hand_over(*pending, a2)
        pending = (idx, a1, a2)
        release_heap()
    if pending is not None:
        hand_over(*pending, first)
    del pending, first
    release_heap()
    return {name: acc.result() for name, acc in runs.items()}


class NonFiniteCheckpoint(RunDirError):
    """A checkpoint whose weights hold NaN or inf (a diverged run): the driver skips it."""


def _check_finite(model: torch.nn.Module, info: CheckpointInfo) -> None:
    """Refuse a checkpoint with non-finite weights before any family reads it: its SVDs and
    probes would fail (or store garbage) one family at a time."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise NonFiniteCheckpoint(
                f"step {info.step} ({info.path}): non-finite weights in {name}; skipped, "
                "nothing stored for it (the other checkpoints are analysed)"
            )


def _rows(parts: list[tuple[Activations, int]]) -> Activations:
    """A batch made of single sequences of other batches (residual stream only), right-padded
    to its own longest sequence; padded positions hold zeros (no family reads them)."""
    lengths = [int(a.mask[r].sum()) for a, r in parts]
    t = max(lengths)
    a0 = parts[0][0].resid
    resid = a0.new_zeros((a0.shape[0], len(parts), t, a0.shape[3]))
    mask = torch.zeros((len(parts), t), dtype=torch.bool)
    for b, ((a, r), n) in enumerate(zip(parts, lengths, strict=True)):
        resid[:, b, :n] = a.resid[:, r, :n]
        mask[b, :n] = True
    return Activations({"resid": resid}, mask)


def _activation_runner(ctx: CheckpointContext, kinds: list[str]) -> Callable[[list], Activations]:
    """seqs -> Activations of one padded batch, through the checkpoint's TransformerBridge
    (booted, or the previous checkpoint's refreshed with these weights: ``bridge_for``).

    Plain forward hooks on a GPT-2 were tried (1.2x faster) but differ from the bridge's
    fused-QKV split by float32 rounding, which flips neurons at the firing threshold: the
    bridge stays the one way activations are read, on every architecture."""
    bridge = bridge_for(ctx.model, ctx.series.tokenizer, ctx.view, device=ctx.options.device)
    return lambda seqs: run_activations(bridge, *pad_batch(seqs), ctx.view, kinds)


def _registered(name: str) -> Family:
    fam = FAMILIES.get(name)
    if fam is None:
        raise MetricError(f"unknown metric family {name!r} in this process")
    return fam


class SeriesWarning(UserWarning):
    """The series check found faulty revisions (duplicate weights, steps out of order, ...)."""


def _warn_series(ckpts: list[CheckpointInfo]) -> None:
    """`probekit check`'s checks of the selected checkpoints, as one warning line (sampled
    hashes: a few MB read per checkpoint, whatever the model's size)."""
    import warnings

    from probekit.series_check import check_checkpoints, summary_line

    problems = check_checkpoints(ckpts)
    if problems:
        warnings.warn(
            summary_line(problems, len(ckpts)) + " (`probekit check` lists them)",
            SeriesWarning,
            stacklevel=3,
        )


def _needs_parallel(family: Family) -> bool:
    n = family.needs
    return bool(n.activations) or n.gradients or n.baseline or n.parallel


def check_needs(families: Sequence[Family], series: Series, ckpts: list[CheckpointInfo]) -> bool:
    """Everything the families declared is there, before any checkpoint is loaded: the parallel
    pairs, the test texts, and activations this architecture provides (one-line errors naming
    the family). Returns whether the parallel pairs are needed."""
    kinds = {(k, f.name) for f in families for k in f.needs.activations}
    for kind, _ in sorted(kinds):
        check_hook_kind(kind)
    if kinds and ckpts:
        view = _view_of(ckpts[0])
        for kind, name in sorted(kinds):
            why = view.unavailable(kind) if view is not None else None
            if why is not None:
                raise MetricError(f"{name}: activation {kind!r} is not available: {why}")
    parallel = any(_needs_parallel(f) for f in families)
    if parallel:
        _ = series.parallel
    if any(f.needs.test_tokens for f in families):
        _ = series.test_texts()
    return parallel


def _view_of(info: CheckpointInfo) -> ModelView | None:
    """The model view from a checkpoint's config.json alone (None where it has none: the
    loader then says what is wrong with the checkpoint)."""
    from transformers import AutoConfig

    try:
        return ModelView.from_config(AutoConfig.from_pretrained(str(info.path)))
    except (OSError, ValueError, KeyError):
        return None


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_cluster(workers: int):
    """A dask LocalCluster of `workers` one-thread processes on this machine.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold: every large temporary becomes a fresh mmap whose pages fault in
    again (align of one tiny checkpoint: 4.4x the page faults, 2.4x the system time). Our
    own workers start without it; `probekit.heap` keeps their memory flat."""
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )


def _run_dask(
    path: Path,
    jobs: list,
    opts: AnalysisOptions,
    workers: int,
    scheduler: str | None,
    save: Callable,
    progress: bool,
    label: str,
) -> None:
    from dask.distributed import Client, as_completed
    from tqdm.auto import tqdm

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ProbekitError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        cluster = None
    else:
        cluster = local_cluster(workers)
        client = Client(cluster)
    try:
        futures = {
            client.submit(compute_checkpoint, path, info.step, fams, opts, pure=False): info
            for info, fams in ((info, [FAMILIES[n] for n in names]) for info, names in jobs)
        }
        for fut in tqdm(
            as_completed(futures), total=len(futures), desc=label, disable=not progress
        ):
            try:
                result = fut.result()
            except NonFiniteCheckpoint as exc:
                print(f"warning: {exc}", flush=True)
                continue
            save(futures[fut], result)  # the driver writes: one writer, results as they come
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


__all__ = ["run", "compute_checkpoint", "local_cluster", "Series", "SCHEDULER_ENV", "SeriesWarning"]

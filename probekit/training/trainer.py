"""The trainer: config in, checkpoint series out. Read it top to bottom at one sitting.

`train()` at the bottom is the whole loop; every step it takes is a named function above it.
Optimiser step s (0-based) trains on the global sequences [s*B, (s+1)*B) of the run's
seeded mixture stream, so which data a step sees never depends on restarts, grad_accum
or the number of DDP ranks. Checkpoint `step_N` holds the weights after N updates.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probekit import checkpoints as ck
from probekit.config import (
    DEVICES,
    RESULT_SECTIONS,
    RunConfig,
    config_fingerprint,
    diff_fields,
    dump_config,
    load_config,
)
from probekit.errors import ConfigError, RunDirError
from probekit.heap import steady_heap
from probekit.training.model import build_model


# --- plans -------------------------------------------------------------------------------
def checkpoint_plan(cfg: RunConfig) -> list[int]:
    """Steps that get a checkpoint: 0, log-spaced early ones, every `every`, and the last."""
    steps, c = cfg.train.steps, cfg.checkpoints
    plan = {0, steps}
    if c.steps:
        plan |= {s for s in c.steps if s <= steps}
    else:
        if c.log_spaced:  # geometric between 1 and the first regular checkpoint
            plan |= {int(round(x)) for x in np.geomspace(1, c.every, c.log_spaced + 1)[:-1]}
        plan |= set(range(c.every, steps + 1, c.every))
    return sorted(s for s in plan if 0 <= s <= steps)


def lr_factor(step: int, steps: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up to 1, then cosine to min_frac at the last update (index steps - 1)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# --- the process: ranks, device, precision -------------------------------------------------
@dataclass
class Job:
    """What every step of one training process shares."""

    cfg: RunConfig
    run_dir: Path
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp: Callable[[], Any]  # autocast context of the run's precision (nullcontext for fp32)
    scaler: Any  # a GradScaler for fp16, else None

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); starts a process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: CUDA requested but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if requested not in DEVICES:
        raise ConfigError(f"train.device: unknown device {requested!r}")
    return torch.device("cpu")


def setup(cfg: RunConfig, run_dir: Path, device: str | None = None) -> Job:
    """Join the DDP group (under torchrun), pick the device and the precision."""
    t = cfg.train
    rank, world, local_rank = _init_distributed()
    dev = _resolve_device(device or t.device, local_rank)
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError("train.precision: fp16 needs CUDA (use bf16 or fp32 on CPU)")
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is not divisible by ranks x grad_accum = "
            f"{world} x {t.grad_accum}"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return Job(cfg, Path(run_dir), rank, world, local_rank, dev, amp, scaler)


def _barrier(job: Job) -> None:
    if job.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- run directory -----------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("probekit")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


def prepare_run_dir(cfg: RunConfig, run_dir: Path, force: bool) -> None:
    """Write config.toml; refuse a RUN_DIR that holds another config (force: clear it)."""
    old_file = run_dir / "config.toml"
    if old_file.is_file():
        try:
            old = load_config(old_file)
        except ConfigError:
            old = None
        if old is None or config_fingerprint(old) != config_fingerprint(cfg):
            if not force:
                fields = ["config.toml (unreadable)"]
                if old is not None:
                    a, b = old.to_dict(), cfg.to_dict()
                    fields = diff_fields(
                        {k: a[k] for k in RESULT_SECTIONS}, {k: b[k] for k in RESULT_SECTIONS}
                    )
                raise RunDirError(
                    f"{run_dir} holds a different config ({', '.join(fields[:3])} differs); "
                    "use --force to overwrite"
                )
            # force: the old checkpoints, log and tokenizer belong to the old config
            for name in ("checkpoints", "tokenizer"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            (run_dir / ck.LOG_FILE).unlink(missing_ok=True)
            print(f"--force: cleared the old run in {run_dir}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = old_file.with_name("config.toml.tmp")
    tmp.write_text(f"# written by probekit {_version()}\n" + dump_config(cfg))
    os.replace(tmp, old_file)
    for left in (run_dir / "checkpoints").glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(left, ignore_errors=True)


def _steps_done(ckpt_dir: Path) -> set[int]:
    try:
        return {i.step for i in ck.list_checkpoints(ckpt_dir)}
    except RunDirError:  # no checkpoints yet
        return set()


def load_data(job: Job) -> Any:
    """The run's RunData; rank 0 builds the tokenizer, the other ranks then load it."""
    from probekit.data import prepare_run_data

    data = prepare_run_data(job.cfg, job.run_dir) if job.rank0 else None
    _barrier(job)
    return data if job.rank0 else prepare_run_data(job.cfg, job.run_dir)


# --- model, optimiser, resume --------------------------------------------------------------
def init_model(job: Job, vocab_size: int) -> tuple[Any, Any, Any]:
    """Model, AdamW and LR schedule, seeded so two runs with one seed are identical."""
    cfg, t = job.cfg, job.cfg.train
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model, vocab_size).to(job.device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.min_lr_frac)
    )
    return model, opt, sched


def _load_newest_state(job: Job, model: Any, opt: Any, sched: Any) -> ck.CheckpointInfo | None:
    """Load the newest checkpoint that has a readable state; returns its info or None.
    A corrupt one is renamed to .corrupt-step_N (never silently deleted)."""
    from safetensors.torch import load_file

    try:
        infos = [i for i in ck.list_checkpoints(job.ckpt_dir) if i.has_state]
    except RunDirError:
        return None
    for info in reversed(infos):
        try:
            weights = load_file(str(info.path / "model.safetensors"))
            state = torch.load(info.path / ck.STATE_FILE, map_location="cpu", weights_only=False)
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
                raise RuntimeError(f"weights do not match the model ({(missing + unexpected)[:3]})")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if job.scaler is not None and state.get("scaler"):
                job.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
            return info
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the one before
            if job.rank0:
                bad = info.path.with_name(f".corrupt-{info.path.name}")
                shutil.rmtree(bad, ignore_errors=True)
                info.path.rename(bad)
                print(
                    f"warning: checkpoint {info.path.name} is unreadable "
                    f"({type(exc).__name__}); moved to {bad.name}, resuming from an earlier one",
                    file=sys.stderr,
                )
    return None


def resume(job: Job, model: Any, opt: Any, sched: Any) -> int:
    """Restore the newest resumable checkpoint; returns the step to start from (0: fresh)."""
    info = None
    for turn in (True, False):  # rank 0 first: it alone renames a corrupt checkpoint aside
        if job.rank0 == turn:
            info = _load_newest_state(job, model, opt, sched)
        _barrier(job)
    start = 0 if info is None else info.step
    if job.rank0:  # drop log lines past the resumed step
        log = [r for r in ck.read_train_log(job.run_dir) if r["step"] <= start] if start else []
        ck.write_train_log(job.run_dir, log)
        if start:
            print(f"resuming {job.run_dir} from step {start}", file=sys.stderr)
    return start


def wrap_for_steps(job: Job, model: Any) -> Any:
    """The module the steps run: DDP averages gradients over ranks; compile wraps that."""
    step_model = model
    if job.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(
            model, device_ids=[job.local_rank] if job.device.type == "cuda" else None
        )
    if job.cfg.train.compile and job.device.type == "cuda":
        step_model = torch.compile(step_model)
    return step_model


# --- one step ----------------------------------------------------------------------------
def _ce_sum(model: Any, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the non-pad targets of ids[:, 1:], and their count."""
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[targets == pad_id] = -100
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
    )
    return loss, int((targets != -100).sum())


def forward_backward(
    model: Any,
    batch: torch.Tensor,
    pad_id: int,
    grad_accum: int = 1,
    rank: int = 0,
    world: int = 1,
    amp: Any = nullcontext,
    scaler: Any = None,
) -> torch.Tensor:
    """Forward and backward of one optimiser step; returns this rank's share of the mean loss.

    `batch` is the step's global [B, T + 1] ids; this rank takes its B / world sequences in
    `grad_accum` micro-batches. Gradients accumulate in `.grad` as those of the step's mean
    loss over all non-pad targets, whatever the split (DDP averages the ranks' gradients).
    """
    n_targets = int((batch[:, 1:] != pad_id).sum())  # global count: exact mean loss
    per_rank = batch.size(0) // world
    device = next(model.parameters()).device
    mine = batch[rank * per_rank : (rank + 1) * per_rank].to(device, non_blocking=True)
    micro = per_rank // grad_accum
    loss_share = torch.zeros((), device=device)
    for k in range(grad_accum):
        last = k == grad_accum - 1
        sync = nullcontext() if last or world == 1 else model.no_sync()
        with sync, amp():
            s, _ = _ce_sum(model, mine[k * micro : (k + 1) * micro], pad_id)
            loss = s * world / max(n_targets, 1)  # DDP divides by world again
        (scaler.scale(loss) if scaler else loss).backward()
        loss_share += loss.detach() / world
    return loss_share


def train_step(
    job: Job, step_model: Any, opt: Any, sched: Any, batch: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, float]:
    """One optimiser update on the step's global batch; (this rank's loss share, its lr)."""
    t, scaler = job.cfg.train, job.scaler
    loss = forward_backward(
        step_model, batch, pad_id, t.grad_accum, job.rank, job.world, job.amp, scaler
    )
    if scaler:
        scaler.unscale_(opt)
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), t.grad_clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    lr = sched.get_last_lr()[0]
    sched.step()
    return loss, lr


@torch.no_grad()
def evaluate(model: Any, heldout: dict[str, torch.Tensor], pad_id: int, amp: Any) -> dict:
    """Mean held-out cross-entropy per language."""
    was_training = model.training
    model.eval()
    out = {}
    for lang, ids in heldout.items():
        total, count = 0.0, 0
        for chunk in ids.split(16):
            with amp():
                s, n = _ce_sum(model, chunk, pad_id)
            total, count = total + float(s), count + n
        out[lang] = total / max(count, 1)
    model.train(was_training)
    return out


def save_checkpoint(
    job: Job, model: Any, opt: Any, sched: Any, step: int, loss: float | None, meta: dict
) -> None:
    """Rank 0 writes checkpoint `step` with the state that resumes training from it."""
    if not job.rank0:
        return
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": job.scaler.state_dict() if job.scaler else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    meta = {
        **meta,
        "loss": loss,
        "tokenizer": "../../tokenizer",
        "probekit_version": _version(),
    }
    ck.save_checkpoint(model, job.ckpt_dir, step, meta, state, job.cfg.checkpoints.keep_state)


class LossMeter:
    """Training loss, tokens and time since the last log line (the mean is over ranks)."""

    def __init__(self, device: torch.device):
        self.loss, self.steps, self.tokens, self.seconds = torch.zeros((), device=device), 0, 0, 0.0

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def read(self, world: int) -> tuple[float, float]:
        """(mean loss, tokens per second) since the last read; waits for the device."""
        if world > 1:  # every rank's loss is its share of the global mean
            import torch.distributed as dist

            dist.all_reduce(self.loss)
        mean, tok_s = float(self.loss) / self.steps, self.tokens / max(self.seconds, 1e-9)
        self.loss.zero_()
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        return mean, tok_s


# --- the loop ----------------------------------------------------------------------------
def train(
    config: str | Path | dict | RunConfig,
    out: str | Path,
    max_steps: int | None = None,
    device: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    progress: bool = True,
    data: Any = None,
) -> Path:
    """Train a run into `out` (RUN_DIR) and return it; resumes an interrupted run.

    max_steps stops early (the LR schedule still follows the full budget); device
    overrides train.device for this process only; `data` replaces prepare_run_data
    (tests, benchmarks).
    """
    cfg = load_config(config, overrides)
    steady_heap()  # every step frees and reallocates the same buffers: keep them mapped
    job = setup(cfg, Path(out), device)
    run_dir, steps, B, T = job.run_dir, cfg.train.steps, cfg.train.batch_size, cfg.model.context
    if job.rank0:
        prepare_run_dir(cfg, run_dir, force)
    _barrier(job)
    if steps in _steps_done(job.ckpt_dir):
        if job.rank0:
            print(f"run already complete: {run_dir} (step {steps})", file=sys.stderr)
        return run_dir
    data = data if data is not None else load_data(job)
    langs, plan = list(data.languages), checkpoint_plan(cfg)

    model, opt, sched = init_model(job, data.model_vocab_size)
    start = resume(job, model, opt, sched)
    stop = steps if max_steps is None else min(steps, start + max_steps)
    stream = data.stream(steps * B, T)
    if job.rank0 and start == 0:
        _announce_mix(stream, steps * B, langs, progress)
    lang_tokens = stream.language_counts(start * B).astype(np.int64) * T
    heldout = {
        lang: torch.as_tensor(data.heldout(lang, cfg.eval.n_sequences, T), device=job.device)
        for lang in langs
    }

    def tokens_seen(step: int) -> dict:
        return {
            "tokens": step * B * T,
            "tokens_per_language": dict(zip(langs, lang_tokens.tolist(), strict=True)),
        }

    def log_eval(step: int) -> None:
        evals = evaluate(model, heldout, data.pad_id, job.amp)
        ck.append_train_log(run_dir, {"step": step, "eval": evals})

    if start == 0:
        if job.rank0:
            log_eval(0)
        save_checkpoint(job, model, opt, sched, 0, None, {**tokens_seen(0), "sequences": 0})

    step_model = wrap_for_steps(job, model)
    bar = _progress_bar(start, stop) if progress and job.rank0 else None
    meter = LossMeter(job.device)
    model.train()
    for step in range(start, stop):
        t0 = time.perf_counter()
        ids, step_langs = stream.sequences(step * B, B)  # every rank reads the whole step
        loss, lr = train_step(job, step_model, opt, sched, torch.from_numpy(ids), data.pad_id)
        lang_tokens += np.bincount(step_langs, minlength=len(langs)) * T
        meter.add(loss, B * T)
        done = step + 1
        if done % cfg.eval.log_interval == 0 or done == stop or done in plan:
            meter.seconds += time.perf_counter() - t0  # before read(), which waits for the device
            mean_loss, tok_s = meter.read(job.world)
            if job.rank0:
                record = {"step": done, **tokens_seen(done), "lr": lr, "loss": mean_loss}
                ck.append_train_log(run_dir, {**record, "tok_per_s": round(tok_s, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        else:
            meter.seconds += time.perf_counter() - t0
        if job.rank0 and (done % cfg.eval.interval == 0 or done == steps):
            log_eval(done)
        if done in plan:
            meta = {**tokens_seen(done), "sequences": done * B}
            save_checkpoint(job, model, opt, sched, done, mean_loss, meta)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _barrier(job)
    return run_dir


def _announce_mix(stream: Any, n_sequences: int, langs: list[str], progress: bool) -> None:
    """Warn when the corpus repeats; print the language shares over the whole run."""
    if warning := stream.repeat_warning(n_sequences):
        print(f"warning: {warning}", file=sys.stderr)
    if len(langs) > 1 and progress:  # the real share, schedules included
        shares = stream.language_counts(n_sequences) / n_sequences
        mix = ", ".join(f"{lang} {x:.1%}" for lang, x in zip(langs, shares, strict=True))
        print(f"language shares over the run: {mix}", file=sys.stderr)


def _progress_bar(start: int, stop: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True)

"""The trainer: config in, checkpoint series out. Read it top to bottom at one sitting.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from probekit import checkpoints as ck
from probekit.errors import ConfigError, RunDirError

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 20,  # sequences per optimiser step, global (all ranks, all micro-batches)
    "grad_accum": 1,
    "tokens": 0,  # token budget; 0: use `steps`
    "steps": 0,  # optimiser steps; 0 and tokens 0: 1000
    "lr": 2e-3,
    "warmup_steps": None,  # None: 5 % of steps, at least 1
    "min_lr_frac": 0.01,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.0,
    "grad_clip": 0.0,  # 0: off (the paper clips nothing)
    "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    "compile": False,
    "device": "auto",  # auto | cpu | cuda
}
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "log_spaced": 6,  # log-spaced checkpoints before the first regular one
    "every": None,  # None: steps // 8
    "steps": [],  # explicit steps; replace log_spaced/every
    "keep_state": 2,  # newest checkpoints that keep optimiser/RNG state (for resume)
}
EVAL_DEFAULTS: dict[str, Any] = {
    "interval": None,  # None: steps // 10
    "n_sequences": 16,  # held-out sequences per language
    "log_interval": None,  # None: steps // 100
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


# --- config ----------------------------------------------------------------------------
def _section(defaults: dict, given: Any, name: str) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"{name}: expected a table")
    for key in given:
        if key not in defaults:
            raise ConfigError(f"{name}.{key}: unknown field (known: {', '.join(defaults)})")
    out = dict(defaults)
    # dump_config writes None as "", so "" reads back as "not set"
    out.update({k: (None if v == "" else v) for k, v in given.items()})
    return out


def _int(value: Any, field: str, lo: int = 0) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # tokens = 1.2e9 reads as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{field}: expected an integer >= {lo}, got {value!r}")
    return value


def _num(value: Any, field: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{field}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def validate_train_sections(cfg: dict) -> dict:
    """Fill and check [train], [checkpoints], [eval]; derived values are written out so
    config.toml is the complete recipe. Needs cfg['model'] already resolved."""
    t = _section(TRAIN_DEFAULTS, cfg.get("train", {}), "train")
    c = _section(CHECKPOINT_DEFAULTS, cfg.get("checkpoints", {}), "checkpoints")
    e = _section(EVAL_DEFAULTS, cfg.get("eval", {}), "eval")
    context = cfg["model"]["context"]
    t["batch_size"] = _int(t["batch_size"], "train.batch_size", 1)
    t["grad_accum"] = _int(t["grad_accum"], "train.grad_accum", 1)
    if t["batch_size"] % t["grad_accum"]:
        raise ConfigError(
            f"train.grad_accum: {t['grad_accum']} does not divide "
            f"train.batch_size = {t['batch_size']}"
        )
    per_step = t["batch_size"] * context
    tokens, steps = _int(t["tokens"], "train.tokens"), _int(t["steps"], "train.steps")
    if tokens and steps and steps != math.ceil(tokens / per_step):
        raise ConfigError(
            f"train.steps: {steps} conflicts with train.tokens = {tokens} "
            f"({math.ceil(tokens / per_step)} steps of {per_step} tokens); set one of them"
        )
    steps = steps or (math.ceil(tokens / per_step) if tokens else 1000)
    t["steps"], t["tokens"] = steps, steps * per_step
    t["lr"] = _num(t["lr"], "train.lr", 0.0, 10.0)
    if t["warmup_steps"] is None:
        t["warmup_steps"] = max(1, round(0.05 * steps))
    t["warmup_steps"] = _int(t["warmup_steps"], "train.warmup_steps", 0)
    t["min_lr_frac"] = _num(t["min_lr_frac"], "train.min_lr_frac", 0.0, 1.0)
    betas = t["betas"]
    if not isinstance(betas, list | tuple) or len(betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers, got {betas!r}")
    t["betas"] = [_num(b, "train.betas", 0.0, 0.999999) for b in betas]
    t["eps"] = _num(t["eps"], "train.eps", 0.0, 1.0)
    t["weight_decay"] = _num(t["weight_decay"], "train.weight_decay", 0.0, 10.0)
    t["grad_clip"] = _num(t["grad_clip"], "train.grad_clip", 0.0)
    if t["precision"] not in PRECISIONS:
        raise ConfigError(
            f"train.precision: unknown precision {t['precision']!r} "
            f"(known: {', '.join(PRECISIONS)})"
        )
    if not isinstance(t["compile"], bool):
        raise ConfigError(f"train.compile: expected true or false, got {t['compile']!r}")
    if t["device"] not in DEVICES:
        raise ConfigError(
            f"train.device: unknown device {t['device']!r} (known: {', '.join(DEVICES)})"
        )
    c["log_spaced"] = _int(c["log_spaced"], "checkpoints.log_spaced")
    c["every"] = _int(
        max(1, steps // 8) if c["every"] is None else c["every"], "checkpoints.every", 1
    )
    if not isinstance(c["steps"], list):
        raise ConfigError(f"checkpoints.steps: expected a list of steps, got {c['steps']!r}")
    c["steps"] = sorted({_int(s, "checkpoints.steps") for s in c["steps"]})
    c["keep_state"] = _int(c["keep_state"], "checkpoints.keep_state", 1)
    e["interval"] = _int(
        max(1, steps // 10) if e["interval"] is None else e["interval"], "eval.interval", 1
    )
    e["n_sequences"] = _int(e["n_sequences"], "eval.n_sequences")
    e["log_interval"] = _int(
        max(1, steps // 100) if e["log_interval"] is None else e["log_interval"],
        "eval.log_interval",
        1,
    )
    return {**cfg, "train": t, "checkpoints": c, "eval": e}


def checkpoint_plan(cfg: dict) -> list[int]:
    """Steps that get a checkpoint: 0, log-spaced early ones, every `every`, and the last."""
    steps, c = cfg["train"]["steps"], cfg["checkpoints"]
    plan = {0, steps}
    if c["steps"]:
        plan |= {s for s in c["steps"] if s <= steps}
    else:
        every = c["every"]
        if c["log_spaced"]:  # geometric between 1 and the first regular checkpoint
            plan |= {int(round(x)) for x in np.geomspace(1, every, c["log_spaced"] + 1)[:-1]}
        plan |= set(range(every, steps + 1, every))
    return sorted(s for s in plan if 0 <= s <= steps)


def lr_factor(step: int, steps: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up to 1, then cosine to min_frac at the last update (index steps - 1)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# --- run directory ---------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("probekit")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


def _prepare_run_dir(cfg: dict, run_dir: Path, force: bool) -> None:
    """Refuse a RUN_DIR that holds another config; with force, clear the old run."""
    from probekit.config import RESULT_SECTIONS, config_fingerprint, diff_fields, load_config

    old_file = run_dir / "config.toml"
    if old_file.is_file():
        try:
            old = load_config(old_file)
        except ConfigError:
            old = None
        if old is None or config_fingerprint(old) != config_fingerprint(cfg):
            if not force:
                fields = (
                    diff_fields(
                        {k: old[k] for k in RESULT_SECTIONS}, {k: cfg[k] for k in RESULT_SECTIONS}
                    )
                    if old
                    else ["config.toml (unreadable)"]
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
    from probekit.config import dump_config

    text = f"# written by probekit {_version()}\n" + dump_config(cfg)
    tmp = old_file.with_name("config.toml.tmp")
    tmp.write_text(text)
    os.replace(tmp, old_file)


# --- devices, DDP ------------------------------------------------------------------------
def _resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: CUDA requested but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if requested not in DEVICES:
        raise ConfigError(f"train.device: unknown device {requested!r}")
    return torch.device("cpu")


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); starts a process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _steps_done(ckpt_dir: Path) -> set[int]:
    try:
        return {i.step for i in ck.list_checkpoints(ckpt_dir)}
    except RunDirError:  # no checkpoints yet
        return set()


# --- resume ----------------------------------------------------------------------------
def _try_resume(model: Any, opt: Any, sched: Any, scaler: Any, ckpt_dir: Path, rank0: bool):
    """Load the newest checkpoint that has a readable state; returns its info or None.
    A corrupt one is renamed to .corrupt-step_N (never silently deleted)."""
    from safetensors.torch import load_file

    try:
        infos = [i for i in ck.list_checkpoints(ckpt_dir) if i.has_state]
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
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
            return info
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the one before
            if rank0:
                bad = info.path.with_name(f".corrupt-{info.path.name}")
                shutil.rmtree(bad, ignore_errors=True)
                info.path.rename(bad)
                print(
                    f"warning: checkpoint {info.path.name} is unreadable "
                    f"({type(exc).__name__}); moved to {bad.name}, resuming from an earlier one",
                    file=sys.stderr,
                )
    return None


# --- the loop ----------------------------------------------------------------------------
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


def train(
    config: str | Path | dict,
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
    from probekit.config import load_config
    from probekit.training.model import build_model

    cfg = load_config(config, overrides)
    run_dir = Path(out)
    t, c, e = cfg["train"], cfg["checkpoints"], cfg["eval"]
    rank, world, local_rank = _init_distributed()
    rank0 = rank == 0
    dev = _resolve_device(device or t["device"], local_rank)
    precision = t["precision"]
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError("train.precision: fp16 needs CUDA (use bf16 or fp32 on CPU)")
    steps, B, T = t["steps"], t["batch_size"], cfg["model"]["context"]
    if B % (world * t["grad_accum"]):
        raise ConfigError(
            f"train.batch_size: {B} is not divisible by ranks x grad_accum = "
            f"{world} x {t['grad_accum']}"
        )
    ckpt_dir = run_dir / "checkpoints"
    if rank0:
        _prepare_run_dir(cfg, run_dir, force)
        for tmp in ckpt_dir.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier(world)
    plan = checkpoint_plan(cfg)
    if steps in _steps_done(ckpt_dir):
        if rank0:
            print(f"run already complete: {run_dir} (step {steps})", file=sys.stderr)
        return run_dir

    if data is None:
        from probekit.data import prepare_run_data

        if rank0:  # rank 0 builds the tokenizer; the others load it
            data = prepare_run_data(cfg, run_dir)
        _barrier(world)
        if not rank0:
            data = prepare_run_data(cfg, run_dir)
    langs = list(data.languages)

    # model, optimiser, schedule: seeded so two runs with one seed are identical
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    model = build_model(cfg["model"], data.model_vocab_size).to(dev)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t["lr"],
        betas=tuple(t["betas"]),
        eps=t["eps"],
        weight_decay=t["weight_decay"],
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, t["warmup_steps"], t["min_lr_frac"])
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    start = 0
    info = None
    for turn in (True, False):  # rank 0 first: it alone renames a corrupt checkpoint aside
        if rank0 == turn:
            info = _try_resume(model, opt, sched, scaler, ckpt_dir, rank0)
        _barrier(world)
    if info is not None:
        start = info.step
        if rank0:
            print(f"resuming {run_dir} from step {start}", file=sys.stderr)
            ck.write_train_log(
                run_dir, [r for r in ck.read_train_log(run_dir) if r["step"] <= start]
            )
    elif rank0:
        ck.write_train_log(run_dir, [])
    stop = steps if max_steps is None else min(steps, start + max_steps)

    stream = data.stream(steps * B, T)
    if rank0 and start == 0:
        if warning := stream.repeat_warning(steps * B):
            print(f"warning: {warning}", file=sys.stderr)
        if len(langs) > 1 and progress:  # the real share, schedules included
            shares = stream.language_counts(steps * B) / (steps * B)
            mix = ", ".join(f"{lang} {x:.1%}" for lang, x in zip(langs, shares, strict=True))
            print(f"language shares over the run: {mix}", file=sys.stderr)
    lang_tokens = stream.language_counts(start * B).astype(np.int64) * T
    heldout = {
        lang: torch.as_tensor(data.heldout(lang, e["n_sequences"], T), device=dev) for lang in langs
    }

    def meta(step: int, loss: float | None) -> dict:
        return {
            "tokens": step * B * T,
            "tokens_per_language": dict(zip(langs, lang_tokens.tolist(), strict=True)),
            "sequences": step * B,
            "loss": loss,
            "tokenizer": "../../tokenizer",
            "probekit_version": _version(),
        }

    def save(step: int, loss: float | None) -> None:
        if not rank0:
            return
        state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }
        ck.save_checkpoint(model, ckpt_dir, step, meta(step, loss), state, c["keep_state"])

    if start == 0:
        if rank0:
            ck.append_train_log(
                run_dir, {"step": 0, "eval": evaluate(model, heldout, data.pad_id, amp)}
            )
        save(0, None)  # no loss before the first update

    # DDP averages gradients over ranks; torch.compile wraps the (DDP) module
    step_model: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(
            model, device_ids=[local_rank] if dev.type == "cuda" else None
        )
    if t["compile"] and dev.type == "cuda":
        step_model = torch.compile(step_model)

    bar = None
    if progress and rank0:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    loss_acc, n_acc, t_train, tok_acc = torch.zeros((), device=dev), 0, 0.0, 0
    for step in range(start, stop):
        t0 = time.perf_counter()
        # all ranks read the step, each uses its slice
        ids_np, lang_np = stream.sequences(step * B, B)
        loss_acc += forward_backward(
            step_model,
            torch.from_numpy(ids_np),
            data.pad_id,
            t["grad_accum"],
            rank,
            world,
            amp,
            scaler,
        )
        if scaler:
            scaler.unscale_(opt)
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        lang_tokens += np.bincount(lang_np, minlength=len(langs)) * T
        n_acc, tok_acc = n_acc + 1, tok_acc + B * T
        done_steps = step + 1
        last_step = done_steps == stop
        needs_loss = done_steps % e["log_interval"] == 0 or last_step or done_steps in plan
        if needs_loss:
            if world > 1:  # every rank's loss is its share of the global mean
                import torch.distributed as dist

                dist.all_reduce(loss_acc)
            t_train += time.perf_counter() - t0  # .item() below waits for the device
            mean_loss = float(loss_acc) / n_acc
            tok_s = tok_acc / max(t_train, 1e-9)
            if rank0:
                ck.append_train_log(
                    run_dir,
                    {
                        "step": done_steps,
                        "tokens": done_steps * B * T,
                        "tokens_per_language": dict(zip(langs, lang_tokens.tolist(), strict=True)),
                        "lr": lr,
                        "loss": mean_loss,
                        "tok_per_s": round(tok_s, 1),
                    },
                )
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            loss_acc.zero_()
            n_acc, tok_acc, t_train = 0, 0, 0.0
        else:
            t_train += time.perf_counter() - t0
        if rank0 and (done_steps % e["interval"] == 0 or done_steps == steps):
            ck.append_train_log(
                run_dir, {"step": done_steps, "eval": evaluate(model, heldout, data.pad_id, amp)}
            )
        if done_steps in plan:
            save(done_steps, mean_loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _barrier(world)
    return run_dir

"""Trainer tests: tiny CPU runs (nano preset) on a small synthetic English corpus."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_then_kill
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from probekit.checkpoints import list_checkpoints, read_train_log
from probekit.config import dump_config, load_config
from probekit.data.vocab import PAD_ID
from probekit.errors import ConfigError, RunDirError
from probekit.training import PRESETS, train, trainer
from probekit.training.trainer import _ce_sum, checkpoint_plan, forward_backward, lr_factor

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny models: threads only contend (and CI has 2 cores)


def _write_corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = (
        "the of and to in a is that he was for it with as his on be at by this had not are "
        "but from or have an they which one you were her all she there would their we him "
        "been has when who will more no if out so said what up its about into than them can"
    ).split()
    paras = [
        " ".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + "."
            for _ in range(rng.randint(2, 6))
        )
        for _ in range(400)
    ]
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "en.txt")


def make_cfg(corpus: Path, steps: int = 30, **train_kw) -> dict:
    return {
        "seed": 0,
        "data": {"mode": "clone", "base": "en", "sources": {"en": [str(corpus)]}, "p": 0.3},
        "tokenizer": {"vocab_size": 300},
        "model": {"preset": "nano"},
        "train": {"steps": steps, "batch_size": 8, **train_kw},
        "eval": {"n_sequences": 4},
    }


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One uninterrupted 30-step run that several tests compare against."""
    torch.set_num_threads(1)  # as the killed child: bitwise equality needs one reduction order
    return train(make_cfg(corpus), tmp_path_factory.mktemp("ref") / "run", progress=False)


def test_run_writes_planned_checkpoints_loadable_by_transformers(reference):
    cfg = load_config(reference / "config.toml")
    infos = list_checkpoints(reference)
    assert [i.step for i in infos] == checkpoint_plan(cfg)
    assert infos[0].step == 0 and infos[-1].step == 30
    for info in infos:
        model = AutoModelForCausalLM.from_pretrained(info.path, local_files_only=True)
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
        assert info.tokens == info.step * 8 * 64
        assert sum(info.tokens_per_language.values()) == info.tokens
    # optimiser state only on the newest keep_state (2) checkpoints
    assert [i.step for i in infos if i.has_state] == [i.step for i in infos[-2:]]


def test_train_log_has_losses_and_heldout_loss_per_language(reference):
    log = read_train_log(reference)
    evals = [r for r in log if "eval" in r]
    steps = [r for r in log if "loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert all(set(r["eval"]) == {"EN1", "EN2"} for r in evals)
    assert evals[-1]["eval"]["EN1"] < evals[0]["eval"]["EN1"]  # it learns
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(
        r.keys() >= {"tokens", "tokens_per_language", "lr", "loss", "tok_per_s"} for r in steps
    )


def test_same_seed_gives_identical_runs(reference, corpus, tmp_path):
    again = train(make_cfg(corpus), tmp_path / "run", progress=False)
    assert_same(weights(reference, 30), weights(again, 30))


def test_finished_run_is_not_retrained(reference, corpus, capsys):
    before = (reference / "checkpoints" / "step_000030" / "model.safetensors").stat().st_mtime_ns
    train(make_cfg(corpus), reference, progress=False)
    assert "run already complete" in capsys.readouterr().err
    after = (reference / "checkpoints" / "step_000030" / "model.safetensors").stat().st_mtime_ns
    assert before == after


def test_different_config_in_same_run_dir_is_refused(reference, corpus, tmp_path):
    with pytest.raises(RunDirError, match=r"train\.lr differs.*--force"):
        train(make_cfg(corpus, lr=1e-3), reference, progress=False)
    # --force clears the old run and starts again
    run = tmp_path / "run"
    train(make_cfg(corpus, steps=4), run, progress=False)
    train(make_cfg(corpus, steps=3), run, progress=False, force=True)
    assert [i.step for i in list_checkpoints(run)][-1] == 3


def test_kill_9_then_resume_matches_uninterrupted_run(reference, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    # slow the child down (eval + log every step) so it is surely killed mid-way
    train_then_kill(make_cfg(corpus), run, ["eval.interval=1"])
    ckpts = run / "checkpoints"
    assert not (ckpts / "step_000030").exists()
    capsys.readouterr()
    torch.set_num_threads(1)
    train(make_cfg(corpus), run, progress=False, overrides=["eval.interval=1"])
    assert "resuming" in capsys.readouterr().err  # not a silent restart from step 0
    assert_same(weights(reference, 30), weights(run, 30))
    steps = [r["step"] for r in read_train_log(run) if "loss" in r]
    assert steps == list(range(1, 31))  # lines past the resumed step were dropped


def test_max_steps_then_resume_with_corrupt_newest_checkpoint(reference, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(corpus), run, max_steps=12, progress=False)
    assert (run / "checkpoints" / "step_000012").is_dir()
    assert not (run / "checkpoints" / "step_000015").exists()
    (run / "checkpoints" / "step_000012" / "model.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    train(make_cfg(corpus), run, progress=False)
    err = capsys.readouterr().err
    assert "step_000012" in err and "warning" in err and "from step 9" in err
    assert (run / "checkpoints" / ".corrupt-step_000012").is_dir()
    assert_same(weights(reference, 30), weights(run, 30))  # schedule unchanged by max_steps


def test_config_errors(corpus):
    with pytest.raises(ConfigError, match=r"model\.preset: unknown preset 'huge'"):
        load_config({**make_cfg(corpus), "model": {"preset": "huge"}})
    with pytest.raises(ConfigError, match=r"model\.n_head"):
        load_config({**make_cfg(corpus), "model": {"preset": "nano", "n_head": 3}})
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(make_cfg(corpus, precision="fp8"))
    with pytest.raises(ConfigError, match=r"train\.steps: .* conflicts"):
        load_config(make_cfg(corpus, tokens=10**6))
    with pytest.raises(ConfigError, match=r"train\.grad_accum"):
        load_config(make_cfg(corpus, grad_accum=3))


@pytest.mark.parametrize("field", ["tokens", "steps"])
def test_zero_budget_is_an_error_and_unset_means_1000_steps(corpus, field, tmp_path):
    cfg = make_cfg(corpus)
    cfg["train"] = {field: 0}  # today's "0 = unset" trained 1,000 steps without a word
    with pytest.raises(ConfigError, match=rf"^train\.{field}: expected an integer >= 1, got 0$"):
        load_config(cfg)
    cfg["train"] = {}
    resolved = load_config(cfg)
    assert resolved.train.steps == 1000 and resolved.train.tokens == 1000 * 20 * 64
    (tmp_path / "c.toml").write_text(dump_config(resolved))
    assert "\ntokens = 1280000\nsteps = 1000\n" in (tmp_path / "c.toml").read_text()
    assert load_config(tmp_path / "c.toml") == resolved  # both written: read back unchanged


def test_config_imports_neither_training_nor_data():
    code = (
        "import sys, probekit.config\n"
        "bad = [m for m in sys.modules if m.startswith(('probekit.training', 'probekit.data'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(corpus, tmp_path):
    with pytest.raises(ConfigError, match="CUDA requested but no CUDA device"):
        train(make_cfg(corpus), tmp_path / "run", device="cuda", progress=False)


def test_presets_and_schedule():
    assert set(PRESETS) == {"nano", "tiny", "cpu", "mini", "small", "medium"}
    assert PRESETS["small"] == dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, context=512)
    f = [lr_factor(s, 100, 5, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == 1.0 and f[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    cfg = load_config({"train": {"steps": 1000}})
    plan = checkpoint_plan(cfg)
    assert plan[:7] == [0, 1, 2, 5, 11, 25, 56] and plan[-1] == 1000 and 125 in plan


U = 2.0**-24  # float32 unit roundoff


def grad_mismatches(got: dict, want: dict, n_terms: int) -> list[str]:
    """Parameter tensors whose gradients differ by more than regrouping a float32 sum allows.

    Every gradient element is a sum over the step's n_terms target positions. One batch,
    micro-batches, DDP ranks or another sequence order only regroup that sum (and let the
    kernels block it differently), which moves it by at most about n·u·Σ|terms| (u = 2^-24;
    Higham, Accuracy and Stability of Numerical Algorithms, §4.2). The tensor's largest
    gradient stands in for the summand scale: atol = n·u·max|g| per tensor. Measured
    differences stay below 0.05 of that (Xeon AVX-512 + MKL, 1 and 2 threads); leaving out a
    micro-batch or a rank's average exceeds it over 1,000-fold. Gradients are compared, not
    weights after AdamW: Adam's step m/(sqrt(v)+eps) is about ±lr whatever the gradient's size,
    so a rounding difference in a near-zero gradient (a rarely seen embedding row) becomes a
    difference of order lr in the weight (issue 18).
    """
    assert got.keys() == want.keys()
    bad = []
    for name, g in want.items():
        atol = n_terms * U * max(g.abs().max().item(), got[name].abs().max().item())
        if not torch.allclose(got[name], g, rtol=0.0, atol=atol):
            bad.append(name)
    return bad


def capture_first_step(out: dict):
    """A trainer.forward_backward that records, at its first call, the model before the step
    (a copy), the step's batch and the gradients it leaves (DDP-averaged under torchrun)."""

    def wrapper(model, batch, *args, **kwargs):
        if "grads" in out:
            return forward_backward(model, batch, *args, **kwargs)
        out["model"] = copy.deepcopy(getattr(model, "module", model))
        loss = forward_backward(model, batch, *args, **kwargs)
        out["batch"] = batch.clone()
        out["grads"] = {
            n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()
        }
        return loss

    return wrapper


def first_step(cfg: dict, run: Path, monkeypatch) -> dict:
    """Train `cfg` into `run` in this process; the first step's model, batch and gradients."""
    out: dict = {}
    monkeypatch.setattr(trainer, "forward_backward", capture_first_step(out))
    train(cfg, run, progress=False)
    return out


def grads_of(model, compute) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    compute(model)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_grad_accum_matches_one_batch(corpus, tmp_path, monkeypatch):
    one = first_step(make_cfg(corpus, steps=1), tmp_path / "one", monkeypatch)
    accum = first_step(make_cfg(corpus, steps=1, grad_accum=2), tmp_path / "accum", monkeypatch)
    batch, model, pad = one["batch"], one["model"], PAD_ID
    assert torch.equal(batch, accum["batch"])
    n_terms = batch[:, 1:].numel()
    assert grad_mismatches(accum["grads"], one["grads"], n_terms) == []
    # the same sum in another order: sequences permuted, four micro-batches
    perm = batch[torch.randperm(len(batch), generator=torch.Generator().manual_seed(1))]
    permuted = grads_of(model, lambda m: forward_backward(m, perm, pad, grad_accum=4))
    assert grad_mismatches(permuted, one["grads"], n_terms) == []

    # a broken accumulation fails the same check: the second micro-batch left out
    def drop_second_micro_batch(m):
        s, _ = _ce_sum(m, batch[: len(batch) // 2], pad)
        (s / int((batch[:, 1:] != pad).sum())).backward()

    dropped = grads_of(model, drop_second_micro_batch)
    assert grad_mismatches(dropped, one["grads"], n_terms) != []


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(corpus, tmp_path, monkeypatch):
    """torchrun --nproc_per_node=2 (gloo) gives the single-process gradients up to float order."""
    cfg = make_cfg(corpus, steps=2)
    single = first_step(cfg, tmp_path / "single", monkeypatch)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist; torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_trainer import capture_first_step, trainer\n"
        "out = {}\n"
        "trainer.forward_backward = capture_first_step(out)\n"
        f"trainer.train({cfg!r}, sys.argv[1], progress=False)\n"
        "torch.save({'batch': out['batch'], 'grads': out['grads']},"
        " f'{sys.argv[2]}/grads_{dist.get_rank()}.pt')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port: parallel test sessions must not collide
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "ddp"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    assert [i.step for i in list_checkpoints(tmp_path / "ddp")][-1] == 2
    batch, model, pad = single["batch"], single["model"], PAD_ID
    n_terms = batch[:, 1:].numel()
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"grads_{rank}.pt", weights_only=True)
        assert torch.equal(ddp["batch"], batch)  # every rank reads the whole step
        assert grad_mismatches(ddp["grads"], single["grads"], n_terms) == []
    # the step-1 loss (before any update) is the all-reduced mean over both ranks
    losses = [
        [r["loss"] for r in read_train_log(run) if r["step"] == 1 and "loss" in r][0]
        for run in (tmp_path / "single", tmp_path / "ddp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=n_terms * U, abs=0)
    # the same sum in another order: sequences permuted, so the ranks hold other halves
    perm = batch[torch.randperm(len(batch), generator=torch.Generator().manual_seed(1))]
    permuted = grads_of(model, lambda m: forward_backward(m, perm, pad))
    assert grad_mismatches(ddp["grads"], permuted, n_terms) == []
    # a rank whose gradient is not averaged fails the same check
    unaveraged = grads_of(model, lambda m: forward_backward(m, batch, pad, rank=0, world=2))
    assert grad_mismatches(unaveraged, single["grads"], n_terms) != []


def test_gpt2_configs_keep_their_text_and_fingerprint():
    """model.arch (issue 16) is written only when it is not gpt2: configs and run directories
    written before it existed keep their config.toml text and fingerprint."""
    from probekit.config import config_fingerprint

    cfg = load_config(ROOT / "examples" / "clone_90_10.toml")
    assert config_fingerprint(cfg) == "6fd1432996a7c446"  # the fingerprint before issue 16
    assert "arch" not in dump_config(cfg)
    assert load_config({"model": {"arch": "gpt2"}}).to_dict() == load_config({}).to_dict()
    for path in sorted((ROOT / "examples").glob("*.toml")):
        raw = path.read_text()
        if "[grid]" in raw:
            continue
        cfg = load_config(path)  # every example loads
        assert ("arch" in dump_config(cfg)) == (cfg.model.arch != "gpt2"), path.name

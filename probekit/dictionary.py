"""A compact TopK sparse autoencoder (a feature dictionary) of probekit's own.

Architecture (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): inputs are
divided by a per-dictionary ``scale`` (their RMS norm over sqrt(d), so that a dictionary
warm-started at the next checkpoint sees inputs of the same size), a pre-encoder bias
``b_pre`` is subtracted, ``pre = W_enc (x - b_pre) + b_enc``, the k largest of ``relu(pre)``
are kept (the codes), and ``x_hat = (codes @ W_dec + b_pre) * scale``. Decoder rows are unit
norm: renormalised after every Adam step, and the gradient parallel to each row is removed
before it. Dead latents (no firing in ``dead_tokens`` training tokens) get the AuxK loss: the
top ``aux_k`` dead latents reconstruct the main reconstruction's residual, weighted 1/32.

Training streams: the caller hands ``fit_chunk`` one chunk of activations at a time (one
forward of a batch of sequences), which is shuffled with the trainer's own seeded generator
and consumed in minibatches until ``steps`` Adam steps are taken; nothing is kept between
chunks but the parameters and their Adam state. On one CPU the result is a deterministic
function of the seed, the initial dictionary and the chunks.

Why our own and not a library (evaluated for issue 28, December 2026): `sae-lens` 6.54
requires transformer-lens < 4 (probekit reads activations with TransformerLens 4's
TransformerBridge); `dictionary-learning` 0.1.0 on PyPI pins nnsight < 0.4 and pulls wandb,
umap-learn and circuitsvis; `eai-sparsify` 1.3.3 installs, but its trainer hooks HF modules
itself and reads a `datasets` stream, and its `SparseCoder` would bring natsort,
schedulefree and simple-parsing for ~60 lines of TopK arithmetic. None stores per-checkpoint
dictionaries with a warm start and identity matching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from probekit.errors import MetricError

AUX_COEF = 1 / 32  # weight of the AuxK loss (Gao et al.)
BATCH_TOKENS = 256  # activations per Adam step
LR = 2e-3
MIN_MASS = 0.1  # a latent with less activation mass than this x the mean latent's: dead


@dataclass
class Dictionary:
    """A trained TopK dictionary: ``m`` latents over a ``d``-dimensional input."""

    w_enc: torch.Tensor  # [m, d]
    b_enc: torch.Tensor  # [m]
    w_dec: torch.Tensor  # [m, d], unit rows
    b_pre: torch.Tensor  # [d], in scaled units
    scale: torch.Tensor  # [] inputs are divided by it
    k: int

    @property
    def size(self) -> int:
        return int(self.w_dec.shape[0])

    @property
    def d(self) -> int:
        return int(self.w_dec.shape[1])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> dense codes [..., m] (k nonzero at most per row, in scaled units)."""
        return _codes(self._pre(x), self.k)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.scale - self.b_pre) @ self.w_enc.T + self.b_enc

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes @ self.w_dec + self.b_pre) * self.scale

    @torch.no_grad()
    def contribution(self, codes: torch.Tensor, feature: int) -> torch.Tensor:
        """What latent ``feature`` adds to the reconstruction: activation x decoder row."""
        return codes[..., feature, None] * self.w_dec[feature] * self.scale

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}w_enc": self.w_enc,
            f"{prefix}b_enc": self.b_enc,
            f"{prefix}w_dec": self.w_dec,
            f"{prefix}b_pre": self.b_pre,
            f"{prefix}scale": self.scale.reshape(1),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], k: int, prefix: str = "") -> Dictionary:
        try:
            return cls(
                tensors[f"{prefix}w_enc"].float(),
                tensors[f"{prefix}b_enc"].float(),
                tensors[f"{prefix}w_dec"].float(),
                tensors[f"{prefix}b_pre"].float(),
                tensors[f"{prefix}scale"].float().reshape(()),
                int(k),
            )
        except KeyError as exc:
            raise MetricError(f"stored dictionary lacks tensor {exc.args[0]!r}") from None

    def permuted(self, order: np.ndarray) -> Dictionary:
        """The same dictionary with its latents in ``order`` (latent i <- old latent order[i])."""
        idx = torch.as_tensor(order, dtype=torch.long)
        return Dictionary(
            self.w_enc[idx], self.b_enc[idx], self.w_dec[idx], self.b_pre, self.scale, self.k
        )


def _codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def check_shape(size: int, k: int) -> None:
    """One-line errors for a dictionary size or sparsity that cannot be trained."""
    for name, value in (("features_size", size), ("features_k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MetricError(f"{name}: expected an integer >= 1, got {value!r}")
    if k > size:
        raise MetricError(f"features_k: {k} active latents exceed the dictionary size {size}")


class TopKTrainer:
    """Trains one dictionary on chunks of activations handed to it one at a time."""

    def __init__(
        self,
        d: int,
        size: int,
        k: int,
        steps: int,
        seed: int = 0,
        init: Dictionary | None = None,
        lr: float = LR,
        batch: int = BATCH_TOKENS,
        aux_k: int | None = None,
        dead_tokens: int | None = None,
    ):
        check_shape(size, k)
        if init is not None and (init.size, init.d) != (size, d):
            raise MetricError(
                f"stored dictionary has {init.size} latents over {init.d} dimensions; "
                f"this analysis asks for {size} over {d}"
            )
        self.d, self.size, self.k, self.steps = d, size, k, steps
        self.batch = batch
        self.aux_k = aux_k or min(size, 4 * k)
        self.dead_tokens = dead_tokens or 8 * batch * max(1, size // (8 * k))
        self.gen = torch.Generator().manual_seed(int(seed))
        self.init = init
        self.params: dict[str, torch.Tensor] | None = None
        self.taken = 0
        self.since_fired = torch.zeros(size, dtype=torch.long)
        self.losses: list[float] = []
        self.aux_steps = 0
        self.lr = lr

    @property
    def done(self) -> bool:
        return self.taken >= self.steps

    def _start(self, x: torch.Tensor) -> None:
        # the scale is re-measured on each checkpoint's first chunk: residual norms grow with
        # training, and a warm-started dictionary should see inputs of the same size
        scale = torch.sqrt((x.double() ** 2).sum(-1).mean() / self.d).float().clamp_min(1e-8)
        if self.init is not None:
            p = {
                "w_enc": self.init.w_enc.clone(),
                "b_enc": self.init.b_enc.clone(),
                "w_dec": self.init.w_dec.clone(),
                "b_pre": self.init.b_pre.clone(),
            }
        else:
            w = torch.randn(self.size, self.d, generator=self.gen)
            w = w / w.norm(dim=1, keepdim=True)
            p = {
                "w_enc": w.clone(),
                "b_enc": torch.zeros(self.size),
                "w_dec": w,
                "b_pre": (x.float() / scale).mean(0),  # the mean, as a cheap geometric median
            }
        self.scale = scale
        self.params = {n: t.requires_grad_(True) for n, t in p.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=self.lr)

    def fit_chunk(self, x: torch.Tensor) -> None:
        """Adam steps on minibatches of this chunk [n, d] (shuffled) until the budget is spent."""
        if self.done or len(x) == 0:
            return
        x = x.detach().float()
        if self.params is None:
            self._start(x)
        order = torch.randperm(len(x), generator=self.gen)
        for lo in range(0, len(x), self.batch):
            if self.done:
                break
            self._step(x[order[lo : lo + self.batch]] / self.scale)

    def _step(self, x: torch.Tensor) -> None:
        with torch.enable_grad():  # callers read activations under no_grad
            self._grad_step(x)

    def _grad_step(self, x: torch.Tensor) -> None:
        p = self.params
        assert p is not None
        pre = (x - p["b_pre"]) @ p["w_enc"].T + p["b_enc"]
        codes = _codes(pre, self.k)
        x_hat = codes @ p["w_dec"] + p["b_pre"]
        err = x - x_hat
        var = ((x - x.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-8)
        loss = (err**2).sum(-1).mean() / var
        with torch.no_grad():
            fired = (codes > 0).any(0)
            self.since_fired += len(x)
            self.since_fired[fired] = 0
            dead = self.since_fired >= self.dead_tokens
        total = loss
        if bool(dead.any()):
            self.aux_steps += 1
            kk = min(self.aux_k, int(dead.sum()))
            aux_pre = pre.masked_fill(~dead, -math.inf)
            vals, idx = aux_pre.topk(kk, dim=-1)
            aux_codes = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            e = err.detach()
            e_hat = aux_codes @ p["w_dec"]
            aux = ((e - e_hat) ** 2).sum(-1).mean() / (e**2).sum(-1).mean().clamp_min(1e-8)
            total = loss + AUX_COEF * aux
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        with torch.no_grad():
            w, g = p["w_dec"], p["w_dec"].grad
            if g is not None:  # only the part of the gradient that keeps the rows' norm
                g -= (g * w).sum(1, keepdim=True) * w
            self.opt.step()
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.losses.append(float(loss.detach()))
        self.taken += 1

    def result(self) -> Dictionary:
        if self.params is None:
            raise MetricError("no activations reached the dictionary trainer")
        p = {n: t.detach().clone() for n, t in self.params.items()}
        return Dictionary(p["w_enc"], p["b_enc"], p["w_dec"], p["b_pre"], self.scale, self.k)

    def record(self) -> dict:
        tail = self.losses[-20:]
        return {
            "steps": self.taken,
            "batch_tokens": self.batch,
            "lr": self.lr,
            "aux_k": self.aux_k,
            "dead_tokens": self.dead_tokens,
            "aux_steps": self.aux_steps,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": float(np.mean(tail)) if tail else None,
            "dead_at_end": int((self.since_fired >= self.dead_tokens).sum()),
        }


def train_dictionary(
    chunks: Callable[[], Iterable[torch.Tensor]],
    d: int,
    size: int,
    k: int,
    steps: int,
    seed: int = 0,
    init: Dictionary | None = None,
    max_epochs: int = 1000,
    **kw,
) -> tuple[Dictionary, dict]:
    """Train on ``chunks()`` (called once per epoch: a fresh stream) until ``steps`` Adam steps."""
    trainer = TopKTrainer(d, size, k, steps, seed=seed, init=init, **kw)
    for _ in range(max_epochs):
        seen = 0
        for x in chunks():
            trainer.fit_chunk(x)
            seen += len(x)
            if trainer.done:
                break
        if trainer.done or seen == 0:
            break
    return trainer.result(), trainer.record()


def match(previous: torch.Tensor, current: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of two decoders' rows on their cosine.

    Returns (order, cos): ``current[order[i]]`` is the latent matched to ``previous[i]``, and
    ``cos[i]`` their cosine. Reordering the current dictionary by ``order`` keeps each
    latent's index, its identity, from one checkpoint to the next."""
    from scipy.optimize import linear_sum_assignment

    a = previous.double() / previous.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = current.double() / current.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order, cos[np.arange(len(order)), order]


# feature kinds, in the order of the cube's `kind` coordinate (the languages fill in 1 and 2)
SHARED, SPECIFIC_1, SPECIFIC_2, DEAD = 0, 1, 2, 3


def classify(mass: np.ndarray, specific: float, alive: np.ndarray | None = None) -> np.ndarray:
    """mass [2, m] (mean activation per token, per language) -> kind [m].

    Dead: no activation in either language (or not ``alive``). Otherwise a feature with less
    than a share ``specific`` of its activation mass on language 2, m2 / (m1 + m2), is
    specific to language 1, with more than 1 - ``specific`` specific to language 2, else
    shared. Mass, not firing counts: a TopK code always fires k latents, and the weak
    filler activations of a token that needs fewer would make every feature look shared."""
    total = mass[0] + mass[1]
    share = np.divide(mass[1], total, out=np.full(total.shape, 0.5), where=total > 0)
    kind = np.full(total.shape, SHARED, dtype=np.int64)
    kind[share < specific] = SPECIFIC_1
    kind[share > 1 - specific] = SPECIFIC_2
    dead = total <= 0 if alive is None else (total <= 0) | ~alive
    kind[dead] = DEAD
    return kind


class FeatureStats:
    """Per-language firing statistics of one dictionary over a stream of activations.

    ``update(side, x)`` takes activations [n, d] of one language (0 or 1); ``update_aligned``
    takes both languages' activations at the same positions (token-aligned clones) and also
    counts co-firing. Also accumulates the fraction of variance explained per language."""

    def __init__(self, dictionary: Dictionary, fire: float = 0.0, n_top: int = 0):
        self.dic, self.fire, self.n_top = dictionary, fire, n_top
        m = dictionary.size
        self.count = np.zeros(2)
        self.fires = np.zeros((2, m))
        self.act_sum = np.zeros((2, m))
        self.sse = np.zeros(2)
        self.ss = np.zeros(2)
        self.sum = np.zeros((2, dictionary.d))
        self.both = np.zeros(m)
        self.either = np.zeros(m)
        # top-activating positions per language: activation and a caller's tag (e.g. a flat
        # position index), [2, m, n_top]
        self.top_act = np.full((2, m, n_top), -np.inf)
        self.top_tag = np.full((2, m, n_top), -1, dtype=np.int64)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.dic.encode(x)

    def update(self, side: int, x: torch.Tensor, tags: np.ndarray | None = None) -> torch.Tensor:
        x = x.float()
        codes = self.dic.encode(x)
        on = codes > self.fire
        self.count[side] += len(x)
        self.fires[side] += on.sum(0).double().numpy()
        self.act_sum[side] += codes.sum(0).double().numpy()
        err = x - self.dic.decode(codes)
        self.sse[side] += float((err.double() ** 2).sum())
        self.ss[side] += float((x.double() ** 2).sum())
        self.sum[side] += x.double().sum(0).numpy()
        if self.n_top and len(x):
            self._top(side, codes, np.arange(len(x)) if tags is None else tags)
        return codes

    def _top(self, side: int, codes: torch.Tensor, tags: np.ndarray) -> None:
        n = min(self.n_top, len(codes))
        vals, idx = codes.topk(n, dim=0)  # [n, m]
        acts = np.concatenate([self.top_act[side], vals.T.double().numpy()], 1)
        tg = np.concatenate([self.top_tag[side], np.asarray(tags)[idx.T.numpy()]], 1)
        best = np.argsort(-acts, axis=1, kind="stable")[:, : self.n_top]
        self.top_act[side] = np.take_along_axis(acts, best, 1)
        self.top_tag[side] = np.take_along_axis(tg, best, 1)

    def update_aligned(
        self, x1: torch.Tensor, x2: torch.Tensor, tags: np.ndarray | None = None
    ) -> None:
        c1 = self.update(0, x1, tags) > self.fire
        c2 = self.update(1, x2, tags) > self.fire
        self.both += (c1 & c2).sum(0).double().numpy()
        self.either += (c1 | c2).sum(0).double().numpy()

    def freq(self) -> np.ndarray:
        return self.fires / np.maximum(self.count, 1)[:, None]

    def mass(self) -> np.ndarray:
        """Mean activation per token, per language [2, m] (zeros where it does not fire)."""
        return self.act_sum / np.maximum(self.count, 1)[:, None]

    def kinds(self, specific: float) -> np.ndarray:
        """Shared / specific / dead per feature (`classify`). Dead also: a latent carrying under
        MIN_MASS of the mean latent's activation mass: TopK always fires k latents, and the
        weak filler latents of tokens that need fewer fire on anything, in both languages."""
        mass = self.mass().sum(0)
        alive = (self.fires.sum(0) > 0) & (mass >= MIN_MASS * mass.mean())
        return classify(self.mass(), specific, alive=alive)

    def mean_act(self) -> np.ndarray:
        """Mean activation where the feature fires, per language (NaN where it never does)."""
        return np.divide(
            self.act_sum, self.fires, out=np.full(self.fires.shape, np.nan), where=self.fires > 0
        )

    def fve(self) -> np.ndarray:
        """Fraction of variance explained per language: 1 - SSE / total sum of squares."""
        n = np.maximum(self.count, 1)
        tss = self.ss - (self.sum**2).sum(1) / n
        return 1 - self.sse / np.where(tss > 0, tss, np.nan)

    def cofire(self) -> float:
        """Of all (position, feature) firings in either language at aligned positions, the
        share that fire in both (NaN without aligned positions)."""
        either = self.either.sum()
        return float(self.both.sum() / either) if either > 0 else float("nan")

"""The analysis driver's options, typed and validated in one place.

`align`, `eval` and the sweep build one `AnalysisOptions`; `validated()` turns every bad
value into a one-line `OptionError` naming the option, before anything is read or written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

from probekit.errors import ProbekitError


class OptionError(ProbekitError):
    """An analysis option is malformed or out of range."""


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
DTYPES = ("float32", "bfloat16", "float16")  # --dtype


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis commands compute and how; CLI flags in brackets."""

    pair: tuple[str, str] | None = None  # languages compared [--pair]; default the first two
    n_pairs: int = 64  # parallel pairs per checkpoint [--pairs]
    seq_len: int | None = None  # tokens per sequence [--seq-len]; default min(context, 128)
    batch_size: int = 16  # pairs per forward batch [--batch-size]
    n_grad_pairs: int = 16  # pairs for gradient alignment [--grad-pairs]
    ci: float | None = None  # bootstrap interval level, e.g. 0.95 [--ci]
    n_boot: int = 1000  # bootstrap replicates
    device: str = "cpu"  # cpu, cuda or cuda:N [--device]
    # the forwards' and backwards' precision [--dtype]; accumulators stay float32 / float64
    dtype: str = "float32"
    neuron_threshold: float = 0.0  # an MLP neuron "fires" above this activation
    neuron_top_frac: float = 0.1  # top-k neuron sets: this fraction of d_mlp
    parallel_files: tuple[str, str] | None = None  # any HF series: two line-aligned texts
    tokenizer: str | None = None  # any HF series: tokenizer folder (default: first checkpoint)
    hub_model: str | None = None  # a hub cache: ORG/NAME [--model]
    revisions: tuple[str, ...] | None = None  # a hub cache: revisions [--revisions]; default all
    test_files: tuple[tuple[str, str], ...] | None = None  # any HF series: (lang, file) [--test]
    clone_offset: int | None = None  # any HF series: L2 ids = L1 ids + V [--clone-offset]
    # perplexity (eval)
    stride: int | None = None  # window stride [--stride]; default context / 4
    tail: int | None = None  # scored tokens at the end of each window [--tail]; default stride
    max_tokens: int | None = None  # test tokens per language [--max-tokens]; 0: all
    # tuned lens (align --metrics tuned_lens): held-out training text and stopping rule
    lens_tokens: int = 4096  # training tokens per language [--lens-tokens]
    lens_steps: int = 500  # most Adam steps per checkpoint
    lens_patience: int = 2  # validation checks without improvement before stopping
    lens_tol: float = 0.03  # relative validation-KL improvement that counts
    lens_lr: float = 1e-2  # Adam
    lens_seed: int = 0
    # feature dictionary (align --metrics features): see probekit/metrics/features.py
    features_layers: tuple[int, ...] | None = None  # default: a middle and the last layer
    features_size: int | None = None  # latents per dictionary; default 4 x d_model
    features_k: int = 8  # active latents per token (TopK)
    features_tokens: int = 8192  # held-out training tokens per language
    features_steps: int = 400  # Adam steps per checkpoint and layer
    features_fire: float = 0.0  # a latent fires above this activation
    features_specific: float = 0.1  # share of mass on the other language below which: specific
    features_top: int = 4  # top features per kind measured causally (and as many random)
    features_seed: int = 0
    # calibrated similarity (the `calibrated` family)
    null_permutations: int = 100  # permutations of the null [--null-permutations]
    null_sample: int = 512  # rows (tokens or pooled sequences) of its sample [--null-sample]
    knn_k: int = 10  # neighbours of mutual k-NN and CKNNA [--knn-k]

    def validated(self) -> AnalysisOptions:
        """This object if every value is usable; raises OptionError naming the first bad one."""
        for name, lo in (("n_pairs", 4), ("batch_size", 1), ("n_grad_pairs", 1), ("n_boot", 1)):
            _int(getattr(self, name), name, lo)
        for name, lo in (("null_permutations", 2), ("null_sample", 4), ("knn_k", 1)):
            _int(getattr(self, name), name, lo)
        for name, lo in (("seq_len", 2), ("stride", 1), ("tail", 1), ("max_tokens", 0)):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, lo)
        for name, lo in (("lens_tokens", 1), ("lens_steps", 1), ("lens_patience", 1)):
            _int(getattr(self, name), name, lo)
        _int(self.lens_seed, "lens_seed", 0)
        if not (_is_number(self.lens_lr) and 0 < self.lens_lr < math.inf):
            raise OptionError(f"lens_lr: expected a learning rate > 0, got {self.lens_lr!r}")
        if not (_is_number(self.lens_tol) and 0 <= self.lens_tol < 1):
            raise OptionError(f"lens_tol: expected a fraction in [0, 1), got {self.lens_tol!r}")
        _check_features(self)
        if self.ci is not None and not (_is_number(self.ci) and 0 < self.ci < 1):
            raise OptionError(f"--ci: expected a level in (0, 1) such as 0.95, got {self.ci!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise OptionError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise OptionError(f"--device: {self.device} requested but no CUDA device")
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype: expected {' | '.join(DTYPES)}, got {self.dtype!r}")
        if not _is_number(self.neuron_threshold) or math.isnan(self.neuron_threshold):
            raise OptionError(f"neuron_threshold: expected a number, got {self.neuron_threshold!r}")
        if not (_is_number(self.neuron_top_frac) and 0 < self.neuron_top_frac <= 1):
            raise OptionError(
                f"neuron_top_frac: expected a fraction in (0, 1], got {self.neuron_top_frac!r}"
            )
        if self.pair is not None and (len(self.pair) != 2 or self.pair[0] == self.pair[1]):
            raise OptionError(f"--pair: expected two different languages, got {self.pair!r}")
        if self.clone_offset is not None:
            _int(self.clone_offset, "clone_offset", 1)
        if self.parallel_files is not None and len(self.parallel_files) != 2:
            # a clone series reads one text (its L2 side is the same ids shifted)
            if not (self.clone_offset is not None and len(self.parallel_files) == 1):
                raise OptionError("--parallel: expected two line-aligned files (L1 L2)")
        return self

    def updated(self, **changes: object) -> AnalysisOptions:
        return replace(self, **changes)

    def describe(self) -> dict[str, object]:
        """The options as stored in the cube's attributes."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_features(o: AnalysisOptions) -> None:
    if o.features_size is not None:
        _int(o.features_size, "features_size", 1)
    for name, lo in (("features_k", 1), ("features_tokens", 256), ("features_steps", 1)):
        _int(getattr(o, name), name, lo)
    _int(o.features_top, "features_top", 0)
    _int(o.features_seed, "features_seed", 0)
    if o.features_layers is not None:
        if not o.features_layers:
            raise OptionError("--features-layers: expected at least one layer")
        for lay in o.features_layers:
            _int(lay, "features_layers", 0)
    if not _is_number(o.features_fire) or math.isnan(o.features_fire):
        raise OptionError(f"features_fire: expected a number, got {o.features_fire!r}")
    if not (_is_number(o.features_specific) and 0 < o.features_specific < 0.5):
        raise OptionError(
            f"features_specific: expected a share in (0, 0.5), got {o.features_specific!r}"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: object, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise OptionError(f"{_flag(name)}: expected an integer >= {lo}, got {value!r}")
    return value


_FLAGS = {"n_pairs": "--pairs", "n_grad_pairs": "--grad-pairs", "n_boot": "n_boot"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))

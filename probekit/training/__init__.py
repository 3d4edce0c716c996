"""Training: GPT-2 presets and a compact trainer that writes checkpoint series."""

from probekit.training.model import PRESETS, build_model
from probekit.training.trainer import train

__all__ = ["train", "PRESETS", "build_model"]

# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # probekit in a notebook: a cloned 90/10 run, end to end
#
# Open this file in Jupyter (with jupytext) or VS Code, or run it as a script:
# `python examples/notebook.py` (well under 90 s on a CPU). It trains a nano GPT on
# EN1 (90 %) and its clone EN2 (10 %), analyses every checkpoint, scores per-language
# perplexity, draws two charts and writes the HTML report, all into a temporary folder
# (set `PROBEKIT_NOTEBOOK_OUT` to keep the results somewhere else).

# %%
import os
import tempfile
from pathlib import Path

import torch

import probekit
from probekit.report import layer_profile, similarity_heatmap

torch.set_num_threads(min(4, os.cpu_count() or 1))  # nano models: more threads only contend
OUT = Path(os.environ.get("PROBEKIT_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="probekit-nb-"))
RUN = OUT / "clone_90_10"
print("results in", OUT)

# %% [markdown]
# ## Train
# A config is a TOML file or the same dict. `nano` is the test preset (2 layers, 64 wide,
# context 64); 40 steps of 8 sequences train in seconds. Checkpoints: 0, two log-spaced
# early ones, then every 20 steps.

# %%
config = {
    "name": "clone_90_10_nano",
    "seed": 0,
    "data": {"mode": "clone", "p": 0.1, "sources": {"en": ["bible:web"]}},  # EN2 gets 10 %
    "tokenizer": {"vocab_size": 300},
    "model": {"preset": "nano"},
    "train": {"steps": 40, "batch_size": 8, "lr": 3e-3},
    "checkpoints": {"log_spaced": 2, "every": 20},
    "eval": {"n_sequences": 4},
}
probekit.train(config, RUN, progress=False)
print([c.step for c in probekit.list_checkpoints(RUN)])

# %% [markdown]
# ## Analyse every checkpoint
# `align` appends one step per checkpoint to `RUN/analysis.zarr` (similarity, neurons,
# gradients, embeddings, probes); `evaluate` adds per-language test perplexity. Both skip
# checkpoints already stored, so rerunning this cell is cheap.

# %%
opts = probekit.AlignOptions(n_pairs=32, n_grad_pairs=8)
probekit.align(RUN, options=opts, progress=False)
probekit.evaluate(RUN, max_tokens=4096, progress=False)

cube = probekit.open_cube(RUN)
print(cube["hidden_cos"].attrs["definition"])
final = cube.isel(step=-1)
print(f"hidden_cos at step {int(final['step'])} (layer 0 = embeddings output):")
for layer, value in zip(cube["layer"].values, final["hidden_cos"].values, strict=True):
    base = float(final["hidden_cos_baseline"].sel(layer=layer))
    print(f"  layer {int(layer)}: {value:.3f}   (different-text baseline {base:.3f})")
print("test PPL:", {str(k): round(float(v), 2) for k, v in final["ppl"].to_series().items()})

# %% [markdown]
# ## Charts
# Every chart function takes `{run name: cube}` (or a single cube) and returns an altair chart;
# in a notebook the last expression of a cell renders it.

# %%
runs = {"clone 90/10": cube}
heat = similarity_heatmap(runs, "hidden_cos", x="step")
profile = layer_profile(runs, "hidden_cos", step="final")
heat.save(str(OUT / "hidden_cos_heatmap.html"))
profile.save(str(OUT / "hidden_cos_profile.html"))
profile  # noqa: B018 -- a cell's last expression is what Jupyter displays

# %% [markdown]
# ## The report
# One self-contained `index.html` plus a PNG per chart.

# %%
report = probekit.make_report([RUN], OUT / "report", title="clone 90/10 (nano)")
print("report:", report)

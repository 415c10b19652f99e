# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Singular values of the projector under three normalisations (paper B, figure 2)
#
# Paper B distils the penultimate feature through a linear projector W_p with an L2 loss and tracks
# the singular values of W_p during training. Its claim: **without normalisation (and with L2) many
# singular values shrink towards zero -- the projector collapses -- while with BatchNorm far fewer do,
# and small ones partly recover later in training.** Paper setting: ResNet-50 → ResNet-18, W_p 512 → 2048.
#
# Here: a CIFAR pair whose projector also widens the feature 4× (student resnet8, 64-d → teacher
# resnet8x4, 256-d in the quick profile), loss = CE + `feature_weight` · MSE(norm(Z_s W_p), norm(Z_t)),
# with norm ∈ {none, l2, batchnorm} applied to both sides (`vkd.SRDLoss(norm=..., distance="mse")`).

# %% tags=["parameters"]
profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/02"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs, shared with notebook 03 (same settings -> trained once)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 0.1  # class-stratified fraction of the training set
test_fraction: float = 0.2  # class-stratified fraction of the test set
teacher: str = "resnet8x4"  # teacher (256-d feature); full: resnet50_cifar (2048-d)
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 5  # epochs when the teacher is trained here
student: str = "resnet8"  # student (64-d feature); full: resnet8x4 (256-d): W_p is 256 -> 2048
norms: list = ["none", "l2", "batchnorm"]  # normalisations of both sides
feature_weight: float = 1.0  # weight of the feature loss next to CE
epochs: int = 5  # student epochs; full: 240
batch_size: int = 64
lr: float = 0.05
weight_decay: float = 5e-4  # the students' (and so W_p's) weight decay; paper B's ImageNet runs use 1e-4
threshold: float = 0.01  # a singular value "collapsed" when below threshold x the largest
teacher_cache_views: int = 2  # >0: cache teacher outputs for that many augmentation views
seed: int = 0
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from vkd import analysis
from vkd.engine import TrainConfig, train, train_teacher
from vkd.paths import output_dir, run_group
from vkd.results import run_record

figures = output_dir(figures_dir)
tag = run_group(dataset, fraction, profile)
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction,
              batch_size=batch_size, lr=lr, seed=seed, device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   **common)


# %%
def projector_spectrum(distiller) -> dict:
    return {"singular_values": analysis.singular_values(distiller.losses["srd"].projector.weight).tolist()}


summaries, spectra = {}, {}
for norm in norms:
    config = TrainConfig(student=student, method="srd", epochs=epochs, weight_decay=weight_decay, teacher=teacher,
                         teacher_checkpoint=teacher_weights, teacher_cache_views=teacher_cache_views,
                         method_options={"srd_weight": feature_weight, "srd_projector": "linear", "srd_norm": norm,
                                         "srd_distance": "mse"}, out_dir=f"{runs_dir}/{tag}", **common)
    config = config.named(f"{norm}-{student}")
    summaries[norm] = train(config, probe=projector_spectrum)
    spectra[norm] = pd.read_json(config.run_dir() / "probes.json")
    print(f"{norm:10s} best {summaries[norm]['best_acc']:.2f} %")

# %%
fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.6), sharey=True)
for ax, norm in zip(np.atleast_1d(axes), norms, strict=True):
    records = spectra[norm]
    colours = plt.cm.coolwarm(np.linspace(0, 1, len(records)))
    for colour, (_, record) in zip(colours, records.iterrows(), strict=True):
        ax.plot(np.log(np.asarray(record.singular_values) + 1e-12), color=colour, lw=1)
    ax.set(title=f"norm = {norm}", xlabel="singular value index (sorted)")
np.atleast_1d(axes)[0].set_ylabel("log singular value of W_p")
fig.suptitle(f"{student} → {teacher}: W_p spectrum from epoch 0 (blue) to {epochs} (red)", y=1.02)
fig.savefig(figures / "02_projector_spectra.png", dpi=120, bbox_inches="tight")

# %%
rows = []
for norm in norms:
    first = torch.tensor(spectra[norm].singular_values.iloc[0])
    last = torch.tensor(spectra[norm].singular_values.iloc[-1])
    rows.append({"norm": norm, "effective_rank_start": round(analysis.effective_rank(first), 1),
                 "effective_rank_end": round(analysis.effective_rank(last), 1),
                 f"below_{threshold:g}_of_max_end": int((last < threshold * last.max()).sum()),
                 "min_over_max_end": float(last.min() / last.max()), "best_top1": round(summaries[norm]["best_acc"], 2),
                 "epochs": epochs, "weight_decay": weight_decay, "fraction": fraction,
                 **run_record(summaries[norm], profile)})
table = pd.DataFrame(rows)
table.to_csv(figures / "02_projector_spectra.csv", index=False)
table

# %% [markdown]
# ## Paper vs. this run
# The cell below states, from the numbers above, whether batch normalisation kept more of W_p's
# singular values alive than no normalisation and L2 -- the paper's claim.

# %%
by_norm = table.set_index("norm")
if {"none", "batchnorm"} <= set(by_norm.index):
    bn, none = by_norm.loc["batchnorm"], by_norm.loc["none"]
    verdict = "agrees" if bn.effective_rank_end > none.effective_rank_end else "does not agree"
    print(f"effective rank at the end: batchnorm {bn.effective_rank_end}, none {none.effective_rank_end}"
          + (f", l2 {by_norm.loc['l2'].effective_rank_end}" if "l2" in by_norm.index else "")
          + f" -> this run {verdict} with the paper's claim that BN prevents the projector's collapse.")

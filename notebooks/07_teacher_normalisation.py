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
# # 07 · Standardising the teacher: convergence and the loss landscape (paper A)
#
# Paper A's claim for discriminative tasks: **standardising the teacher's features across their depth
# (layer norm, no affine) improves convergence by smoothing the loss landscape**; its figure compares
# the landscape with and without that standardisation. Here: VkD students (orthogonal projector,
# smooth-L1) trained with the teacher normalised by each of `norms`, otherwise identical; their accuracy
# and distillation loss per epoch; and each trained student's loss surface along two random
# filter-normalised directions of its weights (Li et al., 2018; `vkd.analysis.loss_surface`) on a fixed
# batch of test images. How steeply a surface rises is summarised as `vkd.analysis.relative_rise`:
# the mean loss on the border of the plotted square over the loss at its centre, minus one.

# %% tags=["parameters"]
profile: str = "smoke"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/07"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs, shared with notebooks 02-04 (same settings -> trained once)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 1.0  # class-stratified fraction of the training set
test_fraction: float = 1.0  # class-stratified fraction of the test set
teacher: str = "resnet32x4"  # teacher architecture
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 240  # epochs when the teacher is trained here
student: str = "resnet8x4"  # student architecture
norms: list = ["none", "layernorm"]  # teacher normalisations compared (vkd.normalization)
vkd_weight: float = 1.0  # weight of the VkD term next to cross-entropy
epochs: int = 240
batch_size: int = 64
lr: float = 0.05
teacher_cache_views: int = 0  # >0: cache teacher outputs for that many augmentation views
parallel: int = 1  # students trained at once, as separate processes (several share one GPU well)
compile: bool = False  # torch.compile the training forward; also a mode name ("reduce-overhead": CUDA graphs)
landscape_images: int = 256  # fixed test images on which the loss surfaces are evaluated
radius: float = 1.0  # the surfaces span [-radius, radius] times each filter-normalised direction
steps: int = 21  # grid points per direction
direction_pairs: int = 3  # random pairs of directions per run: the first is plotted, the rise is averaged over all
seed: int = 0
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from vkd import analysis, data
from vkd.engine import TrainConfig, load_distiller, train_many, train_teacher
from vkd.paths import output_dir

figures = output_dir(figures_dir)
tag = f"{dataset}-{int(fraction * 100)}pct-{profile}"
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction,
              batch_size=batch_size, lr=lr, seed=seed, device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   **common)

# %%
configs = {norm: TrainConfig(student=student, method="vkd", epochs=epochs, teacher=teacher,
                             teacher_checkpoint=teacher_weights, teacher_cache_views=teacher_cache_views,
                             method_options={"vkd_norm": norm, "vkd_weight": vkd_weight}, compile=compile,
                             out_dir=f"{runs_dir}/{tag}", **common).named(f"{norm}-{student}")
           for norm in norms}
summaries = dict(zip(norms, train_many(list(configs.values()), parallel), strict=True))
for norm, s in summaries.items():
    print(f"{norm:10s} best {s['best_acc']:.2f} %  last {s['last_acc']:.2f} %  {s['wall_seconds']:.0f} s")
curves = pd.concat([pd.read_csv(c.run_dir() / "metrics.csv").assign(norm=n) for n, c in configs.items()],
                   ignore_index=True)

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
for ax, column, label in zip(axes, ["test_acc", "train_ce", "train_vkd"],
                             ["test top-1 (%)", "training cross-entropy", "training VkD term (weighted)"], strict=True):
    sns.lineplot(data=curves, x="epoch", y=column, hue="norm", marker="o", ax=ax, legend=ax is axes[0])
    ax.set(ylabel=label)
fig.suptitle(f"VkD, {student} ← {teacher}, teacher normalised by {' / '.join(norms)}")
fig.savefig(figures / "07_teacher_norm_curves.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Loss surfaces around each trained student
# The student and its projector are moved along the same two random draws, each rescaled filter by
# filter to that run's weights, and the training objective (cross-entropy + weighted VkD term, eval-mode
# batch norm) is evaluated on the same images for every run.

# %%
images, labels = data.test_batch(dataset, landscape_images, seed, download=download)
surfaces = {}  # norm -> one {term: (steps, steps) grid} per pair of directions
for norm, config in configs.items():
    distiller = load_distiller(config)
    cached = distiller.teacher_outputs(images)

    def objective(d, teacher_outputs=cached):
        return d(images, labels, teacher_outputs=teacher_outputs)[1]

    surfaces[norm] = []
    for pair in range(direction_pairs):
        directions = tuple(analysis.filter_normalised_direction(distiller, seed + 2 * pair + k) for k in (1, 2))
        grids = analysis.loss_surface(distiller, objective, directions, radius, steps)
        surfaces[norm].append({**grids, "total": sum(grids.values())})

offsets = np.linspace(-radius, radius, steps)
fig, axes = plt.subplots(1, len(norms), figsize=(4.4 * len(norms), 3.8), squeeze=False)
for ax, norm in zip(axes[0], norms, strict=True):
    grid = surfaces[norm][0]["total"].numpy()
    contours = ax.contour(offsets, offsets, np.log(grid), levels=15, cmap="viridis")
    ax.clabel(contours, fontsize=6, fmt=lambda v: f"{np.exp(v):.2g}")
    ax.plot(0, 0, "r+")
    ax.set(title=f"teacher norm = {norm}", xlabel="direction 2", ylabel="direction 1" if ax is axes[0, 0] else "")
fig.suptitle("training objective around the trained student (contours of log loss; first pair of directions)", y=1.02)
fig.savefig(figures / "07_loss_landscape.png", dpi=120, bbox_inches="tight")

rows = []
for norm in norms:
    for term in surfaces[norm][0]:
        rises = torch.tensor([analysis.relative_rise(grids[term]) for grids in surfaces[norm]])
        centre = surfaces[norm][0][term][steps // 2, steps // 2]
        rows.append({"norm": norm, "term": term, "loss_at_centre": float(centre),
                     "relative_rise_mean": float(rises.mean()),
                     "relative_rise_std": float(rises.std()) if len(rises) > 1 else float("nan"),
                     "direction_pairs": len(rises), "radius": radius, "steps": steps,
                     "best_top1": summaries[norm]["best_acc"], "last_top1": summaries[norm]["last_acc"],
                     "epochs": epochs, "fraction": fraction, "seed": seed, "device": summaries[norm]["device"],
                     "wall_s": round(summaries[norm]["wall_seconds"]), "profile": profile})
table = pd.DataFrame(rows).round({"loss_at_centre": 4, "relative_rise_mean": 3, "relative_rise_std": 3})
table.to_csv(figures / "07_teacher_normalisation.csv", index=False)
table

# %% [markdown]
# ## Paper vs. this run
# Printed from the table: is the surface of the objective flatter around the student distilled from
# the standardised teacher, and did that student converge faster or end higher?

# %%
totals = table[table.term == "total"].set_index("norm")
if {"none", "layernorm"} <= set(totals.index):
    rise = {n: f"{totals.relative_rise_mean[n]:.2f} ± {totals.relative_rise_std[n]:.2f}" for n in ("layernorm", "none")}
    flatter = totals.relative_rise_mean["layernorm"] < totals.relative_rise_mean["none"]
    print(f"relative rise of the objective (mean ± std over {direction_pairs} pairs of directions): layernorm "
          f"{rise['layernorm']}, none {rise['none']} -> {'agrees' if flatter else 'does not agree'} with "
          f"paper A's claim of a smoother landscape with the standardised teacher")
    print(f"best top-1: layernorm {totals.best_top1['layernorm']:.2f} %, none {totals.best_top1['none']:.2f} %")

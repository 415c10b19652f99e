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
from typing import Union  # for compile

profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/07"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs, shared with notebooks 02-04 (same settings -> trained once)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 0.1  # class-stratified fraction of the training set
test_fraction: float = 0.2  # class-stratified fraction of the test set
teacher: str = "resnet8x4"  # the teacher of notebooks 02-04 (same settings: trained once); full: resnet32x4
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 5  # epochs when the teacher is trained here
student: str = "resnet8"  # student architecture; full: resnet8x4
norms: list = ["none", "layernorm"]  # teacher normalisations compared (vkd.normalization)
vkd_weight: float = 1.0  # weight of the VkD term next to cross-entropy
epochs: int = 5  # full: 240
batch_size: int = 64
lr: float = 0.05
teacher_cache_views: int = 2  # >0: cache teacher outputs for that many augmentation views
parallel: int = 1  # students trained at once, as separate processes (several share one GPU well)
compile: Union[bool, str] = False  # torch.compile the training forward; or a mode ("reduce-overhead": CUDA graphs)
landscape_images: int = 256  # fixed test images on which the loss surfaces are evaluated
radius: float = 1.0  # the surfaces span [-radius, radius] times each filter-normalised direction
steps: int = 15  # grid points per direction
direction_pairs: int = 3  # random pairs of directions per run: the first is plotted, the rise is averaged over all
seeds: list = [0]  # student seeds (each draws its landscape images and directions); the teacher uses the first
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from vkd import analysis, data
from vkd.engine import TrainConfig, load_distiller, train_teacher
from vkd.launch import train_many
from vkd.paths import output_dir, run_group
from vkd.results import distinct_seeds, over_seeds, run_record

seeds = distinct_seeds(seeds)
figures = output_dir(figures_dir)
tag = run_group(dataset, fraction, profile)
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction,
              batch_size=batch_size, lr=lr, seed=seeds[0], device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   **common)

# %%
runs = [(norm, seed) for seed in seeds for norm in norms]
configs = {(norm, seed): TrainConfig(student=student, method="vkd", epochs=epochs, teacher=teacher,
                                     teacher_checkpoint=teacher_weights, teacher_cache_views=teacher_cache_views,
                                     method_options={"vkd_norm": norm, "vkd_weight": vkd_weight}, compile=compile,
                                     out_dir=f"{runs_dir}/{tag}", **{**common, "seed": seed}).named(f"{norm}-{student}")
           for norm, seed in runs}
summaries = dict(zip(runs, train_many(list(configs.values()), parallel), strict=True))
for (norm, seed), s in summaries.items():
    print(f"{norm:10s} seed {seed}  best {s['best_acc']:.2f} %  last {s['last_acc']:.2f} %  {s['wall_seconds']:.0f} s")
curves = pd.concat([pd.read_csv(c.run_dir() / "metrics.csv").assign(norm=norm, seed=seed)
                    for (norm, seed), c in configs.items()], ignore_index=True)
seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {seeds}"

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
for ax, column, label in zip(axes, ["test_acc", "train_ce", "train_vkd"],
                             ["test top-1 (%)", "training cross-entropy", "training VkD term (weighted)"], strict=True):
    sns.lineplot(data=curves, x="epoch", y=column, hue="norm", marker="o", errorbar="sd", ax=ax, legend=ax is axes[0])
    ax.set(ylabel=label)
fig.suptitle(f"VkD, {student} ← {teacher}, teacher normalised by {' / '.join(norms)}, {seeds_text}")
fig.savefig(figures / "07_teacher_norm_curves.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Loss surfaces around each trained student
# The student and its projector are moved along the same two random draws, each rescaled filter by
# filter to that run's weights, and the training objective (cross-entropy + weighted VkD term, eval-mode
# batch norm) is evaluated on the same images for every run of a seed (images and directions are drawn
# with the run's seed; the contours show the first seed).

# %%
batches = {seed: data.test_batch(dataset, landscape_images, seed, download=download) for seed in seeds}
surfaces = {}  # (norm, seed) -> one {term: (steps, steps) grid} per pair of directions
for (norm, seed), config in configs.items():
    images, labels = batches[seed]
    distiller = load_distiller(config)
    cached = distiller.teacher_outputs(images)

    def objective(d, teacher_outputs=cached, images=images, labels=labels):
        return d(images, labels, teacher_outputs=teacher_outputs)[1]

    surfaces[norm, seed] = []
    for pair in range(direction_pairs):
        directions = tuple(analysis.filter_normalised_direction(distiller, seed + 2 * pair + k) for k in (1, 2))
        grids = analysis.loss_surface(distiller, objective, directions, radius, steps)
        surfaces[norm, seed].append({**grids, "total": sum(grids.values())})

offsets = np.linspace(-radius, radius, steps)
fig, axes = plt.subplots(1, len(norms), figsize=(4.4 * len(norms), 3.8), squeeze=False)
for ax, norm in zip(axes[0], norms, strict=True):
    grid = surfaces[norm, seeds[0]][0]["total"].numpy()
    contours = ax.contour(offsets, offsets, np.log(grid), levels=15, cmap="viridis")
    ax.clabel(contours, fontsize=6, fmt=lambda v: f"{np.exp(v):.2g}")
    ax.plot(0, 0, "r+")
    ax.set(title=f"teacher norm = {norm}", xlabel="direction 2", ylabel="direction 1" if ax is axes[0, 0] else "")
fig.suptitle(f"training objective around the trained student (contours of log loss; first pair of directions, "
             f"seed {seeds[0]})", y=1.02)
fig.savefig(figures / "07_loss_landscape.png", dpi=120, bbox_inches="tight")

rows = []
for norm, seed in runs:
    summary = summaries[norm, seed]
    for term in surfaces[norm, seed][0]:
        rises = torch.tensor([analysis.relative_rise(grids[term]) for grids in surfaces[norm, seed]])
        centre = surfaces[norm, seed][0][term][steps // 2, steps // 2]
        rows.append({"norm": norm, "term": term, "loss_at_centre": float(centre),
                     "relative_rise_mean": float(rises.mean()),
                     "relative_rise_std": float(rises.std()) if len(rises) > 1 else float("nan"),
                     "direction_pairs": len(rises), "radius": radius, "steps": steps,
                     "best_top1": summary["best_acc"], "last_top1": summary["last_acc"],
                     "epochs": epochs, "fraction": fraction, **run_record(summary, profile)})
table = pd.DataFrame(rows).round({"loss_at_centre": 4, "relative_rise_mean": 3, "relative_rise_std": 3})
table.to_csv(figures / "07_teacher_normalisation.csv", index=False)
# over seeds: each run's rise (its mean over the pairs of directions) and accuracy, mean ± std across seeds
statistics = over_seeds(table.drop(columns=["loss_at_centre", "relative_rise_std"])
                        .rename(columns={"relative_rise_mean": "relative_rise"}),
                        baseline=None, values=("relative_rise", "best_top1", "last_top1"))
if len(seeds) > 1:
    statistics.to_csv(figures / "07_teacher_normalisation_seeds.csv", index=False)
table if len(seeds) == 1 else statistics

# %% [markdown]
# ## Paper vs. this run
# Printed from the table: is the surface of the objective flatter around the student distilled from
# the standardised teacher, and did that student converge faster or end higher?

# %%
totals = table[table.term == "total"]
if {"none", "layernorm"} <= set(totals.norm):
    rise = totals.pivot(index="seed", columns="norm", values="relative_rise_mean")
    flatter = rise["layernorm"] < rise["none"]
    # one seed: the spread over pairs of directions; several: the spread of the runs' rises over seeds
    by_norm, over = ((totals.set_index("norm"), f"{direction_pairs} pairs of directions") if len(seeds) == 1
                     else (statistics[statistics.term == "total"].set_index("norm"), f"seeds {seeds}"))
    means, spreads = by_norm.relative_rise_mean, by_norm.relative_rise_std
    print(f"relative rise of the objective (mean ± std over {over}): layernorm {means['layernorm']:.2f} ± "
          f"{spreads['layernorm']:.2f}, none {means['none']:.2f} ± {spreads['none']:.2f}; flatter with the "
          f"standardised teacher at {flatter.sum()} of {len(flatter)} seed(s) -> "
          f"{'agrees' if flatter.all() else 'does not agree'} with paper A's claim of a smoother landscape")
    top1 = totals.pivot(index="seed", columns="norm", values="best_top1")
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {seeds}"
    print(f"best top-1 ({which}): layernorm {top1['layernorm'].mean():.2f} %, none {top1['none'].mean():.2f} %")

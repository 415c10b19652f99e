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
# # 04 · Attention maps and translational equivariance of distilled ViT students
#
# Paper A shows feature / attention maps of DeiT-Ti and VkD-Ti on an object moved across the image:
# the VkD student's maps follow the object -- the CNN teacher's translational equivariance transfers.
# Paper B measures it: µ_T = ‖φ(Tx) − Tφ(x)‖² of a DeiT-S block is 1.52 ± 0.15 for DeiT-S,
# 0.13 ± 0.05 for CivT-S and 0.04 ± 0.02 for SRD.
#
# Here a small ViT (`deit_tiny_patch4_32`, 8×8 patches of 4 px) is trained from scratch alone (CE),
# with KD and with VkD from a CNN teacher; we show last-layer class-token attention (per head and
# averaged) and attention rollout, the moved-object figure, and µ_T. Our µ_T is relative and on
# the students' last features: ‖φ(Tx) − T'φ(x)‖² / ‖φ(x)‖² with T a shift of the image by one patch
# (zero fill) and T' the shift of the patch grid, on the region both cover (`vkd.analysis`); paper
# B's normalisation is not stated, so only the ordering is comparable.

# %% tags=["parameters"]
profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/04"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs (shared with notebooks 02 and 03)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 0.1  # class-stratified fraction of the training set
test_fraction: float = 0.2  # class-stratified fraction of the test set
teacher: str = "resnet8x4"  # CNN teacher; full: resnet32x4
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 5  # epochs when the teacher is trained here (SGD recipe)
teacher_lr: float = 0.05  # teacher learning rate (SGD)
student: str = "deit_tiny_patch4_32"  # ViT student for 32 px images
student_depth: int = 3  # transformer blocks of the student; full: 12
methods: list = ["ce", "kd", "vkd"]  # student trained alone, with KD, with VkD
epochs: int = 5  # full: 300
batch_size: int = 128
lr: float = 1e-3  # AdamW learning rate of the students
weight_decay: float = 0.05
images_shown: int = 4  # test images in the attention figure
equivariance_images: int = 256  # test images over which µ_T is averaged
teacher_cache_views: int = 2
seeds: list = [0]  # student seeds (each draws its µ_T images); the teacher and the figures use the first
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import timm
import torch

from vkd import analysis, data
from vkd.checkpoints import load_weights
from vkd.distillers import check_methods
from vkd.engine import TrainConfig, train, train_teacher
from vkd.paths import output_dir, run_group
from vkd.results import distinct_seeds, over_seeds, run_record

seeds = distinct_seeds(seeds)
check_methods(methods)
figures = output_dir(figures_dir)
tag = run_group(dataset, fraction, profile)
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction, seed=seeds[0],
              device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   batch_size=64, lr=teacher_lr, **common)

# %%
summaries, students = {}, {}  # (method, seed) -> run summary, trained student (eval mode)
for seed in seeds:
    for method in methods:
        config = TrainConfig(student=student, student_options={"depth": student_depth}, method=method,
                             epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr,
                             weight_decay=weight_decay, schedule="cosine", teacher=None if method == "ce" else teacher,
                             teacher_checkpoint=None if method == "ce" else teacher_weights,
                             teacher_cache_views=0 if method == "ce" else teacher_cache_views,
                             out_dir=f"{runs_dir}/{tag}", **{**common, "seed": seed}).named(f"{method}-{student}")
        summaries[method, seed] = train(config)
        students[method, seed] = timm.create_model(student, num_classes=data.NUM_CLASSES[dataset], depth=student_depth)
        load_weights(students[method, seed], config.run_dir() / "model.pt")
        students[method, seed].eval()
        print(f"{method:4s} seed {seed}  best {summaries[method, seed]['best_acc']:.2f} %")
models = {method: students[method, seeds[0]] for method in methods}  # the figures show the first seed
cnn = timm.create_model(teacher, num_classes=data.NUM_CLASSES[dataset])
load_weights(cnn, teacher_weights)
cnn.eval()

mean, std = data.stats(dataset)
batches = {seed: data.test_batch(dataset, equivariance_images, seed, download=download)[0] for seed in seeds}
images = batches[seeds[0]]
shown = images[torch.linspace(0, len(images) - 1, images_shown).long()]


def to_rgb(batch: torch.Tensor) -> np.ndarray:
    rgb = batch * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()


# %% [markdown]
# ## Attention on test images
# Rows: images. Columns: the image, then per student the last layer's class-token attention averaged
# over heads and the attention rollout over all layers (both upsampled from the 8×8 patch grid).

# %%
fig, axes = plt.subplots(len(shown), 1 + 2 * len(models), figsize=(2 * (1 + 2 * len(models)), 2 * len(shown)))
axes = np.atleast_2d(axes)
maps = {m: analysis.attention_maps(model, shown) for m, model in models.items()}
for row, rgb in enumerate(to_rgb(shown)):
    axes[row, 0].imshow(rgb)
    for k, method in enumerate(models):
        last = analysis.cls_attention(maps[method])[row].mean(0)
        roll = analysis.rollout_cls_map(maps[method])[row]
        for col, (name, grid) in enumerate([("last layer", last), ("rollout", roll)]):
            ax = axes[row, 1 + 2 * k + col]
            ax.imshow(rgb)
            ax.imshow(grid.numpy(), cmap="inferno", alpha=0.6, extent=(-0.5, 31.5, 31.5, -0.5),
                      interpolation="bilinear")
            if row == 0:
                ax.set_title(f"{method}: {name}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
fig.savefig(figures / "04_attention_maps.png", dpi=110, bbox_inches="tight")

# %%
heads = analysis.cls_attention(maps[methods[-1]])[0]
fig, axes = plt.subplots(1, heads.shape[0] + 1, figsize=(2 * (heads.shape[0] + 1), 2.2))
axes[0].imshow(to_rgb(shown[:1])[0])
for h, ax in enumerate(axes[1:]):
    ax.imshow(heads[h].numpy(), cmap="inferno")
    ax.set_title(f"{methods[-1]} head {h}", fontsize=9)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
fig.savefig(figures / "04_attention_heads.png", dpi=110, bbox_inches="tight")

# %% [markdown]
# ## The moved object
# The central 16×16 crop of a test image pasted at three positions of a plain background (the
# dataset mean); the rollout maps of each student, and the CNN teacher's feature-map norm.

# %%
obj = shown[0, :, 8:24, 8:24]
positions = [(0, 0), (8, 8), (16, 16)]
canvas = torch.zeros(len(positions), 3, 32, 32)
for i, (y, x) in enumerate(positions):
    canvas[i, :, y:y + 16, x:x + 16] = obj
rows = {m: analysis.rollout_cls_map(analysis.attention_maps(model, canvas)) for m, model in models.items()}
with torch.no_grad():
    rows[f"teacher {teacher} (‖feature‖)"] = cnn.forward_features(canvas).norm(dim=1)
fig, axes = plt.subplots(1 + len(rows), len(positions), figsize=(2.2 * len(positions), 2.2 * (1 + len(rows))))
for j, rgb in enumerate(to_rgb(canvas)):
    axes[0, j].imshow(rgb)
    for i, (name, grids) in enumerate(rows.items(), start=1):
        axes[i, j].imshow(grids[j].numpy(), cmap="inferno")
        if j == 0:
            axes[i, j].set_ylabel(name, fontsize=8)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
fig.savefig(figures / "04_moved_object.png", dpi=110, bbox_inches="tight")

# %% [markdown]
# ## Translational equivariance µ_T
# Per seed, on that seed's test images: each student of the seed and the teacher.

# %%
rows, per_image = [], {}  # per_image: (model, seed) -> µ_T of each image
for seed in seeds:
    for name, model in {**{m: students[m, seed] for m in methods}, f"teacher {teacher}": cnn}.items():
        mu = analysis.translation_equivariance(lambda x, m=model: analysis.feature_grid(m, x), batches[seed],
                                               shift=1, cell=4)
        per_image[name, seed] = mu
        summary = summaries.get((name, seed))
        rows.append({"model": name, "mu_T_mean": mu.mean().item(), "mu_T_std": mu.std().item(), "images": len(mu),
                     "best_top1": summary["best_acc"] if summary else None, "epochs": epochs, "fraction": fraction,
                     **(run_record(summary, profile) if summary else {"seed": seed, "profile": profile})})
table = pd.DataFrame(rows).round(4)
table.to_csv(figures / "04_equivariance.csv", index=False)
# over seeds: each run's mean µ_T and accuracy, mean ± std across seeds
statistics = over_seeds(table.drop(columns=["mu_T_std"]), decimals=4, values=("mu_T_mean", "best_top1"))
if len(seeds) > 1:
    statistics.to_csv(figures / "04_equivariance_seeds.csv", index=False)
table if len(seeds) == 1 else statistics

# %% [markdown]
# ## Paper vs. this run

# %%
# The students of a seed are measured on the same images, so the comparison uses the per-image differences
# (pooled over seeds): a difference counts only when it exceeds twice its standard error.
if {"ce", "vkd"} <= set(methods):
    for other in [m for m in ("vkd", "kd") if m in methods]:
        difference = torch.cat([per_image[other, seed] - per_image["ce", seed] for seed in seeds])
        mean, error = difference.mean().item(), difference.std().item() / len(difference) ** 0.5
        verdict = ("agrees with" if mean < -2 * error else "does not agree with" if mean > 2 * error
                   else "is inconclusive (difference within two standard errors) about")
        print(f"µ_T {other} − student alone: {mean:+.4f} ± {error:.4f} (paired, {len(difference)} images, "
              f"seeds {seeds}) -> this run {verdict} the papers' claim that distilling from a CNN makes the ViT "
              "more translation-equivariant.")

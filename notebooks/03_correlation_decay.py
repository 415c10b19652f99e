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
# # 03 · Input–output correlation of the projector, and VkD's projector ablation
#
# **Paper B, figure 3**: the correlation between a projector's input and output decays during
# training, for a linear projector least (final ≈ 0.36) and for narrow MLPs most (MLP-64 ≈ 0.32):
# more capacity lets the projector decorrelate from the student, i.e. learn a representation of its
# own that is discarded after training. **Paper A's ablation**: an orthogonal projector (which cannot
# decorrelate -- it preserves all inner products) converges faster and ends higher than linear, MLP
# and ensemble projectors.
#
# The papers do not define the correlation measure. We report two (`vkd.analysis`):
# `matched` -- mean |Pearson correlation| between input dimension i and output dimension i;
# `cka` -- linear CKA between the input and output batches. `measure` picks the one plotted first.
# Every run is VkD (teacher layer norm, smooth-L1) with only the projector changed.

# %% tags=["parameters"]
profile: str = "smoke"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/03"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs, shared with notebook 02 (same settings -> trained once)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 1.0  # class-stratified fraction of the training set
test_fraction: float = 1.0  # class-stratified fraction of the test set
teacher: str = "resnet50_cifar"  # teacher architecture
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 240  # epochs when the teacher is trained here
student: str = "resnet8x4"  # student architecture
projectors: list = ["linear", "mlp-64", "mlp-512", "mlp-2048", "ensemble-512", "orthogonal"]  # kind[-hidden]
measure: str = "matched"  # matched | cka: the correlation plotted first
probe_images: int = 512  # fixed test images on which the correlation is measured
probe_every: int = 20  # optimiser steps between correlation measurements
smoothing: int = 5  # moving-average window (in measurements) of the plotted curves
epochs: int = 240
batch_size: int = 64
lr: float = 0.05
teacher_cache_views: int = 0  # >0: cache teacher outputs for that many augmentation views
seed: int = 0
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vkd import analysis, data
from vkd.engine import TrainConfig, train, train_teacher
from vkd.paths import output_dir

figures = output_dir(figures_dir)
tag = f"{dataset}-{int(fraction * 100)}pct-{profile}"
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction,
              batch_size=batch_size, lr=lr, seed=seed, device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   **common)

probe_batch, _ = data.test_batch(dataset, probe_images, seed, download=download)


# %%
def correlation(distiller) -> dict:
    inputs, outputs = distiller.projector_io(probe_batch.to(next(distiller.parameters()).device), "vkd")
    return {name: fn(inputs, outputs) for name, fn in analysis.CORRELATIONS.items()}


summaries, curves, accuracy = {}, [], []
for spec in projectors:
    kind, _, hidden = spec.partition("-")
    options = {"vkd_projector": kind, **({"vkd_hidden": int(hidden)} if hidden else {})}
    config = TrainConfig(student=student, method="vkd", epochs=epochs, teacher=teacher,
                         teacher_checkpoint=teacher_weights, method_options=options,
                         teacher_cache_views=teacher_cache_views, out_dir=f"{runs_dir}/{tag}", **common)
    config = config.named(f"{spec}-{student}")
    summaries[spec] = train(config, probe=correlation, probe_every=probe_every)
    run = config.run_dir()
    curves.append(pd.read_json(run / "probes.json").assign(projector=spec))
    accuracy.append(pd.read_csv(run / "metrics.csv").assign(projector=spec))
    print(f"{spec:12s} best {summaries[spec]['best_acc']:.2f} %")
curves, accuracy = pd.concat(curves, ignore_index=True), pd.concat(accuracy, ignore_index=True)
curves.to_csv(figures / "03_correlation_decay.csv", index=False)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, name in zip(axes, [measure, *[m for m in analysis.CORRELATIONS if m != measure]], strict=True):
    smooth = curves.assign(value=curves.groupby("projector")[name].transform(
        lambda v: v.rolling(smoothing, min_periods=1).mean()))
    sns.lineplot(data=smooth, x="step", y="value", hue="projector", ax=ax, legend=ax is axes[0])
    ax.set(xlabel="iteration", ylabel=f"input-output correlation ({name})")
fig.suptitle(f"Projector input-output correlation, {student} ← {teacher} (VkD loss)", y=1.02)
fig.savefig(figures / "03_correlation_decay.png", dpi=120, bbox_inches="tight")

# %%
fig, ax = plt.subplots(figsize=(6, 3.8))
sns.lineplot(data=accuracy, x="epoch", y="test_acc", hue="projector", marker="o", ax=ax)
ax.set(ylabel="test top-1 (%)", title=f"VkD projector ablation, {student} ← {teacher}")
fig.savefig(figures / "03_projector_ablation.png", dpi=120, bbox_inches="tight")
final = curves.groupby("projector").tail(1).set_index("projector")
table = pd.DataFrame({
    "projector": list(summaries),
    "start_matched": [curves[curves.projector == p].matched.iloc[0] for p in summaries],
    "end_matched": [final.loc[p, "matched"] for p in summaries],
    "start_cka": [curves[curves.projector == p].cka.iloc[0] for p in summaries],
    "end_cka": [final.loc[p, "cka"] for p in summaries],
    "best_top1": [s["best_acc"] for s in summaries.values()], "last_top1": [s["last_acc"] for s in summaries.values()],
    "epochs": epochs, "fraction": fraction, "seed": seed, "device": next(iter(summaries.values()))["device"],
    "profile": profile}).round(4)
table.to_csv(figures / "03_projector_ablation.csv", index=False)
table

# %% [markdown]
# ## Paper vs. this run
# Printed from the table: does the correlation decay, is the linear projector's final correlation
# above the MLPs', and does the orthogonal projector end with the best accuracy?

# %%
t = table.set_index("projector")
mlps = [p for p in t.index if p.startswith("mlp")]
print("correlation decays for:", [p for p in t.index if t.loc[p, f"end_{measure}"] < t.loc[p, f"start_{measure}"]])
if "linear" in t.index and mlps:
    above = all(t.loc["linear", f"end_{measure}"] > t.loc[m, f"end_{measure}"] for m in mlps)
    print(f"linear ends above every MLP ({measure}): {above} (paper: yes)")
print(f"best final accuracy: {t.last_top1.idxmax()} (paper A: orthogonal)")

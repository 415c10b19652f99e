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
# Every run is VkD (teacher layer norm, smooth-L1) with only the projector changed. With several `seeds`
# every projector is trained once per seed (each seed draws its training subset and its probe images) and
# the ablation is also given as mean ± std over the seeds, with each projector's rank among the projectors of
# its seed (1: the best last top-1).
#
# **Paper A's t-SNE figure**: the student's features after an orthogonal and after a linear projection.
# At the end we map the probe images' projected features with t-SNE and measure how well the classes
# separate in each space (leave-one-out k-NN accuracy, `vkd.analysis.knn_accuracy`).

# %% tags=["parameters"]
profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/03"  # run folders
teachers_dir: str = "runs/teachers"  # teacher runs, shared with notebook 02 (same settings -> trained once)
dataset: str = "cifar10-jpeg"  # cifar10-jpeg | cifar10 | cifar100
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 0.1  # class-stratified fraction of the training set
test_fraction: float = 0.2  # class-stratified fraction of the test set
teacher: str = "resnet8x4"  # teacher architecture; full: resnet50_cifar
teacher_checkpoint: str = ""  # weights of a trained teacher; empty: train one here first
teacher_epochs: int = 5  # epochs when the teacher is trained here
student: str = "resnet8"  # student architecture; full: resnet8x4
projectors: list = ["linear", "mlp-64", "mlp-512", "mlp-2048", "ensemble-512", "orthogonal"]  # kind[-hidden]
measure: str = "matched"  # matched | cka: the correlation plotted first
probe_images: int = 512  # fixed test images on which the correlation is measured
probe_every: int = 8  # optimiser steps between correlation measurements
smoothing: int = 5  # moving-average window (in measurements) of the plotted curves and of their peaks
tsne_projectors: list = ["linear", "orthogonal"]  # projectors whose projected features get a t-SNE panel
knn: int = 5  # neighbours of the k-NN accuracy that measures class separation in a feature space
epochs: int = 4  # full: 240
batch_size: int = 64
lr: float = 0.05
teacher_cache_views: int = 2  # >0: cache teacher outputs for that many augmentation views
seeds: list = [0]  # student seeds; the teacher and the feature-geometry section use the first
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from vkd import analysis, data
from vkd.engine import TrainConfig, load_distiller, train, train_teacher
from vkd.paths import output_dir, run_group
from vkd.results import distinct_seeds, over_seeds, run_record

seeds = distinct_seeds(seeds)
figures = output_dir(figures_dir)
tag = run_group(dataset, fraction, profile)
common = dict(dataset=dataset, download=download, fraction=fraction, test_fraction=test_fraction,
              batch_size=batch_size, lr=lr, seed=seeds[0], device=device)
teacher_weights, _ = train_teacher(teacher, teacher_epochs, teacher_checkpoint, out_dir=f"{teachers_dir}/{tag}",
                                   **common)

probes = {seed: data.test_batch(dataset, probe_images, seed, download=download) for seed in seeds}


# %%
def correlation_on(images: torch.Tensor):
    """The probe of a run: both correlation measures of its projector on ``images``."""
    def correlation(distiller) -> dict:
        inputs, outputs = distiller.projector_io(images.to(next(distiller.parameters()).device), "vkd")
        return {name: fn(inputs, outputs) for name, fn in analysis.CORRELATIONS.items()}
    return correlation


summaries, configs, curves, accuracy = {}, {}, [], []  # summaries, configs: (projector, seed) -> run's
for seed in seeds:
    for spec in projectors:
        kind, _, hidden = spec.partition("-")
        options = {"vkd_projector": kind, **({"vkd_hidden": int(hidden)} if hidden else {})}
        config = TrainConfig(student=student, method="vkd", epochs=epochs, teacher=teacher,
                             teacher_checkpoint=teacher_weights, method_options=options,
                             teacher_cache_views=teacher_cache_views, out_dir=f"{runs_dir}/{tag}",
                             **{**common, "seed": seed})
        configs[spec, seed] = config = config.named(f"{spec}-{student}")
        summaries[spec, seed] = train(config, probe=correlation_on(probes[seed][0]), probe_every=probe_every)
        run = config.run_dir()
        curves.append(pd.read_json(run / "probes.json").assign(projector=spec, seed=seed))
        accuracy.append(pd.read_csv(run / "metrics.csv").assign(projector=spec, seed=seed))
        print(f"{spec:12s} seed {seed}  best {summaries[spec, seed]['best_acc']:.2f} %")
curves, accuracy = pd.concat(curves, ignore_index=True), pd.concat(accuracy, ignore_index=True)
curves.to_csv(figures / "03_correlation_decay.csv", index=False)
seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean and 95 % interval over seeds {seeds}"

# %%
runs = ["projector", "seed"]
smooth = curves.assign(**curves.groupby(runs)[list(analysis.CORRELATIONS)].transform(
    lambda v: v.rolling(smoothing, min_periods=1).mean()))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, name in zip(axes, [measure, *[m for m in analysis.CORRELATIONS if m != measure]], strict=True):
    sns.lineplot(data=smooth, x="step", y=name, hue="projector", ax=ax, legend=ax is axes[0])
    ax.set(xlabel="iteration", ylabel=f"input-output correlation ({name})")
fig.suptitle(f"Projector input-output correlation, {student} ← {teacher} (VkD loss), {seeds_text}", y=1.02)
fig.savefig(figures / "03_correlation_decay.png", dpi=120, bbox_inches="tight")

# %%
fig, ax = plt.subplots(figsize=(6, 3.8))
sns.lineplot(data=accuracy, x="epoch", y="test_acc", hue="projector", marker="o", ax=ax)
ax.set(ylabel="test top-1 (%)", title=f"VkD projector ablation, {student} ← {teacher}\n{seeds_text}")
fig.savefig(figures / "03_projector_ablation.png", dpi=120, bbox_inches="tight")
first = curves.groupby(runs).head(1).set_index(runs)
final = curves.groupby(runs).tail(1).set_index(runs)
peaks = smooth.loc[smooth.groupby(runs)[measure].idxmax()].set_index(runs)  # of the plotted curve
table = pd.DataFrame({
    "projector": [spec for spec, _ in summaries],
    "start_matched": [first.loc[run, "matched"] for run in summaries],
    "end_matched": [final.loc[run, "matched"] for run in summaries],
    f"peak_{measure}": [peaks.loc[run, measure] for run in summaries],
    "peak_step": [peaks.loc[run, "step"] for run in summaries],
    "start_cka": [first.loc[run, "cka"] for run in summaries],
    "end_cka": [final.loc[run, "cka"] for run in summaries],
    "best_top1": [s["best_acc"] for s in summaries.values()], "last_top1": [s["last_acc"] for s in summaries.values()],
    "epochs": epochs, "fraction": fraction}).round(4)
table = table.join(pd.DataFrame([run_record(s, profile) for s in summaries.values()]))
table.insert(table.columns.get_loc("last_top1") + 1, "rank",  # among the projectors of its seed, by last top-1
             table.groupby("seed").last_top1.rank(ascending=False, method="min").astype(int))
table.to_csv(figures / "03_projector_ablation.csv", index=False)
# over seeds: each projector's final correlation, accuracy and rank, mean ± std across seeds
statistics = over_seeds(table.drop(columns=["start_matched", f"peak_{measure}", "peak_step", "start_cka", "end_cka"]),
                        baseline=None, decimals=4, values=("end_matched", "best_top1", "last_top1", "rank"))
if len(seeds) > 1:
    statistics.to_csv(figures / "03_projector_ablation_seeds.csv", index=False)
table if len(seeds) == 1 else statistics

# %% [markdown]
# ## Feature geometry after the projection (paper A's t-SNE figure)
# Each trained student of the first seed: its pooled features on the probe images, before and after its
# projector, and the teacher's: class separation as k-NN accuracy in each space (the orthogonal projector
# keeps every distance of the student, so its two numbers agree by construction), and t-SNE maps of the
# projected features next to the teacher's.

# %%
probe_batch, probe_labels = probes[seeds[0]]
with torch.no_grad():
    distillers = {spec: load_distiller(configs[spec, seeds[0]]) for spec in projectors}
    spaces = {spec: distiller.projector_io(probe_batch, "vkd") for spec, distiller in distillers.items()}
    teacher_features = next(iter(distillers.values())).teacher_outputs(probe_batch, pooled=True)[0]
geometry = pd.DataFrame({
    "projector": list(spaces),
    "knn_student": [analysis.knn_accuracy(inputs, probe_labels, knn) for inputs, _ in spaces.values()],
    "knn_projected": [analysis.knn_accuracy(outputs, probe_labels, knn) for _, outputs in spaces.values()],
    "knn_teacher": analysis.knn_accuracy(teacher_features, probe_labels, knn), "k": knn,
    "probe_images": len(probe_labels), "epochs": epochs, "fraction": fraction})
geometry = geometry.join(pd.DataFrame([run_record(summaries[spec, seeds[0]], profile) for spec in spaces]))
geometry = geometry.round({"knn_student": 2, "knn_projected": 2, "knn_teacher": 2})
geometry.to_csv(figures / "03_feature_geometry.csv", index=False)

class_names = data.load_tensor_data(dataset, "test", download=download).classes
panels = {"teacher": teacher_features, **{f"{p} projection": spaces[p][1] for p in tsne_projectors if p in spaces}}
fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
for ax, (title, features) in zip(axes[0], panels.items(), strict=True):
    xy = analysis.tsne(features, seeds[0])
    sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=[class_names[i] for i in probe_labels], hue_order=class_names,
                    palette="tab10", s=8, linewidth=0, ax=ax, legend=ax is axes[0, -1] and len(class_names) <= 10)
    ax.set(title=title, xticks=[], yticks=[], xlabel="", ylabel="")
if axes[0, -1].get_legend() is not None:
    axes[0, -1].legend(title="class", bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=7)
fig.suptitle(f"t-SNE of {len(probe_labels)} test images' features, {student} ← {teacher} (VkD loss)", y=1.03)
fig.savefig(figures / "03_feature_tsne.png", dpi=120, bbox_inches="tight")
geometry

# %% [markdown]
# ## Paper vs. this run
# Printed from the tables (with several seeds, from each projector's means over them): does the correlation
# decay, is the linear projector's final correlation above the MLPs', does the orthogonal projector end with
# the best accuracy, and in which student's feature space do the classes separate best?

# %%
columns = [f"start_{measure}", f"end_{measure}", f"peak_{measure}", "last_top1"]
t = table.groupby("projector", sort=False)[columns].mean()
mlps = [p for p in t.index if p.startswith("mlp")]
print("correlation ends below its start for:",
      [p for p in t.index if t.loc[p, f"end_{measure}"] < t.loc[p, f"start_{measure}"]])
print("fall from the (smoothed) peak to the end:",
      {p: round(float(t.loc[p, f"peak_{measure}"] - t.loc[p, f"end_{measure}"]), 3) for p in t.index})
if "linear" in t.index and mlps:
    above = all(t.loc["linear", f"end_{measure}"] > t.loc[m, f"end_{measure}"] for m in mlps)
    print(f"linear ends above every MLP ({measure}): {above} (paper: yes)")
print(f"best final accuracy (last top-1, mean over seeds {seeds}): {t.last_top1.idxmax()} (paper A: orthogonal)")
if "orthogonal" in t.index:
    print(f"the orthogonal projector's rank among the {len(projectors)} by last top-1, per seed:",
          dict(zip(seeds, table[table.projector == "orthogonal"]["rank"].tolist(), strict=True)))
g = geometry.set_index("projector")
print(f"classes separate best (k-NN on the student's own features) after training with: {g.knn_student.idxmax()} "
      f"({g.knn_student.max():.1f} %; teacher {g.knn_teacher.iloc[0]:.1f} %)")

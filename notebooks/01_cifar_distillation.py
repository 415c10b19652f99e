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
# # 01 · CIFAR distillation: every method, one training loop
#
# The small-scale experiments of both papers: a teacher, then one student per method -- the student
# alone (CE), KD, FitNet, DKD, SRD ("linear/MLP + BN + LogSum", paper B), VkD (orthogonal projector
# + teacher standardisation, paper A) and SRD+DKD -- all trained by `vkd.engine.train` with the
# same data, schedule and seeds (with several `seeds`, e.g. `[0, 1, 2]`, the tables give mean ± std over
# them). The `full` profile is the CRD / mdistiller recipe (240 epochs, SGD lr 0.05, batch 64, ×0.1 at
# 150/180/210) for resnet32x4 → resnet8x4; `quick` is a CPU-sized version (smaller pair, data fraction,
# few epochs, the committed CPU-trained resnet20 teacher) and `smoke` only proves the plumbing.
#
# The papers report CIFAR-100; the data here is CIFAR-10 (JPEG) unless `dataset` says otherwise, so
# the `paper_top1` column is context (its dataset is shown next to it), not a target.

# %% tags=["parameters"]
from typing import Union  # for compile

profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/01"  # run folders (metrics, checkpoints); reruns resume / reuse them
dataset: str = "cifar10-jpeg"  # cifar10-jpeg (offline archive) | cifar10 | cifar100 (torchvision)
download: bool = False  # let torchvision download CIFAR (online users)
fraction: float = 0.1  # class-stratified fraction of the training set; full: 1.0
test_fraction: float = 0.5  # class-stratified fraction of the test set
teacher: str = "resnet20"  # teacher (timm name): the CPU-trained one of data/teachers/ (85.00 %); full: resnet32x4
# weights of a trained teacher; empty: train one here first (teacher_epochs, teacher_batch_size, teacher_lr)
teacher_checkpoint: str = "data/teachers/resnet20_cifar10-jpeg.pt"
teacher_sha256: str = "09272af3e9e26b5808eeaaca9ca74d36c95fc52dcc4fa7ea14c0e8d9b324cd2a"  # its checksum (optional)
teacher_epochs: int = 240  # epochs when the teacher is trained here
teacher_batch_size: int = 0  # batch size when the teacher is trained here; 0: batch_size
teacher_lr: float = 0.0  # learning rate when the teacher is trained here; 0: lr
student: str = "resnet8"  # student architecture (timm name); full: resnet8x4
methods: list = ["ce", "kd", "fitnet", "dkd", "srd", "vkd", "srd+dkd"]  # METHODS; "srd@x": srd with own method_options
method_options: dict = {}  # per methods entry, MethodConfig overrides, e.g. {"vkd": {"vkd_weight": 50}}
epochs: int = 10  # student epochs; full: 240, the recipe
batch_size: int = 64
lr: float = 0.05
weight_decay: float = 5e-4
teacher_cache_views: int = 4  # >0: cache teacher outputs for that many augmentation views (CPU speed-up)
seeds: list = [0]  # student seeds (each also draws the data fractions); the teacher is trained with the first
device: str = "auto"  # auto | cpu | cuda
parallel: int = 1  # students trained at once, as separate processes (several share one GPU well)
compile: Union[bool, str] = False  # torch.compile the training forward; or a mode ("reduce-overhead": CUDA graphs)
cuda_graph: bool = False  # GPU: replay each whole training step as one CUDA graph (SGD; compile true or false)

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vkd.distillers import check_methods, method_of
from vkd.engine import TrainConfig, train_teacher
from vkd.launch import train_many
from vkd.models import check_model_names
from vkd.paths import output_dir, resolve, run_group
from vkd.results import (
    committed_teacher_row,
    distinct_seeds,
    over_seeds,
    render_table,
    run_record,
    with_paper_numbers,
)

seeds = distinct_seeds(seeds)
check_methods(methods, method_options)  # here, not after the teacher has trained
check_model_names(teacher, student)
figures = output_dir(figures_dir)
tag = run_group(dataset, fraction, profile)
common = dict(out_dir=f"{runs_dir}/{tag}", dataset=dataset, download=download, fraction=fraction,
              test_fraction=test_fraction, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seeds[0],
              device=device, compile=compile, cuda_graph=cuda_graph)

# %% [markdown]
# ## Teacher
# Trained with the same loop (method `ce`), unless `teacher_checkpoint` points to weights -- vkd's own
# `model.pt` or an mdistiller CIFAR teacher checkpoint; its sha256 is recorded in every summary.

# %%
teacher_settings = {**common, "batch_size": teacher_batch_size or batch_size, "lr": teacher_lr or lr}
teacher_weights, teacher_summary = train_teacher(teacher, teacher_epochs, teacher_checkpoint, **teacher_settings)

# %% [markdown]
# ## Students
# One run per method (or variant, `"method@label"`) and seed, all distilled from the one teacher above.

# %%
runs = [(method, seed) for seed in seeds for method in methods]  # method: a methods entry, maybe a variant
alone = {method: method_of(method) == "ce" for method in methods}
configs = [TrainConfig(
    student=student, method=method_of(method), epochs=epochs, teacher=None if alone[method] else teacher,
    teacher_checkpoint=None if alone[method] else teacher_weights, teacher_sha256=teacher_sha256 or None,
    teacher_cache_views=0 if alone[method] else teacher_cache_views, method_options=method_options.get(method, {}),
    **{**common, "seed": seed}).named(f"{method}-{student}")
    for method, seed in runs]
summaries = dict(zip(runs, train_many(configs, parallel), strict=True))
width = max(map(len, methods))  # of the printed method names
for (method, seed), s in summaries.items():
    print(f"{method:{width}s} seed {seed}  best {s['best_acc']:6.2f} %  last {s['last_acc']:6.2f} %  "
          f"{s['wall_seconds']:6.0f} s")

# %%
def row(method: str, s: dict) -> dict:
    return {"method": method, "teacher": teacher, "student": s["student"], "dataset": s["dataset"],
            "options": " ".join(f"{k}={v}" for k, v in s["config"]["method_options"].items()),
            "fraction": s["fraction"], "epochs": s["epochs"], "batch": s["config"]["batch_size"],
            "best_top1": round(s["best_acc"], 2), "last_top1": round(s["last_acc"], 2), **run_record(s, profile)}

rows = [row(method, s) for (method, _), s in summaries.items()]
if teacher_summary is not None:
    rows.insert(0, {**row("teacher", teacher_summary), "student": student})
elif (record := committed_teacher_row(teacher_weights)) is not None:  # as measured when it was trained
    rows.insert(0, record)
results = with_paper_numbers(pd.DataFrame(rows, columns=list(rows[-1])).astype({"seed": "Int64"}))
results.loc[results.method == "teacher", "student"] = teacher + " (teacher)"
results.to_csv(figures / "01_cifar_results.csv", index=False)
seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean and std over seeds {seeds}"
statistics = over_seeds(results)
if len(seeds) > 1:
    statistics.to_csv(figures / "01_cifar_seeds.csv", index=False)
shown = results if len(seeds) == 1 else statistics
student_device = results.device.iloc[-1]  # not the first row's: a committed teacher was trained elsewhere
title = f"{dataset}, {fraction:.0%} of the training data, profile {profile}, {seeds_text}, {student_device}"
render_table(shown.drop(columns=["git", "seed", "profile", "device"], errors="ignore"),
             figures / "01_cifar_results.png", title)
shown

# %%
curves = []
for (method, seed), s in summaries.items():
    metrics = pd.read_csv(resolve(common["out_dir"]) / s["name"] / "metrics.csv")
    curves.append(metrics.assign(method=method, seed=seed))
curves = pd.concat(curves, ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))  # several seeds: mean, band of ± one standard deviation
sns.lineplot(data=curves, x="epoch", y="test_acc", hue="method", errorbar="sd", ax=axes[0],
             marker="o" if epochs <= 30 else None)
sns.lineplot(data=curves, x="epoch", y="train_loss", hue="method", errorbar="sd", ax=axes[1], legend=False)
axes[0].set(ylabel="test top-1 (%)", title=f"{teacher} → {student}, {seeds_text}")
axes[1].set(ylabel="training loss (weighted sum)", yscale="log")
fig.tight_layout()
fig.savefig(figures / "01_cifar_curves.png", dpi=120, bbox_inches="tight")

# %%
students = statistics[statistics.method != "teacher"].set_index("method")
if "gain_mean" in students:
    for method, s in students.iterrows():
        spread = "" if len(seeds) == 1 else f" (mean ± {s.gain_std:.2f} over {s.seeds} seeds)"
        print(f"{method:{width}s} {s.gain_mean:+6.2f} points (best top-1) vs the student alone{spread}")
print(json.dumps(students.best_top1_mean.round(2).to_dict()))

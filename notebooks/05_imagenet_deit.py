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
# # 05 · DeiT students distilled from a RegNetY-160 teacher (ImageNet), launched with torchrun
#
# The headline experiment of both papers: DeiT-Ti / DeiT-S⚗ students trained on ImageNet-1K for 300
# epochs from the RegNetY-160 teacher, with the DeiT recipe (RandAugment, random erasing,
# Mixup/CutMix, label smoothing, drop-path, AdamW + cosine) and the loss
# CE(class head) + γ·KL(distillation head ‖ teacher, T=1) + α·VkD(mean patch token → layer-normed
# pooled teacher feature) -- or SRD in place of VkD.
#
# The notebook never owns the distributed job: each run is written as a config and launched as
# `torchrun --module vkd train --config ...` (one process per GPU; gloo processes on a CPU), and the
# notebook follows its `metrics.csv`. Runs resume from their checkpoints when relaunched.
#
# Profiles: `smoke` -- a tiny ImageFolder of real CIFAR-10 images, a 2-block DeiT student, the
# committed resnet32x4 CIFAR-10 teacher, two CPU processes, one epoch; `quick` -- CIFAR-10 (JPEG) as
# an ImageFolder at 32 px with the same teacher, minutes on a CPU; `full` -- ImageNet, 300 epochs,
# `regnety_160.deit_in1k` (timm's hub or a local weights file), on GPUs.

# %% tags=["parameters"]
profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # figures and CSVs (relative to the project root)
runs_dir: str = "runs/05"  # run folders
data: str = "cifar10-jpeg"  # imagenet (full: data_root holds train/ and val/) | cifar10-jpeg | cifar10-jpeg-tiny
data_root: str = "data/imagenet"  # ImageFolder with train/ and val/ (data "imagenet")
tiny_per_class: int = 8  # cifar10-jpeg-tiny: images per class in each split
fraction: float = 0.05  # class-stratified fraction of the training set
test_fraction: float = 0.2  # ... of the evaluation set
student: str = "deit_tiny_distilled_patch16_224"  # timm name (deit_small_distilled_patch16_224 for S)
student_options: dict = {"depth": 4, "img_size": 32, "patch_size": 4}  # timm.create_model arguments; full: {}
teacher: str = "resnet32x4"  # timm name (with its pretrained tag); full: regnety_160.deit_in1k
# local weights of the teacher; empty (full): timm's hub (online)
teacher_checkpoint: str = "data/teachers/resnet32x4_cifar10-jpeg.pt"
teacher_sha256: str = "53ec9c1e6acac852e232049cb2e70120168a40ecb87fac59f196ebf98d8cc6fc"  # its checksum (optional)
methods: list = ["kd", "vkd"]  # feature loss next to CE + KD: vkd | srd (kd: DeiT⚗ alone); full: [vkd, srd]
vkd_weight: float = 1.0  # α
kd_weight: float = 1.0  # γ
epochs: int = 4  # full: 300
batch_size: int = 64  # per process; full: 256
lr: float = 5e-4
weight_decay: float = 0.05
warmup_epochs: int = 1
image_size: int = 32  # full: 224
auto_augment: str = "rand-m9-mstd0.5-inc1"
reprob: float = 0.25  # random erasing
mixup: float = 0.8
cutmix: float = 1.0
label_smoothing: float = 0.1
drop_path: float = 0.1
clip_grad: float = 0.0
ema_decay: float = 0.0  # >0: also evaluate an EMA of the student
workers: int = 1  # data-loading processes per training process
nproc_per_node: int = 2  # training processes on this machine (GPUs); full: 8
nnodes: int = 1  # machines; >1 needs rdzv_endpoint and node_rank
node_rank: int = 0
rdzv_endpoint: str = ""  # host:port of node 0
seed: int = 0
device: str = "auto"

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vkd import data as vdata
from vkd.engine import TrainConfig
from vkd.launch import launch_torchrun
from vkd.paths import output_dir, resolve
from vkd.results import render_table, run_record, with_paper_numbers

figures = output_dir(figures_dir)
if data == "cifar10-jpeg":
    root = vdata.cifar10_jpeg_dir()
elif data == "cifar10-jpeg-tiny":
    root = vdata.small_imagefolder(vdata.cifar10_jpeg_dir(), f"{runs_dir}/imagefolder-{tiny_per_class}",
                                   tiny_per_class)
else:
    root = resolve(data_root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(f"no ImageNet ImageFolder at {root}: expected {root}/train/<class>/*.JPEG and "
                                f"{root}/val/<class>/*.JPEG (set data_root, or data='cifar10-jpeg' to try offline)")
if not teacher_checkpoint:
    print(f"teacher weights: timm's hub ({teacher}, needs the internet or timm's cache)")
elif not resolve(teacher_checkpoint).is_file():
    raise FileNotFoundError(f"no teacher weights at {resolve(teacher_checkpoint)}: put the {teacher} weights there "
                            f"(a state dict, or timm's / DeiT's release file), or leave teacher_checkpoint empty "
                            f"to download them (online)")

# %% [markdown]
# ## Training: one torchrun job per method

# %%
objective = {"ce_weight": 1.0, "kd_weight": kd_weight, "temperature": 1.0}  # CE(class head) + γ·KL(T=1), every method
summaries = {}
for method in methods:
    options = {**objective, **({"vkd_weight": vkd_weight} if method == "vkd" else {})}
    config = TrainConfig(
        out_dir=runs_dir, dataset="imagefolder", data_root=str(root), fraction=fraction, test_fraction=test_fraction,
        student=student, student_options=student_options, teacher=teacher,
        teacher_checkpoint=teacher_checkpoint or None, teacher_sha256=teacher_sha256 or None,
        teacher_pretrained=not teacher_checkpoint, method=method, method_options=options, epochs=epochs,
        batch_size=batch_size, optimizer="adamw", lr=lr, weight_decay=weight_decay, schedule="cosine",
        warmup_epochs=warmup_epochs, image_size=image_size, auto_augment=auto_augment, reprob=reprob, mixup=mixup,
        cutmix=cutmix, label_smoothing=label_smoothing, drop_path=drop_path, clip_grad=clip_grad,
        ema_decay=ema_decay, workers=workers, seed=seed, device=device).named(f"{method}-{student}")
    summaries[method] = launch_torchrun(config, nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    s = summaries[method]
    print(f"{method}: top-1 {s['last_acc']:.2f} % (best {s['best_acc']:.2f}), {s['wall_seconds']:.0f} s, "
          f"{s['processes']} process(es) on {s['device']}")

# %%
rows = [{"method": m, "teacher": teacher.split(".")[0], "student": student, "data": data,
         "fraction": s["fraction"], "epochs": s["epochs"], "processes": s["processes"],
         "best_top1": round(s["best_acc"], 2), "last_top1": round(s["last_acc"], 2),
         "last_top5": round(s["last_top5"], 2), **run_record(s, profile)} for m, s in summaries.items()]
results = with_paper_numbers(pd.DataFrame(rows))
results.to_csv(figures / "05_imagenet_deit.csv", index=False)
render_table(results.drop(columns=["seed", "profile", "device", "git"]), figures / "05_imagenet_deit.png",
             f"{student} from {teacher}, data {data}, profile {profile}, {results.device.iloc[0]}")
results

# %%
curves = pd.concat([pd.read_csv(resolve(runs_dir) / s["name"] / "metrics.csv").assign(method=m)
                    for m, s in summaries.items()], ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
sns.lineplot(data=curves, x="epoch", y="test_acc", hue="method", ax=axes[0], marker="o")
sns.lineplot(data=curves, x="epoch", y="train_loss", hue="method", ax=axes[1], legend=False)
axes[0].set(ylabel="top-1 (%)", title=f"{student} ← {teacher}")
axes[1].set(ylabel="training loss (weighted sum)")
fig.tight_layout()
fig.savefig(figures / "05_imagenet_deit_curves.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Paper vs. this run
# The `paper_top1` column holds the papers' ImageNet numbers (VkD-Ti 78.3, SRD-Ti 77.2, ...) only
# where this run is the ImageNet setting (same teacher and student); other profiles are not comparable.

# %%
for _, r in results.iterrows():
    paper = r.get("paper_top1")
    comparable = data == "imagenet" and epochs >= 300 and fraction == 1.0
    note = (f"paper {paper}" if pd.notna(paper) else "no paper number") + ("" if comparable else
                                                                          " (not comparable: not the ImageNet recipe)")
    print(f"{r.method}: {r.last_top1} % top-1 -- {note}")

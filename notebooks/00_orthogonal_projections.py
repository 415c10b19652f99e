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
# # 00 · Orthogonal projections: what they preserve, and what they cost
#
# VkD (Miles et al., CVPR 2024) projects the student's features Z_s (B × d_s) to the teacher's width
# with a matrix P (d_t × d_s) whose columns are orthonormal, PᵀP = I. Then
# (Z_s Pᵀ)(Z_s Pᵀ)ᵀ = Z_s Z_sᵀ: every pairwise inner product between the student's samples -- the
# relational structure the student should learn from the teacher -- is untouched by the projector, so
# the projector cannot learn a representation of its own.
#
# The paper parametrises P as the first d_s columns of matrix_exp of a d_t × d_t skew matrix, which
# costs O(d_t³) per step; `vkd` computes the same columns by the exponential's action on them,
# O(d_t²·d_s) (`vkd.projectors.expm_columns`), and adds exact parametrisations whose cost grows like
# d_t·d_s²; this notebook measures all of them against `nn.Linear`.

# %% tags=["parameters"]
profile: str = "quick"  # smoke / quick / full: which profile filled these values
figures_dir: str = "figures"  # where figures and CSVs go (relative to the project root)
gram_batch: int = 64  # samples in the Gram-matrix demonstration
gram_student_dim: int = 192  # d_s of the Gram-matrix demonstration
gram_teacher_dim: int = 768  # d_t of the Gram-matrix demonstration
student_dims: list = [192, 384]  # d_s values of the cost sweep
teacher_dims: list = [256, 768, 1536, 3024]  # d_t values of the cost sweep
methods: list = ["stiefel", "cayley", "householder", "exp"]  # orthogonal methods to time
max_exp_dim: int = 3024  # skip "exp"/"householder" above this d_t (each 3024 step takes seconds on a CPU)
batch: int = 256  # batch size of the cost sweep
reps: int = 15  # timed repetitions per measurement (medians are reported)
seed: int = 0  # random seed

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

import vkd
from vkd import analysis
from vkd.bench import bench_projectors
from vkd.paths import output_dir
from vkd.runtime import device_description, git_revision

torch.manual_seed(seed)
out = output_dir(figures_dir)
print(f"profile={profile}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads -> {out}")

# %% [markdown]
# ## 1. The batch Gram matrix survives an orthogonal projection, not a linear one

# %%
z_s = torch.randn(gram_batch, gram_student_dim)
projectors = {
    "student (no projection)": None,
    "orthogonal (stiefel)": vkd.OrthogonalProjector(gram_student_dim, gram_teacher_dim),
    "linear (nn.Linear init)": vkd.LinearProjector(gram_student_dim, gram_teacher_dim),
}
grams, rows = {}, []
with torch.no_grad():
    reference = z_s @ z_s.T
    for name, projector in projectors.items():
        z = z_s if projector is None else projector(z_s)
        grams[name] = z @ z.T
        rows.append({"projection": name, "max |ΔGram| / max |Gram|":
                     ((grams[name] - reference).abs().max() / reference.abs().max()).item()})
gram_table = pd.DataFrame(rows)
gram_table.to_csv(out / "00_gram_preservation.csv", index=False)
gram_table

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
limit = reference.abs().max().item()
for ax, (name, gram) in zip(axes, grams.items(), strict=True):
    image = ax.imshow(gram[:32, :32].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(name, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8, label="⟨z_i, z_j⟩")
fig.suptitle(f"Batch Gram matrix, first 32 of {gram_batch} samples, {gram_student_dim} → {gram_teacher_dim}")
fig.savefig(out / "00_gram_preservation.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## 2. Forward + backward cost against teacher width
# Each point is the median of `reps` forward+backward passes at batch `batch` (float32, CPU),
# measured round-robin with an `nn.Linear` of the same size in the same process. vkd's engine also calls
# `vkd.retract_` after every optimiser step (it resets the free parameters to the same P, see
# `vkd.projectors`); that is timed alongside (`retract_ms`), so the table gives a training step's ratio to
# `nn.Linear` (`step_ratio_to_linear`) next to the forward+backward one.

# %%
frames = []
for d_t in teacher_dims:
    chosen = [m for m in methods if m in ("stiefel", "cayley") or d_t <= max_exp_dim]
    frames.append(bench_projectors(student_dims, [d_t], chosen, batch=batch, reps=reps, seed=seed))
cost = pd.concat(frames, ignore_index=True)
cost = cost.assign(device=device_description(torch.device("cpu")), threads=torch.get_num_threads(), seed=seed,
                   profile=profile, git=git_revision())
cost.to_csv(out / "00_projector_cost.csv", index=False)
cost.pivot_table(index=["student_dim", "teacher_dim"], columns="method",
                 values=["ratio_to_linear", "step_ratio_to_linear"]).round(2)

# %%
grid = sns.relplot(data=cost, x="teacher_dim", y="ms", hue="method", col="student_dim", kind="line",
                   marker="o", height=3.6, aspect=1.1, hue_order=["linear", *methods])
for ax in grid.axes.flat:
    ax.set(xscale="log", yscale="log", xlabel="teacher width d_t", ylabel="forward+backward (ms)")
    ax.set_xticks(teacher_dims, [str(d) for d in teacher_dims], minor=False)
    ax.set_xticks([], minor=True)
grid.figure.suptitle(f"Projector cost, batch {batch}, CPU ({torch.get_num_threads()} threads)", y=1.03)
grid.savefig(out / "00_projector_cost.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## 3. The same P, different steps
# Every method spans the same set of P, but one gradient step at learning rate lr moves P by a different
# multiple ("gain") of the gradient on the manifold, R = G − P·sym(PᵀG), for the same dL/dP = G
# (`vkd.analysis.projector_step`, one random G per shape, P as each method initialises it): for a square P
# `"stiefel"` moves it by exactly 2·lr·R and `"cayley"` by 4·lr·R -- at one learning rate the
# parametrisations train the projector at different speeds.

# %%
step_shapes = [(gram_student_dim, gram_student_dim), (gram_student_dim, gram_teacher_dim)]
steps = pd.DataFrame([
    {"student_dim": d_s, "teacher_dim": d_t, "method": method,
     **analysis.projector_step(vkd.OrthogonalProjector(d_s, d_t, method), torch.randn(d_t, d_s))}
    for d_s, d_t in step_shapes for method in methods
]).assign(seed=seed, git=git_revision())
steps.to_csv(out / "00_projector_step.csv", index=False)
steps.pivot_table(index=["student_dim", "teacher_dim"], columns="method", values=["gain", "alignment"]).round(3)

# %% [markdown]
# ## What this shows
# * The orthogonal projector leaves the Gram matrix unchanged to float32 rounding; a linear
#   projector does not, so it can re-weight the relations the student passes to the teacher.
# * All orthogonal methods reach max|PᵀP − I| ≈ 1e-7 (CSV column `orthogonality_error`).
# * `"exp"` (the paper, evaluated in float64 for exactness: a d_t² matrix times d_s columns, about
#   23 times at initialisation) and `"householder"` (the released code) grow steeply with d_t --
#   seconds per step at d_t = 3024; `"stiefel"`'s forward+backward stays within about 2x of `nn.Linear` at
#   d_s = 192 (see the ratio table and `python -m vkd bench projectors`). Its retraction after each step costs
#   about another half of the linear layer's forward+backward there (`step_ratio_to_linear`), and more at
#   d_s = 384: both it and the Gram matrix of the forward pass cost d_t·d_s², against the layer's batch·d_t·d_s.
# * Exact parametrisations are not interchangeable at a fixed learning rate: the step they take on P differs
#   by the factors in the last table (the quick CIFAR runs of notebook 01 compare them in accuracy).

# %%
columns = ["method", "student_dim", "ms", "ratio_to_linear", "retract_ms", "step_ratio_to_linear",
           "orthogonality_error"]
print(cost.loc[cost.teacher_dim == max(teacher_dims), columns].to_string(index=False))

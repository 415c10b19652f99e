"""Results tables: our runs next to the papers' numbers (``data/paper_numbers.csv``, ``data/paper_fid.csv``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .checkpoints import sha256
from .extras import optional_import
from .paths import checkout_path, resolve

PAPER_NUMBERS = "data/paper_numbers.csv"
PAPER_FID = "data/paper_fid.csv"
TEACHERS = "data/teachers/teachers.csv"


def paper_numbers() -> pd.DataFrame:
    """The papers' reported top-1 accuracies: paper, dataset, teacher, student, method, top1, source."""
    return pd.read_csv(checkout_path(PAPER_NUMBERS))


def paper_fid() -> pd.DataFrame:
    """VkD's data-limited generation table (Inception FID, lower is better): paper, dataset, fraction, method,
    fid, fid_std, source; method names as notebook 06 runs them (da, vkd-layernorm, vkd-whiten, ...)."""
    return pd.read_csv(checkout_path(PAPER_FID))


def with_paper_numbers(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` (columns method, teacher, student) plus ``paper_top1`` and ``paper_dataset``.

    The papers' CIFAR numbers are on CIFAR-100; the match is on (teacher, student, method) and the
    dataset is shown next to the number, so a CIFAR-10 run is never silently compared as equal."""
    paper = paper_numbers().rename(columns={"top1": "paper_top1", "dataset": "paper_dataset"})
    paper = paper[["teacher", "student", "method", "paper_top1", "paper_dataset"]]
    return results.merge(paper, on=["teacher", "student", "method"], how="left")


def committed_teacher_row(checkpoint: str | Path) -> dict | None:
    """The results-table row of a committed teacher (``data/teachers/teachers.csv``: its measured test top-1,
    training epochs, batch, wall time, device), or None when ``checkpoint`` is not that file (by sha256) or no
    checkout's ``data/teachers/teachers.csv`` is at hand."""
    path, teachers = resolve(checkpoint), resolve(TEACHERS)
    if not teachers.is_file():
        return None
    table = pd.read_csv(teachers)
    match = table[table.file == path.name]
    if match.empty or not path.is_file() or sha256(path) != match.sha256.iloc[0]:
        return None
    record = match.iloc[0]
    last = record.test_top1_gpu_bf16 if pd.notna(record.test_top1_gpu_bf16) else record.test_top1_cpu_fp32
    return {"method": "teacher", "teacher": record.arch, "student": f"{record.arch} (teacher)",
            "dataset": record.dataset, "epochs": record.epochs, "batch": record.batch_size,
            "best_top1": record.test_top1_best_gpu, "last_top1": last, "wall_s": record.wall_s,
            "device": record.device, "git": record.vkd_revision}


def run_record(summary: dict, profile: str) -> dict:
    """The columns with which a results row names the run behind it, from the run's summary
    (``vkd.engine.train`` or ``vkd.gan.train_gan``): seed, wall time (s), device, the notebook profile and
    the git revision of the code that trained it."""
    return {"seed": summary["seed"], "wall_s": round(summary["wall_seconds"]), "device": summary["device"],
            "profile": profile, "git": summary["git_revision"]}


def distinct_seeds(seeds: list) -> list:
    """``seeds`` as a notebook's ``seeds`` parameter must give it: one or more, none repeated."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must list one or more distinct seeds, e.g. [0, 1, 2]; got {seeds}")
    return list(seeds)


def over_seeds(results: pd.DataFrame, baseline: str | None = "ce", decimals: int = 2,
               values: tuple[str, ...] = ("best_top1", "last_top1")) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1; NaN for one seed) over seeds of every setting in ``results``.

    ``results`` has one row per run with columns ``seed``, ``wall_s`` and each of ``values`` (by default
    best and last % top-1); a setting is every other column but ``git``.  Returns one row per setting, in
    first-seen order: ``seeds`` (how many runs), ``<value>_mean/_std`` for each value, ``wall_s`` (mean),
    and, when ``baseline`` names a method in ``results``, ``gain_mean/_std``: the paired gain in best top-1
    over the baseline run with the same seed (points; NaN for the teacher and where no such run exists).
    The statistics are rounded to ``decimals``, wall time to seconds."""
    values, required = list(values), {"seed", "wall_s", *values}
    if missing := required - set(results.columns):
        raise ValueError(f"over_seeds needs one row per run with columns {sorted(required)}; missing {sorted(missing)}")
    runs = results.copy()
    if baseline is not None and "method" in runs and (runs.method == baseline).any():
        reference = runs[runs.method == baseline].groupby("seed").best_top1.first()
        runs["gain"] = (runs.best_top1 - runs.seed.map(reference).astype(float)).where(runs.method != "teacher")
        values.append("gain")
    keys = [c for c in runs.columns if c not in required | {"git", "gain"}]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    table = grouped[values].agg(["mean", "std"])
    table.columns = [f"{value}_{stat}" for value, stat in table.columns]
    table = table.round(decimals)
    table.insert(0, "seeds", grouped.size())
    table["wall_s"] = grouped.wall_s.mean().round()
    return table.reset_index()


def render_table(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Save ``table`` as a figure (PNG) for readers who look at figures/ rather than CSVs."""
    cells = table.astype(object).where(table.notna(), "")
    plt = optional_import("matplotlib.pyplot", "notebooks")
    fig, ax = plt.subplots(figsize=(min(22, 1.2 + 1.25 * len(table.columns)), 0.9 + 0.32 * len(table)))
    ax.axis("off")
    grid = ax.table(cellText=cells.to_numpy(), colLabels=list(table.columns), loc="center", cellLoc="center")
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    grid.auto_set_column_width(range(len(table.columns)))  # each column as wide as its longest cell
    grid.scale(1, 1.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)

"""Results tables: the committed teachers' records, statistics over seeds."""

import shutil

import numpy as np
import pandas as pd
import pytest

from vkd.paths import project_root
from vkd.results import committed_teacher_row, over_seeds


def test_a_committed_teacher_brings_its_measured_row(tmp_path):
    teacher = project_root() / "data/teachers/resnet32x4_cifar10-jpeg.pt"
    row = committed_teacher_row("data/teachers/resnet32x4_cifar10-jpeg.pt")
    assert row["method"] == "teacher" and row["teacher"] == "resnet32x4"
    assert (row["best_top1"], row["last_top1"], row["epochs"], row["batch"]) == (91.95, 91.83, 240, 256)
    tampered = tmp_path / teacher.name  # same name, other bytes: not the teacher the record measured
    shutil.copy(teacher, tampered)
    with open(tampered, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert committed_teacher_row(tampered) is None
    assert committed_teacher_row(tmp_path / "unknown.pt") is None


def test_over_seeds_gives_mean_std_and_the_paired_gain_by_hand():
    runs = pd.DataFrame({
        "method": ["teacher", "ce", "kd", "ce", "kd", "ce", "kd"],
        "student": ["resnet20 (teacher)"] + ["resnet8"] * 6,
        "paper_top1": [np.nan] * 7,  # a setting column that is NaN everywhere must still group
        "seed": pd.array([None, 0, 0, 1, 1, 2, 2], dtype="Int64"),
        "best_top1": [80.0, 50.0, 53.0, 52.0, 53.0, 51.0, 55.0],
        "last_top1": [79.0, 49.0, 52.0, 51.0, 53.0, 51.0, 54.0],
        "wall_s": [100, 40, 50, 42, 52, 44, 54], "git": ["a", "a", "a", "b", "b", "b", "b"]})
    table = over_seeds(runs, decimals=6).set_index("method")
    assert list(table.index) == ["teacher", "ce", "kd"]
    assert list(table.seeds) == [1, 3, 3]
    assert table.loc["kd", "best_top1_mean"] == pytest.approx(161 / 3, abs=1e-6)
    assert table.loc["kd", "best_top1_std"] == pytest.approx(np.std([53, 53, 55], ddof=1), abs=1e-6)
    assert table.loc["ce", "last_top1_mean"] == pytest.approx(151 / 3, abs=1e-6)
    # kd - ce at the same seed: +3, +1, +4
    assert table.loc["kd", "gain_mean"] == pytest.approx(8 / 3, abs=1e-6)
    assert table.loc["kd", "gain_std"] == pytest.approx(np.std([3, 1, 4], ddof=1), abs=1e-6)
    assert over_seeds(runs).set_index("method").loc["kd", "best_top1_mean"] == 53.67  # two decimals by default
    assert table.loc["ce", "gain_mean"] == 0
    assert np.isnan(table.loc["teacher", "gain_mean"]) and np.isnan(table.loc["teacher", "best_top1_std"])
    assert table.loc["kd", "wall_s"] == 52
    assert "gain_mean" not in over_seeds(runs, baseline=None).columns


def test_over_seeds_refuses_a_table_without_runs():
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        over_seeds(pd.DataFrame({"method": ["ce"], "best_top1": [50.0], "last_top1": [50.0], "wall_s": [1]}))

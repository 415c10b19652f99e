"""Results tables: the committed teachers' records, statistics over seeds."""

import shutil

import numpy as np
import pandas as pd
import pytest

from vkd.paths import project_root, run_group
from vkd.results import committed_teacher_row, distinct_seeds, over_seeds, run_record


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


def test_over_seeds_takes_other_statistics_by_hand():
    """Notebook 07's use: a loss-surface measure and accuracy per run, grouped by normalisation, no baseline."""
    runs = pd.DataFrame({"norm": ["none", "layernorm"] * 2, "seed": [0, 0, 1, 1],
                         "relative_rise": [14.0, 9.0, 12.0, 8.0], "best_top1": [42.0, 41.0, 38.0, 39.0],
                         "wall_s": [40, 41, 42, 43]})
    table = over_seeds(runs, baseline="ce", values=("relative_rise", "best_top1"), decimals=6).set_index("norm")
    assert table.loc["layernorm", "relative_rise_mean"] == pytest.approx(8.5, abs=1e-6)
    assert table.loc["layernorm", "relative_rise_std"] == pytest.approx(np.std([9, 8], ddof=1), abs=1e-6)
    assert table.loc["none", "best_top1_mean"] == pytest.approx(40.0, abs=1e-6)
    assert "last_top1_mean" not in table.columns and "gain_mean" not in table.columns  # no "method" column
    with pytest.raises(ValueError, match=r"missing \['relative_rise'\]"):
        over_seeds(runs.drop(columns="relative_rise"), values=("relative_rise",))


def test_distinct_seeds_refuses_an_empty_or_repeated_list():
    assert distinct_seeds([2, 0]) == [2, 0]
    for seeds in ([], [1, 1]):
        with pytest.raises(ValueError, match=r"one or more distinct seeds, e.g. \[0, 1, 2\]; got"):
            distinct_seeds(seeds)


def test_run_group_names_the_percentage_exactly_and_refuses_a_fraction_outside_0_1():
    assert run_group("cifar10-jpeg", 0.1, "quick") == "cifar10-jpeg-10pct-quick"
    assert run_group("da", 0.29) == "da-29pct"  # int(0.29 * 100) would say 28
    assert run_group("cifar10-jpeg", 0.005, "smoke") == "cifar10-jpeg-0.5pct-smoke"
    for fraction in (0, 10):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\], got {fraction}"):
            run_group("cifar10-jpeg", fraction, "quick")


def test_run_record_names_the_run_behind_a_row_and_over_seeds_ignores_its_revision():
    revisions = {0: "abc1234", 1: "def5678+dirty"}
    summaries = [{"seed": seed, "wall_seconds": 61.6 + 2 * seed, "device": "cpu (2 threads)", "git_revision": revision,
                  "best_acc": 50.0 + seed, "last_acc": 49.0} for seed, revision in revisions.items()]
    rows = [{"method": "vkd", "best_top1": s["best_acc"], "last_top1": s["last_acc"], **run_record(s, "quick")}
            for s in summaries]
    assert rows[1] == {"method": "vkd", "best_top1": 51.0, "last_top1": 49.0, "seed": 1, "wall_s": 64,
                       "device": "cpu (2 threads)", "profile": "quick", "git": "def5678+dirty"}
    statistics = over_seeds(pd.DataFrame(rows))  # runs of two revisions are still one setting
    assert len(statistics) == 1 and statistics.seeds.iloc[0] == 2 and statistics.wall_s.iloc[0] == 63


def test_outside_a_checkout_what_only_the_checkout_holds_is_named(monkeypatch, tmp_path, capsys):
    """A package installed from a wheel, used in another folder: no data/ or notebooks/ there."""
    from vkd import cli, paths, results

    monkeypatch.setattr(paths, "project_root", lambda start=None: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no data/paper_numbers.csv at .*source checkout"):
        results.paper_numbers()
    assert committed_teacher_row(tmp_path / "resnet32x4_cifar10-jpeg.pt") is None  # no committed teachers here
    for command in (["reproduce", "--profile", "quick"], ["run", "01"]):  # reproduce did nothing and exited 0
        assert cli.main(command) == 1
        assert f"no notebooks at {tmp_path / 'notebooks'}" in capsys.readouterr().err

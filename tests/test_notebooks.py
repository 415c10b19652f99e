"""Every notebook end to end in the smoke profile, and the runner's parameter and failure handling."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from vkd import data
from vkd.cli import main
from vkd.engine import TrainConfig
from vkd.notebooks import (
    NotebookError,
    _split_at_parameters,
    checked_parameters,
    declared_parameters,
    find_notebook,
    inspect_parameters,
    list_notebooks,
    notebook_dir,
    prepared_run,
    run_as_script,
    run_notebook,
)
from vkd.paths import project_root

NOTEBOOKS = list_notebooks()


def test_there_are_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS][:1] == ["00"]


NEEDS_CIFAR10 = {"01_cifar_distillation", "05_imagenet_deit", "06_data_limited_gan"}


def cifar10_available() -> bool:
    archive = os.environ.get(data.ARCHIVE_ENV)
    return bool(archive and Path(archive).is_file()) or (project_root() / "data/cifar10/train").is_dir()


def require_cifar10() -> None:
    """Skip where CIFAR-10 (JPEG) is missing, but fail on CI, which has the archive beside the checkout."""
    if not cifar10_available():
        missing = (f"CIFAR-10 (JPEG) not available: set {data.ARCHIVE_ENV} (make does, from ../shared/data) "
                   "or extract it into data/")
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(notebook, tmp_path):
    if notebook.stem in NEEDS_CIFAR10:
        require_cifar10()
    folders = {name: str(tmp_path / name) for name in inspect_parameters(notebook) if name.endswith("_dir")}
    executed = run_notebook(notebook, "smoke", folders, output_dir=tmp_path)
    assert executed.is_file()
    assert any((tmp_path / "figures_dir").glob("*.png")), "the notebook wrote no figure"
    assert any((tmp_path / "figures_dir").glob("*.csv")), "the notebook wrote no table"
    for table in (tmp_path / "figures_dir").glob("*.csv"):  # a results table (it names its profile), per run
        columns = set(pd.read_csv(table, nrows=0).columns)
        if "profile" in columns and "seeds" not in columns:  # "seeds": an aggregate over runs (over_seeds)
            assert {"seed", "device", "git"} <= columns and columns & {"wall_s", "ms"}, (table.name, columns)
    stderr = ["".join(output["text"])[:300] for cell in nbformat.read(executed, as_version=4).cells
              for output in cell.get("outputs", []) if output.get("name") == "stderr"]
    assert not stderr, f"the executed copy holds warnings or progress bars: {stderr}"


@pytest.mark.parametrize("notebook", [p.stem for p in list_notebooks()])
def test_papermill_and_the_runners_see_the_same_parameters_and_types(notebook):
    # papermill parses the parameters cell with its own patterns (it once missed "compile: bool | str = False")
    papermill_types = {name: record["inferred_type_name"] for name, record in inspect_parameters(notebook).items()}
    assert papermill_types == declared_parameters(notebook)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_profile_and_parameters_file_gives_values_of_the_declared_types(notebook):
    files = [None, *sorted((notebook_dir() / "params").glob(f"{notebook.stem[:2]}_*.yaml"))]
    for profile in ("smoke", "quick", "full"):
        for params_file in files:
            assert set(checked_parameters(notebook, profile, params_file=params_file)) <= set(
                declared_parameters(notebook))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_a_notebook_as_it_stands_is_its_quick_profile(notebook):
    """Run All in JupyterLab (papermill with no parameters) runs what `make reproduce` does, labelled so: the
    parameters cell holds the quick values, and the quick profile adds nothing but its name."""
    cell = _split_at_parameters(notebook)[1]
    defaults = {node.target.id: ast.literal_eval(node.value) for node in ast.parse(cell).body
                if isinstance(node, ast.AnnAssign)}
    assert defaults["profile"] == "quick"
    assert checked_parameters(notebook, "quick") == {"profile": "quick"}


@pytest.mark.parametrize("value, message", [
    ("ten", "epochs expects int, got 'ten' (str)"),
    (2.5, "epochs expects int, got 2.5 (float)"),
    (True, "epochs expects int, got True (bool)"),
])
def test_a_value_of_the_wrong_type_is_refused_before_anything_runs(value, message, tmp_path):
    notebook = notebook_dir() / "01_cifar_distillation.py"
    with pytest.raises(NotebookError, match=re.escape(f"01_cifar_distillation.py: {message}")):
        run_as_script(notebook, "smoke", {"epochs": value, "runs_dir": str(tmp_path / "runs")})
    assert not (tmp_path / "runs").exists()
    with pytest.raises(NotebookError, match=re.escape("lr expects float, got '1e-3' (str) (values are read as YAML")):
        run_notebook(notebook, "smoke", {"lr": "1e-3"}, output_dir=tmp_path)
    assert not list(tmp_path.glob("*.ipynb"))
    accepted = checked_parameters(notebook, "smoke", {"lr": 1, "compile": "reduce-overhead", "epochs": 3})
    assert (accepted["lr"], accepted["compile"], accepted["epochs"]) == (1, "reduce-overhead", 3)


def test_unknown_parameter_is_refused_with_the_declared_names(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vkd", "run", "00", "--output-dir", str(tmp_path), "-p", "bogus_name", "1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "declares no parameter 'bogus_name'" in result.stderr
    assert "its parameters are: batch, figures_dir" in result.stderr
    assert not list(tmp_path.glob("*.ipynb"))  # refused before running


def test_the_full_profile_is_refused_where_it_would_train_on_the_cpu_by_default(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for notebook in list_notebooks():
        declares_device = "device" in declared_parameters(notebook)
        if declares_device:
            with pytest.raises(NotebookError, match=re.escape(f"{notebook.name}: the full profile runs the papers' "
                                                              "schedules, meant for a GPU, and torch sees none here")):
                prepared_run(notebook, "full")
            assert prepared_run(notebook, "full", {"device": "cpu"})[1]["device"] == "cpu"  # insisting
        else:  # 00 times projectors on the CPU
            prepared_run(notebook, "full")
        prepared_run(notebook, "quick")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prepared_run("01", "full")[0].name == "01_cifar_distillation.py"
    result = subprocess.run([sys.executable, "-m", "vkd", "reproduce", "--profile", "full", "--output-dir",
                             str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, wherever the tests run
    assert result.returncode == 1 and "01_cifar_distillation.py: the full profile" in result.stderr
    assert not list(tmp_path.iterdir())  # refused before notebook 00 ran


@pytest.mark.parametrize("name, value, message", [
    ("seeds", "[]", "seeds must list one or more distinct seeds, e.g. [0, 1, 2]; got []"),
    ("seeds", "[1, 1]", "seeds must list one or more distinct seeds, e.g. [0, 1, 2]; got [1, 1]"),
    ("methods", "[ce, vkdx]", "unknown method 'vkdx'; expected one of ('ce', 'kd', 'fitnet', 'dkd'"),
    ("methods", "[kd, kd]", "methods must list one or more distinct methods of ('ce', 'kd'"),
    ("methods", "[ce, kd@t2]", "methods entry 'kd@t2': a variant of a method needs a label after '@' and its own"),
    ("method_options", "{vkd: {vkd_wieght: 5}}", "unknown method option(s) ['vkd_wieght']; expected some of"),
    ("method_options", "{srd: {srd_weight: 5}}", "method_options names ['srd'], not among methods ['ce', 'kd',"),
    ("student", "resnet9", "unknown model 'resnet9': expected one of vkd's CIFAR models resnet8, resnet20,"),
])
def test_notebook_01_refuses_bad_seeds_methods_and_models_before_training(name, value, message, tmp_path):
    parameters = {"methods": "[ce, kd, vkd]", "runs_dir": str(tmp_path / "runs"),
                  "figures_dir": str(tmp_path / "figures"), name: value}
    result = subprocess.run([sys.executable, "-m", "vkd", "run", "01", "--as-script",
                             *(item for pair in parameters.items() for item in ("-p", *pair))],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_notebook_04_refuses_a_variant_of_a_method_it_has_no_options_for(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vkd", "run", "04", "--as-script", "-p", "methods", "[ce, kd@t2]",
                             "-p", "runs_dir", str(tmp_path / "runs"), "-p", "teachers_dir", str(tmp_path / "teachers"),
                             "-p", "figures_dir", str(tmp_path / "figures")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "methods entry 'kd@t2': this notebook takes no method_options" in result.stderr
    assert not (tmp_path / "teachers").exists()  # refused before the teacher trained


def test_notebook_01_trains_a_variant_of_a_method_as_its_own_row(tmp_path):
    require_cifar10()
    figures = tmp_path / "figures"
    run_as_script("01", "smoke", {"methods": ["ce", "srd", "srd@mse"], "method_options": {"srd@mse": {
        "srd_distance": "mse"}}, "seeds": [0], "runs_dir": str(tmp_path / "runs"), "figures_dir": str(figures)})
    results = pd.read_csv(figures / "01_cifar_results.csv", keep_default_na=False).set_index("method")
    assert list(results.index) == ["teacher", "ce", "srd", "srd@mse"]
    assert (results.loc["srd", "options"], results.loc["srd@mse", "options"]) == ("", "srd_distance=mse")
    (plain,), (variant,) = (list((tmp_path / "runs").glob(f"*/{name}-resnet8-*")) for name in ("srd", "srd@mse"))
    summary = json.loads((variant / "summary.json").read_text())
    assert summary["method"] == "srd" and summary["config"]["method_options"] == {"srd_distance": "mse"}
    srd_terms = [pd.read_csv(run / "metrics.csv").train_srd.iloc[0] for run in (plain, variant)]
    assert srd_terms[1] <= 4 < srd_terms[0]  # an MSE of batch-normed features (at most 4), not a LogSum (log of a sum)


def test_failing_cell_is_reported(tmp_path, capfd):
    notebook = tmp_path / "99_broken.py"
    notebook.write_text(
        '# %% tags=["parameters"]\nprofile = "smoke"\nfigures_dir = "x"\n\n'
        "# %%\nx = 1\n\n# %%\nraise KeyError('missing-thing')\n"
    )
    with pytest.raises(NotebookError, match=r"99_broken.py \(smoke\) failed in cell \d+ .*KeyError.*missing-thing"):
        run_notebook(notebook, "smoke", output_dir=tmp_path)
    assert (tmp_path / "99_broken.smoke.ipynb").is_file()
    assert "without encryption" not in capfd.readouterr().err  # the kernel's channels are encrypted


def test_batch_runs_keep_progress_bars_out_of_the_executed_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("VKD_PROGRESS", raising=False)
    notebook = tmp_path / "98_progress.py"
    notebook.write_text(
        '# %% tags=["parameters"]\nprofile = "smoke"\nfigures_dir = "x"\n\n'
        "# %%\nfrom tqdm.auto import tqdm\nfrom vkd.engine import TrainConfig\n"
        "for _ in tqdm(range(3), disable=not TrainConfig().progress):\n    pass\nprint(TrainConfig().progress)\n"
    )
    executed = nbformat.read(run_notebook(notebook, "smoke", output_dir=tmp_path), as_version=4)
    assert [output for cell in executed.cells for output in cell.get("outputs", [])] == [
        {"name": "stdout", "output_type": "stream", "text": "False\n"}]
    assert "VKD_PROGRESS" not in os.environ  # restored for this process
    assert TrainConfig().progress


def test_unknown_notebook_profile_and_parameters_file(tmp_path):
    with pytest.raises(NotebookError, match="no notebook 'nope'; the notebooks are: 00_orthogonal_projections, 01_"):
        run_notebook("nope")
    with pytest.raises(NotebookError, match="no profile 'huge'"):
        run_notebook("00", "huge")
    with pytest.raises(NotebookError, match=re.escape(f"no parameters file at {tmp_path / 'gone.yaml'}")):
        run_as_script("00", params_file=tmp_path / "gone.yaml")


def test_parameter_files_apply_in_order_then_the_parameters(tmp_path, capsys):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("epochs: 3\nlr: 0.1\nseeds: [0, 1]\n")
    second.write_text("epochs: 4\n")
    values = checked_parameters(find_notebook("01"), "smoke", {"lr": 0.2}, [first, second])
    assert (values["epochs"], values["lr"], values["seeds"], values["fraction"]) == (4, 0.2, [0, 1], 0.004)
    second.write_text("bogus_name: 1\n")
    for files, message in (([second, first], "declares no parameter 'bogus_name'"),  # the CLI reads every -f
                           ([tmp_path / "gone.yaml", first], f"no parameters file at {tmp_path / 'gone.yaml'}")):
        options = [item for file in files for item in ("-f", str(file))]
        result = subprocess.run([sys.executable, "-m", "vkd", "run", "01", "--as-script", *options],
                                capture_output=True, text=True)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    for text, message in (("epochs: [3,\n", "is not valid YAML at line 2, column 1"),
                          ("- epochs: 3\n", "holds the list [{'epochs': 3}]; expected name: value pairs")):
        second.write_text(text)
        assert main(["run", "01", "--as-script", "-f", str(first), "-f", str(second)]) == 1
        assert capsys.readouterr().err.startswith(f"error: {second} {message}")


def test_missing_dataset_is_explained_not_a_deep_traceback(tmp_path):
    if (project_root() / "data/cifar-100-python").exists():
        pytest.skip("CIFAR-100 is present in data/, so it cannot be missing")
    parameters = {"dataset": "cifar100", "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig")}
    with pytest.raises(NotebookError) as error:
        run_notebook("01", "smoke", parameters, output_dir=tmp_path)
    message = str(error.value)
    assert "DataNotFoundError: cifar100 not found in" in message
    assert "download=True" in message and "cifar10-jpeg" in message


def test_a_notebook_runs_as_a_plain_script_without_jupyter(tmp_path):
    figures = tmp_path / "figures"
    run_as_script("00", "smoke", {"figures_dir": str(figures)})
    assert any(figures.glob("*.png")) and any(figures.glob("*.csv"))
    with pytest.raises(NotebookError, match="declares no parameter 'bogus'; its parameters are: batch, figures_dir"):
        run_as_script("00", "smoke", {"bogus": 1})


def test_missing_imagenet_and_teacher_weights_are_explained(tmp_path):
    parameters = {"data": "imagenet", "data_root": str(tmp_path / "imagenet"), "runs_dir": str(tmp_path / "runs"),
                  "figures_dir": str(tmp_path / "fig"), "device": "cpu"}  # the full profile, here on the CPU
    with pytest.raises(NotebookError, match=r"no ImageNet ImageFolder at .*imagenet: expected .*train/<class>"):
        run_notebook("05", "full", parameters, output_dir=tmp_path)
    (tmp_path / "imagenet/train").mkdir(parents=True)
    (tmp_path / "imagenet/val").mkdir()
    with pytest.raises(NotebookError, match=r"no teacher weights at .*missing.pt"):
        run_notebook("05", "full", {**parameters, "teacher_checkpoint": str(tmp_path / "missing.pt")},
                     output_dir=tmp_path)


def test_a_script_run_reports_errors_at_the_notebooks_own_line_numbers(tmp_path, monkeypatch):
    notebook = tmp_path / "99_lines.py"
    source = ('# %% tags=["parameters"]\nprofile: str = "smoke"\nfigures_dir: str = "x"\nlimit: int = 1\n\n'
              "# %%\nx = limit + 1\n\n# %%\nraise KeyError(f'limit {limit}')\n")
    notebook.write_text(source)
    monkeypatch.setattr("vkd.notebooks.find_notebook", lambda name: notebook)
    with pytest.raises(KeyError, match="limit 5") as raised:
        run_as_script("99_lines", "smoke", {"limit": 5})
    frame = [entry for entry in raised.traceback if str(entry.path) == str(notebook)][-1]
    assert frame.lineno == source.splitlines().index("raise KeyError(f'limit {limit}')")  # both 0-based


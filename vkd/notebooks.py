"""Run the companion's notebooks with papermill: profiles, strict parameters, clear failures.

Notebook sources are jupytext "percent" scripts (``notebooks/NN_name.py``): plain Python files that
JupyterLab opens as notebooks (right click, "Open With > Notebook") and that diff cleanly.  The cell
tagged ``parameters`` declares each parameter with a type annotation and a trailing comment.
A profile (``notebooks/profiles/<profile>.yaml``) gives values under ``all:`` and under each
notebook's stem; a user's ``--params-file`` (one or more, in order) and ``-p NAME VALUE`` overrides come on
top, in that order.
The parameters cells hold the quick profile's values, so a notebook run as it stands (Run All in
JupyterLab) is the quick profile; smoke.yaml and full.yaml list what they change.
"""

from __future__ import annotations

import ast
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .extras import optional_import
from .paths import PROGRESS_ENV, checkout_path, project_root
from .settings import fits, settings_file

PROFILES = ("smoke", "quick", "full")
ParamsFiles = str | Path | list[str | Path] | None  # parameter files, applied in order


class NotebookError(RuntimeError):
    """A notebook could not be run: bad name or parameters, or a cell raised."""


def notebook_dir() -> Path:
    """The checkout's ``notebooks/`` folder (a NotebookError saying where it looked when there is none)."""
    try:
        return checkout_path("notebooks")
    except FileNotFoundError as error:
        raise NotebookError(str(error)) from None


def list_notebooks() -> list[Path]:
    """The companion's notebooks in order (``notebooks/NN_*.py``)."""
    return sorted(notebook_dir().glob("[0-9][0-9]_*.py"))


def find_notebook(name: str | Path) -> Path:
    """A path, a file name in notebooks/, or a stem / its NN prefix ("00", "00_orthogonal_projections")."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    candidates = [p for p in list_notebooks() if p.stem == path.stem or p.name == path.name or p.stem[:2] == str(name)]
    if len(candidates) != 1:
        known = ", ".join(p.stem for p in list_notebooks()) or "none"
        raise NotebookError(f"no notebook {str(name)!r}; the notebooks are: {known}")
    return candidates[0]


def load_profile(profile: str, stem: str) -> dict[str, Any]:
    """The parameters that ``profile`` sets for notebook ``stem``."""
    path = notebook_dir() / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        raise NotebookError(f"no profile {profile!r}: expected a file {path} (profiles: {', '.join(PROFILES)})")
    data = settings_file(path)
    return {"profile": profile, **(data.get("all") or {}), **(data.get(stem) or {})}


def inspect_parameters(name: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares as papermill reads them (``papermill --help-notebook``): name ->
    papermill's record (default, type, help)."""
    jupytext, nbformat, papermill = (optional_import(m, "notebooks") for m in ("jupytext", "nbformat", "papermill"))
    path = find_notebook(name)
    notebook = jupytext.read(path)
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in notebook.cells):
        raise NotebookError(f"{path.name} has no cell tagged 'parameters'")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{path.stem}.ipynb"
        nbformat.write(notebook, source)
        return papermill.inspect_notebook(str(source))


def _declared_types(cell: str) -> dict[str, str]:
    """Each ``name: type = value`` of a parameters cell as name -> its annotation as written ("int", or
    "Union[bool, str]": papermill's own parser does not read "bool | str"); a plain ``name = value`` -> ""."""
    declared = {}
    for node in ast.parse(cell).body:
        if isinstance(node, ast.AnnAssign):
            declared[node.target.id] = ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            declared[node.targets[0].id] = ""
    return declared


def declared_parameters(name: str | Path) -> dict[str, str]:
    """The parameters a notebook's parameters cell declares: name -> type, as both runners check them."""
    return _declared_types(_split_at_parameters(find_notebook(name))[1])


def checked_parameters(path: Path, profile: str, parameters: dict[str, Any] | None = None,
                       params_file: ParamsFiles = None) -> dict[str, Any]:
    """The values a run of notebook ``path`` gets: the profile's, then those of ``params_file`` (one file or a
    list, later files overriding earlier ones), then ``parameters``.  A name the notebook does not declare, or a
    value not of its declared type, is refused (NotebookError) before anything runs."""
    values = load_profile(profile, path.stem)
    for file in [params_file] if isinstance(params_file, (str, Path)) else params_file or []:
        if not Path(file).is_file():
            raise NotebookError(f"no parameters file at {file}")
        try:
            values.update(settings_file(file))
        except ValueError as error:
            raise NotebookError(str(error)) from None
    values.update(parameters or {})
    declared = _declared_types(_split_at_parameters(path)[1])
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise NotebookError(f"{path.name} declares no parameter {', '.join(map(repr, unknown))}; "
                            f"its parameters are: {', '.join(sorted(declared))}")
    wrong = [f"{key} expects {declared[key]}, got {value!r} ({type(value).__name__})"
             for key, value in values.items() if not fits(declared[key], value)]
    if wrong:
        raise NotebookError(f"{path.name}: {'; '.join(wrong)} (values are read as YAML: 1.0e-3 is a float, "
                            "1e-3 a string)")
    return values


def _kernel_options() -> dict[str, Any]:
    """Ask jupyter_client (8.9 or newer) to encrypt the kernel's channels where the kernel supports it;
    without this, ipykernel 7.3+ prints "Kernel is running over TCP without encryption" on every run."""
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names():
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


def prepared_run(name: str | Path, profile: str, parameters: dict[str, Any] | None = None,
                 params_file: ParamsFiles = None) -> tuple[Path, dict[str, Any]]:
    """The notebook's path and the values a run of it gets (:func:`checked_parameters`), refused as both runners
    refuse them -- and the ``full`` profile, the papers' GPU schedules, where torch sees no GPU and the notebook's
    ``device`` is left at ``auto``: it would train on the CPU for days.  ``-p device cpu`` insists."""
    path = find_notebook(name)
    values = checked_parameters(path, profile, parameters, params_file)
    if profile == "full" and "device" in declared_parameters(path) and values.get("device", "auto") == "auto":
        import torch

        if not torch.cuda.is_available():
            raise NotebookError(f"{path.name}: the full profile runs the papers' schedules, meant for a GPU, and torch "
                                "sees none here: on the CPU it would take days. Use the quick profile, or pass "
                                "-p device cpu to run it on the CPU anyway")
    return path, values


def run_notebook(
    name: str | Path,
    profile: str = "smoke",
    parameters: dict[str, Any] | None = None,
    params_file: ParamsFiles = None,
    output_dir: str | Path | None = None,
    log_output: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``output_dir/<stem>.<profile>.ipynb``; returns that path.

    Parameter names the notebook does not declare are refused; a failing cell raises NotebookError
    naming the cell, the exception and the executed copy, which holds the full traceback."""
    jupytext, papermill = (optional_import(m, "notebooks") for m in ("jupytext", "papermill"))
    path, values = prepared_run(name, profile, parameters, params_file)
    notebook = jupytext.read(path)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out_dir = Path(output_dir) if output_dir is not None else notebook_dir() / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{path.stem}.{profile}.ipynb"
    start = time.perf_counter()
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"  # the kernel inherits it: no tqdm bars frozen, as text, into the executed copy
    try:
        papermill.execute_notebook(
            notebook, str(output), parameters=values, cwd=str(project_root()), kernel_name="python3",
            progress_bar=False, log_output=log_output, **_kernel_options(),
        )
    except papermill.PapermillExecutionError as error:
        raise NotebookError(
            f"{path.name} ({profile}) failed in cell {error.cell_index} (execution count {error.exec_count}): "
            f"{error.ename}: {error.evalue}\n  executed copy with the traceback: {output}"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV)
        else:
            os.environ[PROGRESS_ENV] = previous
    print(f"{path.name} ({profile}) ran in {time.perf_counter() - start:.0f} s -> {output}")
    return output


PARAMETERS_MARKER = '# %% tags=["parameters"]'


def _split_at_parameters(path: Path) -> tuple[str, str, str]:
    """A notebook's source as (before the parameters cell, the cell's body, after it)."""
    source = path.read_text()
    if PARAMETERS_MARKER not in source:
        raise NotebookError(f"{path.name} has no cell tagged 'parameters'")
    head, rest = source.split(PARAMETERS_MARKER, 1)
    cell, _, tail = rest.partition("\n# %%")
    return head, cell, tail


def run_as_script(
    name: str | Path,
    profile: str = "smoke",
    parameters: dict[str, Any] | None = None,
    params_file: ParamsFiles = None,
) -> None:
    """Execute a notebook's source as a plain Python script, with the same parameters as :func:`run_notebook`.

    For machines without Jupyter (e.g. a bare GPU server): the cells run in order in one namespace,
    the parameter values are assigned right after the parameters cell (as papermill injects them),
    figures and CSVs are written as usual, but no executed notebook is.  Because runs are reused by
    their settings, running the notebook later with the same parameters only gathers the results."""
    path, values = prepared_run(name, profile, parameters, params_file)
    head, cell, tail = _split_at_parameters(path)
    # on the next cell's marker line, so that tracebacks give the notebook's own line numbers
    injected = "".join(f"{key} = {value!r}; " for key, value in values.items())
    code = f"{head}{PARAMETERS_MARKER}{cell}\n{injected}# %% (parameters injected on this line){tail}"
    optional_import("matplotlib", "notebooks").use("Agg")
    start, cwd = time.perf_counter(), os.getcwd()
    os.chdir(project_root())
    try:
        exec(compile(code, str(path), "exec"), {"__name__": "__main__", "__file__": str(path)})
    finally:
        os.chdir(cwd)
    print(f"{path.name} ({profile}) ran as a script in {time.perf_counter() - start:.0f} s")

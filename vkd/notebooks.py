"""Run the companion's notebooks with papermill: profiles, strict parameters, clear failures.

Notebook sources are jupytext "percent" scripts (``notebooks/NN_name.py``): plain Python files that
JupyterLab opens as notebooks (right click, "Open With > Notebook") and that diff cleanly.  The cell
tagged ``parameters`` declares each parameter with a type annotation and a trailing comment.
A profile (``notebooks/profiles/<profile>.yaml``) gives values under ``all:`` and under each
notebook's stem; a user's ``--params-file`` and ``-p NAME VALUE`` overrides come on top, in that order.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import papermill
import yaml

from .paths import project_root

PROFILES = ("smoke", "quick", "full")


class NotebookError(RuntimeError):
    """A notebook could not be run: bad name or parameters, or a cell raised."""


def notebook_dir() -> Path:
    return project_root() / "notebooks"


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
    data = yaml.safe_load(path.read_text()) or {}
    return {"profile": profile, **(data.get("all") or {}), **(data.get(stem) or {})}


def inspect_parameters(name: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares: name -> papermill's record (default, type, help)."""
    path = find_notebook(name)
    return _declared_parameters(jupytext.read(path), path)


def _declared_parameters(notebook: nbformat.NotebookNode, path: Path) -> dict[str, Any]:
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in notebook.cells):
        raise NotebookError(f"{path.name} has no cell tagged 'parameters'")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{path.stem}.ipynb"
        nbformat.write(notebook, source)
        return papermill.inspect_notebook(str(source))


def run_notebook(
    name: str | Path,
    profile: str = "smoke",
    parameters: dict[str, Any] | None = None,
    params_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    log_output: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``output_dir/<stem>.<profile>.ipynb``; returns that path.

    Parameter names the notebook does not declare are refused; a failing cell raises NotebookError
    naming the cell, the exception and the executed copy, which holds the full traceback."""
    path = find_notebook(name)
    values = load_profile(profile, path.stem)
    if params_file is not None:
        values.update(yaml.safe_load(Path(params_file).read_text()) or {})
    values.update(parameters or {})
    notebook = jupytext.read(path)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    declared = _declared_parameters(notebook, path)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise NotebookError(
            f"{path.name} declares no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(sorted(declared))}"
        )
    out_dir = Path(output_dir) if output_dir is not None else project_root() / "notebooks" / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{path.stem}.{profile}.ipynb"
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            notebook, str(output), parameters=values, cwd=str(project_root()), kernel_name="python3",
            progress_bar=False, log_output=log_output,
        )
    except papermill.PapermillExecutionError as error:
        raise NotebookError(
            f"{path.name} ({profile}) failed in cell {error.cell_index} (execution count {error.exec_count}): "
            f"{error.ename}: {error.evalue}\n  executed copy with the traceback: {output}"
        ) from None
    print(f"{path.name} ({profile}) ran in {time.perf_counter() - start:.0f} s -> {output}")
    return output

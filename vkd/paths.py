"""Where the project's folders are, wherever a notebook or command is started from, writing files
into them safely, and the environment switch for progress bars."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

PROGRESS_ENV = "VKD_PROGRESS"  # "0": no tqdm bars (set for the kernel of batch notebook runs)


def progress_default() -> bool:
    """Whether tqdm bars show by default: yes, unless ``$VKD_PROGRESS`` is "0" (as in the notebooks'
    papermill runs, whose executed copies would otherwise keep every bar update as text)."""
    return os.environ.get(PROGRESS_ENV, "1") != "0"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding vkd's pyproject.toml.

    Falls back to the checkout this package was imported from, then to the working directory."""
    here = Path.cwd() if start is None else Path(start)
    for folder in (here.resolve(), *here.resolve().parents, Path(__file__).resolve().parents[1]):
        marker = folder / "pyproject.toml"
        if marker.is_file() and 'name = "vkd"' in marker.read_text():
            return folder
    return here.resolve()


def resolve(path: str | Path) -> Path:
    """A path relative to the project root (absolute paths pass through)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def checkout_path(relative: str) -> Path:
    """``resolve(relative)`` for what only a vkd source checkout holds (``notebooks/``, ``data/paper_numbers.csv``);
    a FileNotFoundError naming where it looked when it is not there (a package installed from a wheel, used
    outside the checkout)."""
    path = resolve(relative)
    if not path.exists():
        raise FileNotFoundError(f"no {relative} at {path}: it comes with vkd's source checkout (git clone), not with "
                                f"the installed package; run from the checkout's folder or one below it")
    return path


def portable(path: str | Path) -> str:
    """``path`` as run settings record it: relative to the project root when it lies inside it, else absolute.
    Any spelling of one file (relative, absolute, through another working directory) gives one string,
    which stays the same when the checkout moves."""
    absolute = resolve(path).resolve()
    root = project_root()
    return absolute.relative_to(root).as_posix() if absolute.is_relative_to(root) else str(absolute)


def check_fraction(fraction: float) -> None:
    """Refuse (ValueError) a fraction of a dataset outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def run_group(dataset: str, fraction: float, profile: str = "") -> str:
    """The name of the runs of one dataset (or method), data fraction and profile: ``cifar10-jpeg-10pct-quick``.

    The notebooks name their run folders (and 06 its runs) with it; notebooks that train the same teacher
    (same settings) thus find one run folder and share it."""
    check_fraction(fraction)
    return "-".join(part for part in (dataset, f"{fraction * 100:g}pct", profile) if part)


def output_dir(path: str | Path) -> Path:
    """``resolve(path)``, created if missing (figures, runs)."""
    folder = resolve(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` into a temporary file of this process, then rename it to ``path``: ``path`` always
    holds a whole file (old or new), also when the writer is interrupted or several processes write at once."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj, path)`` through :func:`write_atomic`."""
    write_atomic(path, lambda partial: torch.save(obj, partial))


def save_json_atomic(obj, path: Path) -> None:
    """``obj`` as indented JSON in ``path``, through :func:`write_atomic` (run summaries)."""
    write_atomic(path, lambda partial: partial.write_text(json.dumps(obj, indent=2)))

"""Weights files: checksums, loading (vkd's own, mdistiller's and DeiT-style checkpoints, plain state dicts)
and exporting a finished run's weights as a teacher for others."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .paths import resolve, save_atomic


def sha256(path: str | Path) -> str:
    """The file's SHA-256 digest (64 hex digits), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a SHA-256 digest as sha256sum prints it (64 hex digits, either case)."""
    return re.fullmatch(r"[0-9a-fA-F]{64}", text) is not None


class CheckpointMismatchError(ValueError):
    """A weights file is not the one expected: another checksum, weights that do not fit the model, or no
    checkpoint at all (a file torch.load cannot read, or one that holds no weights)."""


TEACHER_HINT = "train the teacher first (notebook 01) or give its path"


def existing_file(path: str | Path, what: str = "checkpoint", missing_hint: str = TEACHER_HINT) -> Path:
    """``path`` resolved; a missing file is refused as "no ``what`` at ``path``: ``missing_hint``"."""
    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}: {missing_hint}")
    return path


def checked_file(path: str | Path, expected_sha256: str | None = None, missing_hint: str = TEACHER_HINT,
                 what: str = "checkpoint") -> tuple[Path, str]:
    """``path`` resolved (see :func:`existing_file`), and its sha256 (checked against ``expected_sha256``
    when given)."""
    path = existing_file(path, what, missing_hint)
    digest = sha256(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise CheckpointMismatchError(f"checksum mismatch for {path}: expected sha256 {expected_sha256}, got {digest}")
    return path, digest


def load_file(path: str | Path, map_location: str | torch.device = "cpu"):
    """``torch.load`` of a file vkd or its user wrote (full unpickling: vkd's checkpoints hold their configs);
    a file it cannot read is a :class:`CheckpointMismatchError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:  # not a (whole) torch.save file
        first_line = str(error).partition("\n")[0][:200]
        reason = f"{type(error).__name__}: {first_line}"
        raise CheckpointMismatchError(f"{path} is not a checkpoint torch.load can read (truncated, or another kind "
                                      f"of file?): {reason}") from None


def read_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[object, str]:
    """The contents of a checkpoint file and its sha256 (checked against ``expected_sha256`` when given)."""
    path, digest = checked_file(path, expected_sha256)
    return load_file(path), digest


def load_state(model: nn.Module, contents, strict: bool = True, source: str = "the checkpoint") -> list[str]:
    """Load checkpoint ``contents`` into ``model``; returns the keys the model does not have (sorted).

    Accepts vkd's ``model.pt`` / ``checkpoint.pt``, mdistiller's ``{"model": state_dict}`` teacher
    checkpoints, DeiT-style releases and plain state dicts; half-precision weights are cast to the
    model's dtype.  ``strict=False``: keys the model does not have are ignored (and returned); every
    weight of the model must still be in the file.  Weights that do not fit raise
    :class:`CheckpointMismatchError` naming ``source`` and the architecture the file records, if any."""
    recorded = contents.get("arch") if isinstance(contents, dict) else None
    holds = f" (it holds a {recorded!r})" if isinstance(recorded, str) else ""
    state = contents
    for key in ("model", "student", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{source} holds a {type(state).__name__}, not weights: expected a state dict, "
                                      "or a vkd, mdistiller or DeiT-style checkpoint holding one")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference and torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in state.items()}
    if strict:
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # torch lists every key and shape that differs
            details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            more = f" (and {len(details) - 1} more such lines)" if len(details) > 1 else ""
            raise CheckpointMismatchError(f"{source}'s weights do not fit the {type(model).__name__}{holds}: "
                                          f"{details[0][:300] if details else error}{more}") from None
        return []
    missing = sorted(set(reference) - set(state))
    if missing:
        raise CheckpointMismatchError(f"{source} lacks {len(missing)} of the model's weights{holds}, "
                                      f"e.g. {missing[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in reference})
    return sorted(set(state) - set(reference))


def load_weights(model: nn.Module, path: str | Path, expected_sha256: str | None = None, strict: bool = True) -> str:
    """Load the checkpoint file ``path`` into ``model`` (see :func:`load_state`); returns its sha256."""
    contents, digest = read_checkpoint(path, expected_sha256)
    load_state(model, contents, strict, source=str(resolve(path)))
    return digest


def export_weights(run_dir: str | Path, path: str | Path, half: bool = True) -> dict:
    """Write a finished run's final weights to ``path`` (half precision by default: a teacher for others).

    The file is ``{"model": state_dict, "arch", "num_classes", "options", "test_acc"}`` (loadable by
    :func:`load_weights`); returns its description: path, sha256, arch, test accuracy (last epoch, %)."""
    run_dir, path = resolve(run_dir), resolve(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the file to write, e.g. {path / 'teacher.pt'}")
    for name in ("model.pt", "summary.json"):
        existing_file(run_dir / name, what=f"finished run ({name})",
                      missing_hint="a run writes model.pt and summary.json when its last epoch ends")
    state = load_file(run_dir / "model.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    if half:
        state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    state["test_acc"] = summary["last_acc"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, path)
    return {"path": str(path), "sha256": sha256(path), "arch": state["arch"], "test_acc": summary["last_acc"],
            "dataset": summary["dataset"], "epochs": summary["epochs"], "device": summary["device"],
            "wall_seconds": summary["wall_seconds"]}

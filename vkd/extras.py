"""Packages that only parts of vkd need: pyproject.toml's extras install them (``pip install 'vkd[notebooks]'``)."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ModuleNotFoundError):
    """A package that an extra of vkd installs is not installed; the message names the extra."""


def optional_import(module: str, extra: str) -> ModuleType:
    """``module`` (dotted name) imported; if its package is not installed, MissingExtraError naming the vkd
    ``extra`` that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        package = module.split(".")[0]
        if error.name != package:  # something else is missing: not ours to explain
            raise
        raise MissingExtraError(f"{package} is not installed; this part of vkd needs the {extra!r} extra: "
                                f"pip install 'vkd[{extra}]' (make setup installs every extra)",
                                name=package) from error

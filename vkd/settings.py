"""Settings as they are read from YAML or JSON -- a notebook's parameters, a run configuration's fields --
checked against the type their declaration names, so a wrong value is refused before anything runs."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

DECLARED_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "tuple": (tuple, list),
                  "dict": dict, "None": type(None)}


def fits(annotation: str, value: Any) -> bool:
    """Whether ``value`` is of the type ``annotation`` names as written ("int", "str | None", "Union[bool, str]";
    any type when it is empty): an int passes for a float, a bool for no number, a list for a tuple (YAML and
    JSON have no tuples)."""
    if not annotation:
        return True
    names = [name for name in re.findall(r"\w+", annotation) if name != "Union"]
    unknown = sorted(set(names) - set(DECLARED_TYPES))
    if unknown:
        raise ValueError(f"type {annotation!r} names {unknown}; the checked types are {sorted(DECLARED_TYPES)}")
    if isinstance(value, bool):
        return "bool" in names
    return any(isinstance(value, DECLARED_TYPES[name]) for name in names) or (
        isinstance(value, int) and "float" in names)


def wrong_types(settings: Any) -> list[str]:
    """For each field of the dataclass instance ``settings`` whose value does not :func:`fit <fits>` its declared
    type, ``"<field> expects <type>, got <value> (<its type>)"``."""
    return [f"{field.name} expects {field.type}, got {value!r} ({type(value).__name__})"
            for field in fields(settings) if not fits(field.type, value := getattr(settings, field.name))]


def at_least(settings: Any, low: float, *names: str) -> list[tuple[str, bool, str]]:
    """``limits()`` rules that the settings ``names`` of ``settings`` are at least ``low``."""
    return [(name, getattr(settings, name) >= low, f"at least {low}") for name in names]


def positive(settings: Any, *names: str) -> list[tuple[str, bool, str]]:
    """``limits()`` rules that the settings ``names`` of ``settings`` are above 0."""
    return [(name, getattr(settings, name) > 0, "positive") for name in names]


def wrong_settings(settings: Any) -> list[str]:
    """:func:`wrong_types`; when every type fits, ``"<field> must be <rule>, got <value>"`` for each of
    ``settings.limits()`` -- ``(field, whether its value is allowed, what it must be)`` -- that does not hold."""
    return wrong_types(settings) or [f"{name} must be {rule}, got {getattr(settings, name)!r}"
                                     for name, holds, rule in settings.limits() if not holds]


def parsed_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML (JSON is YAML too); when it is not valid YAML, a ValueError naming ``source`` (a file,
    or the option that gave the text) and the line and column where reading stopped."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise ValueError(f"{source} is not valid YAML{at}: {problem}") from None


def settings_file(path: str | Path) -> dict[str, Any]:
    """The ``name: value`` pairs a YAML (or JSON) file holds ({} for an empty file); a ValueError naming the file
    when it is not valid YAML or holds anything else (a list, a plain value, names that are not text)."""
    values = parsed_yaml(Path(path).read_text(), str(path))
    if values is None:
        return {}
    expected = "expected name: value pairs, one a line (e.g. epochs: 240)"
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds the {type(values).__name__} {str(values)[:60]}; {expected}")
    untitled = [name for name in values if not isinstance(name, str)]
    if untitled:
        raise ValueError(f"{path} has names that are not text, {untitled}; {expected}")
    return values

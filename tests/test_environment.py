"""The install files agree: every dependency pyproject.toml declares has an exact version in
requirements-lock.txt that its range allows, and the Makefile and environment.yml pin the lock's torch."""

import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vkd.paths import project_root


def locked_versions() -> dict[str, str]:
    lines = (project_root() / "requirements-lock.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), "every line of requirements-lock.txt is NAME==VERSION"
    return {canonicalize_name(name): version for name, version in pins}


def test_every_declared_dependency_is_locked_within_its_range():
    project = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]
    locked = locked_versions()
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is in pyproject.toml but not in requirements-lock.txt (make lock)"
        assert requirement.specifier.contains(locked[name]), f"locked {name}=={locked[name]} is outside {requirement}"


def test_makefile_and_conda_environment_pin_the_locked_torch():
    locked = locked_versions()
    expected = {f"{name}=={locked[name]}" for name in ("torch", "torchvision")}
    makefile_pin = re.search(r"^TORCH_PIN := (.*)$", (project_root() / "Makefile").read_text(), re.MULTILINE)
    assert set(makefile_pin.group(1).split()) == expected
    environment = yaml.safe_load((project_root() / "environment.yml").read_text())
    pip_lines = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert expected <= set(pip_lines) and "-c requirements-lock.txt" in pip_lines

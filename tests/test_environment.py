"""The install files agree: every dependency pyproject.toml declares has an exact version in
requirements-lock.txt that its range allows, and the Makefile and environment.yml pin the lock's torch.
The library installs without its extras: without their packages it imports and trains, and what needs
one of them says which extra to install."""

import functools
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vkd.extras import MissingExtraError, optional_import
from vkd.paths import project_root


@functools.cache
def project() -> dict:
    return tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]


def requirements(group: str | None = None) -> list[Requirement]:
    """pyproject's requirements: the core ``dependencies`` (group None) or an extra's, less vkd's own extras."""
    lines = project()["dependencies"] if group is None else project()["optional-dependencies"][group]
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != "vkd"]


def locked_versions() -> dict[str, str]:
    lines = (project_root() / "requirements-lock.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), "every line of requirements-lock.txt is NAME==VERSION"
    return {canonicalize_name(name): version for name, version in pins}


def test_every_declared_dependency_is_locked_within_its_range():
    locked = locked_versions()
    for requirement in [r for group in (None, *project()["optional-dependencies"]) for r in requirements(group)]:
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


def test_dev_extra_installs_every_other_extra():
    """make setup and environment.yml install vkd[dev]: with it, everything the notebooks and tests need."""
    extras, reached, waiting = project()["optional-dependencies"], set(), ["dev"]
    while waiting:  # vkd[a] in an extra's list installs extra a too
        group = waiting.pop()
        reached.add(group)
        waiting += [extra for line in extras[group] if canonicalize_name(Requirement(line).name) == "vkd"
                    for extra in Requirement(line).extras if extra not in reached]
    assert reached == set(extras)


def test_optional_import_names_the_extra_only_for_its_own_package():
    assert optional_import("json.decoder", "notebooks").JSONDecoder is json.JSONDecoder
    with pytest.raises(MissingExtraError, match=r"no_such_package is not installed.*pip install 'vkd\[gan\]'"):
        optional_import("no_such_package.sub", "gan")
    with pytest.raises(ModuleNotFoundError) as missing:  # the package is there, something inside it is not
        optional_import("json.no_such_module", "gan")
    assert not isinstance(missing.value, MissingExtraError)


LIBRARY_WITHOUT_EXTRAS = """
import importlib.machinery, json, sys


class NotInstalled:  # first on the import path: importing an extra's package fails as if it were not installed
    blocked = set(json.loads(sys.argv[1]))

    @classmethod
    def find_spec(cls, name, path=None, target=None):  # a spec, so that torch's probes (find_spec) do not fail
        return importlib.machinery.ModuleSpec(name, cls) if name.split(".")[0] in cls.blocked else None

    @staticmethod
    def create_module(spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    exec_module = None  # never reached: create_module raises


sys.meta_path.insert(0, NotInstalled)
import torch
import vkd, vkd.analysis, vkd.bench, vkd.cli, vkd.data, vkd.distillers, vkd.engine, vkd.gan, vkd.results
from vkd.extras import MissingExtraError

loss = vkd.VkDLoss(8, 16)(torch.randn(4, 8), torch.randn(4, 16))
loss.backward()
distiller = vkd.distillers.Distiller(vkd.models.timm.create_model("resnet8", num_classes=10),
                                     vkd.models.timm.create_model("resnet8", num_classes=10),
                                     vkd.distillers.MethodConfig.for_method("vkd"))
optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
vkd.engine.train_step(distiller, optimizer, torch.randn(4, 3, 32, 32), torch.arange(4))
messages = {}
for name, call in {"tsne": lambda: vkd.analysis.tsne(torch.randn(12, 3)),
                   "render_table": lambda: vkd.results.render_table(vkd.results.paper_numbers(), "unused.png"),
                   "FID": lambda: vkd.gan.FID("inception")}.items():
    try:
        call()
    except MissingExtraError as error:
        messages[name] = str(error)
print(json.dumps(messages))
sys.exit(vkd.cli.main(["run", "00"]))
"""


def test_library_runs_without_the_extras_and_names_them_where_needed(tmp_path):
    """What ``pip install vkd`` (no extra) gives: the modules import and a distillation step trains with the
    extras' packages absent; t-SNE, figures, FID and the notebook runner each say which extra they need."""
    extras_only = {canonicalize_name(r.name) for group in project()["optional-dependencies"]
                   for r in requirements(group)} - {canonicalize_name(r.name) for r in requirements()}
    blocked = sorted(module for module, distributions in packages_distributions().items()
                     if not module.startswith("_") and {canonicalize_name(d) for d in distributions} & extras_only)
    assert {"papermill", "matplotlib", "sklearn", "torchmetrics"} <= set(blocked)
    result = subprocess.run([sys.executable, "-c", LIBRARY_WITHOUT_EXTRAS, json.dumps(blocked)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr  # the last line: `python -m vkd run 00` refused, not a traceback
    messages = json.loads(result.stdout.splitlines()[-1])
    assert set(messages) == {"tsne", "render_table", "FID"}
    for name, extra in {"tsne": "notebooks", "render_table": "notebooks", "FID": "gan"}.items():
        assert f"pip install 'vkd[{extra}]'" in messages[name]
    assert result.stderr.startswith("error: ") and "pip install 'vkd[notebooks]'" in result.stderr
    assert "Traceback" not in result.stderr

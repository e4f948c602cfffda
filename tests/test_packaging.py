"""Packaging: environment.yml and pyproject.toml agree; the console script and the make targets exist."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    version = tuple(int(x) for x in python.split("=")[-1].split("."))
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1).split("."))
    assert version >= minimum, f"environment.yml pins {python}, below requires-python {project['requires-python']}"
    assert "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    installs = [p for p in pip if p.startswith("-e")]
    assert installs == ['-e ".[dev]"'], "environment.yml must install the package with its dev extra through pip"
    assert "dev" in project["optional-dependencies"]


def test_dependency_ranges_are_ranges_not_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert "==" not in dep, f"{dep}: use a range, not an exact pin"
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "torchvision", "timm", "matplotlib", "scikit-learn", "ipywidgets"} <= names
    dev = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert {"pytest", "nbval", "jupyterlab", "playwright"} <= dev
    assert project["scripts"]["ijepa-viz"] == "ijepa_viz.cli:main"


def test_makefile_and_ci_use_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo:", "test:", "lab:"):
        assert re.search(rf"^{target}", makefile, re.M), f"Makefile lacks {target}"
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()

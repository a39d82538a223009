"""The layout holds: the import rule (pyproject.toml's ``[tool.importlinter]`` contracts) passes,
a forbidden import breaks the contract it should, and every module imports on its own.

The rule, from docs/architecture.md: ``service.core`` imports nothing else of ours; ``training``
imports only ``service.core`` of the service; ``serving`` imports only ``service.core`` and, of
training, only ``training.model``; the dashboard loads no model code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("service", "training", "serving")
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``config``'s contracts, reading the packages found from ``cwd``
    (and no cache: a stale graph would hide an import)."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "500"}  # no wrapped names
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", str(config)], check=False,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_pass():
    result = lint_imports(REPO / "pyproject.toml", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


def contracts() -> list[dict]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def within(module: str, packages: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# (the package whose __init__ gets the import, what it imports)
FORBIDDEN = [("training", "service.api.app"), ("training", "serving.engine"),
             ("serving", "training.recipes"), ("service.core", "service.jobs"),
             ("service.ui", "serving.engine"), ("training.recipes", "ray")]


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN,
                         ids=[f"{i}->{m}" for i, m in FORBIDDEN])
def test_a_forbidden_import_breaks_its_contract(tmp_path, importer, imported):
    """A copy of the three packages with one forbidden import appended to a package's
    ``__init__``: ``lint-imports`` exits non-zero and names the contracts it breaks (those of
    pyproject.toml that forbid it) and the import. PYTHONPATH and the working directory point
    at the copy, so grimp reads it and not the installed (editable) packages, which have no
    such import."""
    expected = [c["name"] for c in contracts() if c["type"] == "forbidden"
                and within(importer, c["source_modules"])
                and within(imported, c["forbidden_modules"])]
    assert expected, f"no contract forbids {importer} -> {imported}"
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    init = tmp_path / importer.replace(".", "/") / "__init__.py"
    init.write_text(init.read_text() + f"\nimport {imported}  # forbidden\n")

    result = lint_imports(tmp_path / "pyproject.toml", tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    for name in expected:
        assert name in broken, (name, result.stdout)
    assert f"{importer} -> {imported} (l." in broken, result.stdout


IMPORT_EACH = """
import importlib, json, os, sys, traceback

# The heavy libraries first, once; each module is then imported in a fork of this process,
# first of ours there, so that an import that works only after another of ours (a circle, a
# name another module happened to define) fails.
for library in ("torch", "transformers", "peft", "fastapi", "ray", "ray.serve", "ray.train.torch",
                "boto3", "datasets", "pydantic_settings"):
    importlib.import_module(library)
failures = {}
for name in json.load(sys.stdin):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException:
            message = traceback.format_exc(limit=-3)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    if message:
        failures[name] = message
print(json.dumps(failures))
"""


def all_modules() -> list[str]:
    """Every module of the three packages, from the files (a folder without ``__init__.py``
    is not skipped)."""
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_on_its_own():
    modules = all_modules()
    assert {"service.core.errors", "training.run", "serving.protocol"} <= set(modules)
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH], input=json.dumps(modules),
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())

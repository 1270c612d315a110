"""The layers declared in pyproject.toml hold, and an import that breaks them is caught.

scripts/test runs ``lint-imports`` on the tree; these tests check that the contracts say what
docs/architecture.md says, cover every module of the kit, and fail on an upward import.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import squint

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "squint",
    "compressor_plugins",
    "vision_worker",
    "llm_worker",
    "orchestrator",
    "bench",
    "evaluation",
    "training",
)
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["type"]: contract for contract in config["contracts"]}


def test_the_parts_are_layered_app_over_orchestrator_over_workers_over_compressors():
    layers = contracts()["layers"]["layers"]
    assert layers == [
        "squint.app : bench : evaluation : training",
        "orchestrator",
        "vision_worker | llm_worker",
        "compressor_plugins",
    ]


def test_the_kit_contract_covers_every_module_of_squint_outside_the_app():
    kit = contracts()["forbidden"]
    children = {f"squint.{m.name}" for m in pkgutil.iter_modules(squint.__path__)}
    # __main__ is the `python -m squint` shim onto the app's CLI.
    assert set(kit["source_modules"]) == children - {"squint.app", "squint.__main__"}
    assert set(kit["forbidden_modules"]) == {"squint.app", *PACKAGES[1:]}


def copy_of_the_code(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__", "*.pbtxt"))
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    return tree


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "upward_import", "broken"),
    [
        ("compressor_plugins/pooling.py", "import vision_worker.images", "Parts are layered"),
        ("llm_worker/staged.py", "import vision_worker.images", "Parts are layered"),
        ("orchestrator/prompting.py", "import squint.app.client", "Parts are layered"),
        ("squint/wire.py", "import orchestrator.budget", "The kit"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward_import, broken):
    tree = copy_of_the_code(tmp_path)
    clean = lint_imports(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    path = tree / module
    path.write_text(path.read_text() + f"\n{upward_import}\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    broken_lines = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(broken) for line in broken_lines), result.stdout

"""The import contract of `make lint` (lint-imports, pyproject.toml): the real tree keeps it, and
a copy of the tree with one import planted where it must not be breaks it, naming the import."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, tool

pytestmark = pytest.mark.slow

PACKAGES = ("dockercoins", "dockercoins_tools", "rng_svc", "hasher_svc", "worker_svc", "webui")
LAYERS = "the tools over the services over the core"
INDEPENDENT = "no service imports another"
ACYCLIC = "no import cycle between the modules of a package"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the contracts of pyproject.toml, run on the packages under `root`."""
    return subprocess.run(
        [tool("lint-imports"), "--no-cache", "--no-logo"],
        cwd=root,  # lint-imports puts its working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tree_keeps_the_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (LAYERS, INDEPENDENT, ACYCLIC):
        assert f"{contract} KEPT" in result.stdout


# (module, import planted in it, where: "top" or inside a function, the contract it breaks,
# the import as lint-imports names it)
PLANTED = {
    "the core imports a service, in a function": (
        "dockercoins/net.py",
        "from rng_svc.config import FLAGS",
        "function",
        LAYERS,
        "dockercoins.net -> rng_svc.config",
    ),
    "the core imports a tool": (
        "dockercoins/settings.py",
        "import dockercoins_tools.procstat",
        "top",
        LAYERS,
        "dockercoins.settings -> dockercoins_tools.procstat",
    ),
    "a service's __main__ imports the CLI": (
        "rng_svc/__main__.py",
        "import dockercoins_tools.cli",
        "top",
        LAYERS,
        "rng_svc.__main__ -> dockercoins_tools.cli",
    ),
    "a service imports another, in a function": (
        "webui/server.py",
        "from worker_svc.config import WorkerSettings",
        "function",
        INDEPENDENT,
        "webui.server -> worker_svc.config",
    ),
    "a cycle in the core, through a function": (
        "dockercoins/errors.py",
        "import dockercoins.tls",
        "function",
        ACYCLIC,
        ".errors -> .tls",
    ),
    "a cycle in the tools, through a function": (
        "dockercoins_tools/cost_model.py",
        "import dockercoins_tools.chart",
        "function",
        ACYCLIC,
        ".cost_model -> .chart",
    ),
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_import_breaks_the_contract(case: str, tmp_path: Path) -> None:
    module, statement, where, contract, named = PLANTED[case]
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    planted = tmp_path / module
    code = planted.read_text()
    assert statement not in code
    if where == "top":
        code += f"\n{statement}\n"
    else:
        code += f"\n\ndef _planted() -> None:\n    {statement}\n"
    planted.write_text(code)
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract} BROKEN" in result.stdout
    assert named in result.stdout, result.stdout

"""The tree shows the architecture, and these checks keep it so (no SGLang needed to run them):

- only ``chameleon_sglang/integration/`` imports ``sglang``; the pure policy (``scheduler/``,
  ``cache/``, ``dp/``, ``config``, ``clock``, ``status``) imports no torch either;
- nothing the server loads imports the developer tooling (``chameleon_sglang/dev/``);
- the patches import one module, ``chameleon_sglang.integration.patch_api``, and only names it
  exports;
- ``pyproject.toml`` installs every package of the tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Set, Tuple

import pytest
import tomllib

from chameleon_sglang.integration import patch_api

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "chameleon_sglang"
PURE = ("scheduler", "cache", "catalog", "dp", "config.py", "clock.py", "status.py")


def imported_modules(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, at any depth (inside functions too)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def modules_under(*parts: str) -> Iterator[Path]:
    for part in parts:
        path = PACKAGE / part
        yield from ([path] if path.suffix == ".py" else sorted(path.rglob("*.py")))


def offenders(paths: Iterator[Path], top_level: str) -> Set[str]:
    return {
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in paths
        for line, module in imported_modules(path)
        if module.split(".")[0] == top_level
    }


def test_only_the_integration_package_imports_sglang():
    outside = (
        p for p in PACKAGE.rglob("*.py") if "integration" not in p.relative_to(PACKAGE).parts
    )
    assert offenders(outside, "sglang") == set()


def test_the_integration_package_does_import_sglang():
    """The check above would pass on an empty tree: the scan itself finds SGLang imports."""
    assert offenders(modules_under("integration"), "sglang")


def test_the_pure_policy_imports_no_torch():
    assert offenders(modules_under(*PURE), "torch") == set()


def test_nothing_the_server_loads_imports_the_developer_tooling():
    loaded = (p for p in PACKAGE.rglob("*.py") if "dev" not in p.relative_to(PACKAGE).parts)
    found = {
        f"{path.relative_to(ROOT)}:{line}"
        for path in loaded
        for line, module in imported_modules(path)
        if module.startswith("chameleon_sglang.dev")
    }
    assert found == set()


def patch_imports() -> Iterator[Tuple[str, str, str]]:
    """``(patch, module, names)`` of every import of our code a patch adds."""
    for patch in sorted((ROOT / "patches").glob("*.patch")):
        added = "\n".join(
            line[1:]
            for line in patch.read_text().splitlines()
            if line.startswith("+") and not line.startswith("+++")
        )
        for match in re.finditer(r"from (chameleon\w*(?:\.\w+)*) import (\([^)]*\)|[^\n]*)", added):
            yield patch.name, match.group(1), match.group(2)


def test_the_patches_import_only_the_patch_api():
    found = list(patch_imports())
    assert found, "no patch imports our code: the scan is broken"
    assert {module for _, module, _ in found} == {"chameleon_sglang.integration.patch_api"}


def test_every_name_a_patch_imports_is_exported_by_the_patch_api():
    names = set()
    for _, _, imported in patch_imports():
        for item in imported.strip("()").split(","):
            if item.strip():
                names.add(item.split(" as ")[0].strip())
    assert names <= set(patch_api.EXPORTS), sorted(names - set(patch_api.EXPORTS))
    for name in sorted(names):
        assert callable(getattr(patch_api, name)), name


def test_the_patch_api_refuses_names_it_does_not_export():
    with pytest.raises(AttributeError):
        getattr(patch_api, "no_such_call")  # noqa: B009 - the attribute is looked up on purpose


def test_pyproject_installs_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")
    }
    on_disk.add("chameleon_kernels")
    assert listed == on_disk
    assert config["package-dir"] == {"chameleon_kernels": "kernels"}


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (rootdir import mode): two files of one name in
    different test folders fail the whole collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []

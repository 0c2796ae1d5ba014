"""The import-linter contracts in pyproject.toml stay complete as modules are added (lint-imports itself runs in
``make test`` before pytest)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVING = {"deployments.handler", "deployments.chaos_handler", "deployments.serving_request",
           "canaryflow.core.serving_contract"}


def _modules(package: str) -> set[str]:
    """Importable modules; ``templates/`` holds files shipped to pods and servers (scripts), not modules."""
    base = ROOT / package.replace(".", "/")
    return {package + "." + ".".join(p.relative_to(base).with_suffix("").parts)
            for p in base.rglob("*.py") if p.name != "__init__.py" and "templates" not in p.relative_to(base).parts}


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def test_the_handler_contract_forbids_every_module_but_the_serving_ones() -> None:
    [contract] = [c for name, c in _contracts().items() if name.startswith("the handler imports")]
    forbidden = contract["forbidden_modules"]

    def covered(module: str) -> bool:
        return any(module == f or module.startswith(f + ".") for f in forbidden)

    ours = _modules("canaryflow") | _modules("deployments") | _modules("validation")
    assert sorted(m for m in ours - SERVING if not covered(m)) == []
    assert not [m for m in SERVING if covered(m)]


def test_every_top_level_package_is_in_the_layers() -> None:
    [layers] = [c for c in _contracts().values() if c["type"] == "layers"]
    named = {part.strip() for layer in layers["layers"] for part in layer.split("|")}
    packages = {p.name for p in (ROOT / "canaryflow").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "canaryflow").glob("*.py") if p.name != "__init__.py"}
    assert {f"canaryflow.{n}" for n in packages | modules} <= named
    assert {"flows", "tasks", "deployments", "validation"} <= named


def test_test_modules_have_unique_basenames() -> None:
    """tests/unit and tests/integration have no __init__.py: pytest imports their modules by basename, and two
    files of one name stop the whole run at collection (it happened twice)."""
    root = Path(__file__).resolve().parents[1]
    names = [p.name for p in root.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []

"""The import direction of DESIGN.md ("Packaging"): the wire models live in one protocol package
below the services, which every service imports and which imports none of them; the services
talk to each other over HTTP only. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("engine", "worker", "controller", "api_gateway", "web_ui", "deploy", "kernels")


def pagedserve_imports(path: Path) -> set[str]:
    """The `pagedserve.<part>` names a module imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pagedserve import worker` names the part in the alias.
            if node.module == "pagedserve":
                modules = [f"pagedserve.{alias.name}" for alias in node.names]
            else:
                modules = [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "pagedserve" and len(parts) > 1:
                found.add(f"pagedserve.{parts[1]}")
    return found


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    banned = {f"pagedserve.{name}" for name in forbidden}
    bad = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        hits = sorted(pagedserve_imports(path) & banned)
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_protocol_folder_holds_the_wire_modules():
    names = {p.stem for p in (ROOT / "protocol").glob("*.py")}
    assert {"openai", "fastchat", "registry", "control_token"} <= names
    assert not (ROOT / "protocol" / "__init__.py").exists()  # a PEP 420 folder, as the others


def test_protocol_imports_no_service():
    assert offenders("protocol", SERVICES) == {}


def test_worker_imports_neither_the_gateway_nor_the_controller():
    assert offenders("worker", ("api_gateway", "controller")) == {}


def test_the_old_protocol_modules_are_gone():
    """One place for each model: no copy or re-export left in a service."""
    assert not (ROOT / "api_gateway" / "protocol.py").exists()
    assert not (ROOT / "controller" / "protocol.py").exists()


def test_the_checker_sees_each_import_form(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import pagedserve.worker.app\n"
        "from pagedserve.controller.registry import Controller\n"
        "from pagedserve import api_gateway\n"
        "def f():\n"
        "    from pagedserve.engine import llm\n"
        "from . import sibling\n"
    )
    assert pagedserve_imports(module) == {
        "pagedserve.worker",
        "pagedserve.controller",
        "pagedserve.api_gateway",
        "pagedserve.engine",
    }

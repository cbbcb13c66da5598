"""The layer rules of the README's layout section, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvpfs"

#: Pure modules: codecs, rules and layouts, no I/O framework.
PURE = {
    "kvpfs.config", "kvpfs.errors", "kvpfs.scratch", "kvpfs.fs.text",
    "kvpfs.kvp.records", "kvpfs.kvp.names", "kvpfs.kvp.limits",
    "kvpfs.xenstore.protocol",
    "kvpfs.vbd.vdev", "kvpfs.vbd.diskspec", "kvpfs.vbd.layout", "kvpfs.vbd.states",
    "kvpfs.peers.xenstored.store", "kvpfs.peers.hyperv.message",
    "kvpfs.fs.openfile", "kvpfs.xenstore.errnos", "kvpfs.xenstore.lsformat",
}
#: The composition roots: the only modules that start peers and assemble views.
ROOTS = {
    "kvpfs.compose", "kvpfs.cli", "kvpfs.peers.hyperv.hostsim",
    "kvpfs.testing", "kvpfs.pytest_plugin",
    # not a root, but it reads every command's parser, hostsim's included
    "kvpfs.manpages",
}


PACKAGES = {
    ".".join(p.relative_to(PACKAGE.parent).parent.parts) for p in PACKAGE.rglob("__init__.py")
}


def _modules() -> dict[str, set[str]]:
    """Every kvpfs module and the kvpfs/trio/pyfuse3 modules it imports (anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imports: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imports.add(node.module)
                imports.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[name] = imports
    return found


MODULES = _modules()


def _imports(module: str, prefix: str) -> list[str]:
    return sorted(i for i in MODULES[module] if i == prefix or i.startswith(prefix + "."))


def test_every_pure_module_exists() -> None:
    assert MODULES.keys() >= PURE


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_no_io_framework(module: str) -> None:
    for framework in ("trio", "pyfuse3", "kvpfs.fs"):
        assert _imports(module, framework) == [], f"{module} imports {framework}"
    # and only pure kvpfs modules
    # (``from kvpfs.kvp import records`` names the package, then the module.)
    impure = [
        i for i in _imports(module, "kvpfs")
        if i not in PURE | PACKAGES and i.rsplit(".", 1)[0] not in PURE
    ]
    assert impure == [], f"{module} imports {impure}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_views_and_roots_import_the_fuse_layer(module: str) -> None:
    if module.startswith("kvpfs.fs") or module in ROOTS or module.endswith(".view"):
        return
    assert _imports(module, "kvpfs.fs") == [], f"{module} imports kvpfs.fs"
    assert _imports(module, "pyfuse3") == [], f"{module} imports pyfuse3"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_roots_and_peers_import_peers(module: str) -> None:
    if module.startswith("kvpfs.peers") or module in ROOTS:
        return
    assert _imports(module, "kvpfs.peers") == [], f"{module} imports kvpfs.peers"


def test_each_store_package_has_one_view() -> None:
    views = sorted(m for m in MODULES if m.endswith(".view"))
    assert views == [
        "kvpfs.fs.view", "kvpfs.info.view", "kvpfs.kvp.view", "kvpfs.peers.hyperv.view",
        "kvpfs.vbd.view", "kvpfs.xenstore.view",
    ]

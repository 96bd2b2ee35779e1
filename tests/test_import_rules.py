"""The house rule (docs/design.md): a floor imports only from its own floor and the floors below.

    0  hfp8.numerics (imports nothing else from hfp8), hfp8._files, hfp8._report,
       hfp8._runs, hfp8._version, hfp8.distributed, hfp8.models, hfp8.examples
    1  hfp8.data
    2  hfp8.calibration
    3  hfp8.ptq
    4  hfp8.export
    5  hfp8.training
    6  hfp8.cli and the package root ``hfp8`` (its public names re-export every floor)

Every import counts: at module level, inside functions (lazy) and under ``TYPE_CHECKING``. The
imports are read from the source with ``ast``, not by importing, so a lazy import that a test
never reaches is still checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hfp8"

FLOORS = {
    "hfp8.numerics": 0, "hfp8._files": 0, "hfp8._report": 0, "hfp8._runs": 0,
    "hfp8._version": 0,
    "hfp8.distributed": 0, "hfp8.models": 0, "hfp8.examples": 0,
    "hfp8.data": 1,
    "hfp8.calibration": 2,
    "hfp8.ptq": 3,
    "hfp8.export": 4,
    "hfp8.training": 5,
    "hfp8.cli": 6, "hfp8": 6,
}


def floor_of(module: str) -> tuple[str, int]:
    """(the room, its floor): the longest ``FLOORS`` key that is ``module`` or a parent."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        room = ".".join(parts[:end])
        if room in FLOORS:
            return room, FLOORS[room]
    raise KeyError(f"{module} is on no floor: add its package to FLOORS and docs/design.md")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return ((PACKAGE.parent / relative).with_suffix(".py").exists()
            or (PACKAGE.parent / relative / "__init__.py").exists())


def imported_modules(source: str, importer: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every hfp8 module ``source`` imports; ``from a import b`` names the
    module ``a.b`` when that is a module, else ``a``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                package = importer.split(".")
                package = package if is_package else package[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate) else base))
    return [(line, name) for line, name in found if name == "hfp8" or name.startswith("hfp8.")]


def violations(source: str, importer: str, is_package: bool = False) -> list[str]:
    room, floor = floor_of(importer)
    bad = []
    for line, imported in imported_modules(source, importer, is_package):
        target_room, target_floor = floor_of(imported)
        if room == "hfp8.numerics" and target_room != "hfp8.numerics":
            bad.append(f"{importer}:{line} imports {imported} (numerics imports nothing else)")
        elif target_floor > floor:
            bad.append(f"{importer}:{line} imports {imported} (floor {floor} -> {target_floor})")
    return bad


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_imports_from_a_higher_floor(path):
    assert violations(path.read_text(encoding="utf-8"), module_name(path),
                      path.name == "__init__.py") == []


def test_every_room_is_on_a_floor():
    for path in _sources():
        floor_of(module_name(path))  # raises for a package nobody placed


@pytest.mark.parametrize("importer, source, expected", [
    ("hfp8.calibration.observers", "from hfp8.ptq.config import QuantConfig\n", "floor 2 -> 3"),
    ("hfp8.ptq.quantizers", "def f():\n    from hfp8.export import onnx_ops\n", "floor 3 -> 4"),
    ("hfp8.numerics.formats", "import hfp8.distributed\n", "numerics imports nothing else"),
    ("hfp8.data.batches", "from hfp8 import quantize_model\n", "floor 1 -> 6"),
    ("hfp8.export.verify", "from ..training import hybrid\n", "floor 4 -> 5"),
])
def test_the_rule_catches_planted_upward_imports(importer, source, expected):
    """The checker itself: each planted import breaks the rule and is reported."""
    found = violations(source, importer)
    assert len(found) == 1 and expected in found[0], found


def test_downward_and_sideways_imports_pass():
    assert violations("from hfp8.numerics.formats import E4M3\nfrom hfp8.ptq import plan\n",
                      "hfp8.ptq.pipeline") == []

"""distcl on Ray's public API: the import graph reaches Ray's internals only through the one
adapter (distcl.raycompat), and the installed Ray is one the suite declares it has passed on.

Run: ``.venv/bin/python -m pytest tests/test_raycompat.py -q``
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import ray
from packaging.requirements import Requirement

from distcl import raycompat

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "distcl"
ADAPTER = PACKAGE / "raycompat.py"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in a file, lazy ones inside functions included;
    ``from a import b`` gives both ``a`` and ``a.b``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _internal(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "ray" and any(p in ("_internal", "_private", "_raylet") for p in parts)


def test_no_ray_internal_import_outside_the_adapter():
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ADAPTER
        for line, name in _imported_modules(path)
        if _internal(name)
    ]
    assert found == []


def test_the_walk_sees_the_adapters_own_internal_imports():
    """The check above would find an internal import: the adapter's are found."""
    names = [name for _, name in _imported_modules(ADAPTER) if _internal(name)]
    assert "ray._private.ray_constants" in names
    assert "ray.train._internal.session.get_session" in names


def test_no_private_ray_method_is_overridden():
    """distcl's Ray subclasses define no ``_name`` method of their Ray base (an override of
    a private method, like the default-callback list, breaks silently on another release)."""
    from distcl.train.backend import TorchBackendConfig, _Backend
    from distcl.train.trainer import Trainer

    for cls in (Trainer, TorchBackendConfig, _Backend):
        ray_bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("ray.")]
        private = {n for b in ray_bases for n, v in vars(b).items()
                   if re.match(r"^_[a-z]", n) and callable(v)}  # fmt: skip
        assert not private & set(vars(cls)), (cls, private & set(vars(cls)))


def _declared_ray() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    return req


def test_pyproject_bounds_ray_to_the_adapters_range():
    req = _declared_ray()
    assert str(req.specifier) == str(req.specifier.__class__(raycompat.SUPPORTED_RAY))
    assert req.specifier.filter(["2.60.0"]) and not list(req.specifier.filter(["3.0.0"]))
    assert {"default", "train", "tune"} <= req.extras


def test_the_installed_ray_is_inside_the_declared_range():
    assert _declared_ray().specifier.contains(ray.__version__), ray.__version__
    assert raycompat.check_ray_version() == ray.__version__


@pytest.mark.parametrize("version", ["2.40.0", "2.59.1", "2.61.0", "3.0.0"])
def test_a_ray_outside_the_range_is_refused_naming_it(version):
    with pytest.raises(raycompat.UnsupportedRay, match=re.escape(raycompat.SUPPORTED_RAY)):
        raycompat.check_ray_version(version)


def test_the_readme_states_the_range():
    assert raycompat.SUPPORTED_RAY in (ROOT / "README.md").read_text()

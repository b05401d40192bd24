"""The import rule of docs/architecture.md, checked on every module's source (``ast``, imports inside functions
included): the device side never imports the toolkit's heavy libraries or wings, the wings import only downward, and
the runtime's backends stay behind the runner interface (no ``hasattr`` probing, no cleanup in ``__del__``)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: top-level folders and the package each one is (pyproject.toml's package-dir)
FOLDERS = {"geosurge": "geosurge", "runtime": "geosurge.runtime", "export": "geosurge.export",
           "calibration": "geosurge.calibration"}
#: the shared, numpy-only core: the bundle contract and what both sides agree on
CORE = {"geosurge", "geosurge.errors", "geosurge.fsutil", "geosurge.report", "geosurge.registry", "geosurge.formats",
        "geosurge.manifest", "geosurge.preprocess", "geosurge.images", "geosurge.image_headers", "geosurge.inputs",
        "geosurge.parity", "geosurge.privacy",
        "geosurge.samples", "geosurge.timing", "geosurge.geo"}
HEAVY = {"torch", "torchvision", "timm", "transformers", "onnx", "onnxscript", "modelopt", "coremltools", "safetensors"}
WINGS = {"geosurge.runtime", "geosurge.calibration", "geosurge.models", "geosurge.training", "geosurge.export",
         "geosurge.data", "geosurge.evaluation", "geosurge.api", "geosurge.commands", "geosurge.cli"}
#: who may not import whom (a module is ruled by the longest matching prefix)
FORBIDDEN = {
    "core": HEAVY | WINGS,
    "geosurge.runtime": HEAVY | WINGS - {"geosurge.runtime"},
    "geosurge.calibration": HEAVY | WINGS - {"geosurge.calibration"},
    "geosurge.models": WINGS - {"geosurge.models"},
    "geosurge.training": WINGS - {"geosurge.models", "geosurge.training", "geosurge.data"},
    # georeferenced rasters and views: numpy + OpenCV (+ rasterio / pyproj for GeoTIFFs), the contract only
    "geosurge.data": HEAVY | WINGS - {"geosurge.data"},
    # accuracy in km of checkpoints (through models, torch imported when one is evaluated) and bundles (through the
    # runtime); below export, training and the top
    "geosurge.evaluation": {"geosurge.training", "geosurge.export", "geosurge.calibration", "geosurge.api",
                            "geosurge.commands", "geosurge.cli"},
    "geosurge.export": {"geosurge.training", "geosurge.api", "geosurge.commands", "geosurge.cli"},
    "geosurge.api": {"geosurge.commands", "geosurge.cli"},
}
#: a backend may import its own library (only when chosen: the runner imports it inside ``__init__``)
BACKEND_LIBRARIES = {"geosurge.runtime.backends.coreml": {"coremltools"}}


def modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = [package, *rel]
            is_pkg = parts[-1] == "__init__"
            yield ".".join(parts[:-1] if is_pkg else parts), is_pkg, path


def imported(name: str, is_pkg: bool, tree) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in n.names}  # ``from geosurge import api`` imports geosurge.api
    return out


def rule_for(name: str):
    if any(name == c or name.startswith(c + ".") for c in CORE - {"geosurge"}) or name == "geosurge":
        return "core"
    for prefix in sorted(FORBIDDEN, key=len, reverse=True):
        if prefix != "core" and (name == prefix or name.startswith(prefix + ".")):
            return prefix
    return None


def hits(imp: str, forbidden: set[str]) -> str | None:
    for f in forbidden:
        if imp == f or imp.startswith(f + "."):
            return f
    return None


ALL = list(modules())


def test_every_module_is_ruled_or_at_the_top():
    unruled = [name for name, _, _ in ALL if rule_for(name) is None]
    assert set(unruled) <= {"geosurge.__main__", "geosurge.cli"} | {n for n in unruled
                                                                   if n.startswith("geosurge.commands")}


@pytest.mark.parametrize("name,is_pkg,path", ALL, ids=[m[0] for m in ALL])
def test_import_rule(name, is_pkg, path):
    rule = rule_for(name)
    if rule is None:
        return
    allowed = BACKEND_LIBRARIES.get(name, set())
    bad = sorted({f"{imp} ({f})" for imp in imported(name, is_pkg, ast.parse(path.read_text()))
                  if (f := hits(imp, FORBIDDEN[rule] - allowed)) and not hits(imp, {name})})
    assert not bad, f"{name} ({rule}) may not import: {', '.join(bad)}"


def test_runtime_backends_have_one_interface():
    for path in sorted((ROOT / "runtime" / "backends").glob("*.py")):
        tree = ast.parse(path.read_text())
        probes = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                  "hasattr"]
        finalizers = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__del__"]
        assert not probes and not finalizers, f"{path.name}: hasattr at {probes}, __del__ at {finalizers}"


def test_the_rule_catches_a_violation():
    tree = ast.parse("def f():\n    import torch\n    from geosurge.export import bundle\n")
    got = imported("geosurge.runtime.localizer", False, tree)
    assert hits("torch", FORBIDDEN["geosurge.runtime"]) and {"torch", "geosurge.export.bundle"} <= got
    assert rule_for("geosurge.geo.hierarchy") == "core" and rule_for("geosurge.runtime.backends.coreml") == \
        "geosurge.runtime"
    assert imported("geosurge.runtime.cli", False, ast.parse("from .bench import x")) >= {"geosurge.runtime.bench"}

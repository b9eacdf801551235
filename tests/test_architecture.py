"""The layers (docs/architecture.md "Layers"): `lint-imports` keeps every contract of pyproject.toml's
[tool.importlinter], and those contracts are the expected ones, classify every module of vlm_merge as core or
application, and have no exceptions (so they cannot be emptied or loosened silently)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import vlm_merge.engine

ROOT = Path(__file__).resolve().parents[1]
CORE = {"vlm_merge.io", "vlm_merge.architecture", "vlm_merge.methods", "vlm_merge.recipe", "vlm_merge.engine",
        "vlm_merge.errors", "vlm_merge.tables", "vlm_merge.extras"}
APPLICATIONS = {"vlm_merge.evolve", "vlm_merge.world", "vlm_merge.cli", "vlm_merge.testing"}
EVAL_MAY_IMPORT = {"vlm_merge.io", "vlm_merge.errors", "vlm_merge.tables", "vlm_merge.extras"}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]


def _vlm_merge_modules() -> set[str]:
    """Every module and subpackage directly under vlm_merge/ (its __init__ aside)."""
    package = ROOT / "vlm_merge"
    files = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    return {f"vlm_merge.{name}" for name in files | subpackages}


def test_the_contracts_are_the_expected_ones_with_no_exceptions():
    config = _config()
    assert config["root_packages"] == ["vlm_merge", "eval", "chat_vector"]
    contracts = {c["id"]: c for c in config["contracts"]}
    assert len(contracts) == len(config["contracts"])
    assert set(contracts) == {"core", "core-layers", "applications", "eval", "chat-vector"}
    for c in contracts.values():
        assert not c.get("ignore_imports") and not c.get("allow_indirect_imports"), c["id"]
        assert not c.get("exhaustive_ignores") and not c.get("ignore_imports"), c["id"]
    assert not CORE & APPLICATIONS and CORE | APPLICATIONS == _vlm_merge_modules()  # every module has a layer
    core = contracts["core"]
    assert core["type"] == "forbidden" and set(core["source_modules"]) == CORE
    assert set(core["forbidden_modules"]) == APPLICATIONS | {"eval", "chat_vector"}
    layers = contracts["core-layers"]
    assert layers["type"] == "layers" and layers["containers"] == ["vlm_merge"]
    assert layers["layers"] == ["engine", "recipe", "methods", "architecture", "io"]
    apps = contracts["applications"]
    assert apps["type"] == "layers" and apps["containers"] == ["vlm_merge"]
    assert apps["layers"] == ["cli", "world", "evolve", "engine"]
    ev = contracts["eval"]
    assert ev["type"] == "forbidden" and ev["source_modules"] == ["eval"]
    assert set(ev["forbidden_modules"]) == APPLICATIONS | {"chat_vector"} | (CORE - EVAL_MAY_IMPORT)
    cv = contracts["chat-vector"]
    assert cv["type"] == "forbidden" and cv["source_modules"] == ["chat_vector"]
    assert set(cv["forbidden_modules"]) == APPLICATIONS | {"eval"}


def test_lint_imports_keeps_every_contract():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    contracts = _config()["contracts"]
    for c in contracts:
        assert f"{c['name']} KEPT" in out, out
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out, out


# chat_vector's imports from vlm_merge: the engine as a package (its public API, never a submodule) and these
# public modules of the core; no name starting with "_" from anywhere.
CHAT_VECTOR_MAY_IMPORT = {
    "vlm_merge", "vlm_merge.engine", "vlm_merge.errors", "vlm_merge.io.card", "vlm_merge.io.checkpoint",
    "vlm_merge.io.outputs", "vlm_merge.io.safe_load", "vlm_merge.architecture.anatomy", "vlm_merge.architecture.vocab",
    "vlm_merge.recipe", "vlm_merge.recipe.presets",
}  # fmt: skip


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None for `import module`) for every import statement of a file, lazy ones included."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: relative import"
            out += [(node.module, alias.name) for alias in node.names]
    return out


def test_chat_vector_uses_only_the_public_api_of_the_engine():
    files = sorted((ROOT / "chat_vector").glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "api.py", "rules.py"}
    seen = set()
    for path in files:
        for module, name in _imports(path):
            if not module.startswith("vlm_merge"):
                continue
            where = f"chat_vector/{path.name}: {module}" + (f".{name}" if name else "")
            assert module in CHAT_VECTOR_MAY_IMPORT, f"{where}: not a public module chat_vector may use"
            assert not any(part.startswith("_") for part in module.split(".")), where
            assert name is None or not name.startswith("_"), f"{where}: private name"
            if module == "vlm_merge.engine":
                assert name in vlm_merge.engine.__all__, f"{where}: not in vlm_merge.engine.__all__"
            seen.add(module)
    assert "vlm_merge.engine" in seen and not any(m.startswith("vlm_merge.engine.") for m in seen)


def test_the_engine_api_is_documented_and_complete():
    for name in vlm_merge.engine.__all__:
        obj = getattr(vlm_merge.engine, name)
        doc = (obj.__doc__ or "").strip()
        # a dataclass without a docstring gets its signature as __doc__
        assert isinstance(obj, str) or (doc and not doc.startswith(f"{name}(")), f"vlm_merge.engine.{name} has no docstring"
    for name in ("merge", "validate", "open_sources", "plan_backbone", "write_backbone", "extract_task_vector",
                 "apply_task_vector", "ResidentMerger", "write_scaffold", "torch_threads", "describe_parts"):
        assert name in vlm_merge.engine.__all__, name


def test_applications_use_the_engine_through_its_public_api():
    """evolve, world and cli import `vlm_merge.engine` as a package (names in its `__all__`), never a submodule."""
    files = [p for d in ("evolve", "world", "cli") for p in sorted((ROOT / "vlm_merge" / d).glob("*.py"))]
    assert len(files) > 10
    for path in files:
        for module, name in _imports(path):
            where = f"{path.relative_to(ROOT)}: {module}" + (f".{name}" if name else "")
            assert not module.startswith("vlm_merge.engine."), f"{where}: an engine submodule"
            if module == "vlm_merge.engine":
                assert name in vlm_merge.engine.__all__, f"{where}: not in vlm_merge.engine.__all__"

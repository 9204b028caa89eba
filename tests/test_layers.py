"""The house stays legible: the layers import one way, the kernels import nothing of ours, and
every citation of the design resolves inside the repository."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("powerfast", "kernels", "bench") for p in (ROOT / folder).rglob("*.py")]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement of the file names (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_kernels_import_nothing_from_powerfast():
    offenders = {
        path.name: sorted(name for name in imported_modules(path) if name.split(".")[0] == "powerfast")
        for path in (ROOT / "kernels").glob("*.py")
    }
    assert {name: found for name, found in offenders.items() if found} == {}
    assert len(offenders) >= 5  # the five kernels and __init__ were read


def test_import_contract_holds():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "lint-imports (import-linter, in the test extra) must be installed where the tests run"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken, contract", [
    ("core/config.py", "from powerfast.samplers import power", "powerfast.core.config -> powerfast.samplers.power",
     "layers:"),
    ("evaluation/fidelity.py", "from bench.lab import study", "powerfast.evaluation.fidelity -> bench.lab.study",
     "the library apart from the lab:"),
])
def test_import_contract_catches_a_forbidden_import(module, line, broken, contract, tmp_path):
    # the checker is not a rubber stamp: a copy of the package with one import up a layer, or
    # one of the lab, breaks it
    copy = tmp_path / "powerfast"
    shutil.copytree(ROOT / "powerfast", copy, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    (copy / module).write_text((copy / module).read_text() + f"\n{line}  # noqa: E402,F401\n")
    (tmp_path / "bench" / "lab").mkdir(parents=True)
    for name in ("__init__.py", "lab/__init__.py", "lab/study.py"):
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([lint_imports, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode != 0
    assert broken in result.stdout
    report = " ".join(result.stdout.split())  # contract names wrap at the terminal's width
    assert re.search(re.escape(contract) + r"(?:(?!KEPT).)*? BROKEN", report), report[-2000:]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", SOURCES + DOCS + [ROOT / "pyproject.toml"], ids=lambda p: str(p.relative_to(ROOT)))
def test_design_citations_resolve(path):
    design = (ROOT / "powerfast" / "DESIGN.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", design, re.M)}
    text = path.read_text()
    cited = [int(n) for n in re.findall(r"DESIGN\.md`*,?\)?\s+sections?\s+(\d+)", text)]
    cited += [int(n) for n in re.findall(r"DESIGN\.md`*,?\)?\s+sections?\s+\d+\s+and\s+(\d+)", text)]
    assert not re.search(r"(?<![/\w])DESIGN\.md", text.replace("powerfast/DESIGN.md", "")), \
        f"{path.name} cites a DESIGN.md outside the repository; cite powerfast/DESIGN.md"
    assert set(cited) <= sections, f"{path.name} cites sections {sorted(set(cited) - sections)} that powerfast/DESIGN.md lacks"

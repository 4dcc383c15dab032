"""The code's shape, checked rather than reviewed: the layers (import-linter), lint and complexity (ruff),
and the size of functions and modules."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# grandfathered until their split lands; this list only shrinks
TOO_LONG: set[str] = set()


def _source_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in files.stdout.split() if (ROOT / name).is_file()]


def test_layers_hold():
    run = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": str(BIN)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in run.stdout


def test_ruff_passes():
    run = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]


def _too_long() -> set[str]:
    found = set()
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            found.add(rel)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    found.add(f"{rel}:{node.name}")
    return found


def test_functions_and_modules_stay_short():
    found = _too_long()
    assert found <= TOO_LONG, f"over {MAX_FUNCTION_LINES} lines a function or {MAX_MODULE_LINES} a module: " \
                              f"{sorted(found - TOO_LONG)}"
    if TOO_LONG - found:
        pytest.fail(f"no longer too long, remove from TOO_LONG: {sorted(TOO_LONG - found)}")

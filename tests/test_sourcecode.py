"""Linters as tests: ruff on the Python, and the C core's rules: it never
touches Python (the Cython layer is the only boundary) and compiles cleanly
with strict warnings."""
from __future__ import annotations

import glob
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "lbcore", "tests", "bench"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "ext" / "lb_*.[ch]"))),
                         ids=lambda p: pathlib.Path(p).name)
def test_c_core_has_no_python(path):
    """The C data plane never includes Python.h nor calls into Python."""
    src = pathlib.Path(path).read_text()
    assert "Python.h" not in src
    assert "Py_" not in src


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "ext" / "lb_*.c"))
                                       + glob.glob(str(ROOT / "tests" / "fuzz" / "*.c"))),
                         ids=lambda p: pathlib.Path(p).name)
def test_c_core_strict_warnings(path):
    """Each C file (and the fuzz harness) compiles cleanly with -Wall -Wextra -Werror."""
    cc = shutil.which("gcc") or shutil.which("cc")
    r = subprocess.run([cc, "-std=gnu11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter", "-I", str(ROOT / "ext"), path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module", ["_core", "_testing"])
def test_type_stub_covers_the_extension(module):
    """lbcore/<module>.pyi names every public name of the compiled module,
    and every public method of its classes."""
    import ast
    import importlib

    mod = importlib.import_module(f"lbcore.{module}")
    tree = ast.parse((ROOT / "lbcore" / f"{module}.pyi").read_text())
    top: set[str] = set()
    methods: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            methods[node.name] = {n.name for n in node.body
                                  if isinstance(n, ast.FunctionDef)} | {
                n.target.id for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
    public = {n for n in dir(mod) if not n.startswith("_")}
    assert public <= top, sorted(public - top)
    for cls, names in methods.items():
        have = {m for m in dir(getattr(mod, cls)) if not m.startswith("_")}
        assert have <= names, (cls, sorted(have - names))


# Comments and docs must point at something a reader of the repository can open: no issue
# numbers of a tracker, no notes kept outside the tree.
DANGLING = re.compile(r"(?i:issue ?#?[0-9]+|\bthe issue\b)|\bBASELINE\b|DESIGN\.md|STYLE\.md")
GENERATED = {"ext/_core.c", "ext/_testing.c"}
THIS_FILE = "tests/test_sourcecode.py"     # it spells the patterns out


def _tracked_text_files() -> list[pathlib.Path]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in r.stdout.split("\0") if f and f not in GENERATED | {THIS_FILE}
             and not f.startswith("bench/results/")]
    return [f for f in files if f.suffix in (".py", ".pyx", ".pxi", ".pxd", ".pyi", ".c", ".h",
                                             ".md", ".sh", ".toml", ".service", "")
            and f.is_file()]


def test_no_comment_points_outside_the_repository():
    bad = []
    for f in _tracked_text_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if DANGLING.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert bad == []

"""Linters as tests: ruff on the Python, and C rules from STYLE.md rule 1."""
from __future__ import annotations

import glob
import pathlib
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


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "ext" / "lb_*.c"))),
                         ids=lambda p: pathlib.Path(p).name)
def test_c_core_has_no_python(path):
    """The C data plane never includes Python.h nor calls into Python."""
    src = pathlib.Path(path).read_text()
    assert "Python.h" not in src
    assert "Py_" not in src


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "ext" / "lb_*.c"))),
                         ids=lambda p: pathlib.Path(p).name)
def test_c_core_strict_warnings(path):
    """Each C file compiles cleanly with the strict flags of STYLE.md."""
    cc = shutil.which("gcc") or shutil.which("cc")
    r = subprocess.run([cc, "-std=gnu11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter", "-I", str(ROOT / "ext"), path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

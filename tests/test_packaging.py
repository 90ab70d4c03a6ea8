"""The product runs from a plain `pip install .`: nothing in lbcore needs the test or bench tools.

Two checks that cannot drift apart from the code: every import in every module of the package
(function-level ones included) names the standard library, lbcore itself or a runtime
dependency declared in pyproject.toml; and the CLI's user-facing verbs - `--help`,
`check-config`, `lab up/status/down` and `demo` - run in a Python where the test tools cannot
be imported at all.
"""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from lbcore import lab

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lbcore"
TEST_TOOLS = ("pytest", "_pytest", "hypothesis", "scapy", "pytest_benchmark", "matplotlib")
# imported only inside `try: ... except ImportError` (the lab's servers use uvloop if present)
OPTIONAL = {"uvloop"}
# distribution name -> import name, where they differ
IMPORT_NAME = {"prometheus-client": "prometheus_client"}


def runtime_imports() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].strip().lower() for d in deps}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_runtime_dependencies_are_the_ones_declared():
    assert runtime_imports() == {"pyroute2", "prometheus_client", "rich"}


def test_the_package_imports_only_the_stdlib_itself_and_runtime_dependencies():
    allowed = set(sys.stdlib_module_names) | runtime_imports() | OPTIONAL | {"lbcore"}
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in sorted(PACKAGE.rglob("*.py")) for line, mod in imported_modules(p)
           if mod not in allowed]
    assert bad == []


def test_the_import_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import pytest\n    from scapy.all import IP\n")
    assert imported_modules(f) == [(2, "pytest"), (3, "scapy")]


# A Python in which the test tools do not exist: importing one raises ImportError, as in a
# virtualenv made by a plain `pip install .`.
WITHOUT_TEST_TOOLS = f"""
import sys
for name in {TEST_TOOLS!r}:
    sys.modules[name] = None
from lbcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def lbcore_without_test_tools(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TEST_TOOLS, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=lab.child_env())


def test_blocked_test_tools_really_cannot_be_imported():
    r = subprocess.run([sys.executable, "-c", WITHOUT_TEST_TOOLS.replace(
        "from lbcore.cli import main", "import pytest")], capture_output=True, text=True)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_every_module_imports_without_test_tools():
    code = WITHOUT_TEST_TOOLS.replace("from lbcore.cli import main\nsys.exit(main(sys.argv[1:]))",
                                      """
import importlib, pkgutil, lbcore
names = [m.name for m in pkgutil.walk_packages(lbcore.__path__, "lbcore.")
         if not m.name.endswith("__main__")]
for n in names:
    importlib.import_module(n)
print(len(names))
""")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) >= 20     # every module was found and imported


def test_help_and_check_config_without_test_tools():
    r = lbcore_without_test_tools("--help")
    assert r.returncode == 0 and "check-config" in r.stdout, r.stderr
    r = lbcore_without_test_tools("check-config", str(ROOT / "examples" / "lbcore.toml"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.netns
@pytest.mark.slow
def test_lab_and_demo_without_test_tools():
    with lab.turn():
        lab.down(out=lambda _: None)
        try:
            r = lbcore_without_test_tools("lab", "up", "--backends", "1", "--no-balancer")
            assert r.returncode == 0, r.stdout + r.stderr
            r = lbcore_without_test_tools("lab", "status")
            assert r.returncode == 0 and "lbc-be1" in r.stdout, r.stdout + r.stderr
            r = lbcore_without_test_tools("lab", "down")
            assert r.returncode == 0 and "removed netns lbc-gw" in r.stdout, r.stderr
        finally:
            lab.down(out=lambda _: None)
    # the demo takes its own turn with the lab
    r = lbcore_without_test_tools("demo", "--backends", "2", "--requests", "20", "--udp", "20",
                                  timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what the demo removed is its own business (test_lab checks `down`); that it reported real
    # traffic through the balancer and took the lab down is what a user sees
    assert "lab down" in r.stdout and "demo OK" in r.stdout


@pytest.mark.slow
def test_the_wheel_holds_the_product_only(tmp_path):
    """What `pip install .` installs: the product extension, not the test extension (even when
    `make build` has left one in the tree), no tests, and no test tool among its requirements."""
    import shutil
    import zipfile
    # the work tree as a user has it after `make build` (in-place extensions included), without
    # the venv and the build directories
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", "build", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(src.glob("lbcore/_testing.*.so")), "the copy should hold an in-place build"
    [wheel] = out.glob("lbcore-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("lbcore/_core.") and n.endswith(".so") for n in names)
    assert not [n for n in names if "_testing" in n or n.startswith("tests/")]
    assert "lbcore/lab/demo.py" in names and "lbcore/control/status.py" in names
    required = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(re.split(r"[<>=!~ ]", q, maxsplit=1)[0] for q in required) == [
        "prometheus-client", "pyroute2", "rich"]

"""Benchmarks live in bench_*.py (pytest-benchmark). pytest only collects
test_*.py by default, so collect these files here: `pytest bench`."""
from __future__ import annotations

import pathlib

import pytest


def pytest_collect_file(file_path: pathlib.Path, parent: pytest.Collector):
    # a file named on the command line is collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

"""Namespaces and the lab for tests: run code inside a namespace, send traffic, build the lab.

Plain functions (usable from tests, benchmarks and the demo):

* :func:`ns_call` runs a Python callable in a namespace, in this process (a thread that did
  setns); :func:`ns_run` runs a command there; :func:`ns_python` runs ``python -c CODE`` there and
  returns the JSON its last output line holds.
* :func:`traffic` runs one function of :mod:`lbcore._testbase.traffic` in a subprocess inside a
  namespace and returns its JSON result: one subprocess for many requests.
  :func:`http_requests`, :func:`http_get`, :func:`udp_requests`, :func:`bulk_sink` and
  :func:`bulk_source` are shorthands for it.
* :func:`running_lab` is the lab for the duration of a ``with``: it takes a machine-wide lock (the
  lab's names are fixed, so test sessions that build it must take turns), removes any lab left
  over, builds the wanted one, and always removes it at the end.

Fixtures (tests/conftest.py loads them):

* ``nsname``: a fresh namespace ``lbt-<pid>-<n>`` (function scope), removed afterwards.
* ``netns_factory``: a function making more such namespaces, all removed afterwards.
* ``lab``: the lab (module scope). The default is ``LabSpec()`` (3 backends, IPv4, with the
  balancer); parametrise it indirectly with LabSpec keywords::

      @pytest.mark.parametrize("lab", [{"backends": 2, "ipv6": True}], indirect=True)
      def test_x(lab): ...
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .. import lab as _lab
from .. import netconf

T = TypeVar("T")

TEST_NS_PREFIX = "lbt-"
LAB_TEST_LOCK = Path("/run/lbcore-lab.test.lock")
_counter = itertools.count(1)


# --------------------------------------------------------------------------- running things

def ns_call(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` inside ``netns``, in this process (see netconf.run_in_netns)."""
    return netconf.run_in_netns(netns, fn, *args, **kwargs)


def _env() -> dict[str, str]:
    return _lab._child_env()


def ns_run(netns: str | None, argv: Sequence[str], *, timeout: float = 60.0,
           input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``netns``; text output captured; killed after ``timeout`` seconds.

    ``check`` raises CalledProcessError (with the output) on a non-zero exit.
    """
    proc = netconf.popen_in_netns(netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env())
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
    res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(argv), out, err)
    return res


def ns_python(netns: str | None, code: str, *, timeout: float = 60.0,
              input: str | None = None) -> Any:
    """Run ``python -c code`` inside ``netns``; returns the JSON of its last stdout line."""
    res = ns_run(netns, [sys.executable, "-c", code], timeout=timeout, input=input)
    lines = res.stdout.strip().splitlines()
    if not lines:
        raise ValueError(f"no output from the code; stderr: {res.stderr}")
    return json.loads(lines[-1])


def traffic(netns: str | None, fn: str, *, timeout: float = 120.0, **kwargs: Any) -> Any:
    """Run ``lbcore._testbase.traffic.<fn>(**kwargs)`` in a subprocess inside ``netns``."""
    res = ns_run(netns, [sys.executable, "-m", "lbcore._testbase.traffic"], timeout=timeout,
                 input=json.dumps({"fn": fn, "kwargs": kwargs}))
    return json.loads(res.stdout)


def http_requests(netns: str | None, addr: str, n: int = 1, **kwargs: Any) -> dict[str, Any]:
    """``n`` HTTP GETs from ``netns`` (new connection each, or ``keepalive=True``); see
    traffic.http_requests for the result."""
    return traffic(netns, "http_requests", addr=addr, n=n, **kwargs)


def http_get(netns: str | None, addr: str, **kwargs: Any) -> str:
    """One HTTP GET on a fresh connection; the body, stripped. AssertionError if it failed."""
    r = http_requests(netns, addr, 1, **kwargs)
    assert r["ok"] == 1, r["error_samples"]
    return r["results"][0][1]


def udp_requests(netns: str | None, addr: str, n: int = 1, **kwargs: Any) -> dict[str, Any]:
    """``n`` UDP request/responses from ``netns`` (a new socket each unless new_socket=False)."""
    return traffic(netns, "udp_requests", addr=addr, n=n, **kwargs)


def bulk_sink(netns: str | None, addr: str, nbytes: int, **kwargs: Any) -> dict[str, Any]:
    """Send ``nbytes`` to the sink from ``netns``; see traffic.bulk_sink."""
    return traffic(netns, "bulk_sink", addr=addr, nbytes=nbytes, **kwargs)


def bulk_source(netns: str | None, addr: str, nbytes: int, **kwargs: Any) -> dict[str, Any]:
    """Fetch ``nbytes`` from the source into ``netns``; see traffic.bulk_source."""
    return traffic(netns, "bulk_source", addr=addr, nbytes=nbytes, **kwargs)


# --------------------------------------------------------------------------- namespaces

def new_ns_name() -> str:
    """A namespace name no other test (of this or another process) uses: lbt-<pid>-<n>."""
    return f"{TEST_NS_PREFIX}{os.getpid()}-{next(_counter)}"


@pytest.fixture
def nsname() -> Iterator[str]:
    """A fresh network namespace (loopback up), removed after the test whatever happens."""
    name = new_ns_name()
    netconf.netns_create(name)
    try:
        yield name
    finally:
        netconf.netns_remove(name)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Call it to get more fresh namespaces; all are removed after the test."""
    made: list[str] = []

    def make() -> str:
        name = new_ns_name()
        netconf.netns_create(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            netconf.netns_remove(name)


# --------------------------------------------------------------------------- the lab

@contextlib.contextmanager
def lab_lock(timeout: float = 600.0) -> Iterator[None]:
    """Machine-wide turn-taking for tests that build the lab (its names are fixed)."""
    fd = os.open(LAB_TEST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another test session holds {LAB_TEST_LOCK}") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_lab(spec: _lab.LabSpec | None = None, **kwargs: Any) -> Iterator[_lab.LabState]:
    """The lab (``spec`` or ``LabSpec(**kwargs)``) for the duration of the ``with``."""
    spec = spec or _lab.LabSpec(**kwargs)
    with lab_lock():
        _lab.down(out=lambda _: None)
        try:
            yield _lab.up(spec, out=lambda _: None)
        finally:
            _lab.down(out=lambda _: None)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[_lab.LabState]:
    """The lab, built once per module and always torn down (see the module docstring)."""
    params = getattr(request, "param", None) or {}
    with running_lab(**params) as state:
        yield state

"""Run things inside the lab's namespaces: code, commands, and traffic.

Used by the demo, the tests and the benchmarks:

* :func:`ns_call` runs a Python callable in a namespace, in this process (a thread that did
  setns); :func:`ns_run` runs a command there; :func:`ns_python` runs ``python -c CODE`` there and
  returns the JSON its last output line holds.
* :func:`traffic` runs one function of :mod:`lbcore.lab.traffic` in a subprocess inside a
  namespace and returns its JSON result: one subprocess for many requests.
  :func:`http_requests`, :func:`http_get`, :func:`udp_requests`, :func:`bulk_sink` and
  :func:`bulk_source` are shorthands for it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import netconf
from . import child_env

T = TypeVar("T")


# --------------------------------------------------------------------------- running things

def ns_call(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` inside ``netns``, in this process (see netconf.run_in_netns)."""
    return netconf.run_in_netns(netns, fn, *args, **kwargs)


def ns_run(netns: str | None, argv: Sequence[str], *, timeout: float = 60.0,
           input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``netns``; text output captured; killed after ``timeout`` seconds.

    ``check`` raises CalledProcessError (with the output) on a non-zero exit.
    """
    proc = netconf.popen_in_netns(netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=child_env())
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
    """Run ``lbcore.lab.traffic.<fn>(**kwargs)`` in a subprocess inside ``netns``."""
    res = ns_run(netns, [sys.executable, "-m", "lbcore.lab.traffic"], timeout=timeout,
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

"""Shared fixtures. Integration tests (marker `netns`) need root and network
namespaces; without them they are skipped with the reason, never passed.

* ``nsname``: a fresh namespace ``lbt-<pid>-<n>`` (function scope), removed afterwards.
* ``netns_factory``: a function making more such namespaces, all removed afterwards.
* ``lab``: the lab (module scope), through :func:`lbcore.lab.lease`. The default is
  ``LabSpec()`` (3 backends, IPv4, with the balancer); parametrise it indirectly with LabSpec
  keywords::

      @pytest.mark.parametrize("lab", [{"backends": 2, "ipv6": True}], indirect=True)
      def test_x(lab): ...
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf

TEST_NS_PREFIX = "lbt-"
_counter = itertools.count(1)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN)"
    if not os.path.exists("/var/run/netns") and not os.access("/var/run", os.W_OK):
        return "cannot create network namespaces here"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _netns_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[lab_mod.LabState]:
    """The lab, built once per module and always torn down (see the module docstring)."""
    params = getattr(request, "param", None) or {}
    with lab_mod.lease(**params) as state:
        yield state

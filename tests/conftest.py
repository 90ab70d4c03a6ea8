"""Shared fixtures. Integration tests (marker `netns`) need root and network
namespaces; without them they are skipped with the reason, never passed."""
from __future__ import annotations

import os

import pytest

# The shipped fixtures (nsname, netns_factory, lab): see lbcore/_testbase/netns.py.
pytest_plugins = ["lbcore._testbase.netns"]


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

"""The control side of a running balancer: the Unix-socket API (:mod:`.server`), its CLI
client (:mod:`.client`), the Prometheus endpoint (:mod:`.metrics`), and the one read model they
share (:mod:`.status`).

The server and the metrics endpoint run inside `lbcore run`; the client runs in the `lbcore`
CLI. They share only the JSON protocol and the read model's data.
"""
from __future__ import annotations

from .client import ControlError, request, socket_path

__all__ = ["ControlError", "request", "socket_path"]

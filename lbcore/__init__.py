"""lbcore: a packet-level layer-4 load balancer (Maglev hashing, NAT) with a C core."""
from ._version import __version__

__all__ = ["__version__"]

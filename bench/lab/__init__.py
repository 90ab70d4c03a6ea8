"""The lab benchmark (`make bench-lab`): lbcore beside kernel forwarding, nftables and HAProxy.

Every system is measured in the same run, on the same namespace lab (:mod:`lbcore.lab`), with the
same load generators, pinned the same way. :mod:`bench.lab.run` drives it; the pure parts
(parsing, statistics, the report) live in their own modules so that tests/test_benchlab.py can
check them without root. bench/README.md explains how to read and compare the results.
"""

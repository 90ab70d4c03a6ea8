"""Helpers shipped for lbcore's own tests and benchmarks (the uvloop/asyncpg ``_testbase``
idea): namespace fixtures and the lab (:mod:`.netns`), traffic clients (:mod:`.traffic`).

Importing this package imports neither pytest nor pyroute2; :mod:`.netns` needs both.
"""

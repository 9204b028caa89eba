"""Benchmarks, the GPU machine's scripts (device_check.sh) and, in :mod:`bench.lab`, the finished studies.

Not part of the installed package: run from the repository root, as modules
(``python -m bench.e2e --help``), or collected by ``pytest bench --benchmark-disable``. The
library never imports it (``pyproject.toml [tool.importlinter]``).
"""

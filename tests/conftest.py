"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter: TRITON_INTERPRET=1
must be set before any kernel is defined, so it is set here, before powerfast is imported.

Random test inputs: a test that draws its inputs at random takes its seed from
:func:`fresh_seed` (``from conftest import fresh_seed``): a fresh seed every run, or the one
``POWERFAST_TEST_SEED`` names, to replay a failure. Every seed a failing test used (its own
and its module's) is printed with the failure, with the line that replays it.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_ENV = "POWERFAST_TEST_SEED"
_current: list = [None]  # the test running now (None between tests: at import, a module's seed)
_item_seeds: dict[str, list[int]] = {}  # test node id -> seeds it drew
_module_seeds: dict[str, list[int]] = {}  # module file -> seeds drawn when it was imported


def fresh_seed(bits: int = 32) -> int:
    """A seed for random test inputs: ``POWERFAST_TEST_SEED`` when set (a replay), else a
    fresh draw from the operating system's randomness in [0, 2**bits). It is recorded
    against the running test (or, drawn at import, against its module) and printed if that
    test fails."""
    value = os.environ.get(SEED_ENV)
    seed = int(value) if value else int.from_bytes(os.urandom(8), "little") % 2**bits
    item = _current[0]
    if item is not None:
        _item_seeds.setdefault(item.nodeid, []).append(seed)
    else:
        caller = sys._getframe(1).f_globals.get("__file__")
        _module_seeds.setdefault(os.path.abspath(caller) if caller else "?", []).append(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item
    try:
        yield
    finally:
        _current[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    module_file = getattr(getattr(item, "module", None), "__file__", None)
    drawn = [(seed, "drawn when its module was imported") for seed in
             (_module_seeds.get(os.path.abspath(module_file), []) if module_file else [])]
    drawn += [(seed, "drawn by this test") for seed in _item_seeds.get(item.nodeid, [])]
    if drawn:
        lines = [f"random inputs from seed {seed} ({where}): replay with {SEED_ENV}={seed}" for seed, where in drawn]
        lines.append(f"({SEED_ENV} fixes every seed drawn through fresh_seed to that value)")
        report.sections.append(("random seeds", "\n".join(lines)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs the same kernel under TRITON_INTERPRET=1")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)

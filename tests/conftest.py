"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter: TRITON_INTERPRET=1
must be set before any kernel is defined, so it is set here, before powerfast is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs the same kernel under TRITON_INTERPRET=1")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)

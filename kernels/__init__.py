"""Triton kernels of powerfast, installed as ``powerfast.kernels``.

One module per op: the ``@triton.jit`` kernel and a thin launcher. Dispatch between the
kernels and the torch references lives in ``powerfast.ops``; import from there.
"""

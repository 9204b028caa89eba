"""Triton kernels of powerfast, installed as ``powerfast.kernels``.

One module per op: the ``@triton.jit`` kernel and a thin launcher. Dispatch between the
kernels and the torch references lives in ``powerfast.core.ops``; import from there.

This folder sits at the top of the repository, so whenever the repository root is on
``sys.path`` (``python -m pytest`` or ``python -m powerfast.cli`` run there, a Python shell
opened in the checkout, a worker process started there) a plain ``import kernels`` would
find it. That name belongs to Hugging Face's ``kernels`` package, which transformers
imports. So when this file is executed under the name ``kernels`` it hands the name back:
it imports whatever ``kernels`` the rest of ``sys.path`` provides and leaves that module in
``sys.modules`` (the import system returns the module found there after this file runs).
Under its own name, ``powerfast.kernels``, nothing below the guard runs.
"""

if __name__ == "kernels":  # imported as a top-level package by accident: hand the name back
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def _is_root(entry: str) -> bool:
        try:
            return os.path.samefile(entry or os.curdir, _root)
        except OSError:
            return False

    _saved_path = list(sys.path)
    del sys.modules["kernels"]
    sys.path[:] = [entry for entry in _saved_path if not _is_root(entry)]
    try:
        _theirs = importlib.import_module("kernels")
    except ImportError as error:
        if getattr(error, "name", None) != "kernels":
            raise  # the other package exists but failed to import: its error is the one to see
        raise ModuleNotFoundError(
            f"No module named 'kernels': the folder {os.path.dirname(os.path.abspath(__file__))} is "
            "powerfast's Triton kernels, importable only as 'powerfast.kernels'",
            name="kernels",
        ) from None
    finally:
        sys.path[:] = _saved_path
    sys.modules["kernels"] = _theirs

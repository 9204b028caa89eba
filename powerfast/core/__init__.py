"""The bottom layer: settings, the estimators' math and the ops that dispatch to the kernels.

Pure functions of tensors and validated settings: no model, no cache, no state. Everything
above imports from here; nothing here imports from above (``powerfast/DESIGN.md`` section 3).
"""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.core.estimators``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

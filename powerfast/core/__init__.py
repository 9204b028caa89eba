"""The bottom layer: the settings, declared once and validated (``powerfast.core.config``), and
the one rule for prompts and budgets (``powerfast.core.prompts``).

No model, no cache, no state. Everything above imports from here; nothing here imports from
above (``powerfast/DESIGN.md`` section 3).
"""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.core.config``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

"""Serving: the engine (requests, scheduling, admission, streaming, abort), the
OpenAI-compatible HTTP server and its metrics (``powerfast/DESIGN.md`` section 8)."""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.serving.engine``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

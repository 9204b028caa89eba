"""The runtime: the paged KV cache, the attention function registered with transformers,
the model runner (any Hugging Face causal LM, or a table model) and model loading.

It runs forwards, forks and frees sequences; it knows nothing of alpha or of any sampler
(``powerfast/DESIGN.md`` section 3).
"""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.runtime.cache``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

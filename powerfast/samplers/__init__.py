"""The samplers: step programs over the runtime, the one decode loop, every method (power
sampling, the baselines, Power-SMC, MCMC) and the factory that builds one by name.

A sampler yields the forwards it needs and receives logits; it never touches KV tensors
(``powerfast/DESIGN.md`` sections 3 and 8).
"""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.samplers.power``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

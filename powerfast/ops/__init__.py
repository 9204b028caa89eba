"""The device ops: one module per op, each the op's torch reference, its dispatch and its
``torch.library`` registration; the Triton kernel of the same name is in ``powerfast.kernels``.

- :mod:`~powerfast.ops.sampling`: sample / score one token per row (``powerfast::sample_tokens``);
- :mod:`~powerfast.ops.topk`: the top-k tokens of each row and their log-probs;
- :mod:`~powerfast.ops.jackknife`: the power-distribution estimate, plain and jackknife;
- :mod:`~powerfast.ops.kv_cache`: KV writes into slots (``powerfast::write_kv``), page copies;
- :mod:`~powerfast.ops.paged_attention`: the paged attention backends (``powerfast::paged_attention``);
- :mod:`~powerfast.ops.device`: what they share (the dispatch rule, argument checks, uploads).

Ops know tensors only: no model, no cache, no sampler (``powerfast/DESIGN.md`` section 3).
"""


def __getattr__(name: str):
    """Submodules on first use (``powerfast.ops.sampling``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

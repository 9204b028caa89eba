"""The decision rules every engine shares, with no runtime: what a sampler decides from numbers
already on the host (powerfast/DESIGN.md sections 2 and 6).

- ``seeds``: SeedStream, the reproducible stream of seeds, uniforms and draws of a request;
- ``lookahead``: the Top-K distinct candidates, the skip and rounds rules, the rollouts' ESS,
  the estimate and the choice of one decision;
- ``resampling``: ESS, systematic and chopthin resampling (Power-SMC, resampled rollouts);
- ``mcmc``: the Metropolis-Hastings acceptance of a block proposal;
- ``sir``: importance weights and the draw by weight.

Our samplers (``powerfast.samplers``, on the paged runtime) and the vLLM engine
(``powerfast.engines.vllm``) both call these functions, so the two engines make the same
decision from the same numbers. This layer imports ``ops`` and ``core`` only.
"""


def __getattr__(name: str):
    """Submodules on first use: no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

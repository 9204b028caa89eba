"""powerfast: fast sampling from the power distribution p(x)^alpha of a language model.

Everything imports on first use, so ``import powerfast`` (and the ``powerfast`` command's
argument checks) cost no torch import: the names below (``PowerSampler``,
``power_distribution``, ...) and the submodules (``powerfast.exact.power_conditional(...)``)
load their module when first touched.
"""

__version__ = "0.1.0"

_LAZY = {
    "MCMCConfig": "powerfast.config",
    "PowerConfig": "powerfast.config",
    "SamplingConfig": "powerfast.config",
    "SMCConfig": "powerfast.config",
    "PowerEstimate": "powerfast.estimators",
    "leave_one_out_log_scaling_factors": "powerfast.estimators",
    "log_scaling_factors": "powerfast.estimators",
    "power_distribution": "powerfast.estimators",
    "power_estimates": "powerfast.estimators",
    "HFLanguageModel": "powerfast.lm",
    "LanguageModel": "powerfast.lm",
    "TableLM": "powerfast.lm",
    "PowerSampler": "powerfast.sampler",
    "ModelRunner": "powerfast.runner",
    "AncestralSampler": "powerfast.baselines",
    "MCMCSampler": "powerfast.baselines",
    "SMCSampler": "powerfast.smc",
    "make_sampler": "powerfast.baselines",
    "GenerationResult": "powerfast.generation",
    "GenerationStats": "powerfast.generation",
    "BlockRecord": "powerfast.generation",
    "LMRunner": "powerfast.lm_runner",
    "CacheConfig": "powerfast.cache",
    "OutOfBlocksError": "powerfast.cache",
    "KVCacheTooSmallError": "powerfast.cache",
}

# submodules reachable as attributes (``powerfast.exact.power_conditional``), imported on first use
_SUBMODULES = (
    "attention", "baselines", "cache", "cli", "config", "estimators", "evaluation", "exact", "generation",
    "fidelity", "kernels", "lm", "lm_runner", "models", "ops", "resampling", "runner", "sampler", "smc", "toy",
)

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"powerfast.{name}")  # the import binds it in this namespace
    raise AttributeError(f"module 'powerfast' has no attribute {name!r}")

"""powerfast: fast sampling from the power distribution p(x)^alpha of a language model.

Everything imports on first use, so ``import powerfast`` (and the ``powerfast`` command's
argument checks) cost no torch import: the names below (``PowerSampler``,
``power_distribution``, ...) and the submodules (``powerfast.evaluation.exact.power_conditional(...)``)
load their module when first touched.
"""

__version__ = "0.1.0"

_LAZY = {
    "MCMCConfig": "powerfast.core.config",
    "PowerConfig": "powerfast.core.config",
    "SamplingConfig": "powerfast.core.config",
    "SMCConfig": "powerfast.core.config",
    "SIRConfig": "powerfast.core.config",
    "PowerEstimate": "powerfast.ops.jackknife",
    "leave_one_out_log_scaling_factors": "powerfast.ops.jackknife",
    "log_scaling_factors": "powerfast.ops.jackknife",
    "power_distribution": "powerfast.ops.jackknife",
    "power_estimates": "powerfast.ops.jackknife",
    "HFLanguageModel": "powerfast.runtime.lm",
    "LanguageModel": "powerfast.runtime.lm",
    "TableLM": "powerfast.runtime.lm",
    "PowerSampler": "powerfast.samplers.power",
    "ModelRunner": "powerfast.runtime.runner",
    "AncestralSampler": "powerfast.samplers.ancestral",
    "MCMCSampler": "powerfast.samplers.mcmc",
    "SMCSampler": "powerfast.samplers.smc",
    "SIRSampler": "powerfast.samplers.sir",
    "make_sampler": "powerfast.samplers.factory",
    "GenerationResult": "powerfast.samplers.results",
    "GenerationStats": "powerfast.samplers.results",
    "BlockRecord": "powerfast.samplers.results",
    "LMRunner": "powerfast.runtime.lm_runner",
    "Runner": "powerfast.runtime.protocol",
    "CacheConfig": "powerfast.runtime.cache",
    "OutOfPagesError": "powerfast.runtime.cache",
    "KVCacheTooSmallError": "powerfast.runtime.cache",
    "Engine": "powerfast.serving.engine",
    "AsyncEngine": "powerfast.serving.async_engine",
    "SamplingParams": "powerfast.serving.params",
}

# the layers, reachable as attributes (``powerfast.evaluation.exact.power_conditional``), imported on first use
_SUBMODULES = ("cli", "core", "evaluation", "kernels", "ops", "runtime", "samplers", "serving")

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

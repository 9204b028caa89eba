"""powerfast: fast sampling from the power distribution p(x)^alpha of a language model.

The statistical core (estimators, the exact oracle's model protocol, configs) imports
eagerly; the runtime pieces that pull in transformers (``PowerSampler``, ``ModelRunner``,
the baselines) import on first use.
"""

from powerfast.config import MCMCConfig, PowerConfig, SamplingConfig, SMCConfig
from powerfast.estimators import (
    PowerEstimate,
    leave_one_out_log_scaling_factors,
    log_scaling_factors,
    power_distribution,
    power_estimates,
)
from powerfast.lm import HFLanguageModel, LanguageModel, TableLM

__version__ = "0.1.0"

_LAZY = {
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
}

__all__ = [
    "HFLanguageModel",
    "LanguageModel",
    "MCMCConfig",
    "PowerConfig",
    "PowerEstimate",
    "SamplingConfig",
    "SMCConfig",
    "TableLM",
    "leave_one_out_log_scaling_factors",
    "log_scaling_factors",
    "power_distribution",
    "power_estimates",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'powerfast' has no attribute {name!r}")

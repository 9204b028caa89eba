"""powerfast: fast sampling from the power distribution p(x)^alpha of a language model."""

from powerfast.estimators import (
    PowerEstimate,
    leave_one_out_log_scaling_factors,
    log_scaling_factors,
    power_distribution,
    power_estimates,
)
from powerfast.lm import HFLanguageModel, LanguageModel, TableLM

__version__ = "0.1.0"

__all__ = [
    "HFLanguageModel",
    "LanguageModel",
    "PowerEstimate",
    "TableLM",
    "leave_one_out_log_scaling_factors",
    "log_scaling_factors",
    "power_distribution",
    "power_estimates",
]

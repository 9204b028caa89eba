"""Every method by name: :func:`make_sampler` builds the sampler of one of ``METHODS``."""

from __future__ import annotations

from powerfast.core.config import METHODS, method_config
from powerfast.samplers.ancestral import AncestralSampler
from powerfast.samplers.mcmc import MCMCSampler
from powerfast.samplers.power import PowerSampler
from powerfast.samplers.smc import SMCSampler

__all__ = ["METHODS", "make_sampler"]


def make_sampler(method: str, model, tokenizer=None, *, alpha: float = 4.0, seed: int | None = None,
                 temperature: float = 1.0, num_samples: int = 8, power_config=None, mcmc_config=None,
                 smc_config=None, **runner_kwargs):
    """A sampler by method name (one of METHODS) with the usual settings.

    alpha:       the exponent of "power", "mcmc" and "smc", and T = 1 / alpha of "low-temp"
    temperature: of "plain" and "best-of-n"; num_samples: N of "best-of-n"
    power_config / mcmc_config / smc_config: full settings for "power" / "mcmc" / "smc"
                 (then ``alpha`` is not used)
    Raises ValueError for an unknown method or bad settings (see :func:`powerfast.core.config.method_config`).
    """
    config = method_config(method, alpha=alpha, temperature=temperature, num_samples=num_samples,
                           power_config=power_config, mcmc_config=mcmc_config, smc_config=smc_config)
    if method == "power":
        return PowerSampler(model, tokenizer, config, seed, **runner_kwargs)
    if method == "mcmc":
        return MCMCSampler(model, tokenizer, config, seed, **runner_kwargs)
    if method == "smc":
        return SMCSampler(model, tokenizer, config, seed, **runner_kwargs)
    return AncestralSampler(model, tokenizer, config, seed, method, **runner_kwargs)

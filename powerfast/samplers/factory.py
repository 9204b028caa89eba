"""Every method by name: :func:`make_sampler` builds the sampler of one of ``METHODS``."""

from __future__ import annotations

from powerfast.core.config import METHODS, SettingError, method_config
from powerfast.samplers.ancestral import AncestralSampler
from powerfast.samplers.mcmc import MCMCSampler
from powerfast.samplers.power import PowerSampler
from powerfast.samplers.sir import SIRSampler
from powerfast.samplers.smc import SMCSampler

__all__ = ["METHODS", "make_sampler"]

_SAMPLERS = {"power": PowerSampler, "mcmc": MCMCSampler, "smc": SMCSampler, "sir": SIRSampler}


def make_sampler(method: str, model, tokenizer=None, *, seed: int | None = None, config=None, preset: str = "paper",
                 runner_options: dict | None = None, **settings):
    """A sampler by method name (one of METHODS).

    config:  the method's full settings (a PowerConfig, MCMCConfig, SMCConfig, SamplingConfig
             or SIRConfig, as :func:`powerfast.core.config.method_config` makes them); or
    settings: by name (``alpha=2.0, num_rollouts=16``; the names of
             :data:`powerfast.core.config.SETTINGS`), the rest taking ``preset``'s defaults
    runner_options: keywords of the :class:`~powerfast.runtime.runner.ModelRunner` made when
             ``model`` is not a runner yet (``max_memory``, ``num_pages``, ``page_size``: the
             KV page size, not the sampler's block)
    Raises SettingError (a ValueError naming the field) for an unknown method or bad settings.
    """
    if method not in METHODS:
        raise SettingError("method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if config is None:
        config = method_config(method, preset=preset, **settings)
    elif settings:
        raise TypeError(f"give the settings either as config or by name, not both (got config and {sorted(settings)})")
    if method in _SAMPLERS:
        return _SAMPLERS[method](model, tokenizer, config, seed, **(runner_options or {}))
    return AncestralSampler(model, tokenizer, config, seed, method, **(runner_options or {}))

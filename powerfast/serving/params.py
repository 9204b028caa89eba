"""What a request asks for: :class:`SamplingParams`, the method and its settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from powerfast.core.config import METHODS, MCMCConfig, PowerConfig, SMCConfig, method_config
from powerfast.serving.errors import InvalidRequestError

__all__ = ["SamplingParams"]


# ------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for: the method and its settings, validated on construction
    (:class:`InvalidRequestError` naming the field). Settings of other methods are ignored.

    method:      one of :data:`powerfast.core.config.METHODS`
    max_tokens:  the token budget (> 0)
    temperature: of "plain" and "best-of-n" (0: greedy)
    seed:        the request's own random stream (None: a fresh one)
    stop:        stop strings: the text is cut before the first one found
    ignore_eos:  generate the whole budget whatever the model samples
    alpha:       the exponent of "power", "mcmc" and "smc"; T = 1 / alpha of "low-temp"
    block_size, num_candidates, top_k, num_rollouts, horizon, jackknife, rollout_proposal,
    reuse_rollouts:  "power" (B, L, K, M, H; see :class:`powerfast.core.config.PowerConfig`);
                 block_size is also "mcmc"'s B
    mcmc_steps:  "mcmc"'s N_MCMC
    num_particles, ess_threshold, resample_every, ramp_tokens, resampler: "smc"
    num_samples: "best-of-n"'s N

    The defaults of power, MCMC and SMC are scaled for serving (small blocks, few
    branches), not the papers' settings.
    """

    method: str = "plain"
    max_tokens: int = 256
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    alpha: float = 4.0
    block_size: int = 16
    num_candidates: int = 8
    top_k: int = 4
    num_rollouts: int = 4
    horizon: int = 16
    jackknife: bool = True
    rollout_proposal: str = "base"
    reuse_rollouts: bool = False
    mcmc_steps: int = 2
    num_particles: int = 8
    ess_threshold: float = 0.5
    resample_every: int = 16
    ramp_tokens: int = 0
    resampler: str = "systematic"
    num_samples: int = 4

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InvalidRequestError("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"max_tokens must be an int > 0, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        try:
            self.config()
        except (ValueError, TypeError) as error:
            raise InvalidRequestError(_field_named_in(str(error)), str(error)) from None

    def config(self):
        """The method's validated config (PowerConfig, MCMCConfig, SMCConfig or SamplingConfig)."""
        power = mcmc = smc = None
        if self.method == "power":
            power = PowerConfig(self.alpha, self.block_size, self.num_candidates, self.top_k, self.num_rollouts,
                                self.horizon, self.jackknife, self.rollout_proposal, self.reuse_rollouts)
        elif self.method == "mcmc":
            mcmc = MCMCConfig(self.alpha, self.block_size, self.mcmc_steps)
        elif self.method == "smc":
            smc = SMCConfig(self.alpha, self.num_particles, self.ess_threshold, self.resample_every, self.ramp_tokens,
                            self.resampler)
        return method_config(self.method, alpha=self.alpha, temperature=self.temperature,
                             num_samples=self.num_samples, power_config=power, mcmc_config=mcmc, smc_config=smc)

    def sampler(self, runner, tokenizer=None):
        """The sampler (``make_sampler``) that does what these params ask, with its own seed
        stream: what the engine runs for a request, and ``sampler.generate([prompt])`` the
        same computation outside the engine."""
        from powerfast.samplers.factory import make_sampler

        config = self.config()
        slot = {"power": "power_config", "mcmc": "mcmc_config", "smc": "smc_config"}.get(self.method)
        settings = {slot: config} if slot else {}
        return make_sampler(self.method, runner, tokenizer, alpha=self.alpha, seed=self.seed,
                            temperature=self.temperature, num_samples=self.num_samples, **settings)

    def branches(self) -> tuple[int, str]:
        """(most sequences the request decodes at once, the field that sets it)."""
        if self.method == "power":
            first = self.top_k if self.block_size == 1 else self.num_candidates
            return max(first, self.top_k * self.num_rollouts), "num_rollouts"
        if self.method == "smc":
            return self.num_particles, "num_particles"
        if self.method == "best-of-n":
            return self.num_samples, "num_samples"
        return 1, "method"


SamplingParams.FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))

_CONFIG_WORDS = {"eta": "resampler"}


def _field_named_in(message: str) -> str:
    """The SamplingParams field a config error message is about (its first word naming one)."""
    for word in message.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if word in SamplingParams.FIELDS:
            return word
        if word in _CONFIG_WORDS:
            return _CONFIG_WORDS[word]
    return "method"

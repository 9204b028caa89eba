"""Settings of the samplers, validated on construction (DESIGN.md section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["METHODS", "PowerConfig", "MCMCConfig", "SamplingConfig", "method_config"]

METHODS = ("power", "mcmc", "plain", "low-temp", "greedy", "best-of-n")
"""The sampling methods by name (:func:`powerfast.baselines.make_sampler`)."""


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _alpha(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {value!r}")


@dataclass(slots=True, frozen=True)
class PowerConfig:
    """Power sampling by Monte Carlo lookahead (Algorithm 2 of the paper; Algorithm 1 at
    ``block_size = 1``).

    alpha:          exponent of the target p(x)^alpha (> 0; > 1 sharpens)
    block_size:     B, tokens per decision; 1 is the token-level algorithm
    num_candidates: L, candidate blocks sampled from p per decision (block level only)
    top_k:          K, distinct candidates kept (by base log-likelihood) and scored
    num_rollouts:   M, rollouts per candidate
    horizon:        H, rollout length in tokens (0: no lookahead, choose by p^alpha alone)
    jackknife:      bias-corrected estimate (needs M >= 2) instead of the plain one
    """

    alpha: float = 4.0
    block_size: int = 192
    num_candidates: int = 32
    top_k: int = 8
    num_rollouts: int = 8
    horizon: int = 192
    jackknife: bool = True

    def __post_init__(self) -> None:
        _alpha(self.alpha)
        _positive_int("block_size", self.block_size)
        _positive_int("num_candidates", self.num_candidates)
        _positive_int("top_k", self.top_k)
        _positive_int("num_rollouts", self.num_rollouts)
        _positive_int("horizon", self.horizon, minimum=0)
        if self.jackknife and self.num_rollouts < 2:
            raise ValueError(f"the jackknife needs num_rollouts >= 2, got {self.num_rollouts} (or set jackknife=False)")
        if self.block_size > 1 and self.top_k > self.num_candidates:
            raise ValueError(
                f"top_k ({self.top_k}) cannot exceed num_candidates ({self.num_candidates}) at block level"
            )

    @property
    def token_level(self) -> bool:
        """True at ``block_size = 1``: Algorithm 1, candidates are the Top-K next tokens."""
        return self.block_size == 1


@dataclass(slots=True, frozen=True)
class MCMCConfig:
    """Metropolis-Hastings power sampling of Karan & Du.

    alpha:      exponent of the target; the proposal is p at temperature 1 / alpha
    block_size: B, tokens appended before each round of MH steps
    mcmc_steps: N_MCMC, MH steps after each block
    """

    alpha: float = 4.0
    block_size: int = 192
    mcmc_steps: int = 10

    def __post_init__(self) -> None:
        _alpha(self.alpha)
        _positive_int("block_size", self.block_size)
        _positive_int("mcmc_steps", self.mcmc_steps, minimum=0)


@dataclass(slots=True, frozen=True)
class SamplingConfig:
    """Ancestral sampling baselines.

    temperature: > 0, or 0 for greedy decoding
    num_samples: N for best-of-N (keep the sample of highest base log-likelihood); 1 otherwise
    """

    temperature: float = 1.0
    num_samples: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _positive_int("num_samples", self.num_samples)


def method_config(method: str, *, alpha: float = 4.0, temperature: float = 1.0, num_samples: int = 8,
                  power_config: PowerConfig | None = None, mcmc_config: MCMCConfig | None = None):
    """The validated settings of a method by name (one of METHODS), without loading anything.

    alpha:       the exponent of "power" and "mcmc", and T = 1 / alpha of "low-temp"
    temperature: of "plain" and "best-of-n"; num_samples: N of "best-of-n"
    power_config / mcmc_config: full settings for "power" / "mcmc" (then ``alpha`` is not used)
    Returns a PowerConfig, MCMCConfig or SamplingConfig; ValueError for bad settings or an
    unknown method.
    """
    if method == "power":
        return power_config if power_config is not None else PowerConfig(alpha=alpha)
    if method == "mcmc":
        return mcmc_config if mcmc_config is not None else MCMCConfig(alpha=alpha)
    if method == "plain":
        return SamplingConfig(temperature)
    if method == "low-temp":
        _alpha(alpha)
        return SamplingConfig(1.0 / alpha)
    if method == "greedy":
        return SamplingConfig(0.0)
    if method == "best-of-n":
        return SamplingConfig(temperature, num_samples)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

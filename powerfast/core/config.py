"""Settings of the samplers, validated on construction (powerfast/DESIGN.md section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["METHODS", "PowerConfig", "MCMCConfig", "SMCConfig", "SamplingConfig", "ROLLOUT_PROPOSALS", "RESAMPLERS",
           "method_config"]

METHODS = ("power", "mcmc", "smc", "plain", "low-temp", "greedy", "best-of-n")
"""The sampling methods by name (:func:`powerfast.samplers.factory.make_sampler`)."""
ROLLOUT_PROPOSALS = ("base", "tempered")
RESAMPLERS = ("systematic", "chopthin")


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
    rollout_proposal: "base" (the paper's: rollouts from p, weight p(s)^(alpha-1)) or
                    "tempered" (rollouts from p at temperature 1/alpha, weight prod_t
                    sum_x p(x|h_t)^alpha; powerfast/DESIGN.md section 6)
    reuse_rollouts: the chosen candidate's rollouts (H >= B) become the next decision's
                    candidates, their KV already computed: the candidate phase is skipped
    """

    alpha: float = 4.0
    block_size: int = 192
    num_candidates: int = 32
    top_k: int = 8
    num_rollouts: int = 8
    horizon: int = 192
    jackknife: bool = True
    rollout_proposal: str = "base"
    reuse_rollouts: bool = False

    def __post_init__(self) -> None:
        _alpha(self.alpha)
        if self.rollout_proposal not in ROLLOUT_PROPOSALS:
            raise ValueError(f"rollout_proposal must be one of {ROLLOUT_PROPOSALS}, got {self.rollout_proposal!r}")
        if not isinstance(self.reuse_rollouts, bool):
            raise ValueError(f"reuse_rollouts must be a bool, got {self.reuse_rollouts!r}")
        if self.reuse_rollouts and self.horizon < self.block_size:
            raise ValueError(
                f"reuse_rollouts needs horizon >= block_size (the rollouts become the next candidates), "
                f"got horizon {self.horizon} < block_size {self.block_size}"
            )
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
class SMCConfig:
    """Power-SMC (Azizi et al.): N particles, tempered proposal, resampling (powerfast/DESIGN.md section 6).

    alpha:          exponent of the target; each step samples p at temperature 1 / alpha_t
    num_particles:  N, particles per prompt (forked from the prompt, no KV copied)
    ess_threshold:  kappa in (0, 1]: resample when ESS < kappa * N
    resample_every: R, tokens between ESS checks (a host sync each)
    ramp_tokens:    alpha_t rises linearly from 1 to alpha over this many tokens (0: no ramp)
    resampler:      "systematic" (weights reset) or "chopthin" (Gandy & Lau 2016: weight
                    ratio bounded by eta, unequal weights carried forward)
    eta:            the chopthin bound on largest / smallest weight, >= 4 (default 3 + sqrt 8)
    """

    alpha: float = 4.0
    num_particles: int = 32
    ess_threshold: float = 0.5
    resample_every: int = 16
    ramp_tokens: int = 0
    resampler: str = "systematic"
    eta: float = 3.0 + math.sqrt(8.0)

    def __post_init__(self) -> None:
        _alpha(self.alpha)
        _positive_int("num_particles", self.num_particles)
        if isinstance(self.ess_threshold, bool) or not isinstance(self.ess_threshold, (int, float)) \
                or not 0 < self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be a number in (0, 1], got {self.ess_threshold!r}")
        _positive_int("resample_every", self.resample_every)
        _positive_int("ramp_tokens", self.ramp_tokens, minimum=0)
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {self.resampler!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) \
                or self.eta < 4:
            raise ValueError(f"eta must be a finite number >= 4 (chopthin needs it), got {self.eta!r}")

    def alpha_at(self, step: int) -> float:
        """alpha_t of the token at 0-based position ``step``: the linear ramp from 1, then alpha."""
        if self.ramp_tokens == 0 or step >= self.ramp_tokens:
            return float(self.alpha)
        return 1.0 + (self.alpha - 1.0) * (step + 1) / self.ramp_tokens


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
                  power_config: PowerConfig | None = None, mcmc_config: MCMCConfig | None = None,
                  smc_config: SMCConfig | None = None):
    """The validated settings of a method by name (one of METHODS), without loading anything.

    alpha:       the exponent of "power", "mcmc" and "smc", and T = 1 / alpha of "low-temp"
    temperature: of "plain" and "best-of-n"; num_samples: N of "best-of-n"
    power_config / mcmc_config / smc_config: full settings for "power" / "mcmc" / "smc"
                 (then ``alpha`` is not used)
    Returns a PowerConfig, MCMCConfig, SMCConfig or SamplingConfig; ValueError for bad
    settings or an unknown method.
    """
    if method == "power":
        return power_config if power_config is not None else PowerConfig(alpha=alpha)
    if method == "mcmc":
        return mcmc_config if mcmc_config is not None else MCMCConfig(alpha=alpha)
    if method == "smc":
        return smc_config if smc_config is not None else SMCConfig(alpha=alpha)
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

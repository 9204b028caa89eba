"""The power-distribution estimate of one decision, plain and jackknife, in log space
(powerfast/DESIGN.md section 2). Notation, for K candidates and M rollouts per candidate:

    w[k, r]          = (alpha - 1) * l[k, r]          l: rollout scores (below)
    log zeta[k]      = logsumexp_r w[k, r] - log M
    log u[k]         = alpha * log p(k | h) + log zeta[k]
    p_hat            = softmax_k(log u)
    log zeta^(-s)[k] = logsumexp_{r != s} w[k, r] - log(M - 1)
    p_hat^(-s)       = softmax_k(alpha * log p(k | h) + log zeta^(-s)[k])
    p_jk             = M * p_hat - (M - 1) / M * sum_s p_hat^(-s)

``p_jk`` is clamped at 0 and renormalised; if every entry clamps to 0 the plain
estimate ``p_hat`` is returned instead.

A rollout's **score** ``l[k, r]`` is its log weight divided by (alpha - 1): for a rollout
drawn from p (the paper's estimator) its base log-likelihood; for a rollout drawn from the
tempered proposal, ``sum_t log c(h_t) / (alpha - 1)`` (section 6); for a resampled group, its
log zeta_hat / (alpha - 1).

One contract, two implementations: the Triton kernel of ``powerfast.kernels.jackknife`` (one
program per decision; CUDA, or CPU under ``TRITON_INTERPRET=1``) and the torch reference
:func:`torch_power_estimates` (the CPU path, and the float64 math the toy's bias study runs
on a million rows), chosen per call by :func:`powerfast.ops.device.use_triton`.

The public functions (:func:`power_estimates`, :func:`power_distribution`, the scaling
factors and :func:`choice_standard_error`) validate their input, values included, and so
synchronise with the device to look for NaNs. The samplers' hot path calls
:func:`_power_estimates_nosync`: the same estimate, checked only as far as shapes, dtypes and
Python values allow, which never waits for the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from powerfast.ops.device import use_triton

__all__ = [
    "PowerEstimate",
    "choice_standard_error",
    "leave_one_out_log_scaling_factors",
    "log_scaling_factors",
    "power_distribution",
    "power_estimates",
    "torch_power_estimates",
]


class PowerEstimate(NamedTuple):
    """Everything one estimate produces. Shapes for candidates ``(..., K)``."""

    probs: torch.Tensor
    """(..., K) the returned distribution: jackknife (clamped, renormalised) or plain."""
    p_hat: torch.Tensor
    """(..., K) the plain Monte Carlo estimate softmax(log u)."""
    log_zeta: torch.Tensor
    """(..., K) log of the estimated scaling factors."""


# ---------------------------------------------------------------------------- checks


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    return value


def _check_float_tensor(name: str, tensor: torch.Tensor, min_dim: int) -> None:
    _check_structure(name, tensor, min_dim)
    if torch.isnan(tensor).any():
        where = torch.nonzero(torch.isnan(tensor))[0].tolist()
        raise ValueError(f"{name} contains NaN (first at index {where})")


def _check_structure(name: str, tensor: torch.Tensor, min_dim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(tensor.shape)}"
        )


def _check_power_args(candidate_logprobs: torch.Tensor, rollout_scores: torch.Tensor, alpha, jackknife: bool) -> float:
    """The checks of :func:`power_distribution` that need no look at the values (so no
    host sync): alpha, types, shapes, M >= 2 with the jackknife, one device. Returns alpha."""
    alpha = _check_alpha(alpha)
    _check_structure("candidate_logprobs", candidate_logprobs, 1)
    _check_structure("rollout_scores", rollout_scores, 2)
    if rollout_scores.shape[-1] < 1 or rollout_scores.shape[-2] < 1:
        raise ValueError(
            "rollout_scores must have at least one candidate and one rollout, "
            f"got shape {tuple(rollout_scores.shape)}"
        )
    if tuple(candidate_logprobs.shape) != tuple(rollout_scores.shape[:-1]):
        raise ValueError(
            "candidate_logprobs must have shape rollout_scores.shape[:-1]: got "
            f"{tuple(candidate_logprobs.shape)} and {tuple(rollout_scores.shape)}"
        )
    if jackknife and rollout_scores.shape[-1] < 2:
        raise ValueError(
            f"the jackknife needs at least 2 rollouts per candidate, got M = {rollout_scores.shape[-1]}"
        )
    if candidate_logprobs.device != rollout_scores.device:
        raise ValueError(
            f"candidate_logprobs is on {candidate_logprobs.device}, rollout_scores on {rollout_scores.device}"
        )
    return alpha


def _check_rollouts(rollout_scores: torch.Tensor) -> None:
    _check_float_tensor("rollout_scores", rollout_scores, 2)
    if rollout_scores.shape[-1] < 1 or rollout_scores.shape[-2] < 1:
        raise ValueError(
            "rollout_scores must have at least one candidate and one rollout, "
            f"got shape {tuple(rollout_scores.shape)}"
        )
    if torch.isposinf(rollout_scores).any():
        raise ValueError("rollout_scores contains +inf: a log weight cannot be +inf")


# ------------------------------------------------------------------- torch reference


def _rollout_log_weights(rollout_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = (alpha - 1) * l, with w = -inf where l = -inf (an impossible rollout weighs 0
    for every alpha, including alpha = 1 where the plain product would be NaN)."""
    weights = rollout_scores * (alpha - 1.0)
    return torch.where(torch.isneginf(rollout_scores), rollout_scores, weights)


def _unchecked_log_scaling_factors(rollout_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    num_rollouts = rollout_scores.shape[-1]
    weights = _rollout_log_weights(rollout_scores, alpha)
    return torch.logsumexp(weights, dim=-1) - math.log(num_rollouts)


def _unchecked_loo_log_scaling_factors(rollout_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Leave-one-out log-sum-exp by merging a prefix and a suffix scan: entry s combines
    logsumexp(w[:s]) and logsumexp(w[s+1:]), so no term is ever subtracted and a
    dominating rollout cannot cancel the others away."""
    num_rollouts = rollout_scores.shape[-1]
    weights = _rollout_log_weights(rollout_scores, alpha)
    neg_inf = torch.full_like(weights[..., :1], -math.inf)
    prefix = torch.logcumsumexp(weights, dim=-1)  # prefix[s] = lse(w[..s])
    suffix = torch.logcumsumexp(weights.flip(-1), dim=-1).flip(-1)  # suffix[s] = lse(w[s..])
    before = torch.cat([neg_inf, prefix[..., :-1]], dim=-1)  # lse(w[:s])
    after = torch.cat([suffix[..., 1:], neg_inf], dim=-1)  # lse(w[s+1:])
    return torch.logaddexp(before, after) - math.log(max(num_rollouts - 1, 1))


def _safe_softmax(log_weights: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax along ``dim`` and a mask of the slices that had no finite entry (those
    slices come back as zeros instead of NaN)."""
    row_max = log_weights.amax(dim=dim, keepdim=True)
    empty = torch.isneginf(row_max)
    shifted = log_weights - torch.where(empty, torch.zeros_like(row_max), row_max)
    unnormalised = torch.exp(shifted)
    total = unnormalised.sum(dim=dim, keepdim=True)
    probs = unnormalised / torch.where(empty, torch.ones_like(total), total)
    return probs, empty


def torch_power_estimates(
    candidate_logprobs: torch.Tensor,
    rollout_scores: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
) -> PowerEstimate:
    """The torch reference of the estimate (no validation, no host sync): the CPU path of
    :func:`power_estimates` whatever the environment.

    candidate_logprobs: (..., K)    base log-probability of each candidate
    rollout_scores:     (..., K, M) score of each rollout (its log weight / (alpha - 1))
    returns PowerEstimate(probs (..., K), p_hat (..., K), log_zeta (..., K))

    A row whose log u is -inf everywhere comes back as all zeros (the checked API
    refuses such rows). A leave-one-out replicate in which every candidate loses its
    last finite rollout carries no information; it is replaced by p_hat.
    """
    num_rollouts = rollout_scores.shape[-1]
    log_zeta = _unchecked_log_scaling_factors(rollout_scores, alpha)
    scaled_logprobs = candidate_logprobs * alpha
    p_hat, _ = _safe_softmax(scaled_logprobs + log_zeta, dim=-1)
    if not jackknife:
        return PowerEstimate(p_hat, p_hat, log_zeta)

    loo_log_zeta = _unchecked_loo_log_scaling_factors(rollout_scores, alpha)  # (..., K, M)
    loo_probs, loo_empty = _safe_softmax(scaled_logprobs.unsqueeze(-1) + loo_log_zeta, dim=-2)
    loo_probs = torch.where(loo_empty, p_hat.unsqueeze(-1), loo_probs)
    loo_sum = loo_probs.sum(dim=-1)
    p_jk = (num_rollouts * p_hat - (num_rollouts - 1) / num_rollouts * loo_sum).clamp_min(0.0)
    total = p_jk.sum(dim=-1, keepdim=True)
    all_clamped = total <= 0
    probs = torch.where(all_clamped, p_hat, p_jk / torch.where(all_clamped, torch.ones_like(total), total))
    return PowerEstimate(probs, p_hat, log_zeta)


# ------------------------------------------------------------------------ the estimate


def _power_estimates_nosync(
    candidate_logprobs: torch.Tensor,
    rollout_scores: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
) -> PowerEstimate:
    """:func:`power_estimates` without the checks that read values: the samplers' hot path,
    one kernel launch and no host sync.

    Checks alpha, types, shapes, M >= 2 (jackknife) and the device; NaN, +inf and rows in
    which every candidate is impossible are not looked for (such rows come back as zeros).
    Returns PowerEstimate(probs, p_hat, log_zeta), each (..., K), in the promoted dtype of
    the inputs (the kernel computes in float64 when an input is float64, float32 otherwise).
    """
    alpha = _check_power_args(candidate_logprobs, rollout_scores, alpha, jackknife)
    if use_triton(rollout_scores):
        from powerfast.kernels.jackknife import power_estimates as _triton_power_estimates

        return PowerEstimate(*_triton_power_estimates(candidate_logprobs, rollout_scores, alpha, jackknife))
    return torch_power_estimates(candidate_logprobs, rollout_scores, alpha, jackknife)


def power_estimates(
    candidate_logprobs: torch.Tensor,
    rollout_scores: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
) -> PowerEstimate:
    """The estimated power distribution over the candidates of each row, with the plain
    estimate and the log scaling factors it came from.

    candidate_logprobs: (..., K)    base log p(candidate | prefix); -inf allowed (that
                                    candidate gets probability 0)
    rollout_scores:     (..., K, M) score of each candidate's rollouts: its base
                                    log-likelihood for a rollout drawn from p (in general
                                    its log weight / (alpha - 1), module docstring)
    alpha:              the exponent, > 0
    jackknife:          the bias-corrected estimator (needs M >= 2), else the plain one
    returns PowerEstimate(probs (..., K): finite, >= 0, rows sum to 1; p_hat (..., K);
    log_zeta (..., K)), in the promoted dtype of the inputs.

    Raises ValueError (naming the offending value) for a bad alpha, mismatched shapes,
    NaN input, M < 2 with jackknife, or a row in which every candidate is impossible.
    Looking at the values synchronises with the device.
    """
    alpha = _check_power_args(candidate_logprobs, rollout_scores, alpha, jackknife)
    _check_float_tensor("candidate_logprobs", candidate_logprobs, 1)
    _check_rollouts(rollout_scores)
    if torch.isposinf(candidate_logprobs).any():
        raise ValueError("candidate_logprobs contains +inf")
    dead_rows = torch.isneginf(candidate_logprobs).all(dim=-1)
    if dead_rows.any():
        where = torch.nonzero(dead_rows)[0].tolist()
        raise ValueError(f"every candidate log-prob is -inf in row {where}: nothing to choose from")
    estimate = _power_estimates_nosync(candidate_logprobs, rollout_scores, alpha, jackknife)
    dead = torch.isneginf((candidate_logprobs * alpha + estimate.log_zeta).amax(dim=-1))
    if dead.any():
        where = torch.nonzero(dead)[0].tolist()
        raise ValueError(
            f"row {where} has no candidate with both a finite log-prob and a finite rollout: "
            "every candidate has probability 0"
        )
    return estimate


def power_distribution(
    candidate_logprobs: torch.Tensor,
    rollout_scores: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
) -> torch.Tensor:
    """The probabilities of :func:`power_estimates` (same arguments, same checks): (..., K),
    finite, >= 0, rows summing to 1."""
    return power_estimates(candidate_logprobs, rollout_scores, alpha, jackknife).probs


# ------------------------------------------------------------------ scaling factors


def log_scaling_factors(rollout_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Monte Carlo estimate of log zeta for each candidate.

    rollout_scores: (..., K, M) score of each rollout (float32 / float64)
    returns:        (..., K)    logsumexp_m((alpha - 1) * l) - log M
    """
    alpha = _check_alpha(alpha)
    _check_rollouts(rollout_scores)
    return _unchecked_log_scaling_factors(rollout_scores, alpha)


def leave_one_out_log_scaling_factors(rollout_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Leave-one-out estimates of log zeta.

    rollout_scores: (..., K, M)
    returns:        (..., K, M) entry [..., k, s] is log zeta of candidate k computed
                    from the M - 1 rollouts other than s. Exact when one rollout
                    dominates by any margin (computed from the other terms, never by
                    subtracting from a total). Needs M >= 2.
    """
    alpha = _check_alpha(alpha)
    _check_rollouts(rollout_scores)
    if rollout_scores.shape[-1] < 2:
        raise ValueError(
            f"leave-one-out needs at least 2 rollouts per candidate, got M = {rollout_scores.shape[-1]}"
        )
    return _unchecked_loo_log_scaling_factors(rollout_scores, alpha)


def choice_standard_error(candidate_logprobs: torch.Tensor, rollout_scores: torch.Tensor,
                          alpha: float) -> torch.Tensor:
    """Jackknife standard error of the plain estimate p_hat of the choice distribution.

    candidate_logprobs: (..., K); rollout_scores: (..., K, M), M >= 2, the M columns
    independent (rollouts; for resampled rollouts, independent groups)
    returns (..., K): sqrt((M - 1) / M * sum_s (p_(-s) - mean_s p_(-s))^2), p_(-s) the
    estimate without column s (every candidate's s-th rollout left out at once, as the
    jackknife estimate does). A candidate without rollouts (all columns equal) adds no
    spread of its own. Computed in float64.
    """
    alpha = _check_power_args(candidate_logprobs, rollout_scores, alpha, True)
    num = rollout_scores.shape[-1]
    logprobs, scores = candidate_logprobs.double(), rollout_scores.double()
    p_hat, _ = _safe_softmax(logprobs * alpha + _unchecked_log_scaling_factors(scores, alpha), dim=-1)
    loo_log_zeta = _unchecked_loo_log_scaling_factors(scores, alpha)
    loo_probs, loo_empty = _safe_softmax((logprobs * alpha).unsqueeze(-1) + loo_log_zeta, dim=-2)
    loo_probs = torch.where(loo_empty, p_hat.unsqueeze(-1), loo_probs)
    spread = loo_probs - loo_probs.mean(dim=-1, keepdim=True)
    return ((num - 1) / num * spread.square().sum(dim=-1)).sqrt()

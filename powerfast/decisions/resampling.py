"""Particle weights and resampling for Power-SMC and resampled rollouts (powerfast/DESIGN.md
section 6), in float64 on the host.

Every function takes unnormalised log-weights ``(n,)`` (any real numbers; -inf is a
particle of weight 0) and works on their normalised weights ``w = softmax(log_weights)``.

- :func:`effective_sample_size`: ``1 / sum w_i^2``;
- :func:`systematic_resample`: ``num`` offspring with one uniform; particle i gets
  ``floor`` or ``ceil`` of ``num * w_i`` offspring (so ``E[count_i] = num * w_i``), and
  every offspring has the same weight afterwards;
- :func:`chopthin_resample`: the chopthin resampler of Gandy & Lau (2016). With a
  threshold ``a`` chosen so that the expected number of offspring is exactly ``num``:
  a particle lighter than ``a`` is *thinned* (kept with probability ``w / a``, then of
  weight ``a``); one of weight in ``[a, eta a / 2]`` is kept as it is; a heavier one is
  *chopped* into ``k`` offspring of weight ``w / k``, ``k`` the floor or the ceiling of
  ``x = 2 w / (eta a)`` with mean ``x``. Afterwards every weight lies in ``[a, eta a]``
  (this needs ``eta >= 4``), each particle's expected offspring weight is its weight
  (unbiased), and there are exactly ``num`` offspring (the fractional parts of the
  expected counts are drawn systematically).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normalised_weights",
    "effective_sample_size",
    "systematic_counts",
    "systematic_resample",
    "chopthin_expected_counts",
    "chopthin_resample",
    "resample",
]


def _check_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_weights, torch.Tensor) or log_weights.dim() != 1 or log_weights.numel() == 0:
        raise ValueError(f"log_weights must be a non-empty (n,) tensor, got {log_weights!r}")
    log_weights = log_weights.detach().double().cpu()
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError(f"log_weights hold NaN or +inf: {log_weights.tolist()[:8]}")
    if not torch.isfinite(log_weights).any():
        raise ValueError("every particle has weight 0 (all log_weights are -inf)")
    return log_weights


def normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """(n,) float64 weights summing to 1."""
    return torch.softmax(_check_log_weights(log_weights), dim=0)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """``1 / sum w_i^2`` of the normalised weights: n for equal weights, 1 for one heavy particle."""
    log_weights = _check_log_weights(log_weights)
    return float(torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)))


def _check_num_uniform(num: int, uniform: float) -> None:
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    if not (isinstance(uniform, float) and 0.0 <= uniform < 1.0):
        raise ValueError(f"uniform must be a float in [0, 1), got {uniform!r}")


def _systematic(expected: torch.Tensor, num: int, uniform: float) -> torch.Tensor:
    """Counts with one uniform: positions uniform + j (j < num) against the cumulative
    ``expected`` (rescaled to sum to ``num``); count_i is floor or ceil of expected_i."""
    cumulative = torch.cumsum(expected, 0)
    cumulative = cumulative * (num / float(cumulative[-1]))
    positions = uniform + torch.arange(num, dtype=torch.float64)
    edges = torch.searchsorted(positions, cumulative, right=False)  # positions below each edge
    edges[-1] = num
    return torch.diff(edges, prepend=torch.zeros(1, dtype=edges.dtype))


def _ancestors(counts: torch.Tensor) -> torch.Tensor:
    """(sum counts,) int64: index i repeated counts[i] times (a Python loop: N is small, and
    ``torch.repeat_interleave`` with a counts tensor was measured 100x slower on a CPU)."""
    return torch.tensor([i for i, count in enumerate(counts.tolist()) for _ in range(count)], dtype=torch.long)


def systematic_counts(log_weights: torch.Tensor, num: int, uniform: float) -> torch.Tensor:
    """(n,) int64 offspring counts summing to ``num``; ``E[count_i] = num * w_i``."""
    _check_num_uniform(num, uniform)
    return _systematic(normalised_weights(log_weights), num, uniform)


def systematic_resample(log_weights: torch.Tensor, num: int, uniform: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Systematic resampling.

    returns (ancestors (num,) int64 sorted, new log-weights (num,) float64 all ``-log num``:
    equal weights on the scale of the normalised input weights, so the total is kept).
    """
    counts = systematic_counts(log_weights, num, uniform)
    return _ancestors(counts), torch.full((num,), -math.log(num), dtype=torch.float64)


def _chopthin_counts(weights: torch.Tensor, threshold: float, eta: float) -> torch.Tensor:
    chop_at = eta * threshold / 2
    thinned = weights / threshold
    chopped = weights / chop_at
    return torch.where(weights < threshold, thinned, torch.where(weights <= chop_at, torch.ones_like(weights), chopped))


def chopthin_expected_counts(log_weights: torch.Tensor, num: int, eta: float) -> tuple[torch.Tensor, float]:
    """The expected offspring counts ``h_i(a)`` of chopthin and the threshold ``a``.

    ``h_i(a)`` is ``w_i / a`` below ``a``, 1 in ``[a, eta a / 2]``, ``2 w_i / (eta a)``
    above: continuous and non-increasing in ``a``; ``a`` solves ``sum_i h_i(a) = num``
    (bisection in log space to float64 precision). returns ((n,) float64, a).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 4):
        raise ValueError(f"eta must be a finite number >= 4, got {eta!r}")
    weights = normalised_weights(log_weights)
    # h(a) >= 2 / (eta a) and h(a) = 1 / a once a >= max w: the root lies in [lo, hi]
    lo = math.log(2.0 / (eta * num))
    hi = math.log(max(float(weights.max()), 1.0 / num))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(_chopthin_counts(weights, math.exp(mid), eta).sum()) > num:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    threshold = math.exp(0.5 * (lo + hi))
    return _chopthin_counts(weights, threshold, eta), threshold


def chopthin_resample(log_weights: torch.Tensor, num: int, eta: float, uniform: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Chopthin resampling (Gandy & Lau 2016; see the module docstring).

    returns (ancestors (num,) int64 sorted, new log-weights (num,) float64 on the scale of
    the normalised input weights: the offspring weights of particle i sum to w_i in
    expectation (unbiased); their largest / smallest ratio is at most ``eta``).
    """
    _check_num_uniform(num, uniform)
    expected, threshold = chopthin_expected_counts(log_weights, num, eta)
    weights = normalised_weights(log_weights)
    floors = torch.floor(expected)
    fractions = expected - floors
    extra_total = num - int(floors.sum())
    counts = floors.long()
    if extra_total > 0:
        counts = counts + _systematic(fractions, extra_total, uniform)
    elif extra_total < 0:  # rounding at the bisection's end; cannot exceed a few ulps
        raise ArithmeticError(f"chopthin: floors of the expected counts sum to {int(floors.sum())} > {num}")
    # offspring weight: a for a thinned survivor, w / k otherwise (k = 1 for a kept one)
    offspring_weight = torch.where(weights < threshold, torch.full_like(weights, threshold),
                                   weights / counts.clamp_min(1).double())
    ancestors = _ancestors(counts)
    return ancestors, torch.log(offspring_weight[ancestors])


def resample(log_weights: torch.Tensor, num: int, resampler: str, uniform: float,
             eta: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` offspring by ``resampler`` (``"systematic"`` or ``"chopthin"``, the
    ``SMCConfig.resampler`` values): (ancestors (num,) int64, their log-weights (num,) float64)."""
    if resampler == "chopthin":
        return chopthin_resample(log_weights, num, eta, uniform)
    if resampler == "systematic":
        return systematic_resample(log_weights, num, uniform)
    raise ValueError(f"resampler must be 'systematic' or 'chopthin', got {resampler!r}")

"""Sampling-importance-resampling's weights and draw (powerfast/DESIGN.md section 6)."""

from __future__ import annotations

import torch

from powerfast.decisions import resampling
from powerfast.decisions.seeds import SeedStream

__all__ = ["importance_log_weights", "draw_by_weight"]


def importance_log_weights(base_logliks: torch.Tensor, proposal_logliks: torch.Tensor, alpha: float) -> torch.Tensor:
    """(n,) float64 host log-weights ``alpha * log p(x_i) - log q(x_i)`` of n completions.

    base_logliks:     (n,) log p(x_i) under the model at T = 1 (any float dtype, any device)
    proposal_logliks: (n,) log q(x_i) under the law the completions were drawn from
    alpha:            the exponent of the target p^alpha
    """
    log_p = torch.as_tensor(base_logliks).detach().double().cpu()
    log_q = torch.as_tensor(proposal_logliks).detach().double().cpu()
    return float(alpha) * log_p - log_q


def draw_by_weight(log_weights: torch.Tensor, seeds: SeedStream) -> int:
    """Index i drawn with probability ``softmax(log_weights)[i]`` (self-normalised in float64
    on the host), with the seed stream's generator. ValueError (from
    :func:`~powerfast.decisions.resampling.normalised_weights`) for NaN, +inf or no finite weight."""
    return seeds.categorical(resampling.normalised_weights(log_weights))

"""The Metropolis-Hastings acceptance of Karan & Du's block proposal (powerfast/DESIGN.md section 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["log_acceptance", "accept"]


def log_acceptance(alpha: float, new_logp: Sequence[float], new_logq: Sequence[float],
                   old_logp: Sequence[float], old_logq: Sequence[float]) -> float:
    """``log A = alpha (log p(x') - log p(x)) + log q(x) - log q(x')`` over the resampled suffix.

    new_logp / new_logq: the proposal's per-token log-probs under p (T = 1) and under q (the
    proposal law, p at T = 1/alpha); old_logp / old_logq: the same for the chain's suffix it
    would replace. Python float sums, left to right."""
    return alpha * (sum(new_logp) - sum(old_logp)) + sum(old_logq) - sum(new_logq)


def accept(log_accept: float, uniform: float) -> bool:
    """Metropolis-Hastings: accept when ``log u < log A`` (u in [0, 1); u = 0 counts as 1e-300)."""
    return math.log(max(uniform, 1e-300)) < log_accept

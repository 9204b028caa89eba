"""One lookahead decision from host numbers (powerfast/DESIGN.md sections 2 and 6): which
candidates enter, whether they get rollouts (skip, rounds), the rollouts' ESS, and the choice.

Both engines call these: the paged runtime's PowerSampler and the vLLM engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from powerfast.ops.jackknife import choice_standard_error, torch_power_estimates

__all__ = ["distinct_top_k", "skip_rule", "round_rule", "rollout_ess", "estimate"]


def distinct_top_k(blocks: Sequence[Sequence[int]], logliks: Sequence[float], k: int) -> list[int]:
    """Indices of the Top-K distinct blocks by base log-likelihood, highest first.

    blocks:  the L sampled candidate blocks (token ids, EOS included where a block ended)
    logliks: their base log-likelihoods log p(block | h)
    A block drawn twice counts once, by its first index; ties keep the order drawn."""
    if len(blocks) != len(logliks):
        raise ValueError(f"{len(blocks)} blocks but {len(logliks)} log-likelihoods")
    seen: dict[tuple[int, ...], int] = {}
    for j, block in enumerate(blocks):
        seen.setdefault(tuple(block), j)
    return sorted(seen.values(), key=lambda j: -float(logliks[j]))[:k]


def skip_rule(candidate_logprobs: torch.Tensor, ends_with_eos: Sequence[bool], alpha: float,
              skip_share: float) -> str | None:
    """skip_share: "one candidate" when the candidates merged into one (the choice is
    forced), "decided" when the top one holds >= skip_share of the candidates' p^alpha
    mass; None: the decision gets its rollouts.

    Never "decided" while the top candidate has a future and another one has ended: an
    ended candidate's zeta is exactly 1 (nothing left to sample) and every other zeta is
    at most 1 (E[p^(alpha-1)] with p <= 1) and can be far below it, so nothing bounds the
    ratio the skip assumes (on the embedded model such a pair differed by e^47). An ended
    top candidate is safe: its zeta is the largest."""
    if len(ends_with_eos) == 1:
        return "one candidate"
    shares = torch.softmax(alpha * candidate_logprobs.detach().double().cpu(), -1)
    top = int(shares.argmax())
    if float(shares[top]) < skip_share:
        return None
    if not ends_with_eos[top] and any(ends_with_eos):
        return None
    return "decided"


def round_rule(candidate_logprobs: torch.Tensor, columns: torch.Tensor, alpha: float, drawn: int,
               num_rollouts: int, round_tolerance: float) -> str | None:
    """After a round of rollouts: None for another round, else why the decision stops
    ("all rounds": ``drawn`` >= M rollouts per candidate; "converged": the largest jackknife
    standard error of the choice probabilities is <= round_tolerance).

    candidate_logprobs: (K,) base log-likelihoods; columns: (K, c) the estimator's columns so far."""
    if drawn >= num_rollouts:
        return "all rounds"
    error = choice_standard_error(candidate_logprobs.double(), columns.double(), alpha)
    if float(error.max()) <= round_tolerance:
        return "converged"
    return None


def rollout_ess(log_weights: torch.Tensor) -> float:
    """``1 / sum w^2`` of one candidate's normalised rollout weights ((M,) log-weights)."""
    log_weights = log_weights.detach().double()
    return float(torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)))


def estimate(candidate_logprobs: torch.Tensor, rollout_scores: torch.Tensor, alpha: float,
             jackknife: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decision's (probs, p_hat, log zeta_hat), each (K,) float64 on the host.

    candidate_logprobs: (K,) log p(block_k | h); rollout_scores: (K, c) the estimator's columns
    (section 2; c = 0 columns or a row of zeros: log zeta = 0). The jackknife needs c >= 2 and
    is used only then. The torch reference in float64 on the host (K x c numbers: no kernel
    launch is worth it); NaN, +inf or nothing possible raise ValueError."""
    cand = candidate_logprobs.detach().double().cpu()
    rolls = rollout_scores.detach().double().cpu()
    if rolls.dim() != 2 or rolls.shape[0] != cand.shape[0]:
        raise ValueError(f"rollout_scores must be (K, c) for K = {cand.shape[0]} candidates, got {tuple(rolls.shape)}")
    if torch.isnan(cand).any() or torch.isnan(rolls).any() or torch.isposinf(cand).any():
        raise ValueError(f"NaN or +inf in a decision: candidates {cand.tolist()}, rollout scores {rolls.tolist()}")
    if rolls.shape[-1] == 0:
        rolls = torch.zeros(rolls.shape[0], 1, dtype=torch.float64)
    out = torch_power_estimates(cand, rolls, alpha, jackknife=jackknife and rolls.shape[-1] >= 2)
    if not float(out.probs.sum()) > 0:
        raise ValueError(f"no candidate has both a finite log-prob and a finite rollout: {cand.tolist()}")
    return out.probs, out.p_hat, out.log_zeta

"""The result types every sampler returns: one :class:`GenerationResult` per prompt, its
:class:`GenerationStats` and, for power sampling, one :class:`BlockRecord` per decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------- results


@dataclass(slots=True)
class BlockRecord:
    """One power-sampling decision (one block, or one token at block_size 1).

    candidates:         the distinct candidate blocks scored (token ids)
    candidate_logprobs: base log p(block | prefix) of each
    p_hat:              plain Monte Carlo estimate over the candidates
    probs:              the distribution sampled from (jackknife or plain)
    log_zeta:           estimated log scaling factor of each candidate
    choice:             index into ``candidates`` of the block appended
    rollout_ess:        effective sample size (1 / sum w_r^2) of each candidate's normalised
                        rollout weights, in [1, M]; None for a candidate without rollouts
                        (it ended, or no budget was left). Near 1: one rollout decided zeta
    rule:               what set the rollout budget: "fixed" (all M at once), "last block" (no
                        budget left for rollouts), "one candidate" / "decided" (skip_share:
                        no rollouts), "converged" / "all rounds" (rollouts_per_round: the
                        standard error fell to round_tolerance, or M was reached)
    rollouts:           rollouts decoded for the decision (all candidates together)
    rollouts_saved:     rollouts of the fixed budget (K x M over the candidates that had a
                        future) the rule did not decode
    """

    candidates: list[list[int]]
    candidate_logprobs: list[float]
    p_hat: list[float]
    probs: list[float]
    log_zeta: list[float]
    choice: int
    rollout_ess: list[float | None] | None = None
    rule: str | None = None
    rollouts: int = 0
    rollouts_saved: int = 0


@dataclass(slots=True)
class GenerationStats:
    """Counts and timings of one prompt's generation.

    tokens_by_phase: tokens decoded by the model per phase ("prefill", "candidates",
                     "rollouts", "sample", "proposals", ...); ``tokens_total`` adds them
                     up except the prompt's prefill
    num_forwards:    model forwards (prefill and decode steps) of the ``generate``
                     call up to this result: on a GPU a decode step costs about the same at
                     batch 1 and 64, so forwards, not tokens, bound the latency. Prompts
                     generated together share forwards and all count them.
    forward_rows:    sequences summed over those forwards (``mean_batch_size`` =
                     forward_rows / num_forwards)
    """

    method: str
    tokens_by_phase: dict[str, int] = field(default_factory=dict)
    num_blocks: int = 0
    wall_seconds: float = 0.0
    blocks: list[BlockRecord] = field(default_factory=list)
    acceptance_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_forwards: int = 0
    forward_rows: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.forward_rows / self.num_forwards if self.num_forwards else 0.0

    @property
    def tokens_total(self) -> int:
        return sum(v for k, v in self.tokens_by_phase.items() if k != "prefill")

    def add(self, phase_name: str, count: int) -> None:
        self.tokens_by_phase[phase_name] = self.tokens_by_phase.get(phase_name, 0) + int(count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tokens_total": self.tokens_total,
            "tokens_by_phase": dict(self.tokens_by_phase),
            "num_blocks": self.num_blocks,
            "wall_seconds": self.wall_seconds,
            "acceptance_rate": self.acceptance_rate,
            "num_forwards": self.num_forwards,
            "mean_batch_size": self.mean_batch_size,
            "blocks": [vars(b) if not hasattr(b, "__slots__") else {s: getattr(b, s) for s in b.__slots__} for b in self.blocks],
            **self.extra,
        }


@dataclass(slots=True)
class GenerationResult:
    """One prompt's completion: the generated token ids (prompt excluded; an EOS that
    ended the generation is included), their text when a tokenizer was given, and stats."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
    log_likelihood: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

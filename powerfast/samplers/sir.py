"""Sampling-importance-resampling from plain samples (powerfast/DESIGN.md section 6).

N completions per prompt are drawn by ancestral sampling from q = p at temperature T (the
pool of best-of-N, :meth:`AncestralSampler.sample_pool`, in one decode batch), and ONE of
them is returned, drawn with probability proportional to

    w_i = p(x_i)^alpha / q(x_i)        log w_i = alpha * log p(x_i) - log q(x_i)

(``(alpha - 1) * log p(x_i)`` at T = 1), normalised over the N. Completions that end at EOS
at different lengths are compared as whole sequences: nothing is length-normalised. The
draw is made on the host in float64 from the pool's one device-to-host copy, with the
sampler's seed stream. As N grows the returned completion's law tends to p^alpha / Z; at
finite N it is biased towards q (the self-normalised weights). As alpha -> infinity the
draw becomes best-of-N by likelihood.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from powerfast.core.config import SIRConfig
from powerfast.decisions import resampling
from powerfast.decisions.sir import draw_by_weight, importance_log_weights
from powerfast.samplers.ancestral import AncestralSampler, SamplePool
from powerfast.samplers.program import drive
from powerfast.samplers.results import GenerationResult

__all__ = ["SIRSampler", "WeightedSample", "draw_by_weight", "importance_log_weights"]


class WeightedSample(NamedTuple):
    """One completion of a pool with its weight: token ids (EOS included), log p(x) under the
    model, log q(x) under the temperature it was drawn at, and ``alpha log p - log q``."""

    token_ids: list[int]
    log_p: float
    log_q: float
    log_weight: float


class SIRSampler(AncestralSampler):
    """Sampling-importance-resampling: N plain samples from p at a temperature, one returned
    with probability proportional to p^alpha / q.

    model:     a Hugging Face causal LM, or a runner (:class:`powerfast.runtime.protocol.Runner`)
    tokenizer: optional; needed for string prompts and for ``text`` in the results
    config:    :class:`SIRConfig` (alpha, temperature > 0, num_samples N)
    seed:      makes ``generate`` reproducible (None: fresh randomness)

    ``stats.extra`` of each result: ``log_weights`` (the N log-weights), ``chosen_sample``
    (the index drawn), ``weights_ess`` (the effective sample size ``1 / sum w_i^2`` of the
    normalised weights, in [1, N]) and ``sample_logliks`` (the N base log-likelihoods).
    ``tokens_by_phase["sample"]`` counts every token of the N samples.
    """

    config_type = SIRConfig

    def __init__(self, model, tokenizer=None, config: SIRConfig | None = None, seed: int | None = None,
                 **runner_kwargs) -> None:
        super().__init__(model, tokenizer, config, seed, "sir", **runner_kwargs)

    def log_weights(self, pool: SamplePool, prompt_index: int) -> torch.Tensor:
        """(N,) float64 host log-weights of prompt ``prompt_index``'s samples."""
        rows = pool.rows(prompt_index)
        return importance_log_weights(pool.base_logliks[rows.start : rows.stop],
                                      pool.proposal_logliks[rows.start : rows.stop], self.config.alpha)

    def choose(self, pool: SamplePool, prompt_index: int, prompt_length: int) -> GenerationResult:
        """Prompt ``prompt_index``'s result: one of its N samples drawn by weight."""
        rows = pool.rows(prompt_index)
        log_weights = self.log_weights(pool, prompt_index)
        chosen = draw_by_weight(log_weights, self.seeds)
        stats = self.pool_stats(pool, prompt_index, prompt_length)
        stats.extra.update(log_weights=log_weights.tolist(), chosen_sample=chosen,
                           weights_ess=resampling.effective_sample_size(log_weights),
                           sample_logliks=pool.base_logliks[rows.start : rows.stop].tolist())
        row = rows[chosen]
        return self.result(pool.token_ids(row), stats, float(pool.base_logliks[row]))

    def weighted_samples(self, prompts, max_new_tokens: int = 3072, *, ignore_eos: bool = False,
                         chat_template: bool = True) -> list[list[WeightedSample]]:
        """Every sample of each prompt's pool with its weight instead of one draw: per prompt,
        N :class:`WeightedSample`. Normalised, the weights are the probabilities of the draw
        :meth:`generate` makes from the same pool."""
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        eos = () if ignore_eos else self.runner.eos_token_ids
        pool = drive(self.sample_pool(prompt_ids, max_new_tokens, eos), self.runner)
        out = []
        for i in range(len(prompt_ids)):
            log_weights = self.log_weights(pool, i).tolist()
            out.append([WeightedSample(pool.token_ids(row), float(pool.base_logliks[row]),
                                       float(pool.proposal_logliks[row]), log_weight)
                        for row, log_weight in zip(pool.rows(i), log_weights)])
        return out

"""Ancestral sampling on the runtime: plain sampling at temperature T, low-temperature sampling
(T = 1 / alpha), greedy decoding (T = 0) and best-of-N (N samples, keep the one of highest base
log-likelihood). The pool of N samples per prompt (:meth:`AncestralSampler.sample_pool`) is
also what sampling-importance-resampling (:mod:`powerfast.samplers.sir`) draws from."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from powerfast.core.config import SamplingConfig
from powerfast.samplers.base import RunnerSampler, pages_for, forked_peak_pages
from powerfast.samplers.decoding import continuations_program, nan_flag, phase, raise_on_nan, to_host
from powerfast.samplers.program import Prefill
from powerfast.samplers.results import GenerationResult, GenerationStats

__all__ = ["AncestralSampler", "SamplePool"]


class SamplePool(NamedTuple):
    """N independent completions per prompt, on the host: prompt i's are rows
    ``i * N .. (i + 1) * N - 1`` (:meth:`rows`).

    num_samples:      N
    tokens:           (P * N, S) int64 sampled tokens (after a row's end: the EOS id again)
    lengths:          (P * N,) int64 tokens of each completion, an ending EOS included
    base_logliks:     (P * N,) float32 log p(x) of each completion under the model (T = 1)
    proposal_logliks: (P * N,) float32 log q(x) under the law the tokens were drawn from
                      (p at the temperature; ``base_logliks`` itself at T = 1)
    seconds:          wall time from the prefill to the host copy
    """

    num_samples: int
    tokens: torch.Tensor
    lengths: torch.Tensor
    base_logliks: torch.Tensor
    proposal_logliks: torch.Tensor
    seconds: float

    def rows(self, prompt_index: int) -> range:
        """The rows of prompt ``prompt_index``."""
        return range(prompt_index * self.num_samples, (prompt_index + 1) * self.num_samples)

    def token_ids(self, row: int) -> list[int]:
        """The completion of ``row`` (its EOS included)."""
        return self.tokens[row, : self.lengths[row]].tolist()


class AncestralSampler(RunnerSampler):
    """Token-by-token sampling from p at a temperature; best-of-N with ``num_samples`` > 1.

    config: :class:`SamplingConfig` (temperature 0 is greedy decoding); a subclass that draws
            from the same pool names its own ``config_type`` (sir: :class:`~powerfast.core.config.SIRConfig`)
    method: the name recorded in the results ("plain", "low-temp", "greedy", "best-of-n")
    """

    config_type: type = SamplingConfig

    def __init__(self, model, tokenizer=None, config=None, seed: int | None = None,
                 method: str | None = None, **runner_kwargs) -> None:
        self.config = config if config is not None else self.config_type()
        if not isinstance(self.config, self.config_type):
            raise ValueError(f"config must be a {self.config_type.__name__}, got {type(self.config).__name__}")
        if method is None:
            method = "greedy" if self.config.temperature == 0 else ("best-of-n" if self.config.num_samples > 1 else "plain")
        self.method = method
        super().__init__(model, tokenizer, seed, **runner_kwargs)

    def sample_pool(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...],
                    stream: bool = False):
        """N = ``config.num_samples`` independent completions per prompt from p at
        ``config.temperature``, all prompts and samples in one decode batch (N forks of each
        prompt; no fork at N = 1); a step program that returns a :class:`SamplePool`, read to
        the host in one copy (with ``stream`` and N = 1, each step's tokens are yielded)."""
        n = self.config.num_samples
        started = time.perf_counter()
        live: list = []
        try:
            with phase("prefill"):
                seqs, logits = yield Prefill(prompt_ids)
            live.extend(seqs)
            if n > 1:
                with phase("fork"):
                    children = [c for s in seqs for c in self.runner.fork(s, n)]
                live.extend(children)
                self.runner.free(seqs)
                live = children
                seqs, logits = children, logits.repeat_interleave(n, dim=0)
            with phase("sample"):
                out = yield from continuations_program(seqs, logits, max_new_tokens, self.seeds,
                                                       temperature=self.config.temperature, eos_token_id=eos,
                                                       stream=stream and n == 1)
        finally:
            self.runner.free(live)
        tempered = () if out.tempered_logliks is None else (out.tempered_logliks,)
        tokens, lengths, logliks, nan, *proposal = to_host(out.tokens, out.lengths, out.base_logliks,
                                                           nan_flag(out.base_logliks), *tempered)  # one copy
        raise_on_nan(nan, "sampling")
        return SamplePool(n, tokens, lengths, logliks, proposal[0] if proposal else logliks,
                          time.perf_counter() - started)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """Sample a completion per prompt, all prompts and samples in one decode batch (a step
        program; with ``stream`` and one sample per prompt, each step's tokens are yielded):
        the pool of :meth:`sample_pool`, one completion per prompt chosen by :meth:`choose`."""
        pool = yield from self.sample_pool(prompt_ids, max_new_tokens, eos, stream)
        results = [self.choose(pool, i, len(ids)) for i, ids in enumerate(prompt_ids)]
        if progress is not None:
            progress(max_new_tokens, max_new_tokens)
        return results

    def pool_stats(self, pool: SamplePool, prompt_index: int, prompt_length: int) -> GenerationStats:
        """The stats of one prompt's pool: its prefill and every token of its N samples
        (the compute of the result, whichever sample is returned)."""
        stats = GenerationStats(self.method, wall_seconds=pool.seconds)
        stats.add("prefill", prompt_length)
        rows = pool.rows(prompt_index)
        stats.add("sample", int(pool.lengths[rows.start : rows.stop].sum()))
        return stats

    def choose(self, pool: SamplePool, prompt_index: int, prompt_length: int) -> GenerationResult:
        """Prompt ``prompt_index``'s result: its sample of highest base log-likelihood (the
        only one at N = 1); at N > 1 the N log-likelihoods go to ``stats.extra["sample_logliks"]``."""
        rows = pool.rows(prompt_index)
        logliks = pool.base_logliks
        best = max(rows, key=lambda r: float(logliks[r]))
        stats = self.pool_stats(pool, prompt_index, prompt_length)
        if pool.num_samples > 1:
            stats.extra["sample_logliks"] = logliks[rows.start : rows.stop].tolist()
        return self.result(pool.token_ids(best), stats, float(logliks[best]))

    def peak_kv_pages(self, prompt_lengths: list[int], max_new_tokens: int, page_size: int) -> int:
        """Most KV pages a ``generate`` holds: per prompt, N samples of the whole budget
        forked from the prompt (one sequence when N = 1); the last token is never decoded."""
        n = self.config.num_samples
        if n == 1:
            return sum(pages_for(length + max_new_tokens - 1, page_size) for length in prompt_lengths)
        return forked_peak_pages(prompt_lengths, n, max_new_tokens - 1, page_size)

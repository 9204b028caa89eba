"""Ancestral sampling on the runtime: plain sampling at temperature T, low-temperature sampling
(T = 1 / alpha), greedy decoding (T = 0) and best-of-N (N samples, keep the one of highest base
log-likelihood)."""

from __future__ import annotations

import time

from powerfast.core.config import SamplingConfig
from powerfast.samplers.base import RunnerSampler, blocks_for, forked_peak_blocks
from powerfast.samplers.decoding import continuations_program, nan_flag, phase, raise_on_nan, to_host
from powerfast.samplers.program import Prefill
from powerfast.samplers.results import GenerationStats

__all__ = ["AncestralSampler"]


class AncestralSampler(RunnerSampler):
    """Token-by-token sampling from p at a temperature; best-of-N with ``num_samples`` > 1.

    config: :class:`SamplingConfig` (temperature 0 is greedy decoding)
    method: the name recorded in the results ("plain", "low-temp", "greedy", "best-of-n")
    """

    def __init__(self, model, tokenizer=None, config: SamplingConfig | None = None, seed: int | None = None,
                 method: str | None = None, **runner_kwargs) -> None:
        self.config = config if config is not None else SamplingConfig()
        if not isinstance(self.config, SamplingConfig):
            raise ValueError(f"config must be a SamplingConfig, got {type(self.config).__name__}")
        if method is None:
            method = "greedy" if self.config.temperature == 0 else ("best-of-n" if self.config.num_samples > 1 else "plain")
        self.method = method
        super().__init__(model, tokenizer, seed, **runner_kwargs)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """Sample a completion per prompt, all prompts and samples in one decode batch (a step
        program; with ``stream`` and one sample per prompt, each step's tokens are yielded)."""
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
        tokens, lengths, logliks, nan = to_host(out.tokens, out.lengths, out.base_logliks,
                                                nan_flag(out.base_logliks))  # one copy
        raise_on_nan(nan, "sampling")
        elapsed = time.perf_counter() - started
        results = []
        for i, ids in enumerate(prompt_ids):
            rows = range(i * n, (i + 1) * n)
            best = max(rows, key=lambda r: float(logliks[r]))
            stats = GenerationStats(self.method, wall_seconds=elapsed)
            stats.add("prefill", len(ids))
            stats.add("sample", int(lengths[i * n : (i + 1) * n].sum()))
            if n > 1:
                stats.extra["sample_logliks"] = logliks[i * n : (i + 1) * n].tolist()
            results.append(self.result(tokens[best, : lengths[best]].tolist(), stats, float(logliks[best])))
        if progress is not None:
            progress(max_new_tokens, max_new_tokens)
        return results

    def peak_kv_blocks(self, prompt_lengths: list[int], max_new_tokens: int, block_size: int) -> int:
        """Most KV blocks a ``generate`` holds: per prompt, N samples of the whole budget
        forked from the prompt (one sequence when N = 1); the last token is never decoded."""
        n = self.config.num_samples
        if n == 1:
            return sum(blocks_for(length + max_new_tokens - 1, block_size) for length in prompt_lengths)
        return forked_peak_blocks(prompt_lengths, n, max_new_tokens - 1, block_size)

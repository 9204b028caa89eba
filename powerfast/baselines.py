"""Baselines on the same runner as power sampling, with the same result type.

- :class:`AncestralSampler`: plain sampling at temperature T, low-temperature sampling
  (T = 1 / alpha), greedy decoding (T = 0) and best-of-N (N samples, keep the one of
  highest base log-likelihood);
- :class:`MCMCSampler`: the Metropolis-Hastings power sampler of Karan & Du. A proposal
  forks the current sequence at the resampling position: the shared prefix is never
  recomputed.
"""

from __future__ import annotations

import math
import time

import torch

from powerfast.config import MCMCConfig, SamplingConfig
from powerfast.generation import GenerationResult, GenerationStats, RunnerSampler, phase, sample_continuations

__all__ = ["AncestralSampler", "MCMCSampler", "make_sampler", "METHODS"]

METHODS = ("power", "mcmc", "plain", "low-temp", "greedy", "best-of-n")


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

    def generate(self, prompts, max_new_tokens: int = 3072, *, ignore_eos: bool = False,
                 chat_template: bool = True, progress=None) -> list[GenerationResult]:
        """Sample a completion per prompt (all prompts and samples in one decode batch)."""
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        eos = self.eos_token_id(ignore_eos)
        n = self.config.num_samples
        started = time.perf_counter()
        live: list = []
        try:
            with phase("prefill"):
                seqs, logits = self.runner.prefill(prompt_ids)
            live.extend(seqs)
            if n > 1:
                with phase("fork"):
                    children = [c for s in seqs for c in self.runner.fork(s, n)]
                live.extend(children)
                self.runner.free(seqs)
                live = children
                seqs, logits = children, logits.repeat_interleave(n, dim=0)
            with phase("sample"):
                out = sample_continuations(self.runner, seqs, logits, max_new_tokens, self.seeds,
                                           temperature=self.config.temperature, eos_token_id=eos)
        finally:
            self.runner.free(live)
        if bool(torch.isnan(out.base_logliks).any()):
            raise FloatingPointError("the model returned NaN logits while sampling")
        tokens, lengths, logliks = out.tokens.cpu(), out.lengths.cpu(), out.base_logliks.cpu()
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


class MCMCSampler(RunnerSampler):
    """Metropolis-Hastings power sampling (Karan & Du, "Reasoning with Sampling").

    After every block of B tokens drawn from the proposal q = p at temperature 1/alpha,
    ``mcmc_steps`` MH steps each pick a position m uniformly in the generated part,
    resample the suffix from m with q, and accept with

        log A = alpha * (log p(x') - log p(x)) + log q(x) - log q(x')

    (sums over the resampled suffix). A proposal forks the sequence at m; the prompts of
    a batch run their blocks together and their MH steps one after another.
    """

    method = "mcmc"

    def __init__(self, model, tokenizer=None, config: MCMCConfig | None = None, seed: int | None = None,
                 **runner_kwargs) -> None:
        self.config = config if config is not None else MCMCConfig()
        if not isinstance(self.config, MCMCConfig):
            raise ValueError(f"config must be an MCMCConfig, got {type(self.config).__name__}")
        super().__init__(model, tokenizer, seed, **runner_kwargs)

    def generate(self, prompts, max_new_tokens: int = 3072, *, ignore_eos: bool = False,
                 chat_template: bool = True, progress=None) -> list[GenerationResult]:
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        eos = self.eos_token_id(ignore_eos)
        temperature = 1.0 / self.config.alpha
        started = time.perf_counter()
        stats = [GenerationStats(self.method) for _ in prompt_ids]
        tokens: list[list[int]] = [[] for _ in prompt_ids]
        logp: list[list[float]] = [[] for _ in prompt_ids]  # base log-prob of each generated token
        logq: list[list[float]] = [[] for _ in prompt_ids]  # proposal log-prob of each generated token
        accepted = [0 for _ in prompt_ids]
        proposed = [0 for _ in prompt_ids]
        live: list = []
        try:
            with phase("prefill"):
                seqs, logits = self.runner.prefill(prompt_ids)
            live = list(seqs)
            heads = [logits[i] for i in range(len(prompt_ids))]
            for i, ids in enumerate(prompt_ids):
                stats[i].add("prefill", len(ids))
            open_prompts = list(range(len(prompt_ids)))
            while open_prompts:
                block = min(self.config.block_size, max_new_tokens - len(tokens[open_prompts[0]]))
                with phase("candidates"):
                    out = sample_continuations(
                        self.runner, [seqs[i] for i in open_prompts], torch.stack([heads[i] for i in open_prompts]),
                        block, self.seeds, temperature=temperature, eos_token_id=eos,
                        want_last_logits=True, per_token=True,
                    )
                self._check(out.base_logliks)
                lengths = out.lengths.cpu().tolist()
                for row, i in enumerate(open_prompts):
                    n = lengths[row]
                    tokens[i] += out.tokens[row, :n].cpu().tolist()
                    logp[i] += out.token_logprobs[row, :n].cpu().tolist()
                    logq[i] += out.token_tempered[row, :n].cpu().tolist()
                    heads[i] = out.last_logits[row]
                    stats[i].add("sample", n)
                    stats[i].num_blocks += 1
                for i in open_prompts:
                    for _ in range(self.config.mcmc_steps):
                        with phase("mcmc-step"):
                            ok = self._mh_step(i, prompt_ids[i], seqs, heads, tokens, logp, logq, eos, stats[i], live)
                        accepted[i] += ok
                        proposed[i] += 1
                open_prompts = [
                    i for i in open_prompts
                    if not (eos is not None and tokens[i] and tokens[i][-1] == eos) and len(tokens[i]) < max_new_tokens
                ]
                if progress is not None:
                    progress(max(len(t) for t in tokens), max_new_tokens)
        finally:
            self.runner.free(live)
        elapsed = time.perf_counter() - started
        results = []
        for i in range(len(prompt_ids)):
            stats[i].wall_seconds = elapsed
            stats[i].acceptance_rate = accepted[i] / proposed[i] if proposed[i] else None
            results.append(self.result(tokens[i], stats[i], float(sum(logp[i]))))
        return results

    @staticmethod
    def _check(logliks: torch.Tensor) -> None:
        if bool(torch.isnan(logliks).any()):
            raise FloatingPointError("the model returned NaN logits during MCMC")

    def _mh_step(self, i, prompt, seqs, heads, tokens, logp, logq, eos, stats, live) -> bool:
        """One Metropolis-Hastings step for prompt i; returns whether it was accepted."""
        alpha = self.config.alpha
        generated = len(tokens[i])
        m = self.seeds.integers(generated)
        full = prompt + tokens[i]
        # fork just before position m and feed token m-1 to get the logits of position m
        [child] = self.runner.fork(seqs[i], 1, length=len(prompt) + m - 1)
        live.append(child)
        logits_m = self.runner.decode([child], torch.tensor([full[len(prompt) + m - 1]], device=heads[i].device))
        proposal = sample_continuations(
            self.runner, [child], logits_m, generated - m, self.seeds, temperature=1.0 / alpha,
            eos_token_id=eos, want_last_logits=True, per_token=True,
        )
        self._check(proposal.base_logliks)
        n = int(proposal.lengths[0])
        stats.add("proposals", n + 1)
        new_logp = proposal.token_logprobs[0, :n].cpu().tolist()
        new_logq = proposal.token_tempered[0, :n].cpu().tolist()
        log_accept = alpha * (sum(new_logp) - sum(logp[i][m:])) + sum(logq[i][m:]) - sum(new_logq)
        if math.log(max(self.seeds.uniform(), 1e-300)) < log_accept:
            if n < generated - m:  # ended at EOS early: keep only the tokens up to it
                [trimmed] = self.runner.fork(child, 1, length=len(prompt) + m + n)
                live.append(trimmed)
                self._drop(child, live)
                child = trimmed
            self._drop(seqs[i], live)
            seqs[i] = child
            tokens[i] = tokens[i][:m] + proposal.tokens[0, :n].cpu().tolist()
            logp[i] = logp[i][:m] + new_logp
            logq[i] = logq[i][:m] + new_logq
            heads[i] = proposal.last_logits[0]
            return True
        self._drop(child, live)
        return False

    def _drop(self, seq, live: list) -> None:
        self.runner.free([seq])
        live.remove(seq)


def make_sampler(method: str, model, tokenizer=None, *, alpha: float = 4.0, seed: int | None = None,
                 temperature: float = 1.0, num_samples: int = 8, power_config=None, mcmc_config=None,
                 **runner_kwargs):
    """A sampler by method name (one of METHODS) with the usual settings."""
    from powerfast.config import PowerConfig
    from powerfast.sampler import PowerSampler

    if method == "power":
        return PowerSampler(model, tokenizer, power_config or PowerConfig(alpha=alpha), seed, **runner_kwargs)
    if method == "mcmc":
        return MCMCSampler(model, tokenizer, mcmc_config or MCMCConfig(alpha=alpha), seed, **runner_kwargs)
    if method == "plain":
        return AncestralSampler(model, tokenizer, SamplingConfig(temperature), seed, "plain", **runner_kwargs)
    if method == "low-temp":
        return AncestralSampler(model, tokenizer, SamplingConfig(1.0 / alpha), seed, "low-temp", **runner_kwargs)
    if method == "greedy":
        return AncestralSampler(model, tokenizer, SamplingConfig(0.0), seed, "greedy", **runner_kwargs)
    if method == "best-of-n":
        return AncestralSampler(model, tokenizer, SamplingConfig(temperature, num_samples), seed, "best-of-n",
                                **runner_kwargs)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

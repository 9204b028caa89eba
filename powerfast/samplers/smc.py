"""Power-SMC (Azizi et al., arXiv 2602.10273) on the paged runtime (powerfast/DESIGN.md section 6).

N particles per prompt are forked from the prompt (no KV copied). Step t samples every
live particle from p at temperature 1/alpha_t and multiplies its weight by

    c_t(h) = sum_x p(x | h)^alpha_t        (log: ``powerfast.ops.sampling.sample_tokens(...).log_power_sums``)

which is the incremental weight ``p^alpha_t / q`` of the tempered proposal q; the fused
sampling kernel returns it with the token, no second softmax. With a ramp (alpha_t from 1
to alpha over ``ramp_tokens``), a change of alpha_t adds the catch-up
``(alpha_t - alpha_{t-1}) log p(prefix)`` so the intermediate targets stay p^alpha_t.

Every ``resample_every`` tokens (a host sync) the effective sample size of each prompt's
normalised weights is checked; below ``ess_threshold * N`` the prompt's particles are
resampled (:mod:`powerfast.decisions.resampling`): a particle with k > 0 offspring keeps its
sequence and is forked k - 1 times, one with none is freed: KV is shared, never copied.
A particle that samples EOS is frozen with its weight (its KV freed at the next check;
resampling may duplicate it). At the end one particle per prompt is drawn by weight.
"""

from __future__ import annotations

import math
import time

import torch

from powerfast.core.config import SMCConfig
from powerfast.ops.device import upload_ints
from powerfast.decisions import resampling
from powerfast.samplers.base import RunnerSampler, forked_peak_pages
from powerfast.samplers.decoding import check_no_nan, continuations_program, nan_flag, phase, raise_on_nan, to_host
from powerfast.samplers.program import Prefill, drive
from powerfast.samplers.results import GenerationStats

__all__ = ["SMCSampler"]


class _Particle:
    """One particle: its runner sequence (None once finished and freed), the tokens
    generated up to the last check, and its weight as of that check."""

    __slots__ = ("prompt", "seq", "tokens", "loglik", "log_weight", "weight_alpha", "ancestor", "finished", "row")

    def __init__(self, prompt: int, seq, ancestor: int) -> None:
        self.prompt = prompt
        self.seq = seq
        self.tokens: list[int] = []
        self.loglik = 0.0
        self.log_weight = 0.0
        self.weight_alpha = 1.0  # the alpha_t up to which log_weight holds the catch-up
        self.ancestor = ancestor
        self.finished = False
        self.row = -1  # its row in the current decode batch (next-token logits)

    def copy(self, seq) -> _Particle:
        twin = _Particle(self.prompt, seq, self.ancestor)
        twin.tokens = list(self.tokens)
        twin.loglik, twin.log_weight, twin.weight_alpha, twin.finished, twin.row = (
            self.loglik, self.log_weight, self.weight_alpha, self.finished, self.row)
        return twin


def _effective_sample_sizes(particles: list[list[_Particle]]) -> torch.Tensor:
    """(P,) float64 ESS = 1 / sum w^2 of each prompt's normalised particle weights."""
    log_w = torch.tensor([[p.log_weight for p in group] for group in particles], dtype=torch.float64)
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


class SMCSampler(RunnerSampler):
    """Sequential Monte Carlo power sampling (Power-SMC).

    model:     a Hugging Face causal LM, or a runner (:class:`powerfast.runtime.protocol.Runner`)
    tokenizer: optional; needed for string prompts and for ``text`` in the results
    config:    :class:`SMCConfig`
    seed:      makes ``generate`` reproducible (None: fresh randomness)

    ``stats.extra`` of each result: ``resampling_steps`` (checks that resampled),
    ``ess_history`` (the ESS at every check, before resampling), ``unique_ancestors``
    (distinct initial particles among the final N), ``final_ess``.
    """

    method = "smc"

    def __init__(self, model, tokenizer=None, config: SMCConfig | None = None, seed: int | None = None,
                 **runner_kwargs) -> None:
        self.config = config if config is not None else SMCConfig()
        if not isinstance(self.config, SMCConfig):
            raise ValueError(f"config must be an SMCConfig, got {type(self.config).__name__}")
        super().__init__(model, tokenizer, seed, **runner_kwargs)

    def peak_kv_pages(self, prompt_lengths: list[int], max_new_tokens: int, page_size: int) -> int:
        """Most KV pages a ``generate`` holds: per prompt, N particles forked from the prompt,
        each decoding the whole budget but its last token. Resampling only shares pages
        (a copy is a fork), so it never raises the count past that."""
        return forked_peak_pages(prompt_lengths, self.config.num_particles, max_new_tokens - 1, page_size)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """One completion per prompt, drawn by weight from its N particles; the particles of
        every prompt decode as one batch (a step program). Nothing is final before the
        draw at the end, so ``stream`` yields nothing."""
        groups, stats = yield from self._run(prompt_ids, max_new_tokens, eos, progress)
        results = []
        for group, stat in zip(groups, stats):
            log_weights = torch.tensor([p.log_weight for p in group], dtype=torch.float64)
            chosen = group[self.seeds.categorical(resampling.normalised_weights(log_weights))]
            results.append(self.result(chosen.tokens, stat, chosen.loglik))
        return results

    def particles(self, prompts, max_new_tokens: int = 3072, *, ignore_eos: bool = False,
                  chat_template: bool = True) -> list[list[tuple[list[int], float, float]]]:
        """Every final particle of each prompt instead of one draw: per prompt, N tuples
        (token ids, base log-likelihood, log-weight). The weighted particles estimate the
        power distribution; normalised, the weights are the probabilities of a draw."""
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        eos = () if ignore_eos else self.runner.eos_token_ids
        groups, _ = drive(self._run(prompt_ids, max_new_tokens, eos, None), self.runner)
        return [[(p.tokens, p.loglik, p.log_weight) for p in group] for group in groups]

    def _run(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress):
        """The particle system to the end (a step program); returns (the final particles of
        each prompt, stats)."""
        cfg = self.config
        started = time.perf_counter()
        stats = [GenerationStats(self.method) for _ in prompt_ids]
        for stat, ids in zip(stats, prompt_ids):
            stat.add("prefill", len(ids))
            stat.extra.update(resampling_steps=0, ess_history=[], unique_ancestors=cfg.num_particles,
                              final_ess=float(cfg.num_particles))
        live: dict[int, object] = {}  # id -> sequence: everything this call holds, freed at the end
        try:
            with phase("prefill"):
                seqs, prompt_logits = yield Prefill(prompt_ids)
            live.update((id(s), s) for s in seqs)
            check_no_nan(prompt_logits, "prefill")
            particles: list[list[_Particle]] = []
            running: list[_Particle] = []
            source_rows = []
            with phase("fork"):
                for i, seq in enumerate(seqs):
                    children = [seq] + self.runner.fork(seq, cfg.num_particles - 1)
                    live.update((id(s), s) for s in children)
                    particles.append([_Particle(i, s, n) for n, s in enumerate(children)])
                    for particle in particles[i]:
                        particle.log_weight = -math.log(cfg.num_particles)
                    running.extend(particles[i])
                    source_rows.extend([i] * cfg.num_particles)
            logits = prompt_logits[upload_ints(source_rows, torch.long, prompt_logits.device)]
            device = logits.device
            step, alpha_prev = 0, 1.0
            while step < max_new_tokens:  # one segment of R tokens (the last may be shorter), then a check
                length = min(cfg.resample_every, max_new_tokens - step)
                last = step + length == max_new_tokens
                alphas = [cfg.alpha_at(t) for t in range(step, step + length)]
                ramping = any(a != b for a, b in zip(alphas, [alpha_prev, *alphas[:-1]]))
                logliks = torch.tensor([p.loglik for p in running], dtype=torch.float32, device=device)
                log_weights = torch.tensor([p.log_weight for p in running], dtype=torch.float64, device=device)
                start_logliks = logliks.clone()
                # the product's decode loop: tempered proposal, weights sum_x p(x|h_t)^alpha_t on the device
                out = yield from continuations_program(
                    [p.seq for p in running], logits, length, self.seeds, temperature=[1.0 / a for a in alphas],
                    eos_token_id=eos, want_last_logits=not last, per_token=ramping, stop_check_every=length + 1,
                    logliks=logliks, log_weights=log_weights)
                if ramping:  # catch-up: at each step the target moves from p^alpha_(t-1) to p^alpha_t
                    deltas = torch.tensor([a - b for a, b in zip(alphas, [alpha_prev, *alphas[:-1]])],
                                          dtype=torch.float64, device=device)
                    before = torch.cumsum(out.token_logprobs.double(), dim=1) - out.token_logprobs.double()
                    log_weights += ((before + start_logliks.double()[:, None]) * deltas).sum(dim=1)
                alpha_prev = alphas[-1]
                step += length
                with phase("resample"):
                    running, keep_rows = self._check(particles, running, out, log_weights, alpha_prev, last, stats,
                                                     live)
                if not running:
                    break
                logits = out.last_logits[upload_ints(keep_rows, torch.long, device)]
                if progress is not None:
                    progress(step, max_new_tokens)
            for group in particles:
                for particle in group:  # a ramp longer than the budget: the result still targets p^alpha
                    particle.log_weight += (cfg.alpha - particle.weight_alpha) * particle.loglik
                    particle.weight_alpha = cfg.alpha
        finally:
            self.runner.free(list(live.values()))
        elapsed = time.perf_counter() - started
        for stat in stats:
            stat.wall_seconds = elapsed
        return particles, stats

    def _check(self, particles: list[list[_Particle]], rows: list[_Particle], out, log_weights: torch.Tensor,
               alpha: float, last: bool, stats: list[GenerationStats], live: dict) -> tuple[list[_Particle], list[int]]:
        """Sync the segment's rows (``out``: its Continuations, ``log_weights`` the rows'
        weights) to the particles, free finished ones, resample where the ESS is low.

        Returns the particles still running (in a new row order) and, for each, the row of
        the old batch whose next-token logits it continues from.
        """
        cfg = self.config
        tokens, active, logliks, lengths, log_weights, nan = to_host(  # one copy for the segment
            out.tokens, out.active, out.base_logliks, out.lengths, log_weights, nan_flag(out.base_logliks))
        raise_on_nan(nan, "SMC")
        lengths = lengths.tolist()
        for row, particle in enumerate(rows):
            particle.tokens.extend(tokens[row, : lengths[row]].tolist())
            particle.loglik = float(logliks[row])
            particle.log_weight = float(log_weights[row])
            particle.weight_alpha = alpha
            particle.finished = last or not bool(active[row])
            stats[particle.prompt].add("sample", int(lengths[row]))
            particle.row = row
        running, keep_rows = [], []
        if any(p.finished and p.weight_alpha != alpha for group in particles for p in group):
            for group in particles:  # frozen particles follow the ramp: their target is p^alpha_t too
                for particle in group:
                    if particle.finished and particle.weight_alpha != alpha:
                        particle.log_weight += (alpha - particle.weight_alpha) * particle.loglik
                        particle.weight_alpha = alpha
        ess = _effective_sample_sizes(particles).tolist()
        for i, group in enumerate(particles):
            stats[i].extra["ess_history"].append(ess[i])
            # a group whose particles have all finished is not resampled (that only adds noise)
            if not last and ess[i] < cfg.ess_threshold * cfg.num_particles and not all(p.finished for p in group):
                log_w = torch.tensor([p.log_weight for p in group], dtype=torch.float64)
                group = particles[i] = self._resample(group, log_w, live)
                stats[i].extra["resampling_steps"] += 1
                stats[i].extra["unique_ancestors"] = len({p.ancestor for p in group})
            for particle in group:
                if particle.finished:
                    if particle.seq is not None:
                        self._free(particle, live)
                else:
                    running.append(particle)
                    keep_rows.append(particle.row)
        for i, final_ess in enumerate(_effective_sample_sizes(particles).tolist()):
            stats[i].extra["final_ess"] = final_ess
        return running, keep_rows

    def _resample(self, group: list[_Particle], log_w: torch.Tensor, live: dict) -> list[_Particle]:
        """The group's N offspring: survivors keep their sequence, copies are forks of it."""
        cfg = self.config
        uniform = self.seeds.uniform()
        ancestors, new_log_w = resampling.resample(log_w, cfg.num_particles, cfg.resampler, uniform, cfg.eta)
        counts = torch.bincount(ancestors, minlength=len(group)).tolist()
        offspring: list[_Particle] = []
        new_log_w = new_log_w.tolist()
        for index, (particle, count) in enumerate(zip(group, counts)):
            if count == 0:
                if particle.seq is not None:
                    self._free(particle, live)
                continue
            forks = self.runner.fork(particle.seq, count - 1) if particle.seq is not None and count > 1 else []
            live.update((id(s), s) for s in forks)
            twins = [particle] + [particle.copy(forks[j] if forks else None) for j in range(count - 1)]
            offspring.extend(twins)
        for particle, log_weight in zip(offspring, new_log_w):
            particle.log_weight = log_weight
        return offspring

    def _free(self, particle: _Particle, live: dict) -> None:
        self.runner.free([particle.seq])
        del live[id(particle.seq)]
        particle.seq = None

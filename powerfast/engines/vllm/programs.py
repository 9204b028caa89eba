"""Every method as a program of requests an inference engine answers (powerfast/DESIGN.md section 10).

A program is a generator: it yields a list of asks and receives, in order, one answer per ask:

- ``Draw(prompt, n, temperature, max_tokens, seed, stop, top)``: n continuations of ``prompt``
  (token ids) drawn at ``temperature`` (0: greedy), each ending at a ``stop`` id (kept, last) or
  after ``max_tokens``. Answer: a list of n ``Completion(tokens, logprobs)``, ``logprobs`` the
  per-token log-probabilities under the law drawn from (p at that temperature), and with
  ``top = k > 0`` the k most likely first tokens and their log p as ``Completion.top``.
- ``Score(prompt, continuation)``: log p (temperature 1) of each continuation token. Answer: a
  list of floats.

No program knows which engine answers: ``engines.vllm.engine`` answers with vLLM (a Draw is one
request with ``n``; a Score a prompt-log-prob request over the prefix-cached prompt), the tests
answer from exact next-token tables. The decisions are the shared ones (``powerfast.decisions``):
the Top-K distinct candidates, the skip and rounds rules, the estimate, resampling, the MH
acceptance, the importance weights. :func:`run_programs` runs many programs (one per prompt)
and hands the engine the asks of all of them at once, so prompts batch.

What a Score costs: one prefill over the continuation's tokens (its prompt is cached but for its
last partial KV block). A Draw at T = 1 returns log p itself, so only tempered draws (log q)
need a Score for log p: tempered candidates, tempered rollouts, SMC, MCMC, sir and best-of-N
away from T = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from powerfast.core.config import MCMCConfig, PowerConfig, SamplingConfig, SIRConfig, SMCConfig
from powerfast.decisions import lookahead, mcmc, resampling, sir
from powerfast.decisions.seeds import SeedStream

__all__ = ["Draw", "Score", "Completion", "Result", "program_for", "run_programs", "unsupported_settings"]


@dataclass(frozen=True, slots=True)
class Draw:
    prompt: tuple[int, ...]
    n: int
    temperature: float
    max_tokens: int
    seed: int
    stop: tuple[int, ...] = ()
    top: int = 0


@dataclass(frozen=True, slots=True)
class Score:
    prompt: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(slots=True)
class Completion:
    tokens: list[int]
    logprobs: list[float]
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    """One prompt's completion: token ids (EOS included where it ended), log p of them, and stats:
    ``method``, ``tokens_by_phase`` (decoded tokens per phase: sample, candidates, rollouts,
    proposals; ``scored`` the tokens of Score passes), and the method's extras; ``text`` the
    decoded text where the engine has a tokenizer."""

    token_ids: list[int]
    log_likelihood: float
    stats: dict
    text: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


Program = Generator[list, list, Result]

UNSUPPORTED = {
    "power": {"reuse_rollouts": False, "rollout_resample_every": 0, "entropy_cut": 0.0},
    "smc": {"ramp_tokens": 0},
}
"""Settings the request programs do not honour, with the only value they accept."""


def unsupported_settings(method: str, config) -> None:
    """Refuse, naming the field, a setting this engine cannot honour (before any engine starts)."""
    from powerfast.core.config import SettingError

    for name, accepted in UNSUPPORTED.get(method, {}).items():
        value = getattr(config, name)
        if value != accepted:
            raise SettingError(name, f"{name}={value!r} is not available on the vLLM engine (it needs our runtime's "
                                     f"forks: use --engine powerfast, or {name}={accepted!r})")


def _stats(method: str) -> dict:
    return {"method": method, "tokens_by_phase": {}}


def _add(stats: dict, phase: str, count: int) -> None:
    stats["tokens_by_phase"][phase] = stats["tokens_by_phase"].get(phase, 0) + int(count)


def _ended(tokens: Sequence[int], stop: tuple[int, ...]) -> bool:
    return bool(tokens) and tokens[-1] in stop


def _base_logprobs(prompts: list[tuple[int, ...]], completions: list[Completion], temperature: float,
                   stats: dict) -> Generator[list, list, list[list[float]]]:
    """log p of every completion's tokens: the draw's own log-probs at T = 1, else one Score each."""
    if temperature == 1.0:
        return [c.logprobs for c in completions]
    asks = [Score(prompt, tuple(c.tokens)) for prompt, c in zip(prompts, completions)]
    answers = yield asks
    _add(stats, "scored", sum(len(c.tokens) for c in completions))
    return answers


# ------------------------------------------------------------------------- ancestral, sir


def ancestral(prompt: tuple[int, ...], config: SamplingConfig, method: str, max_new_tokens: int,
              stop: tuple[int, ...], seeds: SeedStream) -> Program:
    """plain, low-temp, greedy, best-of-N: N draws, the one of highest log p kept."""
    stats = _stats(method)
    t = config.temperature
    [completions] = yield [Draw(prompt, config.num_samples, t, max_new_tokens, seeds.next(), stop)]
    _add(stats, "sample", sum(len(c.tokens) for c in completions))
    # greedy (t = 0) reports the base model's log-probs, as a draw at T = 1 does: no Score
    logp = yield from _base_logprobs([prompt] * len(completions), completions, t or 1.0, stats)
    logliks = [math.fsum(lp) for lp in logp]
    best = max(range(len(completions)), key=lambda i: logliks[i])
    if len(completions) > 1:
        stats["sample_logliks"] = logliks
    return Result(completions[best].tokens, logliks[best], stats)


def importance(prompt: tuple[int, ...], config: SIRConfig, max_new_tokens: int, stop: tuple[int, ...],
               seeds: SeedStream) -> Program:
    """sir: N draws from q = p at T, one returned with probability ∝ p^alpha / q."""
    stats = _stats("sir")
    [completions] = yield [Draw(prompt, config.num_samples, config.temperature, max_new_tokens, seeds.next(), stop)]
    _add(stats, "sample", sum(len(c.tokens) for c in completions))
    logp = yield from _base_logprobs([prompt] * len(completions), completions, config.temperature, stats)
    log_p = torch.tensor([math.fsum(lp) for lp in logp], dtype=torch.float64)
    log_q = torch.tensor([math.fsum(c.logprobs) for c in completions], dtype=torch.float64)
    log_weights = sir.importance_log_weights(log_p, log_q, config.alpha)
    chosen = sir.draw_by_weight(log_weights, seeds)
    stats.update(log_weights=log_weights.tolist(), chosen_sample=chosen,
                 weights_ess=resampling.effective_sample_size(log_weights))
    return Result(completions[chosen].tokens, float(log_p[chosen]), stats)


# ------------------------------------------------------------------------- the lookahead


def lookahead_program(prompt: tuple[int, ...], config: PowerConfig, max_new_tokens: int, stop: tuple[int, ...],
                      seeds: SeedStream) -> Program:
    """Power sampling by lookahead (section 2): per block, candidates (L draws, or the Top-K next
    tokens at the token level), the Top-K distinct, M rollouts of each that has a future (in
    rounds with rollouts_per_round), the estimate and the jackknife, one draw."""
    cfg, alpha = config, config.alpha
    stats = _stats("power")
    stats["blocks"] = []
    generated: list[int] = []
    loglik = 0.0
    cand_t = 1.0 / alpha if cfg.candidate_proposal == "tempered" else 1.0
    roll_t = 1.0 / alpha if cfg.rollout_proposal == "tempered" else 1.0
    while len(generated) < max_new_tokens:
        left = max_new_tokens - len(generated)
        block = min(cfg.block_size, left)
        horizon = min(cfg.horizon, left - block)
        head = prompt + tuple(generated)
        if cfg.token_level:
            [[first]] = yield [Draw(head, 1, 1.0, 1, seeds.next(), stop, top=cfg.top_k)]
            top = [(tok, lp) for tok, lp in first.top if math.isfinite(lp)][: cfg.top_k]
            candidates = [[tok] for tok, _ in top]
            cand_lp = [lp for _, lp in top]
            _add(stats, "candidates", 1)
        else:
            [drawn] = yield [Draw(head, cfg.num_candidates, cand_t, block, seeds.next(), stop)]
            _add(stats, "candidates", sum(len(c.tokens) for c in drawn))
            logp = yield from _base_logprobs([head] * len(drawn), drawn, cand_t, stats)
            logliks = [math.fsum(lp) for lp in logp]
            keep = lookahead.distinct_top_k([c.tokens for c in drawn], logliks, cfg.top_k)
            candidates = [drawn[j].tokens for j in keep]
            cand_lp = [logliks[j] for j in keep]
        ends = [_ended(c, stop) for c in candidates]
        cand = torch.tensor(cand_lp, dtype=torch.float64)
        futures = [k for k in range(len(candidates)) if horizon > 0 and not ends[k]]
        rule = "fixed" if futures else ("last block" if horizon <= 0 else "ended")
        if futures and cfg.skip_share:
            rule = lookahead.skip_rule(cand, ends, alpha, cfg.skip_share) or rule
        per_round = cfg.rollouts_per_round or cfg.num_rollouts
        columns: list[torch.Tensor] = []
        drawn_per_candidate = 0
        while rule == "fixed":  # one round of M, or rounds of rollouts_per_round while the choice is uncertain
            answers = yield [Draw(head + tuple(candidates[k]), per_round, roll_t, horizon, seeds.next(), stop)
                             for k in futures]
            rollouts = [(head + tuple(candidates[k]), c) for k, group in zip(futures, answers) for c in group]
            _add(stats, "rollouts", sum(len(c.tokens) for _, c in rollouts))
            logp = yield from _base_logprobs([p for p, _ in rollouts], [c for _, c in rollouts], roll_t, stats)
            round_scores = torch.zeros(len(candidates), per_round, dtype=torch.float64)
            for index, ((_, c), lp) in enumerate(zip(rollouts, logp)):
                k, r = futures[index // per_round], index % per_round
                if roll_t == 1.0:  # a rollout from p: its score is its log-likelihood
                    round_scores[k, r] = math.fsum(lp)
                else:  # tempered: sum_t log c_t = sum_t (alpha log p - log q), over alpha - 1 (section 6)
                    round_scores[k, r] = (alpha * math.fsum(lp) - math.fsum(c.logprobs)) / (alpha - 1.0)
            columns.append(round_scores)
            drawn_per_candidate += per_round
            if not cfg.rollouts_per_round:
                break
            rule = lookahead.round_rule(cand, torch.cat(columns, -1), alpha, drawn_per_candidate,
                                        cfg.num_rollouts, cfg.round_tolerance) or "fixed"
        scores = torch.cat(columns, -1) if columns else torch.zeros(len(candidates), 0, dtype=torch.float64)
        probs, p_hat, log_zeta = lookahead.estimate(cand, scores, alpha, cfg.jackknife)
        choice = seeds.categorical(probs)
        stats["blocks"].append({"candidates": candidates, "candidate_logprobs": cand_lp, "probs": probs.tolist(),
                                "p_hat": p_hat.tolist(), "log_zeta": log_zeta.tolist(), "choice": choice,
                                "rule": rule, "rollouts": drawn_per_candidate * len(futures)})
        generated.extend(candidates[choice])
        loglik += cand_lp[choice]
        if ends[choice]:
            break
    return Result(generated, loglik, stats)


# ------------------------------------------------------------------------- Power-SMC


def smc_program(prompt: tuple[int, ...], config: SMCConfig, max_new_tokens: int, stop: tuple[int, ...],
                seeds: SeedStream) -> Program:
    """Power-SMC by segments: N particles drawn from q = p at T = 1/alpha, R tokens per segment
    (one Draw per live particle, then one Score for log p), weights += sum_t (alpha log p - log q),
    resampled between segments where the ESS < ess_threshold x N; one particle drawn by weight."""
    cfg, alpha = config, config.alpha
    stats = _stats("smc")
    stats.update(resampling_steps=0, ess_history=[])
    num = cfg.num_particles
    tokens: list[list[int]] = [[] for _ in range(num)]
    log_w = [0.0] * num
    logliks = [0.0] * num
    done = [False] * num
    ancestors = list(range(num))
    t = 0
    while t < max_new_tokens and not all(done):
        seg = min(cfg.resample_every, max_new_tokens - t)
        live = [i for i in range(num) if not done[i]]
        heads = [prompt + tuple(tokens[i]) for i in live]
        answers = yield [Draw(h, 1, 1.0 / alpha, seg, seeds.next(), stop) for h in heads]
        drawn = [a[0] for a in answers]
        _add(stats, "sample", sum(len(c.tokens) for c in drawn))
        logp = yield from _base_logprobs(heads, drawn, 1.0 / alpha, stats)
        for i, c, lp in zip(live, drawn, logp):
            tokens[i].extend(c.tokens)
            log_w[i] += alpha * math.fsum(lp) - math.fsum(c.logprobs)
            logliks[i] += math.fsum(lp)
            done[i] = _ended(c.tokens, stop) or len(c.tokens) < seg
        t += seg
        weights = torch.tensor(log_w, dtype=torch.float64)
        ess = resampling.effective_sample_size(weights)
        stats["ess_history"].append(ess)
        last = t >= max_new_tokens or all(done)
        if not last and ess < cfg.ess_threshold * num:
            chosen, new_log_w = resampling.resample(weights, num, cfg.resampler, seeds.uniform(), cfg.eta)
            chosen = chosen.tolist()
            tokens = [list(tokens[a]) for a in chosen]
            logliks, done = [logliks[a] for a in chosen], [done[a] for a in chosen]
            ancestors = [ancestors[a] for a in chosen]
            log_w = new_log_w.tolist()
            stats["resampling_steps"] += 1
    weights = torch.tensor(log_w, dtype=torch.float64)
    pick = seeds.categorical(resampling.normalised_weights(weights))
    stats.update(unique_ancestors=len(set(ancestors)), final_ess=resampling.effective_sample_size(weights))
    return Result(tokens[pick], logliks[pick], stats)


# ------------------------------------------------------------------------- MCMC


def mcmc_program(prompt: tuple[int, ...], config: MCMCConfig, max_new_tokens: int, stop: tuple[int, ...],
                 seeds: SeedStream) -> Program:
    """Karan & Du: blocks of B tokens from q = p at T = 1/alpha; after each, mcmc_steps MH steps,
    each resampling from a uniform position m to the block's end (or EOS) and accepting with
    the shared rule (``decisions.mcmc``)."""
    alpha = config.alpha
    stats = _stats("mcmc")
    tokens: list[int] = []
    logp: list[float] = []
    logq: list[float] = []
    proposed = accepted = 0
    block_end = 0
    while block_end < max_new_tokens and not _ended(tokens, stop):
        block = min(config.block_size, max_new_tokens - block_end)
        head = prompt + tuple(tokens)
        [[c]] = yield [Draw(head, 1, 1.0 / alpha, block, seeds.next(), stop)]
        [lp] = yield from _base_logprobs([head], [c], 1.0 / alpha, stats)
        tokens, logp, logq = tokens + c.tokens, logp + list(lp), logq + list(c.logprobs)
        _add(stats, "sample", len(c.tokens))
        block_end += block
        for _ in range(config.mcmc_steps):  # each step: a proposal from m to the block's end
            m = seeds.integers(len(tokens))
            head = prompt + tuple(tokens[:m])
            [[c]] = yield [Draw(head, 1, 1.0 / alpha, block_end - m, seeds.next(), stop)]
            [lp] = yield from _base_logprobs([head], [c], 1.0 / alpha, stats)
            _add(stats, "proposals", len(c.tokens))
            log_a = mcmc.log_acceptance(alpha, list(lp), c.logprobs, logp[m:], logq[m:])
            proposed += 1
            if mcmc.accept(log_a, seeds.uniform()):
                accepted += 1
                tokens, logp, logq = tokens[:m] + c.tokens, logp[:m] + list(lp), logq[:m] + list(c.logprobs)
    stats["acceptance_rate"] = accepted / proposed if proposed else None
    return Result(tokens, math.fsum(logp), stats)


# ------------------------------------------------------------------------- running


def program_for(method: str, config, prompt: Sequence[int], max_new_tokens: int, stop: tuple[int, ...],
                seed: int) -> Program:
    """The program of ``method`` (one of METHODS) with its validated ``config`` for one prompt."""
    unsupported_settings(method, config)
    prompt, seeds = tuple(int(t) for t in prompt), SeedStream(seed)
    if method == "power":
        return lookahead_program(prompt, config, max_new_tokens, stop, seeds)
    if method == "smc":
        return smc_program(prompt, config, max_new_tokens, stop, seeds)
    if method == "mcmc":
        return mcmc_program(prompt, config, max_new_tokens, stop, seeds)
    if method == "sir":
        return importance(prompt, config, max_new_tokens, stop, seeds)
    return ancestral(prompt, config, method, max_new_tokens, stop, seeds)


def run_programs(programs: Sequence[Program], answer: Callable[[list], list]) -> list[Result]:
    """Run every program to its Result, answering the asks of all running programs with one
    call of ``answer`` per round (so the engine batches them)."""
    results: list[Result | None] = [None] * len(programs)
    pending: dict[int, list] = {}
    for i, program in enumerate(programs):
        try:
            pending[i] = next(program)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = list(pending)
        asks = [ask for i in order for ask in pending[i]]
        answers = answer(asks)
        if len(answers) != len(asks):
            raise RuntimeError(f"the engine answered {len(answers)} of {len(asks)} asks")
        start = 0
        for i in order:
            n = len(pending[i])
            mine, start = answers[start : start + n], start + n
            try:
                pending[i] = programs[i].send(mine)
            except StopIteration as stop:
                results[i] = stop.value
                del pending[i]
    return results  # type: ignore[return-value]

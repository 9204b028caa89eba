"""Power sampling by Monte Carlo lookahead and jackknife (powerfast/DESIGN.md section 2).

Per block of B tokens, for every prompt of the batch at once:

1. candidates: fork the sequence into L children and sample B tokens each from p
   (B decode steps at batch L x prompts), or from p at temperature 1/alpha with
   ``candidate_proposal="tempered"``; token level (B = 1): the Top-K next tokens;
2. merge duplicate candidate blocks, keep the Top-K by base log-likelihood;
3. rollouts: fork each kept candidate into M children and sample H tokens each from p
   (H decode steps at batch K x M x prompts); with ``rollout_proposal="tempered"`` from p
   at temperature 1/alpha, each rollout weighted by the product of its steps'
   ``sum_x p(x)^alpha`` (powerfast/DESIGN.md section 6);
4. estimate: ``powerfast.ops.jackknife`` turns candidate log-probs and rollout scores
   (log-likelihoods, or log weights / (alpha - 1)) into p_hat / jackknife probabilities
   over the candidates;
5. select: draw one candidate, which already holds the block's KV: it becomes the
   sequence; everything else is freed.

The last block (where no budget is left for rollouts) is chosen by p^alpha alone.
With ``reuse_rollouts`` the chosen candidate's rollouts, cut to the next block's length,
are the next decision's candidates (deduplicated, Top-K): their KV is already there, so
the candidate phase of that block is one decode step (the last token of each, for its
next-token logits) instead of B.
The sampler never touches KV tensors: forks, decodes and frees go through the runner.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from powerfast.core.config import PowerConfig
from powerfast.decisions.lookahead import distinct_top_k, round_rule, skip_rule
from powerfast.decisions.lookahead import rollout_ess as rollout_ess_of
from powerfast.decisions.resampling import systematic_resample
from powerfast.ops.device import upload_ints
from powerfast.ops.jackknife import _power_estimates_nosync
from powerfast.ops.topk import topk_logprobs
from powerfast.samplers.base import RunnerSampler, appended_pages, pages_for
from powerfast.samplers.decoding import check_no_nan, continuations_program, nan_flag, phase, raise_on_nan, to_host
from powerfast.samplers.program import Decode, Final, Prefill, drive
from powerfast.samplers.results import BlockRecord, GenerationStats

__all__ = ["PowerSampler", "Decision"]


@dataclass(slots=True)
class Decision:
    """The scored candidates of one prompt at one block (internal, then recorded)."""

    candidates: list[list[int]]
    candidate_seqs: list
    candidate_logprobs: torch.Tensor  # (K,) float32, on the host
    ends_with_eos: list[bool]
    last_logits: torch.Tensor  # (K, V) logits after each candidate block


class PowerSampler(RunnerSampler):
    """Samples from p(x)^alpha with the Monte Carlo lookahead of the paper.

    model:     a Hugging Face causal LM, or a runner (:class:`powerfast.runtime.protocol.Runner`)
    tokenizer: optional; needed for string prompts and for ``text`` in the results
    config:    :class:`PowerConfig`
    seed:      makes ``generate`` reproducible (None: fresh randomness)
    runner_kwargs: passed to the ModelRunner built around ``model`` (page_size, num_pages, ...)
    """

    method = "power"

    def __init__(self, model, tokenizer=None, config: PowerConfig | None = None, seed: int | None = None,
                 **runner_kwargs) -> None:
        self.config = config if config is not None else PowerConfig()
        if not isinstance(self.config, PowerConfig):
            raise ValueError(f"config must be a PowerConfig, got {type(self.config).__name__}")
        super().__init__(model, tokenizer, seed, **runner_kwargs)
        if self.config.token_level and self.config.top_k > self.vocab_size:
            raise ValueError(f"top_k ({self.config.top_k}) exceeds the vocabulary size ({self.vocab_size})")

    # ------------------------------------------------------------------ public API

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """Power-sample a completion for each prompt (a step program); the prompts share
        decode batches. ``progress`` is called after each block; with ``stream`` each chosen
        block is yielded as ``Final``."""
        started = time.perf_counter()
        stats = [GenerationStats(self.method) for _ in prompt_ids]
        generated: list[list[int]] = [[] for _ in prompt_ids]
        logliks = [0.0 for _ in prompt_ids]
        live: list = []  # every sequence this call holds, freed at the end whatever happens
        try:
            with phase("prefill"):
                seqs, logits = yield Prefill(prompt_ids)
            live.extend(seqs)
            check_no_nan(logits, "prefill")
            for i, ids in enumerate(prompt_ids):
                stats[i].add("prefill", len(ids))
            open_prompts = list(range(len(prompt_ids)))
            heads = {i: (seqs[i], logits[i]) for i in open_prompts}
            reused: dict[int, Decision] = {}  # next decision's candidates taken from rollouts
            while open_prompts:
                # prompts with the same budget decide together (all of them, unless entropy_cut
                # made their blocks differ in length)
                groups: dict[int, list[int]] = {}
                for i in open_prompts:
                    groups.setdefault(max_new_tokens - len(generated[i]), []).append(i)
                decisions = {}
                for budget, group in groups.items():
                    decisions.update((yield from self._decide(group, heads, budget, eos, stats, live,
                                                              reused={i: reused[i] for i in group if i in reused})))
                    if len(groups) > 1:  # (entropy_cut, so no reuse) free the group's losers now
                        for i in group:
                            heads[i] = (decisions[i][2], decisions[i][3])
                        keep = {id(heads[j][0]) for j in heads}
                        self.runner.free([s for s in live if id(s) not in keep])
                        live[:] = [s for s in live if id(s) in keep]
                still_open = []
                reused = {}
                for i in open_prompts:
                    chosen, record, seq, last_logits, next_candidates = decisions[i]
                    if next_candidates is not None:
                        reused[i] = next_candidates
                    generated[i].extend(chosen)
                    if stream and chosen:
                        yield Final(i, list(chosen))
                    logliks[i] += record.candidate_logprobs[record.choice]
                    stats[i].blocks.append(record)
                    stats[i].num_blocks += 1
                    heads[i] = (seq, last_logits)
                    if not (chosen and chosen[-1] in eos) and len(generated[i]) < max_new_tokens:
                        still_open.append(i)
                keep = {id(heads[i][0]) for i in heads}
                keep.update(id(c) for d in reused.values() for c in d.candidate_seqs)
                self.runner.free([s for s in live if id(s) not in keep])
                live = [s for s in live if id(s) in keep]
                open_prompts = still_open
                if progress is not None:
                    progress(max(len(generated[i]) for i in range(len(prompt_ids))), max_new_tokens)
        finally:
            self.runner.free(live)
        elapsed = time.perf_counter() - started
        for s in stats:
            s.wall_seconds = elapsed
        return [self.result(generated[i], stats[i], logliks[i]) for i in range(len(prompt_ids))]

    def token_distribution(self, prompt_ids: Sequence[int], max_new_tokens: int, *, ignore_eos: bool = False):
        """The estimated power conditional of the next token (block_size 1) or block.

        returns (candidate_ids, probs): at block_size 1 a (K,) int64 tensor of token ids,
        otherwise a list of K token-id lists; probs (K,) float64 on the CPU (jackknife or
        plain, as configured).
        """
        [record] = self.decisions([list(prompt_ids)], max_new_tokens, ignore_eos=ignore_eos)
        probs = torch.tensor(record.probs, dtype=torch.float64)
        if self.config.token_level:
            return torch.tensor([c[0] for c in record.candidates], dtype=torch.long), probs
        return record.candidates, probs

    def decisions(self, prompts, max_new_tokens: int, *, ignore_eos: bool = False,
                  chat_template: bool = True) -> list[BlockRecord]:
        """The first decision for each prompt, estimated independently (own candidates and
        rollouts) and not taken: candidates with their log-probs, p_hat, the configured
        probabilities and log zeta. Prompts may repeat: each copy is a fresh estimate."""
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        eos = () if ignore_eos else self.runner.eos_token_ids
        decided = drive(self._first_decisions(prompt_ids, max_new_tokens, eos), self.runner)
        return [decided[i][1] for i in range(len(prompt_ids))]

    def _first_decisions(self, prompt_ids: list[list[int]], max_new_tokens: int, eos):
        """The step program of :meth:`decisions`."""
        live: list = []
        try:
            seqs, logits = yield Prefill(prompt_ids)
            live.extend(seqs)
            check_no_nan(logits, "prefill")
            stats = [GenerationStats(self.method) for _ in prompt_ids]
            heads = {i: (seqs[i], logits[i]) for i in range(len(prompt_ids))}
            return (yield from self._decide(list(heads), heads, max_new_tokens, eos, stats, live, select=False))
        finally:
            self.runner.free(live)

    def peak_kv_pages(self, prompt_lengths: list[int], max_new_tokens: int, page_size: int) -> int:
        """Most KV pages a ``generate`` holds at once: at each decision, per prompt, the
        sequence so far, L candidate blocks (K next tokens at token level) and K x M rollouts
        (a rollout of H tokens decodes H - 1: its last token's KV is never needed)."""
        cfg = self.config
        num_candidates = min(cfg.top_k, self.vocab_size) if cfg.token_level else cfg.num_candidates
        num_rollouts = min(cfg.top_k, num_candidates) * cfg.num_rollouts
        peak_of_prompt = {}
        for length in set(prompt_lengths):
            peak = 0
            # tokens generated before each decision: multiples of B, or any count when entropy_cut
            # may end a block early
            for done in range(0, max_new_tokens, 1 if cfg.entropy_cut else cfg.block_size):
                block = min(cfg.block_size, max_new_tokens - done)
                # a cut block may be 1 token long, its rollouts as long as the budget after it
                horizon = min(cfg.horizon, max_new_tokens - done - (1 if cfg.entropy_cut else block))
                here = length + done
                need = (pages_for(here, page_size)
                        + num_candidates * appended_pages(here, block, page_size)
                        + num_rollouts * appended_pages(here + block, horizon - 1, page_size))
                peak = max(peak, need)
            peak_of_prompt[length] = peak
        return sum(peak_of_prompt[length] for length in prompt_lengths)

    # --------------------------------------------------------------- one decision

    def _decide(self, prompts: list[int], heads: dict, budget: int, eos, stats, live: list, select: bool = True,
                reused: dict | None = None):
        """Candidates, rollouts, estimate and choice for every open prompt at once (a step program).

        heads[i] = (sequence, next-token logits (V,)); reused[i], where given, is prompt i's
        candidate set taken from the previous decision's rollouts. Returns, per prompt,
        (chosen tokens, BlockRecord, the chosen candidate's sequence, its next-token
        logits, the next decision's candidates from the rollouts or None).
        ``eos`` is the tuple of ids that end a sequence (empty with ignore_eos).
        """
        cfg = self.config
        block = min(cfg.block_size, budget)
        horizon = min(cfg.horizon, budget - block)
        reused = reused or {}
        fresh = [i for i in prompts if i not in reused]
        decisions = dict(reused)
        with phase("candidates"):
            if not fresh:
                pass
            elif cfg.token_level:
                decisions.update((yield from self._token_candidates(fresh, heads, eos, stats, live)))
            else:
                decisions.update((yield from self._block_candidates(fresh, heads, block, eos, stats, live)))

        if cfg.entropy_cut:  # blocks cut short leave budget for rollouts: the shortest one's
            shortest = min((len(c) for i in prompts for c in decisions[i].candidates), default=block)
            horizon = min(cfg.horizon, budget - shortest)
        # rollouts from every candidate that has a future (not ended, budget left), in one
        # round of M or (rollouts_per_round) in rounds while the choice is uncertain
        resampled = bool(cfg.rollout_resample_every)
        per_round = cfg.rollouts_per_round or cfg.num_rollouts
        futures = {i: [k for k in range(len(decisions[i].candidates))
                       if horizon > 0 and not decisions[i].ends_with_eos[k]] for i in prompts}
        rule = {i: "fixed" if futures[i] else ("last block" if horizon <= 0 else "ended") for i in prompts}
        if cfg.skip_share:
            for i in prompts:
                if futures[i]:
                    rule[i] = self._skip_rule(decisions[i]) or rule[i]
        columns: dict[int, list[torch.Tensor]] = {i: [] for i in prompts}  # (K_i, c) host blocks per round
        weights_of: dict[tuple[int, int], list[torch.Tensor]] = {}  # ESS input per (prompt, candidate)
        rollout_ess: dict[int, list[float | None]] = {i: [None] * len(decisions[i].candidates) for i in prompts}
        used = {i: 0 for i in prompts}
        rollout_rows: dict[tuple[int, int], int] = {}
        rollouts = rollout_seqs = rollout_starts = None
        reuse = cfg.reuse_rollouts and select
        todo = [i for i in prompts if rule[i] == "fixed"]
        rounds = 0
        while todo:
            needs_rollouts = [(i, k) for i in todo for k in futures[i]]
            per_candidate, ess_input, lengths, rollouts, rollout_seqs, rollout_starts = yield from self._rollout_round(
                needs_rollouts, decisions, per_round, horizon, eos, live, reuse)
            rounds += 1
            blocks = {i: torch.zeros(len(decisions[i].candidates), per_candidate.shape[-1]) for i in todo}
            for row, (i, k) in enumerate(needs_rollouts):
                blocks[i][k] = per_candidate[row]
                weights_of.setdefault((i, k), []).append(ess_input[row])
                rollout_rows[(i, k)] = row
                stats[i].add("rollouts", int(lengths[row]))
            for i in todo:
                columns[i].append(blocks[i])
                used[i] += per_round * len(futures[i])
            if not cfg.rollouts_per_round:
                break
            todo = [i for i in todo if self._another_round(decisions[i], columns[i], rounds, rule, i)]
        for (i, k), parts in weights_of.items():
            if resampled:  # the last round's last stage
                rollout_ess[i][k] = float(parts[-1])
            else:
                rollout_ess[i][k] = rollout_ess_of(torch.cat(parts))

        with phase("score"):
            # prompts with the same number of columns share one estimate (all of them with a
            # fixed budget); a prompt without rollouts gets zero columns (log zeta_hat = 0)
            default = cfg.rollout_groups if resampled else cfg.num_rollouts
            rolls_of = {i: torch.cat(columns[i], -1) if columns[i] else torch.zeros(len(decisions[i].candidates),
                                                                                   default)
                        for i in prompts}
            by_count: dict[int, list[int]] = {}
            for i in prompts:
                by_count.setdefault(rolls_of[i].shape[-1], []).append(i)
            device = decisions[prompts[0]].last_logits.device
            estimated = {}
            for count, group in by_count.items():
                k_max = max(len(decisions[i].candidates) for i in group)
                cand = torch.full((len(group), k_max), -math.inf, dtype=torch.float32)
                rolls = torch.zeros(len(group), k_max, count, dtype=torch.float32)
                for row, i in enumerate(group):
                    k_i = len(decisions[i].candidates)
                    cand[row, :k_i] = decisions[i].candidate_logprobs.float()  # host tensors (the candidates' copy)
                    rolls[row, :k_i] = rolls_of[i]
                estimate = _power_estimates_nosync(cand.to(device), rolls.to(device), cfg.alpha,
                                                   cfg.jackknife and count >= 2)
                probs, p_hat, log_zeta = (t.double() for t in to_host(*estimate))  # one copy
                for row, i in enumerate(group):
                    k_i = len(decisions[i].candidates)
                    estimated[i] = (probs[row, :k_i], p_hat[row, :k_i], log_zeta[row, :k_i])

        out = {}
        with phase("select"):
            for i in prompts:
                d = decisions[i]
                probs, p_hat, log_zeta = estimated[i]
                choice = self.seeds.categorical(probs) if select else int(torch.argmax(probs))
                record = BlockRecord(
                    candidates=d.candidates,
                    candidate_logprobs=d.candidate_logprobs.double().tolist(),
                    p_hat=p_hat.tolist(),
                    probs=probs.tolist(),
                    log_zeta=log_zeta.tolist(),
                    choice=choice,
                    rollout_ess=rollout_ess[i],
                    rule=rule[i],
                    rollouts=used[i],
                    rollouts_saved=cfg.num_rollouts * len(futures[i]) - used[i],
                )
                out[i] = (d.candidates[choice], record, d.candidate_seqs[choice], d.last_logits[choice], None)
        if rollouts is not None and cfg.reuse_rollouts and select:
            with phase("reuse"):
                yield from self._reuse(out, prompts, rollouts, rollout_seqs, rollout_rows, rollout_starts, budget, eos, stats, live)
        return out

    def _skip_rule(self, decision: Decision) -> str | None:
        """skip_share's rule (:func:`powerfast.decisions.lookahead.skip_rule`) for one decision."""
        return skip_rule(decision.candidate_logprobs, decision.ends_with_eos, self.config.alpha,
                         self.config.skip_share)

    def _another_round(self, decision: Decision, columns: list[torch.Tensor], rounds: int, rule: dict,
                       i: int) -> bool:
        """After round ``rounds`` of a prompt's rollouts: another one while the rounds rule
        (:func:`powerfast.decisions.lookahead.round_rule`) says so; else records why it stopped."""
        cfg = self.config
        stop = round_rule(decision.candidate_logprobs, torch.cat(columns, -1), cfg.alpha,
                          rounds * cfg.rollouts_per_round, cfg.num_rollouts, cfg.round_tolerance)
        if stop is not None:
            rule[i] = stop
            return False
        return True

    def _rollout_round(self, needs: list[tuple[int, int]], decisions: dict, num: int, horizon: int, eos,
                       live: list, keep: bool):
        """``num`` rollouts of up to ``horizon`` tokens from each (prompt, candidate) of
        ``needs`` (a step program).

        Returns (the estimator's columns (C, c) host float32: one per rollout, or per group
        of resampled rollouts; the ESS input per candidate: (C, num) host float64 log
        weights, or (C,) the last resampling stage's ESS; (C,) host tokens decoded; the
        rollouts' decode output (None when resampled); the rollout sequences; each
        candidate's length where its rollouts start). The sequences are freed unless
        ``keep`` (reuse: the chosen candidate's rollouts become the next candidates).
        """
        cfg = self.config
        with phase("fork"):
            rollout_seqs, first_logits, rollout_starts = [], [], []
            for i, k in needs:
                rollout_starts.append(decisions[i].candidate_seqs[k].length)
                children = self.runner.fork(decisions[i].candidate_seqs[k], num)
                live.extend(children)
                rollout_seqs.extend(children)
                first_logits.append(decisions[i].last_logits[k].expand(num, -1))
        tempered = cfg.rollout_proposal == "tempered"
        resampled = bool(cfg.rollout_resample_every)
        groups = num // (cfg.num_rollouts // cfg.rollout_groups) if resampled else num
        rollouts = None
        with phase("rollouts"):
            if resampled:
                weights, decoded, stage_ess, nan, rollout_seqs = yield from self._resampled_rollouts(
                    rollout_seqs, torch.cat(first_logits), horizon, eos, live, len(needs), num, groups)
            else:
                rollouts = yield from continuations_program(
                    rollout_seqs, torch.cat(first_logits), horizon, self.seeds, eos_token_id=eos,
                    temperature=1.0 / cfg.alpha if tempered else 1.0, want_log_power_sums=tempered,
                    per_token=keep,
                )
        if not keep:
            self.runner.free(rollout_seqs)
            drop = {id(s) for s in rollout_seqs}
            live[:] = [s for s in live if id(s) not in drop]
        shape = (len(needs), groups)
        if resampled:
            # one column per group: log zeta_hat of the group, handed as the rollout score
            # whose (alpha - 1) multiple the estimator averages (see the tempered case)
            scores = weights / (cfg.alpha - 1.0) if cfg.alpha != 1.0 else torch.zeros_like(weights)
            per_candidate, lengths, ess, nan = to_host(scores.float().view(shape), decoded, stage_ess, nan)
            raise_on_nan(nan, "rollouts")
            return per_candidate, ess, lengths, None, rollout_seqs, rollout_starts
        if tempered:
            # log weight of a rollout = sum_t log c_t; the estimator weighs (alpha - 1) * score,
            # so hand it log weight / (alpha - 1) (at alpha = 1 every weight is 0 either way)
            weights = rollouts.log_power_sums.double()
            scores = weights / (cfg.alpha - 1.0) if cfg.alpha != 1.0 else torch.zeros_like(weights)
        else:
            weights = (cfg.alpha - 1.0) * rollouts.base_logliks.double()
            scores = rollouts.base_logliks
        # one device-to-host copy for the round: what the estimate and the records need
        per_candidate, log_weights, lengths, nan = to_host(
            scores.float().view(shape), weights.view(shape), rollouts.lengths.view(shape).sum(-1),
            nan_flag(rollouts.base_logliks))
        raise_on_nan(nan, "rollouts")
        return per_candidate, log_weights, lengths, rollouts, rollout_seqs, rollout_starts

    def _resampled_rollouts(self, seqs: list, logits: torch.Tensor, horizon: int, eos, live: list,
                            num_candidates: int, num: int, groups: int):
        """Tempered rollouts resampled every R tokens within independent groups (a step program).

        The ``num`` rollouts of each candidate are ``groups`` groups of M / G (a round of
        rollouts_per_round holds fewer groups than G). Each group is a sequential
        Monte Carlo run over the rollout tokens: at every token a rollout's weight is
        multiplied by c_t = sum_x p(x | h_t)^alpha (the tempered proposal's normaliser); every
        R tokens the group's stage weights are averaged into its estimate and the group is
        resampled systematically (survivors forked, the rest freed: no KV is copied), the
        weights reset. log zeta_hat of a group is the sum over stages of the log mean stage
        weight: unbiased for zeta, as every such product is. The groups are independent, so
        the jackknife leaves one group out (not one rollout: rollouts in a group are not).

        Returns ((C, G) float64 log zeta_hat per group, (C,) tokens decoded per candidate,
        (C,) ESS of the last stage's weights over the M rollouts, a NaN flag (device
        tensors), the rollout sequences now held).
        """
        cfg = self.config
        size = num // groups
        device = logits.device
        log_zeta = torch.zeros(num_candidates, groups, dtype=torch.float64, device=device)
        decoded = torch.zeros(num_candidates, dtype=torch.long, device=device)
        nan = torch.zeros((), dtype=torch.bool, device=device)
        active, done = None, 0
        while True:
            length = min(cfg.rollout_resample_every, horizon - done)
            last = done + length == horizon
            out = yield from continuations_program(
                seqs, logits, length, self.seeds, eos_token_id=eos, temperature=1.0 / cfg.alpha,
                want_log_power_sums=True, want_last_logits=not last, active=active)
            stage = out.log_power_sums.double().view(num_candidates, groups, size)
            log_zeta += torch.logsumexp(stage, -1) - math.log(size)
            decoded += out.lengths.view(num_candidates, num).sum(-1)
            nan = nan | nan_flag(out.base_logliks)
            done += length
            if last:
                flat = stage.view(num_candidates, num)
                ess = torch.exp(2 * torch.logsumexp(flat, -1) - torch.logsumexp(2 * flat, -1))
                return log_zeta, decoded, ess, nan, seqs
            [host_stage] = to_host(stage)  # one copy per stage: the resampling decisions
            ancestors = []
            for c in range(num_candidates):
                for g in range(groups):
                    first = (c * groups + g) * size
                    chosen, _ = systematic_resample(host_stage[c, g], size, self.seeds.uniform())
                    ancestors.extend(first + a for a in chosen.tolist())
            children = {row: self.runner.fork(seqs[row], count) for row, count in sorted(Counter(ancestors).items())}
            survivors = [children[row].pop() for row in ancestors]
            live.extend(survivors)
            self.runner.free(seqs)
            drop = {id(s) for s in seqs}
            live[:] = [s for s in live if id(s) not in drop]
            index = upload_ints(ancestors, torch.long, device)
            seqs, logits, active = survivors, out.last_logits[index], out.active[index]

    def _reuse(self, out: dict, prompts: list[int], rollouts, rollout_seqs: list, rollout_rows: dict,
               rollout_starts: list[int], budget: int, eos, stats, live: list) -> None:
        """Turn the chosen candidate's rollouts into the next decision's candidates (in
        ``out[i][4]``), then free every rollout sequence.

        Each rollout cut to the next block's length (or its EOS) is a candidate block whose
        KV is already cached; duplicates merge, the Top-K by base log-likelihood stay. A
        kept one is forked one token short and that token decoded again, which gives its
        next-token logits (the rollout did not keep them): one decode step at batch K.
        A step program.
        """
        cfg = self.config
        num = cfg.num_rollouts
        tokens, lengths, token_logprobs = to_host(rollouts.tokens, rollouts.lengths, rollouts.token_logprobs)
        lengths = lengths.tolist()
        pending = []  # (prompt, candidates, logliks, seqs)
        for i in prompts:
            chosen, record, _, _, _ = out[i]
            row = rollout_rows.get((i, record.choice))
            remaining = budget - len(chosen)
            if row is None or remaining <= 0 or (chosen and chosen[-1] in eos):
                continue
            block = min(cfg.block_size, remaining)
            seen: dict[tuple[int, ...], int] = {}
            for j in range(row * num, (row + 1) * num):
                key = tuple(tokens[j, : min(lengths[j], block)].tolist())
                if key and key not in seen:
                    seen[key] = j
            logliks = {key: float(token_logprobs[j, : len(key)].sum()) for key, j in seen.items()}
            kept = sorted(seen, key=lambda key: -logliks[key])[: cfg.top_k]
            seqs = []
            for key in kept:
                source = rollout_seqs[seen[key]]
                [child] = self.runner.fork(source, 1, length=rollout_starts[seen[key] // num] + len(key) - 1)
                live.append(child)
                seqs.append(child)
            pending.append((i, [list(key) for key in kept], torch.tensor([logliks[k] for k in kept]), seqs))
        if pending:
            all_seqs = [s for _, _, _, seqs in pending for s in seqs]
            last_tokens = [c[-1] for _, cands, _, _ in pending for c in cands]  # the runner uploads them, no sync
            last_logits = yield Decode(all_seqs, last_tokens)
            check_no_nan(last_logits, "reused candidates")
            start = 0
            for i, candidates, logliks, seqs in pending:
                n = len(candidates)
                decision = Decision(candidates, seqs, logliks, [c[-1] in eos for c in candidates],
                                    last_logits[start : start + n])
                start += n
                stats[i].add("refresh", n)
                chosen, record, seq, logits, _ = out[i]
                out[i] = (chosen, record, seq, logits, decision)
        self.runner.free(rollout_seqs)
        drop = {id(s) for s in rollout_seqs}
        live[:] = [s for s in live if id(s) not in drop]

    def _token_candidates(self, prompts, heads, eos, stats, live) -> dict[int, Decision]:
        """Token level: the Top-K next tokens (those with probability > 0) of each prompt (a step program)."""
        k = min(self.config.top_k, self.vocab_size)
        logits = torch.stack([heads[i][1] for i in prompts])
        token_ids, logprobs = to_host(*topk_logprobs(logits, k))  # one copy
        all_seqs, all_tokens = [], []
        decisions = {}
        for row, i in enumerate(prompts):
            keep = torch.isfinite(logprobs[row])
            ids = token_ids[row][keep].tolist()
            children = self.runner.fork(heads[i][0], len(ids))
            live.extend(children)
            all_seqs.extend(children)
            all_tokens.extend(ids)
            decisions[i] = Decision([[t] for t in ids], children, logprobs[row][keep],
                                    [t in eos for t in ids], None)
            stats[i].add("candidates", len(ids))
        last_logits = yield Decode(all_seqs, torch.tensor(all_tokens, device=logits.device))
        check_no_nan(last_logits, "candidates")
        start = 0
        for i in prompts:
            n = len(decisions[i].candidates)
            decisions[i].last_logits = last_logits[start : start + n]
            start += n
        return decisions

    def _block_candidates(self, prompts, heads, block, eos, stats, live) -> dict[int, Decision]:
        """Block level: L sampled blocks per prompt (from p, or from p at T = 1/alpha with
        ``candidate_proposal="tempered"``), duplicates merged, Top-K kept by base
        log-likelihood (a step program)."""
        num = self.config.num_candidates
        seqs, first_logits = [], []
        for i in prompts:
            children = self.runner.fork(heads[i][0], num)
            live.extend(children)
            seqs.extend(children)
            first_logits.append(heads[i][1].expand(num, -1))
        # tempered candidates are drawn at T = 1/alpha; their base log-likelihoods rank and weigh them
        temperature = 1.0 / self.config.alpha if self.config.candidate_proposal == "tempered" else 1.0
        sampled = yield from continuations_program(
            seqs, torch.cat(first_logits), block, self.seeds, eos_token_id=eos, want_last_logits=True,
            stop_entropy=self.config.entropy_cut, stop_after=self.config.entropy_cut_after, temperature=temperature,
        )
        # one device-to-host copy for the phase: tokens, lengths, log-likelihoods, the NaN check
        tokens, lengths, logliks, nan = to_host(sampled.tokens, sampled.lengths, sampled.base_logliks,
                                                nan_flag(sampled.base_logliks))
        raise_on_nan(nan, "candidates")
        lengths = lengths.tolist()
        decisions = {}
        for row, i in enumerate(prompts):
            drawn = range(row * num, (row + 1) * num)
            blocks = [tokens[j, : lengths[j]].tolist() for j in drawn]
            unique = [drawn[j] for j in distinct_top_k(blocks, logliks[row * num : (row + 1) * num].tolist(),
                                                       self.config.top_k)]
            candidates = [tokens[j, : lengths[j]].tolist() for j in unique]
            kept = [seqs[j] for j in unique]
            if self.config.entropy_cut:  # a block cut short: its sequence was fed on; cut it back
                start = heads[i][0].length
                for index, (j, candidate) in enumerate(zip(unique, candidates)):
                    if kept[index].length > start + len(candidate) and not (candidate and candidate[-1] in eos):
                        [child] = self.runner.fork(kept[index], 1, length=start + len(candidate))
                        live.append(child)
                        self.runner.free([kept[index]])
                        live[:] = [s for s in live if s is not kept[index]]
                        kept[index] = child
            decisions[i] = Decision(
                candidates,
                kept,
                logliks[unique],
                [len(c) > 0 and c[-1] in eos for c in candidates],
                sampled.last_logits[torch.tensor(unique, device=sampled.last_logits.device)],
            )
            stats[i].add("candidates", sum(lengths[row * num : (row + 1) * num]))
        return decisions

"""Adaptive rollout budgets of the power sampler (skip_share, rollouts_per_round) on cases
whose answer is known, and the jackknife standard error they rest on."""

import math

import pytest
from conftest import fresh_seed
import torch
from test_lookahead import random_table_lm

from powerfast.core.config import PowerConfig
from powerfast.ops import jackknife
from powerfast.runtime.lm import TableLM
from powerfast.runtime.lm_runner import LMRunner
from powerfast.samplers.power import PowerSampler

SEED = fresh_seed()
PROMPT = [0, 1]


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")


# ------------------------------------------------------------- the standard error


def test_choice_standard_error_matches_the_jackknife_by_hand():
    """Against a float64 loop: leave column s out of every candidate, recompute p_hat, and
    take sqrt((n - 1) / n * sum_s (p_(-s) - mean)^2); fresh random inputs each run."""
    generator = torch.Generator().manual_seed(SEED)
    alpha, rows, k, n = 3.0, 4, 5, 6
    cand = torch.log_softmax(torch.randn(rows, k, generator=generator, dtype=torch.float64), -1)
    rolls = -torch.rand(rows, k, n, generator=generator, dtype=torch.float64) * 4
    got = jackknife.choice_standard_error(cand, rolls, alpha)
    for r in range(rows):
        loo = []
        for s in range(n):
            keep = [j for j in range(n) if j != s]
            log_zeta = torch.logsumexp((alpha - 1) * rolls[r][:, keep], -1) - math.log(n - 1)
            loo.append(torch.softmax(alpha * cand[r] + log_zeta, -1))
        loo = torch.stack(loo)
        want = ((n - 1) / n * (loo - loo.mean(0)).square().sum(0)).sqrt()
        torch.testing.assert_close(got[r], want, rtol=1e-12, atol=1e-15)
    # equal columns: nothing varies, the error is 0
    flat = rolls[..., :1].expand(rows, k, n)
    assert float(jackknife.choice_standard_error(cand, flat, alpha).abs().max()) < 1e-15
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        jackknife.choice_standard_error(cand, rolls[..., :1], alpha)


# ------------------------------------------------------------------- the rules


def forced_lm(vocab=4):
    """Token 1 after every prefix shorter than 6, then a random law (fixed per prefix)."""
    other = random_table_lm(vocab, SEED + 3)

    def next_token(prefix):
        if len(prefix) < 6:
            return {1: 1.0}
        return {t: float(p) for t, p in enumerate(other.next_token_probs(list(prefix)).tolist())}

    return TableLM(next_token, vocab)


def run(model, prompts=(PROMPT,), max_new=8, **settings):
    config = PowerConfig(**{"alpha": 4.0, "block_size": 4, "num_candidates": 4, "top_k": 3, "num_rollouts": 4,
                            "horizon": 4, **settings})
    runner = LMRunner(model)
    results = PowerSampler(runner, config=config, seed=SEED).generate([list(p) for p in prompts], max_new)
    assert runner.live_sequences == 0
    return results


def test_identical_candidates_skip_their_rollouts():
    """The first block is forced (token 1 four times): its L candidates merge into one, and
    skip_share decodes no rollout for it; without the rule the fixed lookahead spends M."""
    model = forced_lm()
    [fixed] = run(model)
    [skipped] = run(model, skip_share=0.99)
    first_fixed, first_skipped = fixed.stats.blocks[0], skipped.stats.blocks[0]
    assert first_fixed.candidates == first_skipped.candidates == [[1, 1, 1, 1]]
    assert (first_fixed.rule, first_fixed.rollouts, first_fixed.rollouts_saved) == ("fixed", 4, 0)
    assert (first_skipped.rule, first_skipped.rollouts, first_skipped.rollouts_saved) == ("one candidate", 0, 4)
    assert first_skipped.rollout_ess == [None] and first_skipped.probs == [1.0]
    last = skipped.stats.blocks[-1]
    assert last.rule == "last block" and last.rollouts == 0 and last.rollouts_saved == 0
    assert skipped.stats.tokens_by_phase.get("rollouts", 0) == fixed.stats.tokens_by_phase["rollouts"] - 4 * 4


def two_way_lm(share_logit):
    """Token level: after the prompt, tokens 0 and 1 with logits (share_logit, 0); then a fixed
    random law."""
    other = random_table_lm(3, SEED + 5)

    def next_token(prefix):
        if len(prefix) == len(PROMPT):
            p0 = 1.0 / (1.0 + math.exp(-share_logit))
            return {0: p0, 1: 1.0 - p0}
        return {t: float(p) for t, p in enumerate(other.next_token_probs(list(prefix)).tolist())}

    return TableLM(next_token, 3)


@pytest.mark.parametrize("share_logit, decided", [(3.0, True), (0.2, False)])
def test_a_decisive_decision_skips_and_a_close_one_does_not(share_logit, decided):
    """p^alpha shares of the two first tokens: logit 3 at alpha 4 gives the top one
    1 / (1 + e^-12) > 0.99999 (skipped at skip_share 0.9999); logit 0.2 gives 0.69 (rollouts)."""
    model = two_way_lm(share_logit)
    [result] = run(model, max_new=4, block_size=1, top_k=2, num_candidates=2, skip_share=0.9999)
    first = result.stats.blocks[0]
    share = 1.0 / (1.0 + math.exp(-4 * share_logit))
    assert (first.rule == "decided") is decided, (first.rule, share)
    if decided:
        assert first.rollouts == 0 and first.rollouts_saved == 2 * 4
        assert first.probs == pytest.approx([share, 1 - share], rel=1e-6)  # p^alpha alone
        assert first.log_zeta == [0.0, 0.0]
    else:
        assert first.rule == "fixed" and first.rollouts == 8


@pytest.mark.parametrize("top_ends", [False, True])
def test_no_skip_when_an_ended_candidate_may_outweigh_the_top_one(top_ends):
    """Token level, first decision: token 0 or the EOS token (2), p = 0.8 / 0.2, a top p^alpha
    share of 4^4 / (4^4 + 1) = 0.996 >= skip_share 0.99. Token 0's future is 4 fair coin flips
    (H = 4), so its zeta is (1/2)^(3 x 4) exactly, every rollout alike; the ended candidate's is
    1. With the top candidate not ended the rollouts must run, and they turn the choice around
    (the ended one gets 1 / (1 + 4^4 / 2^12) = 0.941); an ended top candidate has the largest
    zeta and skips."""
    top, other = (2, 0) if top_ends else (0, 2)

    def next_token(prefix):
        if len(prefix) == len(PROMPT):
            return {top: 0.8, other: 0.2}
        return {0: 0.5, 1: 0.5}

    model = TableLM(next_token, 3, eos_token_id=2)
    [result] = run(model, max_new=6, block_size=1, top_k=2, num_candidates=2, skip_share=0.99)
    first = result.stats.blocks[0]
    by_token = {c[0]: k for k, c in enumerate(first.candidates)}
    if top_ends:
        assert first.rule == "decided" and first.rollouts == 0 and first.log_zeta == [0.0, 0.0]
        assert first.probs[by_token[2]] == pytest.approx(256 / 257, rel=1e-6)
    else:
        assert first.rule == "fixed" and first.rollouts == 4  # M = 4 rollouts of the candidate with a future
        assert first.log_zeta[by_token[2]] == 0.0
        assert first.log_zeta[by_token[0]] == pytest.approx(12 * math.log(0.5), rel=1e-5)
        assert first.probs[by_token[2]] == pytest.approx(1 / (1 + 256 / 4096), rel=1e-5)


def test_rounds_stop_after_the_first_when_the_rollouts_agree():
    """Forced futures: every rollout of a candidate is the same sequence, so every column is
    equal, the standard error is 0 and one round of 2 suffices (of M = 8)."""
    def next_token(prefix):
        if len(prefix) == len(PROMPT):
            return {0: 0.6, 1: 0.4}
        return {2: 1.0}

    [result] = run(TableLM(next_token, 3), max_new=4, block_size=1, top_k=2, num_candidates=2, num_rollouts=8,
                   rollouts_per_round=2, round_tolerance=1e-9)
    first = result.stats.blocks[0]
    assert (first.rule, first.rollouts, first.rollouts_saved) == ("converged", 2 * 2, 2 * 6)
    # then one candidate (token 2) with horizons 2 and 1, converged at once too
    assert [b.rule for b in result.stats.blocks] == ["converged", "converged", "converged", "last block"]
    assert result.stats.tokens_by_phase["rollouts"] == 2 * 2 * 3 + 1 * 2 * 2 + 1 * 2 * 1


def test_rounds_go_on_to_m_while_the_choice_is_uncertain_and_the_estimate_uses_them_all():
    """A random model (flat laws) and a tolerance no estimate meets: a decision runs M /
    per_round rounds (rule "all rounds") unless every column came out equal (then its error
    is 0: "converged" early, possible when all rollouts of every candidate coincide, e.g. at
    horizon 1); when every decision ran all rounds, it decoded exactly what the fixed
    lookahead decodes."""
    model = random_table_lm(4, SEED + 9, temperature=0.3)
    [rounds] = run(model, max_new=5, block_size=1, top_k=4, num_rollouts=6, rollouts_per_round=2,
                   round_tolerance=1e-12)
    [fixed] = run(model, max_new=5, block_size=1, top_k=4, num_rollouts=6)
    blocks = rounds.stats.blocks[:-1]
    for block in blocks:
        k = len(block.candidates)
        if block.rule == "all rounds":
            assert block.rollouts == 6 * k and block.rollouts_saved == 0
        else:
            assert block.rule == "converged" and block.rollouts in (2 * k, 4 * k), (block.rule, block.rollouts)
        assert all(e is not None and 1.0 <= e <= 6.0 + 1e-9 for e in block.rollout_ess)
    assert blocks[0].rule == "all rounds"  # horizon 4 on flat laws: columns equal with probability ~4^-24
    if all(block.rule == "all rounds" for block in blocks):
        assert rounds.stats.tokens_by_phase == fixed.stats.tokens_by_phase


def test_a_converged_round_estimate_equals_the_estimate_of_its_columns():
    """At a loose tolerance most decisions stop early; the recorded p_hat is the plain
    estimate of exactly the rollouts drawn (checked by the record's own log zeta)."""
    model = random_table_lm(4, SEED + 13)
    [result] = run(model, max_new=6, block_size=1, top_k=4, num_rollouts=8, rollouts_per_round=2,
                   round_tolerance=0.5, jackknife=False)
    for block in result.stats.blocks[:-1]:
        assert block.rule in ("converged", "all rounds")
        assert block.rollouts % (2 * len(block.candidates)) == 0 and block.rollouts <= 8 * len(block.candidates)
        logp = torch.tensor(block.candidate_logprobs, dtype=torch.float64)
        want = torch.softmax(4.0 * logp + torch.tensor(block.log_zeta, dtype=torch.float64), -1)
        torch.testing.assert_close(torch.tensor(block.p_hat, dtype=torch.float64), want, rtol=1e-5, atol=1e-7)
    assert any(block.rule == "converged" for block in result.stats.blocks[:-1])


def test_resampled_rollouts_run_in_rounds_of_groups():
    model = random_table_lm(4, SEED + 17)
    [result] = run(model, max_new=6, block_size=1, top_k=4, num_rollouts=8, rollout_proposal="tempered",
                   rollout_resample_every=2, rollout_groups=4, rollouts_per_round=4, round_tolerance=1e-12)
    *longer, one, last = result.stats.blocks  # horizons 4, 4, 3, 2, then 1, then none
    for block in longer:  # a round is two groups of two; a second one unless the groups agree
        assert (block.rule, block.rollouts) in (("all rounds", 8 * 4), ("converged", 4 * 4))
    assert any(block.rule == "all rounds" for block in longer)
    # a one-token tempered rollout weighs exactly c(h): every group agrees after one round
    assert one.rule == "converged" and one.rollouts == 4 * len(one.candidates)
    assert last.rule == "last block" and len(result.token_ids) == 6


def test_the_settings_are_checked():
    for bad, field, text in ((dict(skip_share=0.5), "skip_share", "got 0.5"),
                             (dict(skip_share=1.5), "skip_share", "got 1.5"),
                             (dict(rollouts_per_round=3), "rollouts_per_round", r"multiple of rollouts_per_round \(3\)"),
                             (dict(rollouts_per_round=1), "rollouts_per_round", "got 1"),
                             (dict(rollouts_per_round=2, reuse_rollouts=True), "rollouts_per_round", "reuse_rollouts"),
                             (dict(round_tolerance=0.0), "round_tolerance", "got 0.0"),
                             (dict(rollouts_per_round=2, rollout_proposal="tempered", rollout_resample_every=2,
                                   rollout_groups=2), "rollouts_per_round", "group size")):
        with pytest.raises(ValueError, match=text) as caught:
            PowerConfig(num_rollouts=8, **bad)
        assert caught.value.field == field, (bad, caught.value)


# ------------------------------------------------------------------ entropy cuts


def fork_at(position, vocab=4):
    """Peaked laws (entropy about 0.17 nats) except a uniform one (log 4 = 1.39 nats) after
    ``position`` generated tokens."""
    def next_token(prefix):
        generated = len(prefix) - len(PROMPT)
        if generated == position:
            return {t: 1.0 / vocab for t in range(vocab)}
        top = (sum(prefix) + generated) % vocab
        return {t: 0.97 if t == top else 0.01 for t in range(vocab)}

    return TableLM(next_token, vocab)


def table_logprob(model, prefix, tokens):
    total = 0.0
    for t, token in enumerate(tokens):
        total += math.log(float(model.next_token_probs(list(prefix) + list(tokens[:t]))[token]))
    return total


def check_candidates_against_the_table(model, result):
    """Every block's candidates scored by the table at the prefix the generation had then: a
    sequence left holding tokens past its cut would score the next block elsewhere."""
    prefix = list(PROMPT)
    for block in result.stats.blocks:
        for candidate, logprob in zip(block.candidates, block.candidate_logprobs):
            assert logprob == pytest.approx(table_logprob(model, prefix, candidate), abs=1e-5)
        prefix += block.candidates[block.choice]
    assert prefix[len(PROMPT):] == result.token_ids


def test_an_entropy_cut_ends_the_block_before_the_fork_and_the_next_decision_starts_there():
    model = fork_at(2)
    [cut] = run(model, max_new=8, entropy_cut=1.0)
    first = cut.stats.blocks[0]
    assert {len(c) for c in first.candidates} == {2}  # stopped before the uniform token
    second = cut.stats.blocks[1]
    prefix = PROMPT + first.candidates[first.choice]
    for candidate in second.candidates:  # the fork (the uniform law) is the next decision's first token
        assert table_logprob(model, prefix, candidate[:1]) == pytest.approx(math.log(0.25))
    check_candidates_against_the_table(model, cut)
    assert len(cut.token_ids) == 8


def test_a_flat_entropy_stretch_makes_no_cut():
    model = fork_at(99)  # never uniform: every law is peaked, below the threshold
    [cut] = run(model, max_new=8, entropy_cut=1.0)
    [fixed] = run(model, max_new=8)
    assert [len(c) for b in cut.stats.blocks for c in b.candidates] == [4] * sum(
        len(b.candidates) for b in cut.stats.blocks)
    assert cut.token_ids == fixed.token_ids and cut.stats.tokens_by_phase == fixed.stats.tokens_by_phase


def test_a_minimum_block_length_moves_no_cut_it_allows_and_forbids_the_ones_before_it():
    """The fork is the 2nd token of the second block (5 tokens generated): entropy_cut_after=1
    cuts that block to 1 token, =2 forbids the cut (the blocks are the fixed ones, token for
    token); a fork after 2 tokens of the first block is cut alike with after = 1 and 2."""
    late = fork_at(5)
    [cut] = run(late, max_new=12, entropy_cut=1.0)
    assert {len(c) for c in cut.stats.blocks[1].candidates} == {1}  # (L samples: one or more distinct)
    [kept] = run(late, max_new=12, entropy_cut=1.0, entropy_cut_after=2)
    [fixed] = run(late, max_new=12)
    assert [len(c) for b in kept.stats.blocks for c in b.candidates] == [4] * sum(
        len(b.candidates) for b in kept.stats.blocks)
    assert kept.token_ids == fixed.token_ids and kept.stats.tokens_by_phase == fixed.stats.tokens_by_phase
    early = fork_at(2)
    [one], [two] = run(early, entropy_cut=1.0), run(early, entropy_cut=1.0, entropy_cut_after=2)
    assert one.token_ids == two.token_ids and one.stats.tokens_by_phase == two.stats.tokens_by_phase
    assert {len(c) for c in two.stats.blocks[0].candidates} == {2}
    check_candidates_against_the_table(late, cut)


def test_entropy_cuts_on_a_random_model_keep_every_sequence_consistent_and_free_everything():
    """Blocks of every length up to B on a random table (the cut threshold in its entropy
    range); several prompts, whose budgets then differ, decide in groups."""
    model = random_table_lm(4, SEED + 23)
    results = run(model, prompts=[PROMPT] * 3, max_new=10, entropy_cut=0.9, block_size=4)
    lengths = set()
    for result in results:
        check_candidates_against_the_table(model, result)
        assert len(result.token_ids) == 10
        lengths.update(len(c) for b in result.stats.blocks for c in b.candidates)
    assert len(lengths) > 1


def test_entropy_cut_settings_are_checked():
    for bad in (dict(block_size=1), dict(reuse_rollouts=True, horizon=8, block_size=4)):
        with pytest.raises(ValueError, match="entropy_cut=0.5 needs block_size > 1") as caught:
            PowerConfig(entropy_cut=0.5, **bad)
        assert caught.value.field == "entropy_cut"
    with pytest.raises(ValueError, match=r"entropy_cut_after=5 must be <= block_size \(4\)") as caught:
        PowerConfig(block_size=4, entropy_cut=0.5, entropy_cut_after=5)
    assert caught.value.field == "entropy_cut_after"
    with pytest.raises(ValueError, match="entropy_cut_after"):
        PowerConfig(entropy_cut_after=0)


def test_the_benchmarks_skip_check_measures_what_the_skip_would_change():
    """bench/lab/adaptive.py's check on a fixed decision: share, TV to the estimate, zeta ratio."""
    from bench.lab import adaptive
    from powerfast.samplers.results import BlockRecord

    logp = [-0.01, -3.0]  # shares at alpha 4: 1 / (1 + e^-11.96) = 0.9999936...
    share = 1.0 / (1.0 + math.exp(-4 * 2.99))
    record = BlockRecord(candidates=[[1], [2]], candidate_logprobs=logp, p_hat=[0.9, 0.1], probs=[0.9, 0.1],
                         log_zeta=[-2.0, 1.5], choice=0, rule="fixed")
    [check] = adaptive.skip_check([record, BlockRecord([[1]], [0.0], [1.0], [1.0], [0.0], 0, rule="fixed")], 0.99)
    assert check["share"] == pytest.approx(share, rel=1e-12)
    assert check["tv"] == pytest.approx(share - 0.9, rel=1e-9)  # 0.5 * (|s0 - 0.9| + |s1 - 0.1|)
    assert check["log_zeta_ratio"] == pytest.approx(3.5) and not check["kept"]
    assert adaptive.skip_check([record], 0.999999999) == []
    # the second candidate ended (no rollouts, no ESS) while the top one has a future: kept
    record.rollout_ess = [3.2, None]
    [check] = adaptive.skip_check([record], 0.99)
    assert check["kept"] and check["tv"] == pytest.approx(share - 0.9, rel=1e-9)
    record.rollout_ess = [None, 2.0]  # the top one ended: it may skip
    assert not adaptive.skip_check([record], 0.99)[0]["kept"]


def test_the_adaptive_preset_names_the_measured_rules():
    from powerfast.core.config import method_config

    config = method_config("power", preset="adaptive")
    paper = method_config("power")
    assert (config.rollout_proposal, config.skip_share, config.rollouts_per_round, config.round_tolerance,
            config.entropy_cut) == ("tempered", 0.99, 2, 0.05, 0.0)
    assert (config.block_size, config.num_candidates, config.top_k, config.num_rollouts, config.horizon) == (
        paper.block_size, paper.num_candidates, paper.top_k, paper.num_rollouts, paper.horizon)

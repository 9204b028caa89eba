"""Power-SMC: resampling against its definitions, weights against float64, leaks, errors."""

import math

import pytest
from conftest import fresh_seed
import torch
from test_sampler import tiny_llama

from powerfast.core.config import SMCConfig
from powerfast.evaluation import toy
from powerfast.runtime.lm import TableLM
from powerfast.runtime.lm_runner import LMRunner
from powerfast.runtime.runner import ModelRunner
from powerfast.decisions import resampling
from powerfast.samplers.factory import make_sampler
from powerfast.samplers.smc import SMCSampler

SEED = fresh_seed()
ETA = 3 + math.sqrt(8)
UNIFORM_GRID = 20000  # expectations over the one uniform of a resampling, as grid averages

# the interpreter evaluates the log-sums of inactive rows too (then discards them)
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]


@pytest.fixture
def torch_ops(monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")


def random_log_weights(n, generator, spread=3.0):
    log_w = torch.randn(n, generator=generator, dtype=torch.float64) * spread
    log_w[int(torch.randint(n, (1,), generator=generator))] = -math.inf  # a particle of weight 0
    return log_w


def grid_uniforms():
    return [(j + 0.5) / UNIFORM_GRID for j in range(UNIFORM_GRID)]


# ------------------------------------------------------------------------- weights


def test_effective_sample_size_against_float64():
    generator = torch.Generator().manual_seed(SEED)
    for n in (1, 2, 7, 64):
        log_w = torch.randn(n, generator=generator, dtype=torch.float64) * 5 + 300.0  # large: must be shifted
        w = [math.exp(x - float(log_w.max())) for x in log_w.tolist()]
        want = sum(w) ** 2 / sum(x * x for x in w)
        assert resampling.effective_sample_size(log_w) == pytest.approx(want, rel=1e-12)
    assert resampling.effective_sample_size(torch.zeros(8)) == pytest.approx(8.0)
    assert resampling.effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all log_weights are -inf"):
        resampling.effective_sample_size(torch.full((3,), -math.inf))
    with pytest.raises(ValueError, match="NaN"):
        resampling.effective_sample_size(torch.tensor([0.0, math.nan]))


# ---------------------------------------------------------------------- systematic


@pytest.mark.parametrize("n,num", [(5, 5), (9, 32), (40, 16)])
@pytest.mark.slow
def test_systematic_counts_have_mean_num_times_weight(n, num):
    generator = torch.Generator().manual_seed(SEED + n)
    log_w = random_log_weights(n, generator)
    w = resampling.normalised_weights(log_w)
    total = torch.zeros(n, dtype=torch.float64)
    for u in grid_uniforms():
        counts = resampling.systematic_counts(log_w, num, u)
        assert int(counts.sum()) == num
        # each count is the floor or the ceiling of num * w_i
        assert bool(((counts >= torch.floor(num * w - 1e-9)) & (counts <= torch.ceil(num * w + 1e-9))).all())
        total += counts
    torch.testing.assert_close(total / UNIFORM_GRID, num * w, atol=2 * num / UNIFORM_GRID, rtol=0)
    ancestors, new_log_w = resampling.systematic_resample(log_w, num, 0.3)
    assert ancestors.shape == (num,) and bool((w[ancestors] > 0).all())  # weight 0 never survives
    torch.testing.assert_close(new_log_w, torch.full((num,), -math.log(num), dtype=torch.float64))


# ------------------------------------------------------------------------ chopthin


def chopthin_expected_by_definition(w, num, eta):
    """The threshold a by bisection on the definition, in plain Python floats."""
    def h(a):
        return sum(x / a if x < a else (1.0 if x <= eta * a / 2 else 2 * x / (eta * a)) for x in w)

    lo, hi = 1e-300, 1e300
    for _ in range(3000):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if h(mid) > num else (lo, mid)
    a = math.sqrt(lo * hi)
    return [x / a if x < a else (1.0 if x <= eta * a / 2 else 2 * x / (eta * a)) for x in w], a


@pytest.mark.parametrize("n,num", [(6, 6), (12, 32), (50, 16)])
@pytest.mark.slow
def test_chopthin_against_its_definition(n, num):
    generator = torch.Generator().manual_seed(SEED + 7 * n)
    log_w = random_log_weights(n, generator, spread=2.5)
    w = resampling.normalised_weights(log_w)
    expected, threshold = resampling.chopthin_expected_counts(log_w, num, ETA)
    want, want_threshold = chopthin_expected_by_definition(w.tolist(), num, ETA)
    assert threshold == pytest.approx(want_threshold, rel=1e-9)
    torch.testing.assert_close(expected, torch.tensor(want, dtype=torch.float64), rtol=1e-8, atol=1e-10)
    assert float(expected.sum()) == pytest.approx(num, rel=1e-10)
    counts_total = torch.zeros(n, dtype=torch.float64)
    mass_total = torch.zeros(n, dtype=torch.float64)
    floor_ess = num * 4 * ETA / (1 + ETA) ** 2  # a weight ratio <= eta bounds the ESS below (= num / 2 here)
    for u in grid_uniforms()[::4]:
        ancestors, new_log_w = resampling.chopthin_resample(log_w, num, ETA, u)
        assert ancestors.shape == (num,) and new_log_w.shape == (num,)
        new_w = torch.exp(new_log_w)
        assert float(new_w.max() / new_w.min()) <= ETA * (1 + 1e-9)
        assert resampling.effective_sample_size(new_log_w) >= floor_ess - 1e-9
        counts_total += torch.bincount(ancestors, minlength=n)
        mass_total.index_add_(0, ancestors, new_w)
    draws = UNIFORM_GRID // 4
    # expected offspring counts are the definition's h_i(a); the offspring mass of i is w_i (unbiased)
    torch.testing.assert_close(counts_total / draws, expected, atol=2 * num / draws, rtol=0)
    torch.testing.assert_close(mass_total / draws, w, atol=4.0 / draws, rtol=0)


def test_chopthin_keeps_more_lineages_than_systematic():
    generator = torch.Generator().manual_seed(SEED)
    log_w = torch.randn(32, generator=generator, dtype=torch.float64) * 2.0
    systematic = len(set(resampling.systematic_resample(log_w, 32, 0.5)[0].tolist()))
    chopthin = len(set(resampling.chopthin_resample(log_w, 32, ETA, 0.5)[0].tolist()))
    assert chopthin >= systematic, (chopthin, systematic)


@pytest.mark.parametrize("resampler", ["systematic", "chopthin"])
@pytest.mark.slow
def test_resampling_preserves_the_weighted_distribution(resampler):
    """A fixed particle set carrying values: the weighted law of the values after
    resampling equals the one before, in expectation over the uniform."""
    values = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    log_w = torch.tensor([0.3, -1.0, 2.0, -4.0, 0.0, 1.5, -0.5, 1.0], dtype=torch.float64)
    w = resampling.normalised_weights(log_w)
    before = torch.zeros(5, dtype=torch.float64).index_add_(0, values, w)
    after = torch.zeros(5, dtype=torch.float64)
    for u in grid_uniforms()[::4]:
        if resampler == "systematic":
            ancestors, new_log_w = resampling.systematic_resample(log_w, 8, u)
        else:
            ancestors, new_log_w = resampling.chopthin_resample(log_w, 8, ETA, u)
        new_w = torch.softmax(new_log_w, 0)  # the normalised weighted particle law of one draw
        after.index_add_(0, values[ancestors], new_w)
    after /= UNIFORM_GRID // 4
    # the ratio of normalisers is not exactly unbiased for chopthin: allow its small O(1/N) effect
    tolerance = 2e-3 if resampler == "systematic" else 0.03
    torch.testing.assert_close(after, before, atol=tolerance, rtol=0)


# ----------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ValueError, match="num_particles must be an int >= 1, got 0"):
        SMCConfig(num_particles=0)
    with pytest.raises(ValueError, match=r"ess_threshold must be a number in \(0, 1\], got 1.5"):
        SMCConfig(ess_threshold=1.5)
    with pytest.raises(ValueError, match="resampler must be one of"):
        SMCConfig(resampler="multinomial")
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 4 \(chopthin needs it\), got 3"):
        SMCConfig(eta=3)
    with pytest.raises(ValueError, match="ramp_tokens must be an int >= 0"):
        SMCConfig(ramp_tokens=-1)
    config = SMCConfig(alpha=4.0, ramp_tokens=3)
    assert [config.alpha_at(t) for t in range(5)] == [2.0, 3.0, 4.0, 4.0, 4.0]
    assert SMCConfig().eta == pytest.approx(5.828427, rel=1e-6)


# ----------------------------------------------------- weights against float64


def random_table_lm(vocab, eos, seed):
    generator = torch.Generator().manual_seed(seed)
    tables = {}

    def next_token(prefix):
        if prefix not in tables:
            probs = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5, 0)
            table = {t: float(p) for t, p in enumerate(probs)}
            top = max(table, key=table.get)
            table[top] += 1.0 - sum(table.values())
            tables[prefix] = table
        return tables[prefix]

    return TableLM(next_token, vocab, eos_token_id=eos)


@pytest.mark.parametrize("ramp", [0, 3])
def test_particle_weights_are_alpha_log_p_minus_log_q(ramp, torch_ops):
    """Without resampling a particle's log weight is alpha log p(x) - log q(x) - log N,
    q the product of the tempered steps at alpha_t (the per-step log c and the ramp's
    catch-up terms telescope): checked against float64 sums of the model's tables."""
    alpha, num = 3.0, 16
    model = random_table_lm(5, 4, SEED)
    config = SMCConfig(alpha=alpha, num_particles=num, ess_threshold=1e-9, resample_every=2, ramp_tokens=ramp)
    runner = LMRunner(model)
    prompt = [0, 1]
    [group] = SMCSampler(runner, config=config, seed=SEED).particles([prompt], max_new_tokens=5)
    assert len(group) == num and runner.live_sequences == 0
    for tokens, loglik, log_weight in group:
        log_p = log_q = 0.0
        for t, token in enumerate(tokens):
            probs = model.next_token_probs(prompt + tokens[:t])
            alpha_t = config.alpha_at(t)
            log_p += math.log(float(probs[token]))
            log_q += alpha_t * math.log(float(probs[token])) - math.log(float((probs**alpha_t).sum()))
        assert loglik == pytest.approx(log_p, abs=1e-4)
        assert log_weight == pytest.approx(alpha * log_p - log_q - math.log(num), abs=2e-4), tokens


def test_stats_and_resampling_on_the_toy(torch_ops):
    runner = LMRunner(toy.toy_model())
    config = SMCConfig(num_particles=32, resample_every=1)
    results = SMCSampler(runner, config=config, seed=SEED).generate([list(toy.TOY_PROMPT)] * 20, 4)
    assert runner.live_sequences == 0
    for r in results:
        extra = r.stats.extra
        assert r.token_ids in ([0, 2, 3, 5], [0, 2, 4, 5], [1, 3, 5], [1, 4, 5])
        assert len(extra["ess_history"]) >= 3 and all(1 - 1e-9 <= e <= 32 + 1e-9 for e in extra["ess_history"])
        # a resampling at every check but the last whose ESS was below kappa N = 16
        assert extra["resampling_steps"] == sum(e < 16 for e in extra["ess_history"][:-1])
        assert 1 <= extra["unique_ancestors"] <= 32
        assert r.stats.tokens_by_phase["sample"] >= 3 * 32
    # after PLAN / GUESS the weights are c(PLAN) = 1 vs c(GUESS) = 0.1325: most groups resample
    assert sum(r.stats.extra["resampling_steps"] > 0 for r in results) >= 10


# ------------------------------------------------------------ runtime: leaks


@pytest.mark.parametrize("resampler", ["systematic", "chopthin"])
def test_no_leaks_batched_prompts_and_reproducible(resampler):
    runner = ModelRunner(tiny_llama(seed=SEED % 1000, sharpen=3.0), page_size=4)
    config = SMCConfig(num_particles=6, resample_every=2, ess_threshold=1.0, resampler=resampler, ramp_tokens=3)
    prompts = [[0, 1, 2], [0, 3], [0, 1, 2, 3, 4, 1]]
    a = SMCSampler(runner, config=config, seed=7).generate(prompts, 9)
    assert runner.cache.pages_in_use == 0
    b = make_sampler("smc", runner, config=config, seed=7).generate(prompts, 9)
    assert runner.cache.pages_in_use == 0
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for r in a:
        assert 1 <= len(r.token_ids) <= 9 and 5 not in r.token_ids[:-1]
        assert r.stats.method == "smc" and r.stats.extra["resampling_steps"] >= 1  # threshold 1: every check


def test_errors_leak_nothing():
    model = tiny_llama(seed=5, sharpen=3.0)
    runner = ModelRunner(model, page_size=4)
    sampler = SMCSampler(runner, config=SMCConfig(num_particles=4, resample_every=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[0, 1], []], 4)
    with pytest.raises(ValueError, match="config must be an SMCConfig"):
        SMCSampler(runner, config=object())
    # an exception in the middle of a run (the model's forward raising) frees everything
    calls = {"n": 0}
    real_decode = runner.decode

    def failing_decode(seqs, tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("decode failed")
        return real_decode(seqs, tokens)

    runner.decode = failing_decode
    with pytest.raises(RuntimeError, match="decode failed"):
        sampler.generate([[0, 1], [0, 2, 3]], 8, ignore_eos=True)
    runner.decode = real_decode
    assert runner.cache.pages_in_use == 0
    with torch.no_grad():
        model.lm_head.weight[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        sampler.generate([[0, 1, 2]], 6)
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------ fidelity to the exact law


@pytest.mark.parametrize("spec", [(4, 4, 7), (5, 4, 8)], ids=["V4-T4-seed7", "V5-T4-seed8"])
@pytest.mark.slow
def test_smc_tv_shrinks_with_n_to_the_noise_floor(spec, torch_ops):
    """TV of 1500 SMC draws to the exact p^alpha sequence law of a random Llama (no EOS),
    by N. Measured at sampler seeds 0-3: N = 1 0.20-0.22 / 0.27-0.29, N = 8 0.10-0.13 /
    0.17-0.18, N = 128 0.11-0.12 / 0.17-0.18, noise floors 0.12 / 0.17. N = 8 and N = 128 are
    both at the floor here, so their difference is sampling noise (sd ~0.012): the test asks
    that N = 8 and N = 128 each improve on N = 1 by far more than that, and that N = 128 is
    not worse than N = 8 beyond the noise. (At 600 draws the old N = 8 > N = 128 - 0.03
    check sat within a few noise sd and failed on a random seed.) (With an EOS the one-token completion [EOS] can carry
    a large share of p^alpha while the prefix-only proposal almost never draws it: there
    SMC plateaus above the floor; see the fidelity table in docs/studies.md.)"""
    from powerfast.evaluation import fidelity

    vocab, num_tokens, model_seed = spec
    model = fidelity.ModelSpec(vocab, num_tokens, False, model_seed)
    grid = fidelity.method_grid(4.0, num_tokens, particles=(1, 8, 128), include=["smc"])
    rows = fidelity.measure(model, 4.0, grid, 1500, seed=SEED % 10000)
    tv = {row.setting: row.tv for row in rows}
    floor = rows[0].noise_floor
    assert tv["N=1"] > tv["N=8"] + 0.03, (tv, floor, SEED)
    assert tv["N=1"] > tv["N=128"] + 0.03, (tv, floor, SEED)
    assert tv["N=128"] < tv["N=8"] + 0.05, (tv, floor, SEED)
    assert tv["N=128"] < 2 * floor, (tv, floor, SEED)

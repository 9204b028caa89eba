"""The estimators against an independent float64 reference (numpy, term by term)."""

import math

import numpy as np
import pytest
from conftest import fresh_seed
import torch

from powerfast import (
    leave_one_out_log_scaling_factors,
    log_scaling_factors,
    power_distribution,
    power_estimates,
)

SEED = fresh_seed()


def _lse(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    top = values.max()
    if top == -np.inf:
        return -np.inf
    return float(top + np.log(np.exp(values - top).sum()))


def reference(candidate_logprobs: np.ndarray, rollout_logliks: np.ndarray, alpha: float, jackknife: bool):
    """One row at a time, every leave-one-out sum from the other M - 1 terms."""
    k_count, m_count = rollout_logliks.shape
    weights = np.where(np.isneginf(rollout_logliks), -np.inf, (alpha - 1) * rollout_logliks)
    log_zeta = np.array([_lse(weights[k]) - math.log(m_count) for k in range(k_count)])
    log_u = alpha * candidate_logprobs + log_zeta
    p_hat = np.exp(log_u - _lse(log_u))
    if not jackknife:
        return p_hat, log_zeta, None
    loo = np.empty((k_count, m_count))
    for k in range(k_count):
        for s in range(m_count):
            loo[k, s] = _lse(np.delete(weights[k], s)) - math.log(m_count - 1)
    loo_sum = np.zeros(k_count)
    for s in range(m_count):
        log_u_s = alpha * candidate_logprobs + loo[:, s]
        loo_sum += np.exp(log_u_s - _lse(log_u_s))
    p_jk = np.clip(m_count * p_hat - (m_count - 1) / m_count * loo_sum, 0, None)
    return p_jk / p_jk.sum(), log_zeta, loo


def random_inputs(rng, rows, k_count, m_count):
    scale = rng.choice([1.0, 30.0, 400.0, 2000.0])
    candidate = np.log(rng.dirichlet(np.ones(k_count), size=rows))
    rollouts = -rng.uniform(0, 1, size=(rows, k_count, m_count)) * scale
    return candidate, rollouts


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("m_count", [2, 3, 8, 16])
@pytest.mark.parametrize("k_count", [1, 2, 8, 32])
def test_power_distribution_matches_float64_reference(alpha, m_count, k_count):
    rng = np.random.default_rng([SEED, int(alpha * 10), m_count, k_count])
    candidate, rollouts = random_inputs(rng, 3, k_count, m_count)
    for jackknife in (False, True):
        got64 = power_distribution(torch.tensor(candidate), torch.tensor(rollouts), alpha, jackknife=jackknife)
        got32 = power_distribution(torch.tensor(candidate).float(), torch.tensor(rollouts).float(), alpha, jackknife=jackknife)
        for row in range(3):
            want, want_log_zeta, _ = reference(candidate[row], rollouts[row], alpha, jackknife)
            np.testing.assert_allclose(got64[row].numpy(), want, rtol=1e-9, atol=1e-12, err_msg=f"seed {SEED}")
            # float32: log-weights reach (alpha-1)*2000 = 14000, where one ulp is ~1e-3 nats
            np.testing.assert_allclose(got32[row].numpy(), want, rtol=0, atol=5e-3, err_msg=f"seed {SEED}")
        assert torch.all(got64 >= 0) and torch.all(torch.isfinite(got64))
        torch.testing.assert_close(got64.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m_count", [2, 3, 8, 16])
def test_scaling_factors_match_reference(m_count):
    rng = np.random.default_rng([SEED, m_count])
    candidate, rollouts = random_inputs(rng, 2, 5, m_count)
    alpha = 4.0
    log_zeta = log_scaling_factors(torch.tensor(rollouts), alpha)
    loo = leave_one_out_log_scaling_factors(torch.tensor(rollouts), alpha)
    assert log_zeta.shape == (2, 5) and loo.shape == (2, 5, m_count)
    for row in range(2):
        _, want_log_zeta, want_loo = reference(candidate[row], rollouts[row], alpha, True)
        np.testing.assert_allclose(log_zeta[row].numpy(), want_log_zeta, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(loo[row].numpy(), want_loo, rtol=1e-12, atol=1e-9)


def test_leave_one_out_exact_when_one_rollout_dominates():
    # rollout 0 outweighs the rest by ~2,700 nats: exp() of the total minus exp(w_0)
    # would lose every other term; the LOO value must still be exact.
    rollouts = torch.tensor([[-1.0, -900.0, -905.0, -1000.0]], dtype=torch.float64)
    alpha = 4.0
    loo = leave_one_out_log_scaling_factors(rollouts, alpha)[0]
    w = 3.0 * rollouts[0]
    want_without_first = torch.logsumexp(w[1:], 0) - math.log(3)
    assert float(loo[0]) == pytest.approx(float(want_without_first), abs=1e-9)
    assert float(loo[0]) == pytest.approx(-2700.0 + math.log1p(math.exp(-15)) - math.log(3), abs=1e-9)
    # float32 too
    loo32 = leave_one_out_log_scaling_factors(rollouts.float(), alpha)[0]
    assert float(loo32[0]) == pytest.approx(float(want_without_first), abs=1e-2)


def test_jackknife_stable_with_dominating_rollouts():
    rng = np.random.default_rng([SEED, 99])
    for _ in range(20):
        k_count, m_count = int(rng.integers(2, 9)), int(rng.integers(2, 17))
        candidate = np.log(rng.dirichlet(np.ones(k_count)))
        rollouts = -rng.uniform(500, 2000, size=(k_count, m_count))
        rollouts[rng.integers(k_count), rng.integers(m_count)] = -rng.uniform(0, 5)  # one rollout dominates
        want, _, _ = reference(candidate, rollouts, 4.0, True)
        got = power_distribution(torch.tensor(candidate), torch.tensor(rollouts), 4.0)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12, err_msg=f"seed {SEED}")


@pytest.mark.parametrize("jackknife", [False, True])
def test_shift_invariance(jackknife):
    rng = np.random.default_rng([SEED, 7])
    candidate, rollouts = random_inputs(rng, 4, 6, 8)
    base = power_distribution(torch.tensor(candidate), torch.tensor(rollouts), 4.0, jackknife=jackknife)
    for shift in (-500.0, -3.25, 40.0):
        moved = power_distribution(torch.tensor(candidate), torch.tensor(rollouts + shift), 4.0, jackknife=jackknife)
        torch.testing.assert_close(moved, base, rtol=1e-9, atol=1e-12)


def test_impossible_candidate_gets_zero_and_batched_shapes():
    rng = np.random.default_rng([SEED, 3])
    candidate, rollouts = random_inputs(rng, 6, 4, 5)
    candidate[:, 2] = -np.inf
    got = power_distribution(torch.tensor(candidate).view(2, 3, 4), torch.tensor(rollouts).view(2, 3, 4, 5), 2.0)
    assert got.shape == (2, 3, 4)
    assert torch.all(got[..., 2] == 0)
    flat = got.reshape(6, 4)
    for row in range(6):
        want, _, _ = reference(candidate[row], rollouts[row], 2.0, True)
        np.testing.assert_allclose(flat[row].numpy(), want, rtol=1e-9, atol=1e-12)


def test_impossible_rollouts_weigh_zero_also_at_alpha_one():
    rollouts = torch.tensor([[[-1.0, -math.inf, -2.0]]], dtype=torch.float64)
    for alpha in (1.0, 3.0):
        log_zeta = log_scaling_factors(rollouts, alpha)
        want = math.log((math.exp((alpha - 1) * -1) + math.exp((alpha - 1) * -2)) / 3)
        assert float(log_zeta[0, 0]) == pytest.approx(want, abs=1e-12)


def test_single_candidate_is_certain():
    got = power_distribution(torch.tensor([[-3.0]]), torch.randn(1, 1, 4) - 5, 4.0)
    assert got.tolist() == [[1.0]]


def test_power_estimates_returns_plain_and_log_zeta():
    rng = np.random.default_rng([SEED, 11])
    candidate, rollouts = random_inputs(rng, 1, 3, 4)
    est = power_estimates(torch.tensor(candidate), torch.tensor(rollouts), 4.0)
    want_plain, want_log_zeta, _ = reference(candidate[0], rollouts[0], 4.0, False)
    np.testing.assert_allclose(est.p_hat[0].numpy(), want_plain, rtol=1e-9)
    np.testing.assert_allclose(est.log_zeta[0].numpy(), want_log_zeta, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.inf, math.nan, "four"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        power_distribution(torch.zeros(1, 2), torch.zeros(1, 2, 3), alpha)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"\(1, 3\) and \(1, 2, 4\)"):
        power_distribution(torch.zeros(1, 3), torch.zeros(1, 2, 4), 4.0)
    with pytest.raises(ValueError, match="M = 1"):
        power_distribution(torch.zeros(1, 2), torch.zeros(1, 2, 1), 4.0)
    assert power_distribution(torch.zeros(1, 2), torch.zeros(1, 2, 1), 4.0, jackknife=False).shape == (1, 2)
    nan_rollouts = torch.zeros(1, 2, 3)
    nan_rollouts[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN \(first at index \[0, 1, 2\]\)"):
        power_distribution(torch.zeros(1, 2), nan_rollouts, 4.0)
    with pytest.raises(ValueError, match="candidate_logprobs contains NaN"):
        power_distribution(torch.tensor([[0.0, math.nan]]), torch.zeros(1, 2, 3), 4.0)
    with pytest.raises(ValueError, match=r"-inf in row \[1\]"):
        power_distribution(torch.tensor([[0.0, -1.0], [-math.inf, -math.inf]]), torch.zeros(2, 2, 3), 4.0)
    with pytest.raises(ValueError, match="floating-point"):
        power_distribution(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 3), 4.0)
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        leave_one_out_log_scaling_factors(torch.zeros(2, 1), 4.0)
    with pytest.raises(ValueError, match=r"\+inf"):
        log_scaling_factors(torch.tensor([[math.inf, 0.0]]), 4.0)

"""The jackknife op (powerfast.ops.jackknife): its dispatch (the one-launch kernel here)
against the float64 torch reference (torch_power_estimates) on the same input values.

Tolerances: float32 inputs (fp32 compute) probs / p_hat atol 2e-5 + rtol 1e-4,
log_zeta atol 1e-4 + rtol 1e-6 (log-likelihoods down to -2000 times alpha - 1 = 7 are
~1e4: fp32 resolves them to ~1e-3 absolute, so the relative bound is the meaningful one);
float64 inputs (fp64 compute) 1e-10 for everything.
"""

from __future__ import annotations

import math

import pytest
import torch

from powerfast.ops import jackknife

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
TOL = {
    torch.float32: dict(probs=(2e-5, 1e-4), log_zeta=(1e-4, 1e-6)),
    torch.float64: dict(probs=(1e-10, 1e-10), log_zeta=(1e-10, 1e-12)),
}

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.fixture
def poisoned_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _check(candidate_logprobs, rollout_scores, alpha, use_jackknife=True):
    dtype = torch.promote_types(candidate_logprobs.dtype, rollout_scores.dtype)
    got = jackknife._power_estimates_nosync(candidate_logprobs, rollout_scores, alpha, use_jackknife)
    ref = jackknife.torch_power_estimates(
        candidate_logprobs.double().cpu(), rollout_scores.double().cpu(), alpha, use_jackknife
    )
    for name, actual, expected in zip(("probs", "p_hat", "log_zeta"), got, ref):
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        atol, rtol = TOL[dtype]["log_zeta" if name == "log_zeta" else "probs"]
        actual = actual.double().cpu()
        assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), name
        finite = torch.isfinite(expected)
        assert torch.isfinite(actual[finite]).all(), f"{name}: not fully written / not finite"
        err = (actual[finite] - expected[finite]).abs()
        bound = atol + rtol * expected[finite].abs()
        assert (err <= bound).all(), f"{name}: max error {err.max().item()} (alpha {alpha}, shape {tuple(rollout_scores.shape)})"
    probs = got.probs.double().cpu()
    assert (probs >= 0).all()
    live = probs.sum(-1) > 0
    assert torch.allclose(probs.sum(-1)[live], torch.ones_like(probs.sum(-1)[live]), atol=1e-5)
    return got


def _inputs(batch, num_candidates, num_rollouts, dtype, device, low=-2000.0):
    candidate_logprobs = torch.log_softmax(torch.randn(batch, num_candidates, dtype=torch.float64) * 3, -1)
    scale = torch.rand(batch, 1, 1, dtype=torch.float64) ** 3  # some rows tight, some spread to `low`
    rollout_scores = torch.rand(batch, num_candidates, num_rollouts, dtype=torch.float64) * low * scale
    return candidate_logprobs.to(dtype).to(device), rollout_scores.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("num_rollouts", [2, 3, 8, 16])
@pytest.mark.parametrize("num_candidates", [1, 2, 8, 32])
def test_random_inputs_match_estimator(device, dtype, alpha, num_rollouts, num_candidates, poisoned_empty):
    cand, rollouts = _inputs(3, num_candidates, num_rollouts, dtype, device)
    _check(cand, rollouts, alpha)
    _check(cand, rollouts, alpha, use_jackknife=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.5, 4.0, 8.0])
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 2, 2), (4, 32, 16), (2, 3, 3)])
def test_one_rollout_dominates(device, alpha, shape, poisoned_empty):
    batch, num_candidates, num_rollouts = shape
    cand, rollouts = _inputs(batch, num_candidates, num_rollouts, torch.float32, device, low=-50.0)
    rollouts = rollouts - 500.0
    rollouts[:, 0, 0] = -1.0  # dominates the rest by ~500 nats, times (alpha - 1)
    got = _check(cand, rollouts, alpha)
    # leave it out and candidate 0 loses its weight in that replicate: the jackknife moves
    assert torch.isfinite(got.probs).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_neg_inf_candidates_and_rollouts(device, dtype, poisoned_empty):
    cand, rollouts = _inputs(4, 8, 4, dtype, device, low=-300.0)
    cand[0, 3] = -math.inf
    cand[1, :7] = -math.inf  # one candidate left
    rollouts[2, 5, :] = -math.inf  # a candidate whose rollouts are all impossible
    rollouts[3, :, 1] = -math.inf  # one rollout impossible for everyone
    rollouts[3, 2, :] = -math.inf
    got = _check(cand, rollouts, 4.0)
    assert got.probs[0, 3] == 0 and got.probs[2, 5] == 0
    assert got.probs[1, 7] == 1
    # a row with nothing possible comes back as zeros (the checked API refuses it)
    cand[0, :] = -math.inf
    got = _check(cand, rollouts, 4.0)
    assert (got.probs[0] == 0).all()
    with pytest.raises(ValueError, match=r"-inf in row \[0\]"):
        jackknife.power_estimates(cand, rollouts, 4.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 5e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha", [1.5, 4.0])
def test_shift_invariance(device, dtype, atol, alpha):
    """Adding a constant to a row's candidate log-probs or rollout scores does not
    change the distribution (fp32: up to the rounding of the shifted inputs themselves)."""
    cand, rollouts = _inputs(5, 8, 8, dtype, device, low=-100.0)
    base = jackknife.power_distribution(cand, rollouts, alpha)
    shifted = jackknife.power_distribution(cand - 37.0, rollouts - 1500.0, alpha)
    assert torch.allclose(base, shifted, atol=atol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_power_distribution_matches_reference_and_batch_dims(device):
    cand, rollouts = _inputs(6, 4, 8, torch.float32, device, low=-200.0)
    cand = cand.reshape(2, 3, 4)
    rollouts = rollouts.reshape(2, 3, 4, 8)
    got = jackknife.power_distribution(cand, rollouts, 4.0)
    ref = jackknife.torch_power_estimates(cand.double().cpu(), rollouts.double().cpu(), 4.0).probs
    assert got.shape == (2, 3, 4)
    assert torch.allclose(got.double().cpu(), ref, atol=2e-5, rtol=1e-4)
    # non-contiguous views
    got_t = jackknife.power_distribution(cand.transpose(0, 1), rollouts.transpose(0, 1), 4.0)
    assert torch.allclose(got_t.transpose(0, 1), got, atol=1e-6)


def test_paper_toy_example():
    """Section 4.1: P(PLAN) ~= 0.548 at alpha = 4 from the exact zetas (M = 2 rollouts that
    reproduce the zetas exactly: w = 3 l, zeta = mean exp(w))."""
    alpha = 4.0
    cand = torch.log(torch.tensor([[0.4, 0.6]], dtype=torch.float64))
    plan = torch.log(torch.tensor([0.95, 0.05])) * 1.0
    guess = torch.log(torch.tensor([0.55, 0.45]))
    # zeta(k) = sum_s p(s)^alpha = E_p[p^(alpha-1)]: two equally weighted pseudo-rollouts
    # with exp(3 l) = 2 p^4 reproduce it
    rollouts = torch.stack([(torch.log(2 * plan.exp() ** 4)) / 3, (torch.log(2 * guess.exp() ** 4)) / 3])[None]
    probs = jackknife.power_distribution(cand, rollouts, alpha, jackknife=False)
    assert abs(probs[0, 0].item() - 0.548) < 1e-3


@pytest.mark.parametrize(
    "cand_shape, roll_shape, alpha, use_jackknife, message",
    [
        ((2, 3), (2, 3, 4), 0.0, True, "alpha"),
        ((2, 3), (2, 3, 4), math.nan, True, "alpha"),
        ((2, 3), (2, 4, 4), 4.0, True, "shape"),
        ((2, 3), (2, 3, 1), 4.0, True, "at least 2 rollouts"),
        ((2, 3), (2, 3, 0), 4.0, False, "at least one"),
    ],
)
@pytest.mark.parametrize("estimate", ["power_distribution", "_power_estimates_nosync"])
def test_rejects_bad_arguments(estimate, cand_shape, roll_shape, alpha, use_jackknife, message):
    with pytest.raises(ValueError, match=message):
        getattr(jackknife, estimate)(torch.zeros(cand_shape), torch.zeros(roll_shape), alpha, use_jackknife)

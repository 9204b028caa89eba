"""The paper's toy: exact values, and the measured bias of the plain and jackknife estimators."""

import subprocess
import sys

import pytest

from powerfast.evaluation import exact, toy


def test_toy_exact_values():
    model = toy.toy_model()
    pi = exact.power_conditional(model, [], 4.0, toy.TOY_LENGTH)
    assert float(pi[toy.PLAN]) == pytest.approx(0.548, abs=0.001)
    assert float(pi[toy.GUESS]) == pytest.approx(1 - float(pi[toy.PLAN]), abs=1e-12)
    assert float(pi[toy.CALC:].sum()) == 0.0
    assert exact.scaling_factor(model, [], toy.PLAN, 4.0, toy.TOY_LENGTH) == pytest.approx(0.8145, abs=0.0005)
    assert exact.scaling_factor(model, [], toy.GUESS, 4.0, toy.TOY_LENGTH) == pytest.approx(0.1325, abs=0.0005)
    case = toy.toy_case()
    assert float(case.low_temperature_probs(4.0)[0]) == pytest.approx(0.165, abs=0.001)
    assert float(case.exact_probs(4.0)[0]) == pytest.approx(float(pi[toy.PLAN]), abs=1e-12)


def test_toy_closed_form():
    zeta_plan = 0.95**4 + 0.05**4
    zeta_guess = 0.55**4 + 0.45**4
    want = 0.4**4 * zeta_plan / (0.4**4 * zeta_plan + 0.6**4 * zeta_guess)
    pi = exact.power_conditional(toy.toy_model(), [], 4.0, toy.TOY_LENGTH)
    assert float(pi[toy.PLAN]) == pytest.approx(want, rel=1e-12)


def test_monte_carlo_converges_on_the_toy():
    case = toy.toy_case()
    target = float(case.exact_probs(4.0)[0])
    plain, jack = toy.simulate(case, 4.0, 64, 20000, seed=1)
    # std of one estimate at M = 64 is ~0.011; the mean of 20000 has stderr ~8e-5
    assert float(plain[:, 0].mean()) == pytest.approx(target, abs=6e-4)
    assert float(jack[:, 0].mean()) == pytest.approx(target, abs=6e-4)
    assert float(plain[:, 0].std()) < 0.02


REPLICATES = 1 << 19


@pytest.fixture(scope="module")
def bias_rows():
    cases = [toy.toy_case(), *toy.synthetic_cases()]
    rows = toy.bias_table(cases, alpha=4.0, rollout_counts=(8, 16, 32), replicates=REPLICATES, seed=12345)
    print("\n" + toy.format_bias_table(rows))
    return {(r.case, r.num_rollouts): r for r in rows}


@pytest.mark.parametrize("case", ["toy", "dominant+tail", "rare-heavy"])
@pytest.mark.slow
def test_plain_bias_shrinks_like_one_over_m(bias_rows, case):
    r8, r16, r32 = (bias_rows[(case, m)] for m in (8, 16, 32))
    noise = 5 * max(r.plain_stderr for r in (r8, r16, r32))
    # |bias| * M stays bounded: it does not grow from M = 8 to 16 to 32 (up to noise)
    for r in (r16, r32):
        assert abs(r.plain_bias) * r.num_rollouts <= abs(r8.plain_bias) * 8 * 1.25 + noise * r.num_rollouts
    assert abs(r32.plain_bias) <= abs(r8.plain_bias) + noise


@pytest.mark.parametrize("case", ["dominant+tail", "rare-heavy"])
@pytest.mark.parametrize("m", [16, 32])
@pytest.mark.slow
def test_jackknife_bias_clearly_below_plain(bias_rows, case, m):
    row = bias_rows[(case, m)]
    noise = 4 * max(row.plain_stderr, row.jackknife_stderr)
    assert abs(row.jackknife_bias) + noise < abs(row.plain_bias), row


@pytest.mark.slow
def test_both_estimators_nearly_unbiased_on_the_toy(bias_rows):
    # the toy's futures are two-valued and mild: both biases are below 1e-3 from M = 8 on
    for m in (8, 16, 32):
        row = bias_rows[("toy", m)]
        assert abs(row.plain_bias) < 1e-3 and abs(row.jackknife_bias) < 1e-3, row


def test_toy_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "powerfast.cli", "toy", "--seeds", "200"], capture_output=True, text=True, check=True
    ).stdout
    assert "low-temperature P(PLAN)  0.1649" in out
    assert "power (exact)   P(PLAN)  0.5484" in out
    assert "zeta(PLAN) = 0.8145   zeta(GUESS) = 0.1325" in out
    for m in (2, 4, 8, 16, 64):
        assert any(line.split()[:1] == [str(m)] for line in out.splitlines()), out

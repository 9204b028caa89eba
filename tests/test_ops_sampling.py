"""The sampling op (powerfast.ops.sampling): sample_tokens / score_tokens / token_logprobs /
sample_rows and the powerfast::sample_tokens operator against float64 torch references.

On a CPU-only machine the "cpu" cases run the Triton kernel under TRITON_INTERPRET=1 (set
by conftest); the "cuda" twins run it on a GPU. Tolerances on log-probs (absolute, vs the
float64 log-softmax of the same input values): fp32 / fp16 / bf16 inputs 2e-5 + 2e-6 * |lp|
(the kernel upcasts to fp32 right after loading, so the input dtype does not matter).

Sizes: the interpreter runs one program per row sequentially, so N = 64 is tested at
V <= 5003, and the large vocabularies (32000, 151936) with N in {1, 3}.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from scipy import stats

from powerfast.ops import sampling
from powerfast.ops.device import use_triton

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, V): 5003 is not a multiple of the 4096-wide chunk
def _slow(*shapes):
    """Shapes whose interpreter runs take seconds: in the whole suite, not the inner loop."""
    return [pytest.param(shape, marks=pytest.mark.slow) for shape in shapes]


SHAPES = [(1, 1), (3, 7), (64, 1000), *_slow((64, 5003), (3, 32000), (1, 151936), (3, 151936))]
SIGNIFICANCE = 1e-4  # false rejections 1 in 10^4; the power checks below still reject wrong laws

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN (floats), -777 (ints), True (bools): an output
    the kernel does not write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            tensor.fill_(math.nan)
        elif tensor.dtype == torch.bool:
            tensor.fill_(True)
        else:
            tensor.fill_(-777)
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _logits(num_rows, vocab, dtype, device, scale=3.0):
    return (torch.randn(num_rows, vocab, dtype=torch.float64) * scale).to(dtype).to(device)


def _ref_logprobs(logits, tokens, temperature=1.0):
    lp = torch.log_softmax(logits.double().cpu() / temperature, dim=-1)
    return lp.gather(1, tokens.cpu().long()[:, None]).squeeze(1)


def _assert_close(actual, expected):
    actual = actual.double().cpu()
    tol = 2e-5 + 2e-6 * expected.abs()
    bad = ~((actual - expected).abs() <= tol)
    assert not bad.any(), f"max error {(actual - expected).abs().max().item()} at {bad.nonzero()[:5].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_sample_logprobs_match_reference(device, dtype, shape, poisoned_empty):
    num_rows, vocab = shape
    logits = _logits(num_rows, vocab, dtype, device)
    logliks = torch.randn(num_rows, device=device, dtype=torch.float32) * 10
    start = logliks.clone()
    out = sampling.sample_tokens(logits, 0.7, seed=int(torch.randint(0, 2**62, ())), logliks=logliks)
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (num_rows,)
    assert ((out.tokens >= 0) & (out.tokens < vocab)).all()
    _assert_close(out.base_logprobs, _ref_logprobs(logits, out.tokens))
    _assert_close(out.tempered_logprobs, _ref_logprobs(logits, out.tokens, 0.7))
    _assert_close(logliks - start, _ref_logprobs(logits, out.tokens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (64, 1000), (3, 5003), (3, 151936)], ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_token_logprobs_and_score_match_reference(device, dtype, shape, poisoned_empty):
    num_rows, vocab = shape
    logits = _logits(num_rows, vocab, dtype, device)
    tokens = torch.randint(0, vocab, (num_rows,), device=device)
    tokens[0] = vocab - 1  # the last entry of the vocabulary
    got = sampling.token_logprobs(logits, tokens)
    assert got.dtype == torch.float32 and got.shape == (num_rows,)
    _assert_close(got, _ref_logprobs(logits, tokens))
    scored = sampling.score_tokens(logits, tokens.int(), 1.7)
    assert torch.equal(scored.tokens.cpu(), tokens.cpu())
    _assert_close(scored.base_logprobs, _ref_logprobs(logits, tokens))
    _assert_close(scored.tempered_logprobs, _ref_logprobs(logits, tokens, 1.7))


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_one_has_no_tempered_output(device):
    logits = _logits(3, 100, torch.float32, device)
    out = sampling.sample_tokens(logits, 1.0, seed=5)
    assert out.tempered_logprobs is None
    _assert_close(out.base_logprobs, _ref_logprobs(logits, out.tokens))


def _draw_counts(logits_row, temperature, num_draws, block_v=None):
    """Token counts over num_draws rows that share one logits row (distinct offsets)."""
    logits = logits_row[None, :].expand(num_draws, -1)
    seed = int(torch.randint(0, 2**62, ()))
    offsets = torch.arange(num_draws, device=logits.device)
    if use_triton(logits):
        from powerfast.kernels.sampling import sample_logprob

        tokens = sample_logprob(logits, temperature, seed=seed, offsets=offsets, block_v=block_v)[0]
    else:
        tokens = sampling.sample_tokens(logits, temperature, seed=seed, offsets=offsets).tokens
    return torch.bincount(tokens.cpu(), minlength=logits.shape[1]).double()


def _chi_square_pvalue(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit, the categories expected fewer than ``min_expected`` times
    pooled into one (the test statistic is not chi-square distributed for sparse cells: one
    draw of a token expected 0.03 times would otherwise reject a correct sampler)."""
    expected = probs * counts.sum()
    sparse = expected < min_expected
    if bool(sparse.any()):
        counts = torch.cat([counts[~sparse], counts[sparse].sum().reshape(1)])
        expected = torch.cat([expected[~sparse], expected[sparse].sum().reshape(1)])
    return stats.chisquare(counts.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_token_frequencies_match_tempered_softmax(device, backend, monkeypatch):
    """Chi-square goodness of fit at SIGNIFICANCE. The draw count is checked to be large
    enough: the same counts must reject a wrong temperature (1.0) and a vocabulary shifted
    by one, so a kernel with either mistake would fail."""
    if backend == "torch":
        if device != "cpu":
            pytest.skip("the torch reference path is the CPU path")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    vocab, temperature = 10, 0.6
    num_draws = 200_000 if device != "cpu" else (600 if backend == "kernel" else 5000)
    while True:  # fresh logits whose wrong-temperature and shifted laws are clearly apart
        logits = torch.randn(vocab, dtype=torch.float64) * 1.5
        probs = torch.softmax(logits / temperature, dim=0)
        apart = min((probs - torch.softmax(logits, 0)).abs().sum(), (probs - torch.roll(probs, 1)).abs().sum())
        if float(apart) > 0.4:  # total variation > 0.2
            break
    # block_v = 4: three chunks, the last one partial, so the reservoir merge is exercised
    counts = _draw_counts(logits.float().to(device), temperature, num_draws, block_v=4)
    assert counts.sum() == num_draws
    assert _chi_square_pvalue(counts, probs) > SIGNIFICANCE, (counts, probs * num_draws)
    wrong_temperature = torch.softmax(logits, dim=0)
    shifted = torch.roll(probs, 1)
    assert _chi_square_pvalue(counts, wrong_temperature) < SIGNIFICANCE
    assert _chi_square_pvalue(counts, shifted) < SIGNIFICANCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_frequencies_large_vocab_chunk_boundary(device):
    """Mass concentrated on a few tokens straddling chunk boundaries of a 5003-token vocab."""
    vocab = 5003
    num_draws = 300 if device == "cpu" else 100_000
    logits = torch.full((vocab,), -30.0, dtype=torch.float64)
    hot = torch.tensor([0, 4095, 4096, 5002])
    logits[hot] = torch.randn(4, dtype=torch.float64)
    counts = _draw_counts(logits.float().to(device), 1.0, num_draws)
    assert counts[hot].sum() == num_draws
    probs = torch.softmax(logits[hot], dim=0)
    assert _chi_square_pvalue(counts[hot], probs) > SIGNIFICANCE


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens(device):
    logits = _logits(16, 3000, torch.bfloat16, device, scale=0.5)
    first = sampling.sample_tokens(logits, 0.9, seed=1234)
    again = sampling.sample_tokens(logits, 0.9, seed=1234)
    other = sampling.sample_tokens(logits, 0.9, seed=1235)
    shifted = sampling.sample_tokens(logits, 0.9, seed=1234, offsets=torch.arange(16, device=device) + 16)
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.base_logprobs, again.base_logprobs)
    assert not torch.equal(first.tokens, other.tokens)
    assert not torch.equal(first.tokens, shifted.tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_inactive_rows_untouched_and_eos_deactivates(device):
    num_rows, vocab, eos = 6, 50, 7
    logits = _logits(num_rows, vocab, torch.float32, device)
    logits[1, eos] = 100.0  # row 1 samples EOS
    logits[4, eos] = 100.0  # so would row 4, but it is inactive
    active = torch.tensor([True, True, False, True, False, True], device=device)
    logliks = torch.randn(num_rows, device=device)
    start = logliks.clone()
    out = sampling.sample_tokens(logits, 1.3, seed=9, active=active, eos_token_id=eos, logliks=logliks)
    inactive = torch.tensor([2, 4])
    assert (out.tokens[inactive] == eos).all()
    assert (out.base_logprobs[inactive] == 0).all() and (out.tempered_logprobs[inactive] == 0).all()
    assert torch.equal(logliks[inactive], start[inactive])
    assert out.tokens[1] == eos
    assert active.tolist() == [True, False, False, True, False, True] or (
        # another active row may also have drawn EOS by chance
        not active[1] and not active[2] and not active[4]
    )
    live = torch.tensor([0, 1, 3, 5])
    _assert_close(out.base_logprobs[live], _ref_logprobs(logits[live], out.tokens[live]))
    _assert_close((logliks - start)[live], _ref_logprobs(logits[live], out.tokens[live]))
    # without eos_token_id inactive rows return token 0
    again = sampling.sample_tokens(logits, 1.0, seed=9, active=torch.zeros(num_rows, dtype=torch.bool, device=device))
    assert (again.tokens == 0).all() and (again.base_logprobs == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"eos_token_id": 10}, "eos_token_id"),
        ({"active": torch.ones(3, dtype=torch.int64)}, "active"),
        ({"logliks": torch.zeros(2)}, "logliks"),
        ({"offsets": torch.zeros(3)}, "offsets"),
    ],
)
def test_sample_tokens_rejects_bad_arguments(kwargs, message):
    args = {"temperature": 1.0, "seed": 0, **kwargs}
    temperature = args.pop("temperature")
    with pytest.raises(ValueError, match=message):
        sampling.sample_tokens(torch.randn(3, 10), temperature, **args)


def test_dispatch_reads_environment(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(cpu)
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize("device", DEVICES)
def test_strided_tokens_and_offsets(device):
    """A column slice (stride > 1) of tokens / offsets is read element by element."""
    logits = _logits(5, 300, torch.float32, device)
    grid = torch.randint(0, 300, (5, 4), device=device)
    scored = sampling.score_tokens(logits, grid[:, 2])
    assert torch.equal(scored.tokens.cpu(), grid[:, 2].cpu())
    _assert_close(scored.base_logprobs, _ref_logprobs(logits, grid[:, 2]))
    offsets = torch.arange(20, device=device).view(5, 4)
    strided = sampling.sample_tokens(logits, 1.0, seed=3, offsets=offsets[:, 1])
    packed = sampling.sample_tokens(logits, 1.0, seed=3, offsets=offsets[:, 1].contiguous())
    assert torch.equal(strided.tokens.cpu(), packed.tokens.cpu())


# ------------------------------------------------- log sum p^alpha (the power normaliser)


def _ref_log_power_sums(logits, temperature):
    """float64 log sum_x softmax(logits)_x^(1/T) of the same input values."""
    return torch.logsumexp(torch.log_softmax(logits.double().cpu(), dim=-1) / temperature, dim=-1)


LOG_POWER_SHAPES = [(1, 1), (3, 7), *_slow((64, 1000), (5, 5003), (3, 32000), (3, 151936))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOG_POWER_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_log_power_sums_match_float64(device, backend, dtype, shape, monkeypatch, poisoned_empty):
    """log c = log sum p^alpha against float64, at alpha = 4 and 1 / 0.7, from sample and score.

    Tolerance 1e-4 + 1e-5 |log c| (absolute): both fp32 sums carry ~V ulps of rounding."""
    if backend == "torch":
        if device == "cuda":
            pytest.skip("the torch reference runs on CPU tensors only")
        monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    num_rows, vocab = shape
    # logits offset by a large constant: a log c computed as the difference of two
    # unshifted log-sum-exps would lose its digits here
    logits = (torch.randn(num_rows, vocab, dtype=torch.float64) * 3 + 40.0).to(dtype).to(device)
    for temperature in (0.25, 1 / 0.7):
        want = _ref_log_power_sums(logits, temperature)
        tol = 1e-4 + 1e-5 * want.abs()
        sampled = sampling.sample_tokens(logits, temperature, seed=int(torch.randint(0, 2**62, ())))
        scored = sampling.score_tokens(logits, torch.randint(0, vocab, (num_rows,), device=device), temperature)
        for out in (sampled, scored):
            got = out.log_power_sums.double().cpu()
            assert out.log_power_sums.dtype == torch.float32 and got.shape == (num_rows,)
            assert ((got - want).abs() <= tol).all(), ((got - want).abs().max(), temperature)
            # the identity that makes it the tempered normaliser: log q = log p / T - log c
            torch.testing.assert_close(out.tempered_logprobs.double().cpu(),
                                       out.base_logprobs.double().cpu() / temperature - got, atol=2e-3, rtol=1e-5)
    if vocab > 1:
        # sharper than the base (alpha > 1): sum p^alpha < 1
        assert (sampling.sample_tokens(logits, 0.25, seed=1).log_power_sums < 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_log_power_sums_inactive_rows_and_temperature_one(device, backend, monkeypatch):
    if backend == "torch":
        if device == "cuda":
            pytest.skip("the torch reference runs on CPU tensors only")
        monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    logits = _logits(6, 50, torch.float32, device)
    assert sampling.sample_tokens(logits, 1.0, seed=3).log_power_sums is None
    active = torch.tensor([True, False, True, False, True, True], device=device)
    out = sampling.sample_tokens(logits, 0.25, seed=3, active=active.clone())
    want = _ref_log_power_sums(logits, 0.25)
    got = out.log_power_sums.double().cpu()
    assert (got[~active.cpu()] == 0).all()
    assert ((got - want).abs() <= 1e-4 + 1e-5 * want.abs())[active.cpu()].all()


# ------------------------------------------------------------- sample_rows: one launch, many requests


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(14, 37), (14, 5003)], ids=lambda s: f"N{s[0]}-V{s[1]}")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_sample_rows_give_every_row_what_its_own_launch_gives(device, backend, dtype, shape, monkeypatch):
    """Rows of mixed temperatures (greedy, 1, 0.7, 1.5, 0.25), EOS ids (none or one) and
    activity in ONE sample_rows call get, bit for bit, the tokens, log-probs, log power
    sums, activity and log-likelihoods of the operator called once per (temperature, EOS)
    group, as each request's decode loop calls it alone."""
    if backend == "torch":
        if device == "cuda":
            pytest.skip("the torch reference runs on CPU tensors only")
        monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    num_rows, vocab = shape
    logits = _logits(num_rows, vocab, dtype, device)
    temperature_choices, eos_choices = [0.0, 1.0, 0.7, 1.5, 0.25], [-1, 3, int(torch.randint(0, vocab, ()))]
    temperatures = [temperature_choices[int(i)] for i in torch.randint(0, 5, (num_rows,))]
    temperatures[:5] = temperature_choices  # every temperature at least once
    eos_ids = [eos_choices[int(i)] for i in torch.randint(0, 3, (num_rows,))]
    offsets = torch.randint(-(2**63), 2**63 - 1, (num_rows,), dtype=torch.int64)
    active = torch.rand(num_rows) < 0.8
    logliks = torch.randn(num_rows, dtype=torch.float32)
    row_active, row_logliks = active.clone().to(device), logliks.clone().to(device)
    out = sampling.sample_rows(logits, offsets=offsets.to(device),
                          temperatures=torch.tensor(temperatures, dtype=torch.float64, device=device),
                          eos_token_ids=torch.tensor(eos_ids, device=device), active=row_active, logliks=row_logliks)
    groups: dict = {}
    for row, key in enumerate(zip(temperatures, eos_ids)):
        groups.setdefault(key, []).append(row)
    for (temperature, eos), rows in groups.items():
        index = torch.tensor(rows)
        sub_active, sub_logliks = active[index].to(device), logliks[index].to(device)
        want = sampling.sample_tokens_op(logits[index.to(device)], offsets[index].to(device), sub_active, sub_logliks,
                                         temperature, eos)
        got = (out.tokens, out.base_logprobs, out.tempered_logprobs, out.log_power_sums)
        for name, expected, actual in zip(("tokens", "base", "tempered", "log power sums"), want, got):
            assert torch.equal(actual.cpu()[index], expected.cpu()), (name, temperature, eos)
        assert torch.equal(row_active.cpu()[index], sub_active.cpu()), (temperature, eos)
        assert torch.equal(row_logliks.cpu()[index], sub_logliks.cpu()), (temperature, eos)
    assert not row_active.cpu()[~active].any()  # inactive rows stay inactive
    assert (out.base_logprobs.cpu()[~active] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sample_rows_greedy_rows_take_the_first_maximum_across_chunks(device):
    vocab = 9000  # three 4096-wide chunks in the kernel
    logits = torch.randn(3, vocab).to(device)
    logits[0, 10] = logits[0, 4100] = 50.0  # a tie across chunks: the first
    logits[1, 8999] = 60.0  # the last chunk's last entry
    logits[2, 4096] = 70.0  # the first entry of a chunk
    out = sampling.sample_rows(logits, offsets=torch.arange(3, device=device), temperatures=torch.zeros(3, dtype=torch.float64,
                          device=device), eos_token_ids=torch.full((3,), -1, device=device),
                          active=torch.ones(3, dtype=torch.bool, device=device), logliks=torch.zeros(3, device=device))
    assert out.tokens.cpu().tolist() == [10, 8999, 4096]
    want = torch.log_softmax(logits.double().cpu(), -1)[torch.arange(3), torch.tensor([10, 8999, 4096])]
    _assert_close(out.base_logprobs, want)
    assert torch.equal(out.tempered_logprobs, out.base_logprobs) and (out.log_power_sums == 0).all()


def test_sample_rows_refuses_bad_row_tensors_naming_them():
    logits = torch.randn(4, 10)
    good = dict(offsets=torch.arange(4), temperatures=torch.ones(4, dtype=torch.float64),
                eos_token_ids=torch.full((4,), -1), active=torch.ones(4, dtype=torch.bool), logliks=torch.zeros(4))
    for name, bad in (("temperatures", torch.ones(4)), ("eos_token_ids", torch.full((3,), -1)),
                      ("offsets", None), ("logliks", torch.zeros(4, dtype=torch.float64))):
        with pytest.raises(ValueError, match=name):
            sampling.sample_rows(logits, **{**good, name: bad})

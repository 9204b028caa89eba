"""The exact oracle against brute force, and on a tiny random Hugging Face model."""

import itertools
import math

import pytest
from conftest import fresh_seed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from powerfast import HFLanguageModel, TableLM
from powerfast.evaluation import exact

SEED = fresh_seed()


def random_table_lm(vocab, eos, seed):
    """A TableLM with fresh random next-token tables (memoised per prefix)."""
    generator = torch.Generator().manual_seed(seed)
    tables = {}

    def next_token(prefix):
        if prefix not in tables:
            logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * 2
            probs = torch.softmax(logits, 0)
            if len(prefix) % 2 == 1:  # some zero-probability tokens
                probs[int(torch.randint(vocab, (1,), generator=generator))] = 0.0
                probs = probs / probs.sum()
            tables[prefix] = {t: float(p) for t, p in enumerate(probs)}
            fix = 1.0 - sum(tables[prefix].values())
            top = max(tables[prefix], key=tables[prefix].get)
            tables[prefix][top] += fix
        return tables[prefix]

    return TableLM(next_token, vocab, eos_token_id=eos)


def brute_force(model, prefix, alpha, num_tokens, eos):
    """Sum p^alpha over every token string, cutting at EOS: independent of exact.continuations."""
    mass = [0.0] * model.vocab_size
    seen = set()
    for tokens in itertools.product(range(model.vocab_size), repeat=num_tokens):
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        if tokens in seen:
            continue
        seen.add(tokens)
        logp = 0.0
        for i, tok in enumerate(tokens):
            p = float(model.next_token_probs(list(prefix) + list(tokens[:i]))[tok])
            if p == 0:
                logp = -math.inf
                break
            logp += math.log(p)
        if logp > -math.inf:
            mass[tokens[0]] += math.exp(alpha * logp)
    total = sum(mass)
    return [m / total for m in mass]


@pytest.mark.parametrize("eos", [None, 2])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_power_conditional_matches_brute_force(eos, alpha):
    model = random_table_lm(4, eos, SEED)
    prefix = [1, 3]
    want = brute_force(model, prefix, alpha, 3, eos)
    got = exact.power_conditional(model, prefix, alpha, 3, eos_token_id=eos) if eos is not None else \
        exact.power_conditional(model, prefix, alpha, 3)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-14)
    # pi(x) ∝ p(x)^alpha zeta(x)
    p_next = model.next_token_probs(prefix)
    zeta = torch.tensor([exact.scaling_factor(model, prefix, x, alpha, 3, eos_token_id=eos) if eos is not None
                         else exact.scaling_factor(model, prefix, x, alpha, 3) for x in range(4)], dtype=torch.float64)
    product = p_next**alpha * zeta
    torch.testing.assert_close(got, product / product.sum(), rtol=1e-10, atol=1e-14)


def test_refuses_too_many_sequences():
    model = random_table_lm(50, None, SEED)
    with pytest.raises(ValueError, match=r"50\*\*5 = 312500000 sequences exceeds the limit of 2000000"):
        exact.power_conditional(model, [0], 4.0, 5)
    with pytest.raises(ValueError, match="num_tokens"):
        exact.power_conditional(model, [0], 4.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        exact.power_conditional(model, [0], -1.0, 2)
    with pytest.raises(ValueError, match="prefix token 77"):
        exact.power_conditional(model, [77], 4.0, 2)


def test_table_lm_rejects_bad_tables():
    bad = TableLM(lambda prefix: {0: 0.5, 1: 0.4}, vocab_size=3)
    with pytest.raises(ValueError, match="sum to 0.9"):
        bad.next_token_logprobs([[0]])
    with pytest.raises(ValueError, match="token 5 outside"):
        TableLM(lambda prefix: {5: 1.0}, vocab_size=3).next_token_logprobs([[]])
    with pytest.raises(ValueError, match="eos_token_id 3"):
        TableLM(lambda prefix: {0: 1.0}, vocab_size=3, eos_token_id=3)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=6, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random weights so sequences differ in likelihood
        model.lm_head.weight.mul_(8.0)
    return model


def test_hf_adapter_matches_the_model(tiny_llama):
    lm = HFLanguageModel(tiny_llama)
    assert lm.vocab_size == 7 and lm.eos_token_id == 6
    seqs = [[0, 1, 2], [3], [0, 5, 5], [4, 4]]
    got = lm.next_token_logprobs(seqs)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = torch.log_softmax(tiny_llama(torch.tensor([seq])).logits[0, -1].double(), -1)
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)


def test_alpha_one_is_the_model_distribution(tiny_llama):
    lm = HFLanguageModel(tiny_llama)
    prefix = [0, 3, 1]
    pi = exact.power_conditional(lm, prefix, 1.0, 4)
    own = torch.exp(lm.next_token_logprobs([prefix])[0].double())
    torch.testing.assert_close(pi, own / own.sum(), rtol=1e-5, atol=1e-6)


def test_large_alpha_concentrates_on_most_likely_sequence(tiny_llama):
    lm = HFLanguageModel(tiny_llama)
    prefix = [0, 2]
    seqs, logprobs = exact.continuations(lm, prefix, 4)
    order = torch.argsort(logprobs, descending=True)
    best, gap = seqs[int(order[0])], float(logprobs[order[0]] - logprobs[order[1]])
    assert gap > 0, "two continuations tie exactly: redraw the model"
    alpha = max(30.0 / gap, 1.0)  # the top sequence outweighs each other one by exp(30) or more
    pi = exact.power_conditional(lm, prefix, alpha, 4)
    assert float(pi[best[0]]) > 0.99
    assert int(pi.argmax()) == best[0]


@pytest.mark.parametrize("eos", [None, 2])
def test_sequence_distribution_matches_brute_force(eos):
    """p(c)^alpha / Z over whole completions, against products of the tables."""
    model = random_table_lm(3, eos, SEED)
    prefix, alpha, num_tokens = [1], 3.0, 3
    seqs, probs = exact.sequence_distribution(model, prefix, alpha, num_tokens, eos_token_id=eos) \
        if eos is not None else exact.sequence_distribution(model, prefix, alpha, num_tokens)
    assert probs.dtype == torch.float64 and float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    weights = {}
    for tokens in itertools.product(range(3), repeat=num_tokens):
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        p = 1.0
        for i, tok in enumerate(tokens):
            p *= float(model.next_token_probs(prefix + list(tokens[:i]))[tok])
        if p > 0:
            weights[tokens] = p**alpha
    total = sum(weights.values())
    assert set(seqs) == set(weights)
    for seq, prob in zip(seqs, probs.tolist()):
        assert prob == pytest.approx(weights[seq] / total, rel=1e-9)

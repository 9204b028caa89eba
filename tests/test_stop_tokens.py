"""Every EOS id a model declares ends a completion, in every sampler, rollout and candidate.

Instruct models list several EOS ids (Qwen2.5-Instruct two, Llama 3 three). The toy
table below ends on its *second* EOS id far more often than on the first, so a sampler
that stops on the first id only runs on past the end (and the exact oracle gives other
probabilities); the tiny random Llama declares two ids and draws both.
"""

from __future__ import annotations


import pytest
from conftest import fresh_seed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from powerfast.core.config import MCMCConfig, PowerConfig, SMCConfig
from powerfast.evaluation import exact
from powerfast.runtime.lm import HFLanguageModel, TableLM
from powerfast.runtime.lm_runner import LMRunner
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.decoding import SeedStream, sample_continuations
from powerfast.samplers.factory import make_sampler

SEED = fresh_seed()
A, B, C, END1, END2, BOS = range(6)
STOPS = (END1, END2)


def two_stop_model() -> TableLM:
    """After BOS: A or B; A ends with END2 (prob .9) or goes to C; after an END comes C, C, ..."""

    def next_token(prefix):
        last = prefix[-1]
        if last == BOS:
            return {A: 0.5, B: 0.5}
        if last == A:
            return {END2: 0.9, C: 0.1}
        if last == B:
            return {END1: 0.5, END2: 0.5}
        return {C: 0.5, END2: 0.5} if last == C else {C: 1.0}  # after an END: more text (never reached)

    model = TableLM(next_token, vocab_size=6, eos_token_id=END1)
    model.eos_token_ids = STOPS  # a model that declares two ids
    return model


def assert_ends_at_first_stop(token_ids: list[int], max_new_tokens: int) -> None:
    stops_at = [i for i, t in enumerate(token_ids) if t in STOPS]
    if stops_at:
        assert stops_at[0] == len(token_ids) - 1, token_ids  # nothing after the first stop id
    else:
        assert len(token_ids) == max_new_tokens, token_ids


SAMPLERS = {
    "power-token": dict(method="power", config=PowerConfig(alpha=2.0, block_size=1, top_k=3, num_rollouts=2,
                                                                  horizon=3)),
    "power-block": dict(method="power", config=PowerConfig(alpha=2.0, block_size=2, num_candidates=4, top_k=2,
                                                                  num_rollouts=2, horizon=2)),
    "mcmc": dict(method="mcmc", config=MCMCConfig(alpha=2.0, block_size=2, mcmc_steps=2)),
    "smc": dict(method="smc", config=SMCConfig(alpha=2.0, num_particles=4, resample_every=2)),
    "plain": dict(method="plain"),
    "best-of-n": dict(method="best-of-n", num_samples=3),
    "sir": dict(method="sir", num_samples=3, alpha=2.0),
    "greedy": dict(method="greedy"),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_stops_on_the_second_eos_id(name, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    runner = LMRunner(two_stop_model())
    assert runner.eos_token_ids == STOPS
    sampler = make_sampler(model=runner, seed=SEED, **SAMPLERS[name])
    results = sampler.generate([[BOS]] * 40, max_new_tokens=6)
    for r in results:
        assert_ends_at_first_stop(r.token_ids, 6)
    ended_on_second = sum(r.token_ids[-1] == END2 for r in results)
    assert ended_on_second > 0, (name, SEED)
    assert runner.live_sequences == 0


def test_exact_oracle_ends_continuations_on_every_eos_id():
    model = two_stop_model()
    seqs, logprobs = exact.continuations(model, [BOS], 4)
    assert all(s.count(END1) + s.count(END2) <= 1 for s in seqs)
    assert all(t not in STOPS for s in seqs for t in s[:-1])
    assert float(torch.logsumexp(logprobs, 0).exp()) == pytest.approx(1.0, abs=1e-12)
    # pi(A) at alpha 2: A END2 (0.45^2) + A C END2 (.05^2) + A C C (.025^2); B END1, B END2 (.25^2 each)
    expected_a = 0.45**2 + 0.025**2 + 0.025**2
    expected_b = 2 * 0.25**2
    pi = exact.power_conditional(model, [BOS], 2.0, 3)
    assert float(pi[A]) == pytest.approx(expected_a / (expected_a + expected_b), rel=1e-12)
    assert exact.scaling_factor(model, [BOS, A], END2, 2.0, 3) == 1.0  # an EOS id has nothing after it
    # an explicit single id overrides the model's list
    only_first = exact.continuations(model, [BOS], 3, eos_token_id=END1)[0]
    assert (A, END2, C) in only_first


def tiny_llama_two_eos(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=[4, 5], bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = [4, 5]
    with torch.no_grad():  # the two ids equally likely: a random model could all but never pick one
        model.lm_head.weight[5] = model.lm_head.weight[4]
    return model


def test_hf_model_declares_both_ids_and_the_decode_loop_stops_on_each():
    model = tiny_llama_two_eos(SEED % 1000)
    assert HFLanguageModel(model).eos_token_ids == (4, 5) and HFLanguageModel(model).eos_token_id == 4
    runner = ModelRunner(model, page_size=16, num_pages=128)
    sampler = make_sampler("plain", runner, seed=SEED)
    assert runner.eos_token_ids == (4, 5) and sampler.runner is runner  # every id the model declares
    # the fused sampling kernel (under the interpreter) handles the first id, the loop the second
    results = sampler.generate([[0, 1, 2]] * 12, max_new_tokens=12)
    last = [r.token_ids[-1] for r in results]
    for r in results:
        assert not set(r.token_ids[:-1]) & {4, 5}, r.token_ids
        assert r.token_ids[-1] in (4, 5) or len(r.token_ids) == 12
    assert 5 in last, (last, SEED)  # the second id did end some rows
    assert runner.cache.pages_in_use == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_continuations_freezes_rows_after_any_eos(temperature, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    runner = LMRunner(two_stop_model())
    seqs, logits = runner.prefill([[BOS, B]] * 8)  # next token: END1 or END2
    out = sample_continuations(runner, seqs, logits, 4, SeedStream(SEED), temperature=temperature,
                               eos_token_id=[END2, END1])
    assert out.lengths.tolist() == [1] * 8  # every row ended after one token, on either id
    assert set(out.tokens[:, 0].tolist()) <= {END1, END2}
    assert (out.tokens[:, 1:] == END2).all()  # after the end: the first listed id
    runner.free(seqs)

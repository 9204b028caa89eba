"""ModelRunner against the model's own dense forward.

Reference: ``model(input_ids)`` on the whole sequence with the model's default attention
(sdpa), float32, after ``runner.restore_attention()``; row j of its logits is what the
runner must give after the sequence's token j. Tolerance: 1e-4 absolute + 1e-4 relative
on logits of order 1 (observed differences are ~1e-6; a wrong key, position or mask
moves logits by > 1e-2).

Tiny random models (hidden 48-96, 2 layers, vocab 256-512) with grouped-query attention
and an odd number of KV heads: Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral.
"""

from __future__ import annotations

import random

import pytest
from conftest import fresh_seed
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from powerfast.runtime.cache import OutOfPagesError
from powerfast.runtime.runner import ModelRunner

ATOL = RTOL = 1e-4
VOCAB = 384


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,  # GQA, odd number of KV heads
        max_position_embeddings=2048,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=16))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        raise ValueError(family)
    return model.eval()


def dense_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) logits of the model's own dense forward."""
    runner.restore_attention()
    with torch.no_grad():
        return runner.model(input_ids=torch.tensor([tokens])).logits[0].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected, atol=ATOL, rtol=RTOL)


def random_tokens(rng: random.Random, n: int, vocab: int = VOCAB) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(params=["llama", "qwen2"])
def runner(request):
    return ModelRunner(tiny_model(request.param, seed=random.randrange(2**31)), page_size=16, num_pages=256)


# ------------------------------------------------------------------ prefill / decode


def test_prefill_of_ragged_prompts_matches_dense(runner):
    rng = random.Random(fresh_seed())
    prompts = [random_tokens(rng, n) for n in (1, 7, 16, 33, 50)]
    seqs, logits = runner.prefill(prompts)
    assert logits.shape == (len(prompts), VOCAB)
    assert [seq.length for seq in seqs] == [len(p) for p in prompts]
    for prompt, row in zip(prompts, logits):
        assert_close(row, dense_logits(runner, prompt)[-1])
    runner.free(seqs)
    assert runner.cache.pages_in_use == 0


def test_fifty_decode_steps_match_dense(runner):
    rng = random.Random(fresh_seed())
    prompts = [random_tokens(rng, n) for n in (3, 16, 21)]
    seqs, logits = runner.prefill(prompts)
    steps = [logits]
    tokens = [list(p) for p in prompts]
    for _ in range(50):
        next_tokens = random_tokens(rng, len(seqs))
        for seq_tokens, token in zip(tokens, next_tokens):
            seq_tokens.append(token)
        steps.append(runner.decode(seqs, next_tokens))
    for i, (prompt, seq_tokens) in enumerate(zip(prompts, tokens)):
        reference = dense_logits(runner, seq_tokens)[len(prompt) - 1 :]
        assert_close(torch.stack([step[i] for step in steps]), reference)
    runner.free(seqs)
    assert runner.cache.pages_in_use == 0


def test_decode_takes_device_tensors_of_tokens(runner):
    rng = random.Random(fresh_seed())
    prompt = random_tokens(rng, 9)
    seqs, logits = runner.prefill([prompt, prompt])
    next_tokens = logits.argmax(dim=-1)  # stays a tensor
    logits = runner.decode(seqs, next_tokens)
    for token, row in zip(next_tokens.tolist(), logits):
        assert_close(row, dense_logits(runner, prompt + [token])[-1])


# ------------------------------------------------------------------ fork


@pytest.mark.parametrize("prefix_length", [32, 37], ids=["page-boundary", "mid-page"])
def test_forked_children_diverge_and_survive_their_parent(runner, prefix_length):
    rng = random.Random(fresh_seed())
    prefix = random_tokens(rng, prefix_length)
    (parent,), _ = runner.prefill([prefix])
    children = runner.fork(parent, 4)
    parent_pages = runner.cache.pages_in_use
    assert parent_pages == -(-prefix_length // 16)  # the fork itself allocates nothing

    tokens = [list(prefix) for _ in children]
    steps = []
    for step in range(20):  # crosses a page boundary either way
        next_tokens = random_tokens(rng, len(children))
        for seq_tokens, token in zip(tokens, next_tokens):
            seq_tokens.append(token)
        steps.append(runner.decode(children, next_tokens))
        if step == 2:
            runner.free(parent)  # children keep the shared pages alive
    assert len({tuple(t) for t in tokens}) == len(children)
    for i, seq_tokens in enumerate(tokens):
        reference = dense_logits(runner, seq_tokens)[prefix_length:]
        assert_close(torch.stack([step[i] for step in steps]), reference)
    runner.free(children)
    assert runner.cache.pages_in_use == 0


def test_parent_keeps_decoding_after_fork_and_prefix_fork(runner):
    rng = random.Random(fresh_seed())
    prefix = random_tokens(rng, 21)
    (parent,), _ = runner.prefill([prefix])
    (child,) = runner.fork(parent, 1)
    (resample,) = runner.fork(parent, 1, length=13)  # MCMC-style: restart from position 13
    parent_token, child_token, resample_tokens = random_tokens(rng, 1), random_tokens(rng, 1), random_tokens(rng, 4)
    parent_logits = runner.decode([parent], parent_token)
    child_logits = runner.decode([child], child_token)
    resample_logits = torch.cat([runner.decode([resample], [token]) for token in resample_tokens])
    assert_close(parent_logits[0], dense_logits(runner, prefix + parent_token)[-1])
    assert_close(child_logits[0], dense_logits(runner, prefix + child_token)[-1])
    assert_close(resample_logits, dense_logits(runner, prefix[:13] + resample_tokens)[13:])
    runner.free([parent, child, resample])
    assert runner.cache.pages_in_use == 0


def test_fork_of_a_long_prefix_into_64_shares_its_pages():
    model = tiny_model("llama")
    runner = ModelRunner(model, page_size=16, num_pages=63 + 64 + 8)
    rng = random.Random(fresh_seed())
    prefix = random_tokens(rng, 1000)
    (parent,), _ = runner.prefill([prefix])
    assert runner.cache.pages_in_use == 63
    children = runner.fork(parent, 64)
    next_tokens = random_tokens(rng, 64)
    logits = runner.decode(children, next_tokens)
    new_pages = runner.cache.pages_in_use - 63
    assert new_pages <= 64, f"{new_pages} new pages for 64 children (copying would take {64 * 63})"
    for i in (0, 63):
        assert_close(logits[i], dense_logits(runner, prefix + [next_tokens[i]])[-1])
    runner.free([parent, *children])
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------ families, errors


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_families_match_dense(family):
    runner = ModelRunner(tiny_model(family, seed=random.randrange(2**31)), num_pages=64)
    rng = random.Random(fresh_seed())
    prompts = [random_tokens(rng, n) for n in (4, 19)]
    seqs, logits = runner.prefill(prompts)
    next_tokens = random_tokens(rng, 2)
    decoded = runner.decode(seqs, next_tokens)
    for i, prompt in enumerate(prompts):
        reference = dense_logits(runner, prompt + [next_tokens[i]])
        assert_close(logits[i], reference[-2])
        assert_close(decoded[i], reference[-1])


def test_out_of_pages_is_a_clear_error_and_changes_nothing():
    runner = ModelRunner(tiny_model("llama"), page_size=16, num_pages=4)
    rng = random.Random(fresh_seed())
    (seq,), _ = runner.prefill([random_tokens(rng, 40)])
    children = runner.fork(seq, 2)  # each needs its own copy of the shared, partly filled last page
    with pytest.raises(OutOfPagesError, match="2 pages needed, 1 free of 4"):
        runner.decode(children, random_tokens(rng, 2))
    assert runner.cache.pages_in_use == 3 and [s.length for s in (seq, *children)] == [40, 40, 40]


def test_bad_inputs_are_refused(runner):
    (seq,), _ = runner.prefill([[1, 2, 3]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.decode([seq], [VOCAB])
    with pytest.raises(ValueError, match="twice"):
        runner.decode([seq, seq], [1, 2])
    with pytest.raises(ValueError, match="2 next tokens for 1"):
        runner.decode([seq], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        runner.prefill([[1], []])
    runner.free(seq)
    with pytest.raises(ValueError, match="was freed"):
        runner.decode([seq], [1])
    with pytest.raises(ValueError, match="backend"):
        ModelRunner(runner.model, backend="cuda-magic")


def test_model_outside_the_runner_uses_its_own_attention():
    """No restore_attention() needed: a call without the paged context runs the model's own
    attention (same logits as before the runner existed), and the runner switches back."""
    model = tiny_model("llama", seed=random.randrange(2**31))
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        generated_before = model.generate(tokens, max_new_tokens=4, do_sample=False)
    runner = ModelRunner(model, num_pages=8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, before, atol=0, rtol=0)
    assert model.config._attn_implementation == "sdpa"
    seqs, logits = runner.prefill([tokens[0].tolist()])  # switches to the paged attention by itself
    assert model.config._attn_implementation == "powerfast_paged"
    assert_close(logits[0], before[0, -1])
    with torch.no_grad():
        assert model.generate(tokens, max_new_tokens=4, do_sample=False).tolist() == generated_before.tolist()
    runner.free(seqs)
    runner.prefill([[1, 2]])
    runner.restore_attention()  # the explicit switch still works
    assert model.config._attn_implementation == "sdpa"


def test_dense_fallback_keeps_an_eager_model_eager():
    torch.manual_seed(random.randrange(2**31))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    # a left-padded batch needs the model's own mask: the fallback must rebuild it as eager would
    tokens = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=tokens, attention_mask=mask).logits
    runner = ModelRunner(model, num_pages=8)
    runner.prefill([[1, 2, 3]])
    with torch.no_grad():
        after = model(input_ids=tokens, attention_mask=mask).logits
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    second = ModelRunner(model, num_pages=8)  # a second runner keeps the first's record of "eager"
    second.prefill([[1]])
    second.restore_attention()
    assert model.config._attn_implementation == "eager"


# ------------------------------------------------------------------ randomized against dense


@pytest.mark.parametrize("seed", [0, 1])
def test_random_fork_decode_free_never_leaks_and_matches_dense(seed):
    rng = random.Random(seed)
    runner = ModelRunner(tiny_model("qwen2", seed=seed), page_size=8, num_pages=40)
    live: dict[int, tuple[object, list[int]]] = {}
    for step in range(30):
        action = rng.choice(["prefill", "fork", "decode steps", "decode steps", "decode", "free"])
        try:
            if action == "prefill" or not live:
                prompts = [random_tokens(rng, rng.randint(1, 20)) for _ in range(rng.randint(1, 2))]
                seqs, logits = runner.prefill(prompts)
                for seq, prompt, row in zip(seqs, prompts, logits):
                    assert_close(row, dense_logits(runner, prompt)[-1])
                    live[seq.seq_id] = (seq, prompt)
            elif action == "fork":
                seq, tokens = live[rng.choice(list(live))]
                length = rng.randint(0, seq.length)
                for child in runner.fork(seq, rng.randint(1, 3), length=length):
                    live[child.seq_id] = (child, tokens[:length])
            elif action.startswith("decode"):
                chosen = rng.sample(list(live), k=rng.randint(1, min(3, len(live))))
                for _ in range(1 if action == "decode" else rng.randint(2, 9)):
                    new = random_tokens(rng, len(chosen))
                    logits = runner.decode([live[c][0] for c in chosen], new)  # OutOfPagesError changes nothing
                    for c, token, row in zip(chosen, new, logits):
                        seq, tokens = live[c]
                        live[c] = (seq, tokens + [token])
                        assert_close(row, dense_logits(runner, tokens + [token])[-1])
            else:
                victim = rng.choice(list(live))
                runner.free(live.pop(victim)[0])
        except OutOfPagesError:
            in_use = runner.cache.pages_in_use
            assert in_use > 0
        holders = [0] * runner.cache.num_pages
        for seq, tokens in live.values():
            assert seq.length == len(tokens)
            for page in seq.page_table:
                holders[page] += 1
        assert holders == runner.cache.allocator.refcounts
    runner.free([seq for seq, _ in live.values()])
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------ the LanguageModel adapter


def test_hf_language_model_scores_through_the_runner():
    from powerfast.runtime.lm import HFLanguageModel

    model = tiny_model("qwen2", seed=random.randrange(2**31))
    rng = random.Random(fresh_seed())
    sequences = [random_tokens(rng, n) for n in (1, 5, 17, 40, 5)]
    paged = HFLanguageModel(model, batch_size=2)
    dense = HFLanguageModel(model, use_runner=False)
    assert paged.use_runner and not dense.use_runner
    got = paged.next_token_logprobs(sequences)
    assert model.config._attn_implementation == "sdpa"  # left as it was
    assert paged._runner.cache.pages_in_use == 0
    torch.testing.assert_close(got, dense.next_token_logprobs(sequences), atol=ATOL, rtol=RTOL)
    longer = [random_tokens(rng, 16 * 70)]  # more pages than the first pool: it grows
    torch.testing.assert_close(
        paged.next_token_logprobs(longer), dense.next_token_logprobs(longer), atol=ATOL, rtol=RTOL
    )
    fixed = HFLanguageModel(model, batch_size=8, num_pages=4)  # a fixed pool: chunks fit in it
    torch.testing.assert_close(fixed.next_token_logprobs(sequences[:4]), got[:4], atol=ATOL, rtol=RTOL)

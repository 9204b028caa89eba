"""Model families beyond Llama / Qwen: logit soft-capping (Gemma 2 / 3), sliding-window
attention (Gemma 3, Mistral) and models the runner cannot drive (StableLM).

Soft-capping: every scaled score s becomes ``cap * tanh(s / cap)`` (Gemma 2 passes the cap
to the attention function; Gemma 3 has q/k norms and sliding layers instead). The backends are
checked against float64 math on random paged inputs (tolerance 2e-5 absolute, fp32), and
the runner's logits against the model's own eager forward, which applies the cap itself
(tolerance 1e-4 absolute + relative on logits of order 1, as in test_runner.py). The caps
are small (0.5-5) so that tanh bends the random scores: without the cap the outputs
differ by > 1e-2.

Sliding windows: tiny random Gemma 3 models with a window of a few positions, windowed layers
mixed with full-attention ones, run well past the window (prefill, forks and decode
steps) against the model's own eager forward on the whole sequence, which masks keys at or
before ``p - W`` (transformers' ``kv_idx > q_idx - W``); a guard checks that the window changes
that reference (else a runner ignoring it would pass).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from powerfast.kernels.paged_attention import paged_attention
from test_ops_paged_attention import make_case
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

from powerfast.runtime.attention import torch_paged_attention
from powerfast.runtime.runner import ModelRunner


def softcapped_reference(query, key_cache, value_cache, ctx, scale, softcap) -> torch.Tensor:
    """float64 causal paged attention with ``softcap * tanh(q.k * scale / softcap)`` scores."""
    num_tokens, num_heads, head_dim = query.shape
    page_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        seq = int(ctx.query_seq_index[t])
        visible = int(ctx.query_positions[t]) + 1
        slots = [int(ctx.page_tables[seq, p // page_size]) * page_size + p % page_size for p in range(visible)]
        keys = key_cache.reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        values = value_cache.reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", query[t].double(), keys) * scale
        scores = softcap * torch.tanh(scores / softcap)
        out[t] = torch.einsum("hk,khd->hd", scores.softmax(dim=-1), values)
    return out


@pytest.mark.parametrize("softcap", [0.7, 5.0])
def test_softcap_in_the_torch_backend_and_the_kernel(softcap):
    # mixed decode and multi-token queries; 3 sequences, lengths not multiples of the page
    query, key_cache, value_cache, ctx = make_case([37, 5, 20], [1, 5, 3], num_heads=4, kv_heads=2, head_dim=16,
                                                   page_size=8)
    scale = 16**-0.5 * 3  # large scores, where the cap bends them
    expected = softcapped_reference(query, key_cache, value_cache, ctx, scale, softcap)
    uncapped = softcapped_reference(query, key_cache, value_cache, ctx, scale, 1e9)
    assert (expected - uncapped).abs().max() > 1e-2  # the cap matters in this case
    got_torch = torch_paged_attention(query, key_cache, value_cache, ctx, scale, softcap)
    torch.testing.assert_close(got_torch.double(), expected, atol=2e-5, rtol=0)
    got_kernel = paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index,
                                 ctx.query_positions, scale, max_seq_len=ctx.max_seq_len, block_n=16, softcap=softcap)
    torch.testing.assert_close(got_kernel.double(), expected, atol=2e-5, rtol=0)


def test_softcap_in_the_kernel_with_several_splits():
    query, key_cache, value_cache, ctx = make_case([70, 33], [1, 1], num_heads=2, kv_heads=1, head_dim=16,
                                                   page_size=16)
    expected = softcapped_reference(query, key_cache, value_cache, ctx, 0.5, 1.5)
    got = paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions,
                          0.5, max_seq_len=ctx.max_seq_len, block_n=16, num_splits=3, softcap=1.5)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


def test_softcap_must_be_positive():
    query, key_cache, value_cache, ctx = make_case([4], [1], num_heads=2, kv_heads=1, head_dim=16, page_size=8)
    with pytest.raises(ValueError, match="softcap must be > 0 or None, got -1"):
        paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions,
                        0.25, softcap=-1.0)


# ------------------------------------------------------------------ whole models


def tiny_gemma(family: str, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=128,
                  query_pre_attn_scalar=16)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, attn_logit_softcapping=0.5, final_logit_softcapping=30.0))
        with torch.no_grad():  # larger q weights: scores of several units, where the cap bends them
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
    else:  # q/k norms, query_pre_attn_scalar, sliding and full layers (no attention soft cap in Gemma 3)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, final_logit_softcapping=30.0))
    model.set_attn_implementation("eager")  # the reference: applies the soft cap itself
    return model.eval()


def set_softcap(model, softcap) -> None:
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = softcap


def dense(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.slow
def test_gemma_runner_matches_the_dense_forward(family, backend):
    seed = random.randrange(2**31)
    model = tiny_gemma(family, seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(70)]  # > 64 positions: the torch backend's shared-prefix cascade
    runner = ModelRunner(model, page_size=16, num_pages=64, backend=backend)
    [seq], logits = runner.prefill([prompt])
    reference = dense(model, prompt)
    torch.testing.assert_close(logits[0].float(), reference[-1], atol=1e-4, rtol=1e-4)
    if family == "gemma2":  # what the reference would be without the cap: the test can tell them apart
        set_softcap(model, None)
        uncapped = dense(model, prompt)[-1]
        set_softcap(model, model.config.attn_logit_softcapping)
        assert (uncapped - reference[-1]).abs().max() > 1e-3, seed  # 10x the tolerance of the match above
    children = runner.fork(seq, 3)
    next_tokens = [rng.randrange(256) for _ in children]
    step = runner.decode(children, next_tokens)
    for row, token in enumerate(next_tokens):
        torch.testing.assert_close(step[row].float(), dense(model, prompt + [token])[-1], atol=1e-4, rtol=1e-4)
    runner.free(children + [seq])
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------ sliding windows

WINDOW = 6
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def tiny_windowed_gemma3(seed: int, window: int = WINDOW):
    """A 4-layer Gemma 3 (q/k norms, GQA 2) whose layers 0, 2 and 3 see ``window`` positions."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                              query_pre_attn_scalar=16, sliding_window=window, layer_types=LAYER_TYPES)
    model = Gemma3ForCausalLM(config)
    model.set_attn_implementation("eager")
    return model.eval()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected, atol=1e-4, rtol=1e-4)


def test_the_window_changes_the_dense_reference():
    """Guard: without the window the reference moves by > 10x the tolerance of the tests below."""
    model = tiny_windowed_gemma3(0)
    rng = random.Random(0)
    tokens = [rng.randrange(256) for _ in range(40)]
    windowed = dense(model, tokens)
    model.config.sliding_window = 10**6  # the masks are built from the config at every forward
    try:
        full = dense(model, tokens)
    finally:
        model.config.sliding_window = WINDOW
    assert (windowed[: WINDOW] - full[: WINDOW]).abs().max() < 1e-5  # the same until the window is full
    assert (windowed[-1] - full[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_sliding_window_runner_matches_the_dense_forward_past_the_window(backend):
    seed = random.randrange(2**31)
    model = tiny_windowed_gemma3(seed)
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(256) for _ in range(n)]  # noqa: E731
    # 70 positions: the torch backend's shared-prefix cascade after the fork (the interpreted
    # kernel has no cascade: 24, past the window and a page); 11: past the window; 3: within
    # it until its decode steps cross it
    prompts = [tokens(70 if backend == "torch" else 24), tokens(11), tokens(3)]
    runner = ModelRunner(model, page_size=16, num_pages=96, backend=backend)
    seqs, logits = runner.prefill(prompts)
    for prompt, row in zip(prompts, logits):
        assert_logits_close(row, dense(model, prompt)[-1])

    histories = [list(prompt) for prompt in prompts]

    # forks of the long sequence decode past the window together (the cascade on torch), the
    # others in a batch of their own
    children = runner.fork(seqs[0], 3)
    groups = [(children, [list(histories[0]) for _ in children]), (seqs[1:], [list(h) for h in histories[1:]])]
    for batch, batch_histories in groups:
        start = [len(h) for h in batch_histories]
        steps = []
        for _ in range(4):  # the short sequence from 3 to 7 positions: past the window of 6
            next_tokens = tokens(len(batch))
            for history, token in zip(batch_histories, next_tokens):
                history.append(token)
            steps.append(runner.decode(batch, next_tokens))
        for i, history in enumerate(batch_histories):
            assert_logits_close(torch.stack([step[i] for step in steps]), dense(model, history)[start[i]:])
    runner.free([*children, *seqs])
    assert runner.cache.pages_in_use == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_sliding_window_runner_on_a_partial_fork_matches_the_dense_forward(backend):
    """A fork at an earlier length (a rollback), then decode steps: the window of each child
    ends at its own position, not the parent's."""
    seed = random.randrange(2**31)
    model = tiny_windowed_gemma3(seed, window=4)
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(14)]
    runner = ModelRunner(model, page_size=4, num_pages=32, backend=backend)
    [seq], _ = runner.prefill([prompt])
    children = runner.fork(seq, 2, length=9)
    histories = [prompt[:9] for _ in children]
    steps = []
    for _ in range(5):
        next_tokens = [rng.randrange(256) for _ in children]
        for history, token in zip(histories, next_tokens):
            history.append(token)
        steps.append(runner.decode(children, next_tokens))
    for i, history in enumerate(histories):
        assert_logits_close(torch.stack([step[i] for step in steps]), dense(model, history)[9:])
    runner.free([*children, seq])
    assert runner.cache.pages_in_use == 0


def test_mistral_sliding_window_beyond_its_width_matches_the_dense_forward():
    """Mistral passes its window to every layer (no full-attention layers); sdpa reference."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    model = MistralForCausalLM(config).eval()
    runner = ModelRunner(model, num_pages=8)
    tokens = [(7 * i) % 64 for i in range(20)]
    [seq], logits = runner.prefill([tokens[:12]])
    decoded = runner.decode([seq], [tokens[12]])
    runner.restore_attention()
    reference = dense(model, tokens[:13])
    assert_logits_close(logits[0], reference[11])
    assert_logits_close(decoded[0], reference[12])


def test_stablelm_is_refused_at_construction_in_one_line():
    config = StableLmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = StableLmForCausalLM(config).eval()
    with pytest.raises(ValueError) as info:
        ModelRunner(model, num_pages=8)
    message = str(info.value)
    assert "\n" not in message
    assert "StableLmForCausalLM" in message and "'stablelm'" in message
    assert "do not pass attention keyword arguments through" in message
    assert model.config._attn_implementation != "powerfast_paged"  # the model was left alone


def test_softcap_reaches_the_dense_reference():
    """Guard of the reference itself: the eager Gemma 2 forward does apply the cap."""
    model = tiny_gemma("gemma2", 0)
    tokens = list(range(1, 30))
    capped = dense(model, tokens)
    set_softcap(model, None)
    assert not torch.allclose(capped, dense(model, tokens), atol=1e-3)
    assert math.isfinite(float(capped.abs().max()))

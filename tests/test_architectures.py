"""Model families beyond Llama / Qwen: logit soft-capping (Gemma 2 / 3) and models the
runner cannot drive (StableLM).

Soft-capping: every scaled score s becomes ``cap * tanh(s / cap)`` (Gemma 2 passes the cap
to the attention function; Gemma 3 has q/k norms and sliding layers instead). The backends are
checked against float64 math on random paged inputs (tolerance 2e-5 absolute, fp32), and
the runner's logits against the model's own eager forward, which applies the cap itself
(tolerance 1e-4 absolute + relative on logits of order 1, as in test_runner.py). The caps
are small (0.5-5) so that tanh bends the random scores: without the cap the outputs
differ by > 1e-2.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from powerfast.kernels.paged_attention import paged_attention
from test_paged_attention import make_case
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    StableLmConfig,
    StableLmForCausalLM,
)

from powerfast.runtime.attention import torch_paged_attention
from powerfast.runtime.runner import ModelRunner


def softcapped_reference(query, key_cache, value_cache, ctx, scale, softcap) -> torch.Tensor:
    """float64 causal paged attention with ``softcap * tanh(q.k * scale / softcap)`` scores."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        seq = int(ctx.query_seq_index[t])
        visible = int(ctx.query_positions[t]) + 1
        slots = [int(ctx.block_tables[seq, p // block_size]) * block_size + p % block_size for p in range(visible)]
        keys = key_cache.reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        values = value_cache.reshape(-1, kv_heads, head_dim)[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", query[t].double(), keys) * scale
        scores = softcap * torch.tanh(scores / softcap)
        out[t] = torch.einsum("hk,khd->hd", scores.softmax(dim=-1), values)
    return out


@pytest.mark.parametrize("softcap", [0.7, 5.0])
def test_softcap_in_the_torch_backend_and_the_kernel(softcap):
    # mixed decode and multi-token queries; 3 sequences, lengths not multiples of the block
    query, key_cache, value_cache, ctx = make_case([37, 5, 20], [1, 5, 3], num_heads=4, kv_heads=2, head_dim=16,
                                                   block_size=8)
    scale = 16**-0.5 * 3  # large scores, where the cap bends them
    expected = softcapped_reference(query, key_cache, value_cache, ctx, scale, softcap)
    uncapped = softcapped_reference(query, key_cache, value_cache, ctx, scale, 1e9)
    assert (expected - uncapped).abs().max() > 1e-2  # the cap matters in this case
    got_torch = torch_paged_attention(query, key_cache, value_cache, ctx, scale, softcap)
    torch.testing.assert_close(got_torch.double(), expected, atol=2e-5, rtol=0)
    got_kernel = paged_attention(query, key_cache, value_cache, ctx.block_tables, ctx.query_seq_index,
                                 ctx.query_positions, scale, max_seq_len=ctx.max_seq_len, block_n=16, softcap=softcap)
    torch.testing.assert_close(got_kernel.double(), expected, atol=2e-5, rtol=0)


def test_softcap_in_the_kernel_with_several_splits():
    query, key_cache, value_cache, ctx = make_case([70, 33], [1, 1], num_heads=2, kv_heads=1, head_dim=16,
                                                   block_size=16)
    expected = softcapped_reference(query, key_cache, value_cache, ctx, 0.5, 1.5)
    got = paged_attention(query, key_cache, value_cache, ctx.block_tables, ctx.query_seq_index, ctx.query_positions,
                          0.5, max_seq_len=ctx.max_seq_len, block_n=16, num_splits=3, softcap=1.5)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


def test_softcap_must_be_positive():
    query, key_cache, value_cache, ctx = make_case([4], [1], num_heads=2, kv_heads=1, head_dim=16, block_size=8)
    with pytest.raises(ValueError, match="softcap must be > 0 or None, got -1"):
        paged_attention(query, key_cache, value_cache, ctx.block_tables, ctx.query_seq_index, ctx.query_positions,
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
def test_gemma_runner_matches_the_dense_forward(family, backend):
    seed = random.randrange(2**31)
    model = tiny_gemma(family, seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(70)]  # > 64 positions: the torch backend's shared-prefix cascade
    runner = ModelRunner(model, block_size=16, num_blocks=64, backend=backend)
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
    assert runner.cache.blocks_in_use == 0


def test_stablelm_is_refused_at_construction_in_one_line():
    config = StableLmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = StableLmForCausalLM(config).eval()
    with pytest.raises(ValueError) as info:
        ModelRunner(model, num_blocks=8)
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

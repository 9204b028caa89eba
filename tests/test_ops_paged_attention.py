"""The Triton paged attention kernel and the torch reference backend against float64 math.

Under TRITON_INTERPRET=1 (no CUDA, set by conftest) the kernel runs on CPU tensors.
Page tables come from a random permutation of the pool, lengths are not multiples of
the page size, and each case mixes decode (1 new token) and multi-token queries.

Reference: per sequence, gather its positions from the pool in float64, repeat the KV
heads for GQA, softmax(q k^T * scale) with the causal limit of each query's position (and,
with a sliding window W, its lower limit: a query at p sees p - W + 1 .. p).
Tolerances: fp32 inputs 2e-5 absolute; bf16 / fp16 inputs (kernel upcasts) compared to
float64 math on the same rounded inputs, 2e-2 absolute (output rounding).
"""

from __future__ import annotations

import math
import os

import pytest
from conftest import fresh_seed
import torch
from powerfast.kernels.paged_attention import paged_attention

from powerfast.ops.paged_attention import PagedAttentionContext, torch_paged_attention

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_case(
    lengths, query_lens, num_heads, kv_heads, head_dim, page_size, dtype=torch.float32, device="cpu", seed=None
):
    """A random pool, page tables from a permutation, and the new tokens' metadata."""
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    pages_per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + 3  # some pages belong to nobody
    key_cache = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=generator).to(dtype)
    perm = torch.randperm(num_pages, generator=generator).tolist()
    page_tables = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    start = 0
    for i, n in enumerate(pages_per_seq):
        page_tables[i, :n] = torch.tensor(perm[start : start + n])
        start += n
    positions, seq_index = [], []
    for i, (length, q_len) in enumerate(zip(lengths, query_lens)):
        positions += list(range(length - q_len, length))
        seq_index += [i] * q_len
    query = torch.randn(len(positions), num_heads, head_dim, generator=generator).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = PagedAttentionContext(
        key_caches=[key_cache],
        value_caches=[value_cache],
        slot_mapping=torch.full((len(positions),), -1, dtype=torch.long),
        page_tables=page_tables,
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        query_start_loc=query_start_loc,
        query_seq_index=torch.tensor(seq_index, dtype=torch.long),
        query_positions=torch.tensor(positions, dtype=torch.long),
        max_query_len=max(query_lens),
        max_seq_len=max(lengths),
        backend="torch",
    )
    move = lambda t: t.to(device)  # noqa: E731
    return move(query), move(key_cache), move(value_cache), ctx


def float64_reference(query, key_cache, value_cache, ctx, scale, sliding_window=None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    page_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        seq = int(ctx.query_seq_index[t])
        visible = int(ctx.query_positions[t]) + 1
        first = max(0, visible - sliding_window) if sliding_window else 0
        slots = [int(ctx.page_tables[seq, p // page_size]) * page_size + p % page_size
                 for p in range(first, visible)]
        keys = key_cache.reshape(-1, kv_heads, head_dim)[slots].double().cpu()  # (visible, kv_heads, D)
        values = value_cache.reshape(-1, kv_heads, head_dim)[slots].double().cpu()
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", query[t].double().cpu(), keys) * scale
        out[t] = torch.einsum("hk,khd->hd", scores.softmax(dim=-1), values)
    return out


CASES = [
    # lengths, query lens, heads, kv heads, head_dim, page_size, splits
    ([37, 5, 80], [1, 1, 1], 6, 3, 32, 16, 1),  # decode, odd KV heads, GQA 2
    ([37, 5, 80], [3, 1, 10], 6, 3, 32, 16, 3),  # prefill/extend tokens, flash-decoding splits
    ([130, 17], [1, 17], 4, 4, 16, 16, 2),  # MHA, whole-prompt prefill
    ([45, 200], [1, 2], 8, 1, 64, 32, None),  # MQA (group 8), bigger pages
]


@pytest.mark.parametrize("lengths, query_lens, heads, kv_heads, head_dim, page_size, splits", CASES)
def test_kernel_matches_float64_reference(lengths, query_lens, heads, kv_heads, head_dim, page_size, splits):
    query, key_cache, value_cache, ctx = make_case(lengths, query_lens, heads, kv_heads, head_dim, page_size)
    scale = head_dim**-0.5
    out = paged_attention(
        query,
        key_cache,
        value_cache,
        ctx.page_tables,
        ctx.query_seq_index,
        ctx.query_positions,
        scale,
        max_seq_len=ctx.max_seq_len,
        num_splits=splits,
        block_n=64,
    )
    expected = float64_reference(query, key_cache, value_cache, ctx, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_pools(dtype):
    query, key_cache, value_cache, ctx = make_case([29, 70], [1, 5], 4, 2, 32, 16, dtype=dtype)
    scale = 32**-0.5
    out = paged_attention(
        query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions, scale, block_n=64
    )
    assert out.dtype == dtype
    expected = float64_reference(query, key_cache, value_cache, ctx, scale)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("lengths, query_lens, heads, kv_heads, head_dim, page_size, splits", CASES)
def test_torch_backend_matches_float64_reference(lengths, query_lens, heads, kv_heads, head_dim, page_size, splits):
    query, key_cache, value_cache, ctx = make_case(lengths, query_lens, heads, kv_heads, head_dim, page_size)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch_paged_attention(query, key_cache, value_cache, ctx, scale)
    expected = float64_reference(query, key_cache, value_cache, ctx, scale)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


def runner_on_triton_matches_dense(device: str, prompt_lengths: tuple[int, int]) -> None:
    """A ragged prefill, a fork, one decode step: the runner's logits on the Triton backend
    against the model's own dense forward (float32, test_runner's tolerance)."""
    import random

    from test_runner import assert_close, dense_logits, random_tokens, tiny_model

    from powerfast.runtime.runner import ModelRunner

    runner = ModelRunner(tiny_model("qwen2", seed=random.randrange(2**31)).to(device), num_pages=128, backend="triton")
    assert runner.backend == "triton"
    rng = random.Random(fresh_seed())
    prompts = [random_tokens(rng, n) for n in prompt_lengths]
    seqs, logits = runner.prefill(prompts)
    children = runner.fork(seqs[1], 2)
    next_tokens = random_tokens(rng, 3)
    decoded = runner.decode([seqs[0], *children], next_tokens)
    runner.free([*seqs, *children])
    assert runner.cache.pages_in_use == 0
    for row, (prompt, token) in enumerate(zip([prompts[0], prompts[1], prompts[1]], next_tokens)):
        assert_close(decoded[row].cpu(), dense_logits(runner, prompt + [token]).cpu()[-1])
    for prompt, row in zip(prompts, logits):
        assert_close(row.cpu(), dense_logits(runner, prompt).cpu()[-1])


@pytest.mark.slow
def test_runner_with_the_triton_backend_matches_dense():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU twin of the cuda test below: needs TRITON_INTERPRET=1")
    runner_on_triton_matches_dense("cpu", (7, 20))


@pytest.mark.cuda
def test_runner_with_the_triton_backend_matches_dense_on_cuda():
    """Also long enough (700 positions) for the split (flash-decoding) path on a GPU."""
    runner_on_triton_matches_dense("cuda", (7, 700))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_cuda(dtype):
    query, key_cache, value_cache, ctx = make_case(
        [1000, 333, 17], [1, 1, 4], 12, 2, 128, 16, dtype=dtype, device="cuda"
    )
    ctx.page_tables, ctx.query_seq_index, ctx.query_positions = (
        t.cuda() for t in (ctx.page_tables, ctx.query_seq_index, ctx.query_positions)
    )
    scale = 128**-0.5
    out = paged_attention(
        query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions, scale
    )
    expected = float64_reference(query, key_cache, value_cache, ctx, scale)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("shared_pages, lengths", [(3, [49, 60, 80, 100]), (4, [64, 64, 65])])
def test_torch_cascade_over_a_shared_prefix_matches_float64_reference(shared_pages, lengths):
    """Decode of sequences whose page tables share their first pages (a forked prefix)."""
    page_size, heads, kv_heads, head_dim = 16, 6, 3, 32
    query, key_cache, value_cache, ctx = make_case(lengths, [1] * len(lengths), heads, kv_heads, head_dim, page_size)
    ctx.page_tables[1:, :shared_pages] = ctx.page_tables[0, :shared_pages]
    ctx.shared_prefix_pages = shared_pages
    scale = head_dim**-0.5
    out = torch_paged_attention(query, key_cache, value_cache, ctx, scale)
    expected = float64_reference(query, key_cache, value_cache, ctx, scale)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


# ------------------------------------------------------------------ sliding windows

WINDOW_CASES = [
    # lengths, query lens, heads, kv heads, head_dim, page_size, window, splits
    ([37, 5, 80], [1, 1, 1], 6, 3, 32, 16, 8, 1),  # decode; one sequence shorter than the window
    ([37, 5, 80], [3, 1, 10], 6, 3, 32, 16, 20, 3),  # prefill / extend tokens, several splits of the window
    ([130, 17], [1, 17], 4, 4, 16, 16, 17, 2),  # whole-prompt prefill exactly the window's width
    ([45, 200], [1, 40], 8, 1, 64, 32, 33, None),  # MQA, a prefill crossing pages and the window
    ([70, 21], [30, 1], 2, 1, 16, 8, 1, 2),  # a window of 1: each query sees its own key only
]


@pytest.mark.parametrize("lengths, query_lens, heads, kv_heads, head_dim, page_size, window, splits", WINDOW_CASES)
def test_kernel_with_a_sliding_window_matches_float64_reference(lengths, query_lens, heads, kv_heads, head_dim,
                                                                 page_size, window, splits):
    query, key_cache, value_cache, ctx = make_case(lengths, query_lens, heads, kv_heads, head_dim, page_size)
    scale = head_dim**-0.5
    expected = float64_reference(query, key_cache, value_cache, ctx, scale, sliding_window=window)
    unwindowed = float64_reference(query, key_cache, value_cache, ctx, scale)
    assert (expected - unwindowed).abs().max() > 1e-2  # the window matters in this case
    out = paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions,
                          scale, max_seq_len=ctx.max_seq_len, num_splits=splits, block_n=16, sliding_window=window)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("lengths, query_lens, heads, kv_heads, head_dim, page_size, window, splits", WINDOW_CASES)
def test_torch_backend_with_a_sliding_window_matches_float64_reference(lengths, query_lens, heads, kv_heads,
                                                                        head_dim, page_size, window, splits):
    query, key_cache, value_cache, ctx = make_case(lengths, query_lens, heads, kv_heads, head_dim, page_size)
    scale = head_dim**-0.5
    out = torch_paged_attention(query, key_cache, value_cache, ctx, scale, sliding_window=window)
    expected = float64_reference(query, key_cache, value_cache, ctx, scale, sliding_window=window)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("window", [5, 30, 70, 500])
def test_torch_cascade_with_a_sliding_window_matches_float64_reference(window):
    """The shared prefix's product masked per query: windows that start inside the prefix,
    past it (5: the prefix contributes nothing to any query) and before it (500: no window)."""
    page_size, heads, kv_heads, head_dim, shared_pages = 16, 6, 3, 32, 3
    lengths = [49, 60, 80, 100]
    query, key_cache, value_cache, ctx = make_case(lengths, [1] * len(lengths), heads, kv_heads, head_dim, page_size)
    ctx.page_tables[1:, :shared_pages] = ctx.page_tables[0, :shared_pages]
    ctx.shared_prefix_pages = shared_pages
    scale = head_dim**-0.5
    out = torch_paged_attention(query, key_cache, value_cache, ctx, scale, sliding_window=window)
    expected = float64_reference(query, key_cache, value_cache, ctx, scale, sliding_window=window)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


def test_kernel_refuses_a_negative_window():
    query, key_cache, value_cache, ctx = make_case([4], [1], 2, 1, 16, 8)
    with pytest.raises(ValueError, match="sliding_window must be an int >= 1, or 0 / None for none, got -3"):
        paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions,
                        0.25, sliding_window=-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_with_a_sliding_window_on_cuda(dtype):
    """The CUDA twin of test_kernel_with_a_sliding_window_matches_float64_reference: long
    sequences (several default splits of the window), Gemma 3's window width."""
    query, key_cache, value_cache, ctx = make_case(
        [1500, 333, 17], [1, 1, 4], 8, 1, 256, 16, dtype=dtype, device="cuda"
    )
    ctx.page_tables, ctx.query_seq_index, ctx.query_positions = (
        t.cuda() for t in (ctx.page_tables, ctx.query_seq_index, ctx.query_positions)
    )
    scale = 256**-0.5
    out = paged_attention(query, key_cache, value_cache, ctx.page_tables, ctx.query_seq_index, ctx.query_positions,
                          scale, sliding_window=512)
    expected = float64_reference(query, key_cache, value_cache, ctx, scale, sliding_window=512)
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[dtype], rtol=0)

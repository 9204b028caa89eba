"""pytest-benchmark: each op's kernel against its torch reference, one benchmark per op of
powerfast.ops (sampling, topk, jackknife, kv_cache, paged_attention).

    pytest bench/bench_kernels.py                      # timings
    pytest bench/bench_kernels.py --benchmark-disable  # a smoke run (CI)

The Triton cases run only on CUDA: on a CPU the kernels would run under the interpreter,
whose timings mean nothing, so only the torch path is timed there. ``extra_info`` holds
the bytes of logits read once and the effective bandwidth (those bytes / median time).
"""

from __future__ import annotations

import pytest
import torch

from bench.device_kernels import torch_sample  # the same torch baseline the GPU script times

from powerfast.ops import jackknife, kv_cache, paged_attention, sampling, topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
VOCAB_SHAPES = [(64, 32000), (64, 151936), (512, 151936)]
ESTIMATE_SHAPES = [(1, 8, 8), (64, 8, 8)]
# one layer of Qwen2.5-7B (28 query heads, 4 KV heads of 128), pages of 16; smaller on a CPU
KV_HEADS, QUERY_HEADS, HEAD_DIM, PAGE = 4, 28, 128, 16
DECODE_SHAPES = [(1, 1024), (64, 1024)] if CUDA else [(1, 256), (8, 256)]  # (sequences, cached positions)
BACKENDS = ["torch", "triton"]


def _synchronized(fn):
    if not CUDA:
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def _record_bandwidth(benchmark, num_bytes):
    benchmark.extra_info["bytes"] = num_bytes
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats is not None else None
    if median:
        benchmark.extra_info["GB/s"] = num_bytes / median / 1e9


def _skip_interpreted(backend):
    if backend == "triton" and not CUDA:
        pytest.skip("Triton runs only under the interpreter here: its timings are meaningless")


def _logits(shape):
    dtype = torch.bfloat16 if CUDA else torch.float32
    return torch.randn(shape, device=DEVICE).mul_(3).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VOCAB_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_sample_tokens(benchmark, backend, shape):
    _skip_interpreted(backend)
    logits = _logits(shape)
    logliks = torch.zeros(shape[0], device=DEVICE)
    if backend == "triton":
        fn = lambda: sampling.sample_tokens(logits, 0.7, seed=0, logliks=logliks)  # noqa: E731
    else:
        fn = lambda: torch_sample(logits, 0.7, logliks)  # noqa: E731
    benchmark.group = f"sample {shape}"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, logits.numel() * logits.element_size())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VOCAB_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_token_logprobs(benchmark, backend, shape):
    _skip_interpreted(backend)
    logits = _logits(shape)
    tokens = torch.randint(0, shape[1], (shape[0],), device=DEVICE)
    if backend == "triton":
        fn = lambda: sampling.token_logprobs(logits, tokens)  # noqa: E731
    else:
        fn = lambda: torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)  # noqa: E731
    benchmark.group = f"token_logprobs {shape}"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, logits.numel() * logits.element_size())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VOCAB_SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_topk_logprobs(benchmark, backend, shape):
    _skip_interpreted(backend)
    logits = _logits(shape)
    if backend == "triton":
        fn = lambda: topk.topk_logprobs(logits, 8)  # noqa: E731
    else:
        fn = lambda: topk._torch_topk_logprobs(logits, 8)  # noqa: E731
    benchmark.group = f"topk {shape}"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, logits.numel() * logits.element_size())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ESTIMATE_SHAPES, ids=lambda s: f"B{s[0]}-K{s[1]}-M{s[2]}")
def test_power_estimates(benchmark, backend, shape):
    _skip_interpreted(backend)
    batch, num_candidates, num_rollouts = shape
    cand = torch.log_softmax(torch.randn(batch, num_candidates, device=DEVICE), -1)
    rollouts = -torch.rand(batch, num_candidates, num_rollouts, device=DEVICE) * 300
    if backend == "triton":
        fn = lambda: jackknife._power_estimates_nosync(cand, rollouts, 4.0)  # noqa: E731
    else:
        fn = lambda: jackknife.torch_power_estimates(cand, rollouts, 4.0)  # noqa: E731
    benchmark.group = f"power_estimates {shape}"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, (cand.numel() + rollouts.numel()) * 4)


def _kv_caches(num_pages):
    dtype = torch.bfloat16 if CUDA else torch.float32
    key_cache = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    return key_cache, torch.randn_like(key_cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [64, 512])
def test_write_kv(benchmark, backend, num_tokens):
    _skip_interpreted(backend)
    key_cache, value_cache = _kv_caches(4 * num_tokens // PAGE)
    key = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, device=DEVICE).to(key_cache.dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(key_cache.shape[0] * PAGE, device=DEVICE)[:num_tokens]
    if backend == "triton":
        fn = lambda: kv_cache.write_kv(key_cache, value_cache, key, value, slots)  # noqa: E731
    else:
        fn = lambda: kv_cache._torch_write_kv(key_cache, value_cache, key, value, slots)  # noqa: E731
    benchmark.group = f"write_kv {num_tokens} tokens"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, 2 * key.numel() * key.element_size())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"N{s[0]}-L{s[1]}")
def test_paged_attention_decode(benchmark, backend, shape):
    """One decode step of one layer: a query per sequence over its cached positions."""
    _skip_interpreted(backend)
    num_seqs, length = shape
    pages_per_seq = length // PAGE
    key_cache, value_cache = _kv_caches(num_seqs * pages_per_seq)
    rows = torch.arange(num_seqs, device=DEVICE)
    positions = torch.full((num_seqs,), length - 1, device=DEVICE)
    ctx = paged_attention.PagedAttentionContext(
        key_caches=[key_cache], value_caches=[value_cache], slot_mapping=positions,
        page_tables=torch.randperm(num_seqs * pages_per_seq, device=DEVICE).view(num_seqs, -1).int(),
        seq_lens=torch.full((num_seqs,), length, dtype=torch.int32, device=DEVICE),
        cu_seqlens_k=torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE) * length,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE),
        query_seq_index=rows, query_positions=positions, max_query_len=1, max_seq_len=length, backend=backend,
    )
    query = torch.randn(num_seqs, QUERY_HEADS, HEAD_DIM, device=DEVICE).to(key_cache.dtype)
    attend = paged_attention.BACKEND_FUNCTIONS[backend]
    fn = lambda: attend(query, key_cache, value_cache, ctx, HEAD_DIM**-0.5)  # noqa: E731
    benchmark.group = f"paged_attention decode {shape}"
    benchmark(_synchronized(fn))
    _record_bandwidth(benchmark, 2 * num_seqs * length * KV_HEADS * HEAD_DIM * key_cache.element_size())

"""pytest-benchmark: each kernel against its torch reference.

    pytest bench/bench_kernels.py                      # timings
    pytest bench/bench_kernels.py --benchmark-disable  # a smoke run (CI)

The Triton cases run only on CUDA: on a CPU the kernels would run under the interpreter,
whose timings mean nothing, so only the torch path is timed there. ``extra_info`` holds
the bytes of logits read once and the effective bandwidth (those bytes / median time).
"""

from __future__ import annotations

import pytest
import torch
from device_kernels import torch_sample  # the same torch baseline the GPU script times

from powerfast.ops import jackknife, sampling, topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
VOCAB_SHAPES = [(64, 32000), (64, 151936), (512, 151936)]
ESTIMATE_SHAPES = [(1, 8, 8), (64, 8, 8)]
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

"""pytest-benchmark: end-to-end latency of every method on one model and one set of prompts.

    pytest bench/bench_e2e.py                        # timings, tiny random Llama
    pytest bench/bench_e2e.py --benchmark-disable    # one pass (CI)
    POWERFAST_BENCH_SMOLLM2=1 pytest bench/bench_e2e.py -k smollm2 --benchmark-disable -s   # ~7 min

Timings use one CPU thread (POWERFAST_BENCH_THREADS=n for more) and the torch path of the ops.

Each method is one benchmark (all prompts, one call per prompt, EOS ignored); the methods
run in the order of ``e2e.METHODS``, so each benchmark's ``extra_info`` carries the ratios
that involve it and what ran before it (plain/hf-generate on plain, power/plain on power,
mcmc/power on mcmc, recompute-mcmc/mcmc on recompute-mcmc). The last test of each model
prints the table. The library and the CLI are bench/e2e.py; the GPU run is in
bench/device_check.sh.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from bench.e2e import (
    METHODS,
    Settings,
    build_model,
    make_prompts,
    ratios,
    run_method,
    summary,
    warm_up,
    warm_up_long_context,
)

from powerfast.runtime.runner import ModelRunner

# tiny random Llama: every phase of every method runs, in seconds
TINY_TOKENS = 32
TINY_SETTINGS = Settings(block_size=8, horizon=8, num_candidates=8, top_k=4, num_rollouts=4, mcmc_steps=10,
                         num_samples=4)
# SmolLM2-135M on a CPU: the scaled-down settings of bench/RESULTS.md
SMOLLM2_TOKENS = 128
SMOLLM2_SETTINGS = Settings(block_size=32, horizon=32, num_candidates=8, top_k=4, num_rollouts=4, mcmc_steps=10,
                            num_samples=4)
SMOLLM2 = os.environ.get("POWERFAST_BENCH_SMOLLM2") == "1"


class Setup:
    """A model, one runner shared by every sampler, the prompts, and the results so far."""

    def __init__(self, name: str, settings: Settings, max_new_tokens: int, num_prompts: int, prompt_len: int):
        self.model, tokenizer, self.description = build_model(name, device="cpu")
        self.runner = ModelRunner(self.model, max_memory=256 * 2**20)
        self.prompts = make_prompts(self.model, tokenizer, num_prompts, prompt_len)
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.results = {}
        longest = max(len(p) for p in self.prompts) + max_new_tokens
        warm_up(METHODS, self.model, self.runner, settings, self.prompts[0], 8, longest)

    def measure(self, benchmark, method: str):
        result = benchmark.pedantic(
            run_method, args=(method, self.model, self.runner, self.settings, self.prompts, self.max_new_tokens),
            rounds=1, iterations=1,
        )
        self.results[method] = result
        found = ratios(list(self.results.values()))
        benchmark.extra_info.update(
            method=method,
            settings=result.settings,
            max_new_tokens=self.max_new_tokens,
            num_prompts=len(self.prompts),
            seconds_per_prompt=result.seconds_per_prompt,
            generated_tokens=result.generated_tokens,
            decoded_tokens=result.decoded_tokens,
            **{key: value for key, value in found.items() if method in key.split("/")},
        )
        return result

    def table(self) -> str:
        return summary([self.results[m] for m in METHODS if m in self.results],
                       f"{self.description}, CPU, {torch.get_num_threads()} threads, EOS ignored")


@pytest.fixture(scope="module", autouse=True)
def _torch_ops_on_cpu():
    """Time the torch path on a CPU even when tests/conftest.py set TRITON_INTERPRET=1 in
    this process (``pytest tests bench``): interpreted kernels' timings mean nothing."""
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        yield


@contextmanager
def _threads():
    """One CPU thread unless POWERFAST_BENCH_THREADS says otherwise: on a small shared
    machine more threads make the timings slower and far noisier (the ratios too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("POWERFAST_BENCH_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    with _threads():
        yield Setup("tiny", TINY_SETTINGS, TINY_TOKENS, num_prompts=2, prompt_len=32)


@pytest.mark.parametrize("method", METHODS)
def test_e2e_tiny(benchmark, tiny, method):
    result = tiny.measure(benchmark, method)
    assert result.generated_tokens == [TINY_TOKENS] * len(tiny.prompts)  # EOS ignored: full length
    assert min(result.decoded_tokens) >= TINY_TOKENS


def test_long_context_warm_up_decodes_at_the_longest_length_and_returns_every_page(tiny, monkeypatch):
    runner, length = tiny.runner, 3 * TINY_TOKENS + 1
    decoded = []  # (batch, length before the step) of each decode
    original = runner.decode

    def spy(seqs, tokens):
        decoded.append((len(seqs), max(seq.length for seq in seqs)))
        return original(seqs, tokens)

    monkeypatch.setattr(runner, "decode", spy)
    in_use = runner.cache.pages_in_use
    warm_up_long_context(runner, tiny.prompts[0], length, [1, 3])
    assert decoded == [(1, length - 1), (3, length - 1)]
    assert runner.cache.pages_in_use == in_use


def test_e2e_tiny_table(tiny):
    print("\n" + tiny.table())
    measured = ratios(list(tiny.results.values()))
    for key in measured:
        assert measured[key] > 0


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2:
        pytest.skip("set POWERFAST_BENCH_SMOLLM2=1 (minutes on a CPU)")
    with _threads():
        yield Setup("smollm2", SMOLLM2_SETTINGS, SMOLLM2_TOKENS, num_prompts=2, prompt_len=0)


@pytest.mark.parametrize("method", METHODS)
def test_e2e_smollm2(benchmark, smollm2, method):
    result = smollm2.measure(benchmark, method)
    assert result.generated_tokens == [SMOLLM2_TOKENS] * len(smollm2.prompts)


def test_e2e_smollm2_table(smollm2):
    print("\n" + smollm2.table())

"""Serving throughput: requests/s and generated tokens/s through the engine at each
concurrency, against the same prompts run one ``make_sampler(...).generate([prompt])``
call at a time (what a server without the engine would do).

    python -m bench.bench_serve --concurrency 1,4,16 --methods plain,power --requests 32 --max-tokens 32
    pytest bench/bench_serve.py                       # timings, tiny random Llama
    pytest bench/bench_serve.py --benchmark-disable   # one pass (CI)

The script runs the embedded SmolLM2-135M-Instruct (``--model`` for another) on MATH500
problems (``powerfast/data``, the eval harness's template, the chat template applied);
the pytest suite a tiny random Llama on random token prompts. EOS is ignored, so every
request generates ``max_tokens`` and both sides do the same work; request i has seed i on
both sides. Power sampling uses the scaled-down CPU settings of bench/RESULTS.md unless
flags say otherwise. The pytest suite runs on one CPU thread (POWERFAST_BENCH_THREADS for
more), the script on torch's default (``--threads`` to set it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.e2e import make_prompts, tiny_llama
from powerfast.runtime.runner import ModelRunner
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

#: Power sampling on a CPU (bench/RESULTS.md's scaled-down settings, shorter blocks).
CPU_SETTINGS = {"block_size": 16, "horizon": 16, "num_candidates": 8, "top_k": 4, "num_rollouts": 4,
                "mcmc_steps": 2, "num_particles": 8, "num_samples": 4}
TINY_SETTINGS = {"block_size": 4, "horizon": 4, "num_candidates": 4, "top_k": 2, "num_rollouts": 2,
                 "mcmc_steps": 1, "num_particles": 4, "num_samples": 2}


@dataclass
class Measurement:
    """One pass over the prompts: ``concurrency`` 0 is the one-call-at-a-time baseline."""

    method: str
    concurrency: int
    requests: int
    seconds: float
    generated_tokens: int
    decoded_tokens: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


def sampling_params(method: str, max_tokens: int, seed: int, settings: dict) -> SamplingParams:
    return SamplingParams(method=method, max_tokens=max_tokens, seed=seed, ignore_eos=True, **settings)


def run_sequential(runner, tokenizer, prompts: list[list[int]], method: str, max_tokens: int,
                   settings: dict) -> Measurement:
    """Every prompt by its own ``generate([prompt])`` call, one after the other."""
    generated = decoded = 0
    started = time.perf_counter()
    for seed, prompt in enumerate(prompts):
        params = sampling_params(method, max_tokens, seed, settings)
        [result] = params.sampler(runner, tokenizer).generate([prompt], max_tokens, ignore_eos=True)
        generated += result.num_tokens
        decoded += result.stats.tokens_total
    return Measurement(method, 0, len(prompts), time.perf_counter() - started, generated, decoded)


def run_engine(runner, tokenizer, prompts: list[list[int]], method: str, max_tokens: int, settings: dict,
               concurrency: int) -> Measurement:
    """The prompts through a fresh Engine on ``runner`` with ``concurrency`` clients, each
    sending its next request when its last one is answered (a closed loop).

    The engine is stepped in this thread, as the one-at-a-time baseline runs: on a CPU,
    torch's intra-op threads behave differently in a second thread (the server's
    AsyncEngine steps in one), which would measure the threads, not the batching.
    """
    engine = Engine(runner, tokenizer, max_queue=max(len(prompts), 1))
    queue = list(enumerate(prompts))
    finals = []
    in_flight = 0
    started = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            seed, prompt = queue.pop(0)
            engine.add_request(prompt, sampling_params(method, max_tokens, seed, settings))
            in_flight += 1
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out
                finals.append(out)
                in_flight -= 1
    seconds = time.perf_counter() - started
    return Measurement(method, concurrency, len(prompts), seconds, sum(len(f.token_ids) for f in finals),
                       sum(f.decoded_tokens for f in finals))


def table(measurements: list[Measurement], title: str = "") -> str:
    """One row per (method, concurrency); ``vs 1-by-1`` is tokens/s over the baseline's."""
    baseline = {m.method: m for m in measurements if m.concurrency == 0}
    lines = [title] if title else []
    lines.append(f"{'method':<10} {'clients':>7} {'requests':>8} {'seconds':>8} {'req/s':>7} {'tok/s':>8} "
                 f"{'decoded/s':>9} {'vs 1-by-1':>9}")
    for m in measurements:
        base = baseline.get(m.method)
        ratio = f"{m.tokens_per_second / base.tokens_per_second:.2f}x" if base else "-"
        clients = "1-by-1" if m.concurrency == 0 else str(m.concurrency)
        lines.append(f"{m.method:<10} {clients:>7} {m.requests:>8} {m.seconds:>8.2f} {m.requests_per_second:>7.2f} "
                     f"{m.tokens_per_second:>8.1f} {m.decoded_tokens / m.seconds:>9.1f} {ratio:>9}")
    return "\n".join(lines)


def measure(runner, tokenizer, prompts, methods, concurrencies, max_tokens, settings, log=None) -> list[Measurement]:
    results = []
    for method in methods:
        run_sequential(runner, tokenizer, prompts[:1], method, min(max_tokens, 8), settings)  # warm-up
        for concurrency in [0, *concurrencies]:
            if concurrency == 0:
                result = run_sequential(runner, tokenizer, prompts, method, max_tokens, settings)
            else:
                result = run_engine(runner, tokenizer, prompts, method, max_tokens, settings, concurrency)
            if log is not None:
                log(f"{method} {'1-by-1' if concurrency == 0 else f'{concurrency} clients'}: "
                    f"{result.seconds:.1f} s, {result.tokens_per_second:.1f} tok/s")
            results.append(result)
    return results


def math500_prompts(tokenizer, count: int) -> list[list[int]]:
    from powerfast.evaluation import load_task
    from powerfast.core.prompts import encode_prompts

    problems = load_task("math500").problems
    texts = [problems[i % len(problems)].prompt for i in range(count)]
    return encode_prompts(texts, tokenizer, chat_template=True)


# ------------------------------------------------------------------------------ pytest


@contextmanager
def _threads(default: int = 1):
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("POWERFAST_BENCH_THREADS", str(default))))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _torch_ops_on_cpu():
    """The torch path of the ops on a CPU, even under TRITON_INTERPRET=1 (see bench_e2e.py)."""
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        yield


TINY_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    with _threads():
        model = tiny_llama()
        runner = ModelRunner(model, num_pages=1024)
        prompts = make_prompts(model, None, 8, 16)
        results: list[Measurement] = []
        run_sequential(runner, None, prompts[:1], "power", 4, TINY_SETTINGS)  # warm-up
        yield runner, prompts, results
        print("\n" + table(results, f"tiny random Llama, {len(prompts)} requests of {TINY_TOKENS} tokens, CPU"))


@pytest.mark.parametrize("method", ["plain", "power"])
@pytest.mark.parametrize("concurrency", [0, 1, 8])
def test_serve_tiny(benchmark, tiny, method, concurrency):
    runner, prompts, results = tiny
    if concurrency == 0:
        call = (run_sequential, (runner, None, prompts, method, TINY_TOKENS, TINY_SETTINGS))
    else:
        call = (run_engine, (runner, None, prompts, method, TINY_TOKENS, TINY_SETTINGS, concurrency))
    result = benchmark.pedantic(call[0], args=call[1], rounds=1, iterations=1)
    results.append(result)
    benchmark.extra_info.update(method=method, concurrency=concurrency, requests=result.requests,
                                requests_per_second=result.requests_per_second,
                                tokens_per_second=result.tokens_per_second)
    assert result.generated_tokens == TINY_TOKENS * len(prompts)
    assert result.decoded_tokens >= result.generated_tokens
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------------------ script


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from powerfast.core.config import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or .gguf (default: the embedded model)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="clients at once (default 1,4,16)")
    parser.add_argument("--methods", default="plain,power", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--requests", type=int, default=32, help="requests per pass (default 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request, EOS ignored (default 32)")
    parser.add_argument("--kv-memory", type=int, default=None, metavar="MIB", help="KV pool (default: the runner's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for name, value in CPU_SETTINGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value, help=f"(default {value})")
    return parser


def main(argv=None) -> int:
    from powerfast.core.config import METHODS

    parser = build_parser()
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if args.requests < 1 or args.max_tokens < 1:
        parser.error(f"--requests and --max-tokens must be >= 1, got {args.requests} and {args.max_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        os.environ["POWERFAST_INTERPRET_OPS"] = "0"

    from powerfast.runtime.models import load_model

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model, tokenizer = load_model(args.model)
    runner = ModelRunner(model) if args.kv_memory is None else ModelRunner(model, max_memory=args.kv_memory << 20)
    prompts = math500_prompts(tokenizer, args.requests)
    settings = {name: getattr(args, name) for name in CPU_SETTINGS}
    results = measure(runner, tokenizer, prompts, methods, args.concurrency, args.max_tokens, settings, log)
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    print(table(results, f"{name} on {model.device}, {torch.get_num_threads()} threads, {args.requests} MATH500 "
                         f"requests of {args.max_tokens} tokens (EOS ignored); power {settings}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

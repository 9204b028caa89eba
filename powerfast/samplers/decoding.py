"""What every sampler shares: prompt handling, seeds, the batched decode loop, results.

The power sampler (``powerfast.sampler``) and the baselines (``powerfast.baselines``)
are written on top of these pieces and of :class:`powerfast.runner.ModelRunner`; none of
them touches KV tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from powerfast import library, ops
from powerfast.lm import hf_eos_token_ids, stop_token_ids
from powerfast.program import Decode, Tokens, drive

__all__ = [
    "BlockRecord",
    "GenerationResult",
    "GenerationStats",
    "SeedStream",
    "Continuations",
    "sample_continuations",
    "continuations_program",
    "sample_step",
    "encode_prompts",
    "check_no_nan",
    "phase",
    "stop_token_ids",
    "blocks_for",
    "appended_blocks",
]


# ------------------------------------------------------------------------- results


@dataclass(slots=True)
class BlockRecord:
    """One power-sampling decision (one block, or one token at block_size 1).

    candidates:         the distinct candidate blocks scored (token ids)
    candidate_logprobs: base log p(block | prefix) of each
    p_hat:              plain Monte Carlo estimate over the candidates
    probs:              the distribution sampled from (jackknife or plain)
    log_zeta:           estimated log scaling factor of each candidate
    choice:             index into ``candidates`` of the block appended
    rollout_ess:        effective sample size (1 / sum w_r^2) of each candidate's normalised
                        rollout weights, in [1, M]; None for a candidate without rollouts
                        (it ended, or no budget was left). Near 1: one rollout decided zeta
    """

    candidates: list[list[int]]
    candidate_logprobs: list[float]
    p_hat: list[float]
    probs: list[float]
    log_zeta: list[float]
    choice: int
    rollout_ess: list[float | None] | None = None


@dataclass(slots=True)
class GenerationStats:
    """Counts and timings of one prompt's generation.

    tokens_by_phase: tokens decoded by the model per phase ("prefill", "candidates",
                     "rollouts", "sample", "proposals", ...); ``tokens_total`` adds them
                     up except the prompt's prefill
    num_forwards:    model forwards (prefill, decode steps, extends) of the ``generate``
                     call up to this result: on a GPU a decode step costs about the same at
                     batch 1 and 64, so forwards, not tokens, bound the latency. Prompts
                     generated together share forwards and all count them.
    forward_rows:    sequences summed over those forwards (``mean_batch_size`` =
                     forward_rows / num_forwards)
    """

    method: str
    tokens_by_phase: dict[str, int] = field(default_factory=dict)
    num_blocks: int = 0
    wall_seconds: float = 0.0
    blocks: list[BlockRecord] = field(default_factory=list)
    acceptance_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_forwards: int = 0
    forward_rows: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.forward_rows / self.num_forwards if self.num_forwards else 0.0

    @property
    def tokens_total(self) -> int:
        return sum(v for k, v in self.tokens_by_phase.items() if k != "prefill")

    def add(self, phase_name: str, count: int) -> None:
        self.tokens_by_phase[phase_name] = self.tokens_by_phase.get(phase_name, 0) + int(count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tokens_total": self.tokens_total,
            "tokens_by_phase": dict(self.tokens_by_phase),
            "num_blocks": self.num_blocks,
            "wall_seconds": self.wall_seconds,
            "acceptance_rate": self.acceptance_rate,
            "num_forwards": self.num_forwards,
            "mean_batch_size": self.mean_batch_size,
            "blocks": [vars(b) if not hasattr(b, "__slots__") else {s: getattr(b, s) for s in b.__slots__} for b in self.blocks],
            **self.extra,
        }


@dataclass(slots=True)
class GenerationResult:
    """One prompt's completion: the generated token ids (prompt excluded; an EOS that
    ended the generation is included), their text when a tokenizer was given, and stats."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats
    log_likelihood: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# -------------------------------------------------------------------------- prompts


def encode_prompts(prompts, tokenizer=None, chat_template: bool = True, context_length: int | None = None,
                   max_new_tokens: int | None = None) -> list[list[int]]:
    """Prompts (a string, a list of strings, or token-id lists) -> token-id lists.

    Strings need a tokenizer; with ``chat_template`` and a tokenizer that has one, each
    string becomes a one-turn user conversation with the generation prompt appended.
    Raises ValueError for an empty prompt, ids that are not ints, or a prompt that does
    not leave room for ``max_new_tokens`` in ``context_length``.
    """
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings or token-id lists, got {prompts!r}")
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {index} is a string but no tokenizer was given")
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if chat_template and getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                if hasattr(ids, "keys") and "input_ids" in ids:  # BatchEncoding in newer versions
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = [int(t) for t in ids]
        else:
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError(f"prompt {index} must hold int token ids, got {ids[:8]!r}...")
        if len(ids) == 0:
            raise ValueError(f"prompt {index} is empty")
        if context_length is not None:
            need = len(ids) + (max_new_tokens or 0)
            if need > context_length:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is {need}, "
                    f"more than the model's context of {context_length} positions"
                )
        encoded.append(ids)
    return encoded


def check_no_nan(values: torch.Tensor, where: str) -> None:
    """Raise FloatingPointError if the model's logits (or log-likelihoods summed from them)
    hold a NaN. One host sync: call it once per phase, not per token."""
    if bool(torch.isnan(values).any()):
        raise FloatingPointError(f"the model returned NaN logits during {where}")


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` itself if it is an int > 0; ValueError naming the value otherwise."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    return max_new_tokens


# ---------------------------------------------------------------------------- seeds


class SeedStream:
    """A reproducible stream of 63-bit seeds for the counter-based sampling kernels."""

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator().manual_seed(int(seed) % (2**63))

    def next(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._generator).item())

    def uniform(self) -> float:
        return float(torch.rand((), generator=self._generator, dtype=torch.float64))

    def integers(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self._generator).item())

    def categorical(self, probs: torch.Tensor) -> int:
        """Index drawn from a (K,) probability vector (on any device; one host copy)."""
        probs = probs.detach().double().cpu()
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._generator).item())


# ------------------------------------------------------------------------ profiling


@contextmanager
def phase(name: str):
    """An NVTX range named after a sampler phase on CUDA; nothing elsewhere."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


# ---------------------------------------------------------------------- decode loop


class Continuations(NamedTuple):
    """What :func:`sample_continuations` returns for N sequences and S steps.

    tokens:           (N, S) int64 sampled tokens (after a row's EOS: the EOS id again)
    lengths:          (N,) int64 tokens generated per row, an ending EOS included
    base_logliks:     (N,) float32 sum of base log-probs of those tokens
    tempered_logliks: (N,) float32 the same under the tempered distribution, or None at T = 0 or 1
    last_logits:      (N, V) logits after the last token, or None if not asked for
    token_logprobs:   (N, S) float32 base log-prob of each token (0 after the end), or None
    token_tempered:   (N, S) float32 tempered log-prob of each token, or None
    log_power_sums:   (N,) float32 sum over the row's steps of log sum_x p(x | h_t)^(1/T)
                      (the tempered rollout weight of DESIGN.md section 6), or None unless
                      asked for; 0 at T = 1
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    base_logliks: torch.Tensor
    tempered_logliks: torch.Tensor | None
    last_logits: torch.Tensor | None
    token_logprobs: torch.Tensor | None = None
    token_tempered: torch.Tensor | None = None
    log_power_sums: torch.Tensor | None = None


_SEED_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (wrapping multiply)


def sample_step(
    logits: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
    temperature: float,
    eos_token_id: int | None,
) -> ops.SampleOutput:
    """One step's sampling as a function of device tensors: sample (temperature 0:
    argmax), score, accumulate, in one fused operator; no Python value read from the device.

    logits:  (N, V) the next-token logits of N rows
    seed:    () int64 device tensor, fixed for a decode loop
    counter: () int64 device tensor, the step counter; incremented in place
    active:  (N,) bool, updated in place (a row that samples EOS becomes inactive)
    logliks: (N,) float32 running base log-likelihoods, updated in place for active rows

    Row i of a step draws from the kernel's counter-based generator at offset
    ``seed * 0x9E3779B97F4A7C15 + counter * N + i`` (int64, wrapping): distinct for every
    row and step of a loop, and a pure function of tensors, so the step compiles with
    ``torch.compile(fullgraph=True)`` and can be captured as a CUDA graph.
    Returns SampleOutput(tokens (N,) int64, base_logprobs (N,), tempered_logprobs (N,),
    log_power_sums (N,); the tempered log-probs equal the base ones and the log power sums
    are 0 at temperature 0 or 1).
    """
    rows = logits.shape[0]
    offsets = seed * _SEED_MIX + counter * rows + torch.arange(rows, device=logits.device)
    eos = -1 if eos_token_id is None else int(eos_token_id)
    tokens, base, tempered, log_power_sums = library.sample_tokens(
        logits, offsets, active, logliks, float(temperature), eos
    )
    counter.add_(1)
    return ops.SampleOutput(tokens, base, tempered, log_power_sums)


def continuations_program(
    seqs: list,
    first_logits: torch.Tensor,
    num_steps: int,
    seeds: SeedStream,
    *,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    want_last_logits: bool = False,
    per_token: bool = False,
    stop_check_every: int = 32,
    want_log_power_sums: bool = False,
    stream: bool = False,
):
    """Sample ``num_steps`` tokens for every sequence in one batched decode loop, as a
    step program (it yields its decodes, see :mod:`powerfast.program`; with ``stream``
    also each step's tokens as ``Tokens``); :func:`sample_continuations` runs it on a runner.

    first_logits: (N, V) logits of the next token of each sequence. Every step samples
    all rows with :func:`sample_step` (a row that sampled EOS keeps being fed EOS, its
    statistics frozen), then decodes the batch (a Decode yield) so the sequences hold
    the new tokens' KV. The seed and the step counter are device tensors (one seed drawn
    from ``seeds`` per call): no host sync per token; whether every row has finished is
    looked at every ``stop_check_every`` steps. Temperature 0 is greedy decoding. ``want_log_power_sums``
    accumulates each active row's ``log sum_x p(x)^(1/T)`` from the sampling op.

    eos_token_id: one id or several (a row stops at the first of them it samples); after
    its end a row is fed the first id.
    """
    eos_ids = stop_token_ids(eos_token_id)
    eos_token_id = eos_ids[0] if eos_ids else None  # the sampling ops handle the first id
    num_rows = first_logits.shape[0]
    device = first_logits.device
    tokens = torch.zeros(num_rows, max(num_steps, 0), dtype=torch.long, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    base = torch.zeros(num_rows, dtype=torch.float32, device=device)
    tempered = torch.zeros(num_rows, dtype=torch.float32, device=device) if temperature not in (0, 1.0) else None
    active = torch.ones(num_rows, dtype=torch.bool, device=device)
    token_base = torch.zeros(num_rows, max(num_steps, 0), device=device) if per_token else None
    token_tempered = torch.zeros(num_rows, max(num_steps, 0), device=device) if per_token else None
    log_power_sums = torch.zeros(num_rows, dtype=torch.float32, device=device) if want_log_power_sums else None
    if temperature != 0:
        ops._check_temperature(temperature)
    seed = torch.tensor(seeds.next(), dtype=torch.int64, device=device)
    counter = torch.zeros((), dtype=torch.int64, device=device)
    logits = first_logits
    other_eos = torch.tensor(eos_ids[1:], dtype=torch.long, device=device) if len(eos_ids) > 1 else None
    steps_done = 0
    for step in range(num_steps):
        was_active = active.clone()
        out = sample_step(logits, seed, counter, active, base, temperature, eos_token_id)
        chosen = out.tokens
        if tempered is not None:
            tempered += torch.where(was_active, out.tempered_logprobs, torch.zeros_like(out.tempered_logprobs))
        if log_power_sums is not None:
            log_power_sums += out.log_power_sums  # 0 for inactive rows, at T = 0 and at T = 1
        if other_eos is not None:  # the op stopped rows on the first id; the others here, on the device
            active.logical_and_(~torch.isin(chosen, other_eos))
        tokens[:, step] = chosen
        lengths += was_active
        if per_token:
            zero = torch.zeros_like(out.base_logprobs)
            token_base[:, step] = torch.where(was_active, out.base_logprobs, zero)
            token_tempered[:, step] = torch.where(was_active, out.tempered_logprobs, zero)
        steps_done = step + 1
        last_step = step == num_steps - 1
        if eos_ids and not last_step and steps_done % stop_check_every == 0 and not bool(active.any()):
            tokens = tokens[:, :steps_done]
            if per_token:
                token_base, token_tempered = token_base[:, :steps_done], token_tempered[:, :steps_done]
            break
        if stream:
            yield Tokens(chosen, was_active)
        if not last_step or want_last_logits:
            logits = yield Decode(seqs, chosen)
    return Continuations(tokens, lengths, base, tempered, logits if want_last_logits else None,
                         token_base, token_tempered, log_power_sums)


def sample_continuations(
    runner,
    seqs: list,
    first_logits: torch.Tensor,
    num_steps: int,
    seeds: SeedStream,
    **options,
) -> Continuations:
    """Sample ``num_steps`` tokens for every sequence in one batched decode loop on
    ``runner``: :func:`continuations_program` run alone (see there for the options)."""
    return drive(continuations_program(seqs, first_logits, num_steps, seeds, **options), runner)


# ------------------------------------------------------------------ KV budget


def blocks_for(length: int, block_size: int) -> int:
    """KV blocks holding ``length`` positions."""
    return -(-length // block_size)


def appended_blocks(length: int, count: int, block_size: int) -> int:
    """Blocks a sequence forked at ``length`` positions allocates to append ``count`` more:
    its own copy of a shared, partly filled last block and the new blocks (an upper bound)."""
    return blocks_for(length + count, block_size) - length // block_size if count > 0 else 0


def forked_peak_blocks(prompt_lengths: list[int], num_branches: int, count: int, block_size: int) -> int:
    """Most blocks held when each prompt is forked into ``num_branches`` sequences that each
    append ``count`` positions: the prompt's blocks once, and every branch's own blocks
    (an upper bound whatever the branches share later, e.g. after resampling)."""
    return sum(blocks_for(length, block_size) + num_branches * appended_blocks(length, count, block_size)
               for length in prompt_lengths)


# ------------------------------------------------------------------- sampler base


def as_runner(model, **runner_kwargs):
    """``model`` itself if it is a ModelRunner or an LMRunner (then no runner settings may
    be given), else a :class:`powerfast.runner.ModelRunner` around it with ``runner_kwargs``."""
    from powerfast.lm_runner import LMRunner
    from powerfast.runner import ModelRunner

    if isinstance(model, (ModelRunner, LMRunner)):
        if runner_kwargs:
            raise ValueError(f"runner settings {sorted(runner_kwargs)} given with a ready runner")
        return model
    return ModelRunner(model, **runner_kwargs)


class RunnerSampler:
    """What every sampler holds: a runner around the model, a tokenizer, a seed stream.

    model:         a Hugging Face causal LM, a :class:`powerfast.runner.ModelRunner`, or
                   a :class:`powerfast.lm_runner.LMRunner` (any LanguageModel, e.g. the toy)
    tokenizer:     optional; needed for string prompts and for ``text`` in the results
    seed:          makes ``generate`` reproducible (None: fresh randomness)
    runner_kwargs: passed to the ModelRunner built around ``model``
    """

    method = "base"

    def __init__(self, model, tokenizer=None, seed: int | None = None, **runner_kwargs) -> None:
        from powerfast.lm_runner import LMRunner

        self.runner = as_runner(model, **runner_kwargs)
        self.tokenizer = tokenizer
        self.seeds = SeedStream(seed)
        if isinstance(self.runner, LMRunner):
            self.vocab_size = self.runner.vocab_size
            self.context_length = self.runner.context_length
            self._eos_ids = self.runner.eos_token_ids
        else:
            model = self.runner.model
            self.vocab_size = int(self.runner.vocab_size)
            self.context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
            self._eos_ids = hf_eos_token_ids(model)

    def eos_token_id(self, ignore_eos: bool) -> tuple[int, ...]:
        """Every id that ends a completion (all the model declares), or () with ignore_eos.

        Pass it as ``eos_token_id`` of :func:`sample_continuations`; test a token with ``in``.
        """
        return () if ignore_eos else self._eos_ids

    def encode(self, prompts, max_new_tokens: int, chat_template: bool = True) -> list[list[int]]:
        """Checked token-id lists of ``prompts`` (see :func:`encode_prompts`), leaving room for
        the budget, and the KV pool checked against the generation's peak need
        (:meth:`check_kv_capacity`)."""
        check_max_new_tokens(max_new_tokens)
        self._forward_mark = self._forward_counts()
        prompt_ids = encode_prompts(prompts, self.tokenizer, chat_template, self.context_length, max_new_tokens)
        self.check_kv_capacity([len(ids) for ids in prompt_ids], max_new_tokens)
        return prompt_ids

    def generate(self, prompts, max_new_tokens: int = 3072, *, ignore_eos: bool = False,
                 chat_template: bool = True, progress=None) -> list[GenerationResult]:
        """A completion per prompt (strings or token-id lists; the prompts of a call share
        decode batches): the sampler's step program (:meth:`program`) run alone on the runner.

        ignore_eos:    generate the whole budget whatever the model samples
        chat_template: wrap string prompts in the tokenizer's chat template
        progress:      optional callable ``(tokens_done, max_new_tokens)``
        """
        prompt_ids = self.encode(prompts, max_new_tokens, chat_template)
        return drive(self.program(prompt_ids, max_new_tokens, self.eos_token_id(ignore_eos), progress), self.runner)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """The step program (:mod:`powerfast.program`) of a generation: checked prompts, the
        budget, the ids that end a completion; returns a GenerationResult per prompt. With
        ``stream``, output that became final is yielded on the way (``Tokens`` / ``Final``)."""
        raise NotImplementedError

    def peak_kv_blocks(self, prompt_lengths: list[int], max_new_tokens: int, block_size: int) -> int | None:
        """Most KV blocks of ``block_size`` positions a ``generate`` of prompts of these
        lengths can hold at once with this sampler's settings (an upper bound: every row
        decodes its whole budget). Each sampler overrides it; None (here): not known, no check."""
        return None

    def check_kv_capacity(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """KVCacheTooSmallError (a ValueError) before any work when the pool's free blocks
        cannot hold :meth:`peak_kv_blocks`; nothing for runners without a paged pool."""
        from powerfast.cache import KVCacheTooSmallError

        cache = getattr(self.runner, "cache", None)
        if cache is None:
            return
        needed = self.peak_kv_blocks(prompt_lengths, max_new_tokens, cache.block_size)
        if needed is not None and needed > cache.blocks_free:
            what = f"{self.method} sampling of {len(prompt_lengths)} prompt(s) with max_new_tokens={max_new_tokens}"
            raise KVCacheTooSmallError(what, needed, cache.blocks_free, cache.num_blocks, cache.block_size,
                                       cache.bytes_per_block)

    def result(self, token_ids: list[int], stats: GenerationStats, loglik: float) -> GenerationResult:
        """A :class:`GenerationResult` for ``token_ids``, decoded to text when there is a tokenizer."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else None
        mark = getattr(self, "_forward_mark", None)
        if mark is not None:
            forwards, rows = self._forward_counts()
            stats.num_forwards, stats.forward_rows = forwards - mark[0], rows - mark[1]
        return GenerationResult(token_ids, text, stats, loglik)

    def _forward_counts(self) -> tuple[int, int]:
        """(forwards, rows over them) the runner has run so far."""
        return getattr(self.runner, "num_forwards", 0), getattr(self.runner, "forward_rows", 0)

"""The base of every sampler on the runtime: the KV budget of a request and
:class:`RunnerSampler` (a model wrapped in a runner, seeds, ``generate`` as its step program
run alone)."""

from __future__ import annotations

import torch

from powerfast.runtime.protocol import Runner
from powerfast.samplers.decoding import SeedStream
from powerfast.samplers.program import drive
from powerfast.core.prompts import check_max_new_tokens, encode_prompts
from powerfast.samplers.results import GenerationResult, GenerationStats

# ------------------------------------------------------------------ KV budget


def pages_for(length: int, page_size: int) -> int:
    """KV pages holding ``length`` positions."""
    return -(-length // page_size)


def appended_pages(length: int, count: int, page_size: int) -> int:
    """Pages a sequence forked at ``length`` positions allocates to append ``count`` more:
    its own copy of a shared, partly filled last page and the new pages (an upper bound)."""
    return pages_for(length + count, page_size) - length // page_size if count > 0 else 0


def forked_peak_pages(prompt_lengths: list[int], num_branches: int, count: int, page_size: int) -> int:
    """Most pages held when each prompt is forked into ``num_branches`` sequences that each
    append ``count`` positions: the prompt's pages once, and every branch's own pages
    (an upper bound whatever the branches share later, e.g. after resampling)."""
    return sum(pages_for(length, page_size) + num_branches * appended_pages(length, count, page_size)
               for length in prompt_lengths)


# ------------------------------------------------------------------- sampler base


def as_runner(model, **runner_kwargs) -> Runner:
    """A :class:`powerfast.runtime.runner.ModelRunner` with ``runner_kwargs`` around a model (a
    ``torch.nn.Module``: a Hugging Face causal LM); anything else is taken as a ready runner
    (:class:`powerfast.runtime.protocol.Runner`; then no runner settings may be given)."""
    if isinstance(model, torch.nn.Module):
        from powerfast.runtime.runner import ModelRunner

        return ModelRunner(model, **runner_kwargs)
    if runner_kwargs:
        raise ValueError(f"runner settings {sorted(runner_kwargs)} given with a ready runner")
    if not isinstance(model, Runner):
        raise TypeError(f"model must be a Hugging Face causal LM or a runner (powerfast.runtime.protocol.Runner: "
                        f"prefill, decode, fork, free, vocab_size, context_length, eos_token_ids, device, cache, "
                        f"num_forwards, forward_rows); got {type(model).__name__}")
    return model


class RunnerSampler:
    """What every sampler holds: a runner around the model, a tokenizer, a seed stream.

    model:         a Hugging Face causal LM, or a runner (:class:`powerfast.runtime.protocol.Runner`:
                   a :class:`powerfast.runtime.runner.ModelRunner`, a
                   :class:`powerfast.runtime.lm_runner.LMRunner` over any LanguageModel, ...)
    tokenizer:     optional; needed for string prompts and for ``text`` in the results
    seed:          makes ``generate`` reproducible (None: fresh randomness)
    runner_kwargs: passed to the ModelRunner built around ``model``
    """

    method = "base"

    def __init__(self, model, tokenizer=None, seed: int | None = None, **runner_kwargs) -> None:
        self.runner: Runner = as_runner(model, **runner_kwargs)
        self.tokenizer = tokenizer
        self.seeds = SeedStream(seed)
        self.vocab_size = self.runner.vocab_size
        self.context_length = self.runner.context_length

    def encode(self, prompts, max_new_tokens: int, chat_template: bool = True) -> list[list[int]]:
        """Checked token-id lists of ``prompts`` (see :func:`encode_prompts`), leaving room for
        the budget, and the KV pool checked against the generation's peak need
        (:meth:`check_kv_capacity`)."""
        check_max_new_tokens(max_new_tokens)
        self._forward_mark = self._forward_counts()
        prompt_ids = encode_prompts(prompts, self.tokenizer, chat_template, self.context_length, max_new_tokens,
                                    vocab_size=self.vocab_size)
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
        eos = () if ignore_eos else self.runner.eos_token_ids
        return drive(self.program(prompt_ids, max_new_tokens, eos, progress), self.runner)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """The step program (:mod:`powerfast.samplers.program`) of a generation: checked prompts, the
        budget, the ids that end a completion; returns a GenerationResult per prompt. With
        ``stream``, output that became final is yielded on the way (``Tokens`` / ``Final``)."""
        raise NotImplementedError

    def peak_kv_pages(self, prompt_lengths: list[int], max_new_tokens: int, page_size: int) -> int | None:
        """Most KV pages of ``page_size`` positions a ``generate`` of prompts of these
        lengths can hold at once with this sampler's settings (an upper bound: every row
        decodes its whole budget). Each sampler overrides it; None (here): not known, no check."""
        return None

    def check_kv_capacity(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """KVCacheTooSmallError (a ValueError) before any work when the pool's free pages
        cannot hold :meth:`peak_kv_pages`; nothing for runners without a paged pool."""
        from powerfast.runtime.cache import KVCacheTooSmallError

        cache = self.runner.cache
        if cache is None:
            return
        needed = self.peak_kv_pages(prompt_lengths, max_new_tokens, cache.page_size)
        if needed is not None and needed > cache.pages_free:
            what = f"{self.method} sampling of {len(prompt_lengths)} prompt(s) with max_new_tokens={max_new_tokens}"
            raise KVCacheTooSmallError(what, needed, cache.pages_free, cache.num_pages, cache.page_size,
                                       cache.bytes_per_page)

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
        return self.runner.num_forwards, self.runner.forward_rows

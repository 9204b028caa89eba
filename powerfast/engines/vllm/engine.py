"""VLLMEngine: every method's request program (``programs.py``) answered by an unpatched vLLM.

Only vLLM's public API: ``LLM``, ``SamplingParams``, ``TokensPrompt``, prefix caching and
``logprobs_mode``. vLLM is imported when an engine is built, never before, so the rest of
powerfast runs (and is tested) where vLLM is not installed.

One engine, ``logprobs_mode="processed_logprobs"``: a draw at temperature T reports each
sampled token's log-probability under p at T (log q for a tempered draw; log p at T = 1). A
``Score`` is a request of one token with ``prompt_logprobs=0`` over prompt + continuation at
T = 1: log p of every continuation token. vLLM computes prompt log-probs from the first
position (such a request does not read the prefix cache), so a Score costs one prefill of
its whole prompt; ``stats["prefill_tokens"]`` counts what vLLM computed (prompt tokens less
those it found cached) over every request of a completion.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from powerfast.core.config import method_config
from powerfast.core.prompts import encode_prompts
from powerfast.engines.vllm.programs import Completion, Draw, Result, Score, program_for, run_programs

__all__ = ["VLLMEngine"]


class VLLMEngine:
    """Our methods on vLLM.

    model:            a Hugging Face folder or hub name vLLM can load
    dtype:            "float32" (default), "bfloat16" or "float16"
    kv_memory:        KV cache in MiB (vLLM's ``kv_cache_memory_bytes``; default 512)
    max_model_len:    context length (default: the model's)
    eos_token_ids:    ids that end a completion (default: the tokenizer's EOS and the generation
                      config's); needed with ``skip_tokenizer_init``
    skip_tokenizer_init: token-id prompts only, no text (a model folder without tokenizer files)
    seed:             vLLM's engine seed (each request carries its own seed as well)
    llm_kwargs:       passed on to ``vllm.LLM`` (e.g. tensor_parallel_size)
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str = "float32", kv_memory: int = 512,
                 max_model_len: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 skip_tokenizer_init: bool = False, seed: int = 0, **llm_kwargs) -> None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if isinstance(kv_memory, bool) or not isinstance(kv_memory, int) or kv_memory < 1:
            raise ValueError(f"kv_memory must be an int >= 1 (MiB), got {kv_memory!r}")
        if skip_tokenizer_init and eos_token_ids is None:
            raise ValueError("skip_tokenizer_init needs eos_token_ids (there is no tokenizer to read them from)")
        # vLLM logs to stdout unless told otherwise: stdout is the caller's (sample --json)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        settings = dict(model=str(model), dtype=dtype, enforce_eager=True, enable_prefix_caching=True,
                        logprobs_mode="processed_logprobs", skip_tokenizer_init=skip_tokenizer_init, seed=seed,
                        kv_cache_memory_bytes=kv_memory << 20, max_logprobs=64)
        if max_model_len is not None:
            settings["max_model_len"] = max_model_len
        settings.update(llm_kwargs)
        self.llm = LLM(**settings)
        self.tokenizer = None if skip_tokenizer_init else self.llm.get_tokenizer()
        model_config = self.llm.llm_engine.model_config  # what the engine loaded: read, never changed
        self.context_length = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        if eos_token_ids is None:
            eos_token_ids = self._model_eos(str(model))
        self.eos_token_ids = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        self.prefill_tokens = 0

    def _model_eos(self, model: str) -> tuple[int, ...]:
        ids = []
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        try:
            from transformers import GenerationConfig

            declared = GenerationConfig.from_pretrained(model).eos_token_id
        except (OSError, ValueError):
            declared = None
        ids.extend([declared] if isinstance(declared, int) else (declared or []))
        return tuple(ids)

    # ------------------------------------------------------------------ prompts and answers

    def encode(self, prompts, chat_template: bool = True, max_new_tokens: int | None = None) -> list[list[int]]:
        """Token ids of prompts by the one prompt rule (``powerfast.core.prompts``: text through the
        chat template where there is one, chat messages, token ids), checked against the
        vocabulary and the context length."""
        return encode_prompts(prompts, self.tokenizer, chat_template, self.context_length, max_new_tokens,
                              self.vocab_size)

    def answer(self, asks: list) -> list:
        """Answer a round of asks (Draw, Score) with one ``LLM.generate`` call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for ask in asks:
            if isinstance(ask, Draw):
                prompts.append(TokensPrompt(prompt_token_ids=list(ask.prompt)))
                params.append(SamplingParams(n=ask.n, temperature=ask.temperature, max_tokens=ask.max_tokens,
                                             seed=ask.seed, logprobs=ask.top, stop_token_ids=list(ask.stop),
                                             ignore_eos=not ask.stop, detokenize=False))
            elif isinstance(ask, Score):
                prompts.append(TokensPrompt(prompt_token_ids=list(ask.prompt) + list(ask.continuation)))
                params.append(SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0,
                                             detokenize=False))
            else:
                raise TypeError(f"an ask must be a Draw or a Score, got {type(ask).__name__}")
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        answers = []
        for ask, prompt, out in zip(asks, prompts, outputs):
            self.prefill_tokens += len(prompt["prompt_token_ids"]) - (out.num_cached_tokens or 0)
            if isinstance(ask, Score):
                positions = out.prompt_logprobs[len(ask.prompt):]
                answers.append([float(d[t].logprob) for t, d in zip(ask.continuation, positions)])
                continue
            completions = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [float(d[t].logprob) for t, d in zip(tokens, c.logprobs)]
                top = []
                if ask.top:
                    first = c.logprobs[0]
                    top = sorted(((int(t), float(v.logprob)) for t, v in first.items()
                                  if v.rank is not None and v.rank <= ask.top), key=lambda item: -item[1])
                completions.append(Completion(tokens, logprobs, top))
            answers.append(completions)
        return answers

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[str | Sequence[int]], method: str = "power", config=None, *,
                 max_new_tokens: int = 3072, seed: int = 0, seeds: Sequence[int] | None = None,
                 ignore_eos: bool = False, chat_template: bool = True, preset: str = "paper",
                 **settings) -> list[Result]:
        """One completion per prompt by ``method`` (``config``, or settings over ``preset``'s
        defaults, validated as everywhere: a bad value raises naming the field). Prompt i
        uses seed ``seeds[i]``, or ``seed + i``; every prompt's programs run together, their
        asks batched."""
        if config is None:
            config = method_config(method, preset=preset, **settings)
        elif settings:
            raise ValueError(f"give a config or settings, not both (got a config and {sorted(settings)})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
        ids = self.encode(list(prompts), chat_template, max_new_tokens)
        stop = () if ignore_eos else self.eos_token_ids
        started, before = time.perf_counter(), self.prefill_tokens
        if seeds is None:
            seeds = [seed + i for i in range(len(ids))]
        elif len(seeds) != len(ids):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(ids)} prompts")
        programs = [program_for(method, config, p, max_new_tokens, stop, s) for p, s in zip(ids, seeds)]
        results = run_programs(programs, self.answer)
        elapsed = time.perf_counter() - started
        for result in results:
            result.stats["wall_seconds"] = elapsed
            result.stats["prefill_tokens_all_prompts"] = self.prefill_tokens - before
            if self.tokenizer is not None:
                result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return results

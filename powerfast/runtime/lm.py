"""The minimal language-model interface the exact oracle and the toy need.

``LanguageModel`` is a protocol: anything with ``vocab_size``, ``eos_token_ids`` and
``next_token_logprobs(sequences)`` is one. Two implementations ship here:

- :class:`TableLM` — a toy model defined by a Python function ``prefix -> {token: prob}``;
- :class:`HFLanguageModel` — any Hugging Face causal LM, scored through the paged
  runtime (:class:`powerfast.runtime.runner.ModelRunner`) when it can be, densely otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from powerfast.runtime.protocol import eos_token_ids

__all__ = ["LanguageModel", "TableLM", "HFLanguageModel"]


@runtime_checkable
class LanguageModel(Protocol):
    """What the exact oracle needs of a model: its vocabulary size, every id that ends a
    sequence (a tuple, () for none; :func:`eos_token_ids` makes one) and its next-token law."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, V) log-probabilities of the next token after each of the N sequences."""
        ...


class TableLM:
    """A language model given by a function ``prefix tuple -> {token: probability}``.

    next_token:   called with the whole token-id tuple so far (prompt included); returns
                  a mapping of token id to probability. Missing tokens have probability
                  0; the values must sum to 1. It must be deterministic: its tables are
                  memoised per prefix.
    vocab_size:   number of token ids, all in [0, vocab_size)
    eos_token_id: the end-of-sequence id, or None (``eos_token_ids`` holds it as a tuple)
    token_names:  optional names for printing, indexed by token id
    """

    def __init__(
        self,
        next_token: Callable[[tuple[int, ...]], Mapping[int, float]],
        vocab_size: int,
        eos_token_id: int | None = None,
        token_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        if token_names is not None and len(token_names) != vocab_size:
            raise ValueError(f"token_names has {len(token_names)} names for a vocabulary of {vocab_size}")
        self._next_token = next_token
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.eos_token_ids = eos_token_ids(eos_token_id)
        self.token_names = list(token_names) if token_names is not None else None
        self._row_of_prefix: dict[tuple[int, ...], int] = {}
        self._rows: list[torch.Tensor] = []
        self._log_table = torch.zeros(0, vocab_size, dtype=torch.float64)

    def name(self, token_id: int) -> str:
        return self.token_names[token_id] if self.token_names else str(token_id)

    def next_token_probs(self, prefix: Sequence[int]) -> torch.Tensor:
        """(V,) float64 probabilities of the next token after ``prefix``."""
        table = self._next_token(tuple(int(t) for t in prefix))
        probs = torch.zeros(self.vocab_size, dtype=torch.float64)
        for token, prob in table.items():
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"next_token({tuple(prefix)}) gave token {token} outside [0, {self.vocab_size})")
            if not (prob >= 0.0 and math.isfinite(prob)):
                raise ValueError(f"next_token({tuple(prefix)}) gave probability {prob!r} to token {token}")
            probs[token] = prob
        total = float(probs.sum())
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"next_token({tuple(prefix)}) probabilities sum to {total}, not 1")
        return probs

    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, V) float64 log-probabilities of the next token after each sequence."""
        index = []
        for seq in sequences:
            key = tuple(int(t) for t in seq)
            row = self._row_of_prefix.get(key)
            if row is None:
                row = self._row_of_prefix[key] = len(self._rows)
                self._rows.append(self.next_token_probs(key).log())
            index.append(row)
        if len(self._rows) > self._log_table.shape[0]:
            self._log_table = torch.stack(self._rows)
        return self._log_table[torch.tensor(index, dtype=torch.long)]


class HFLanguageModel:
    """Adapter from a Hugging Face causal LM to :class:`LanguageModel`.

    model:         a ``transformers`` causal LM (``model(input_ids).logits``)
    eos_token_id:  an id or a list of ids that end a sequence; defaults to every id of
                   ``model.generation_config.eos_token_id`` (instruct models often list several).
                   ``eos_token_ids`` holds them all, ``eos_token_id`` the first.
    batch_size:    sequences per forward pass
    use_runner:    score through a paged :class:`powerfast.runtime.runner.ModelRunner` (a ragged
                   prefill of up to ``batch_size`` sequences per forward, then free);
                   None (default) uses it when the model's attention goes through
                   transformers' AttentionInterface, False always uses dense forwards
    runner_kwargs: passed to the ModelRunner (page_size, backend, num_pages, ...). Without a
                   size the KV pool is sized to the sequences scored, growing when needed.

    Log-probabilities come back as float32 on the CPU, computed in the model's dtype. The
    model keeps its own attention implementation between calls.
    """

    def __init__(
        self,
        model,
        eos_token_id: int | Sequence[int] | None = None,
        batch_size: int = 64,
        use_runner: bool | None = None,
        **runner_kwargs,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = eos_token_ids(eos_token_id, hf_model=model)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.batch_size = batch_size
        if use_runner is None:
            use_runner = bool(getattr(model, "_supports_attention_backend", False)) and hasattr(
                model, "set_attn_implementation"
            )
        if runner_kwargs and not use_runner:
            raise ValueError(f"runner settings {sorted(runner_kwargs)} given with use_runner=False")
        self.use_runner = use_runner
        self.runner_kwargs = runner_kwargs
        self._runner = None

    @torch.inference_mode()
    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, V) float32 log-probabilities of the next token after each sequence."""
        for index, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"sequence {index} is empty: a causal LM needs at least one token")
        if self.use_runner:
            return self._runner_logprobs(sequences)
        return self._dense_logprobs(sequences)

    def _dense_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """A dense forward per group of equal length."""
        out = torch.empty(len(sequences), self.vocab_size, dtype=torch.float32)
        by_length: dict[int, list[int]] = {}
        for index, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(index)
        device = next(self.model.parameters()).device
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                input_ids = torch.tensor([list(sequences[i]) for i in chunk], device=device)
                logits = self.model(input_ids=input_ids, logits_to_keep=1).logits[:, -1, :]
                out[chunk] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out

    def _runner_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Ragged prefills of up to ``batch_size`` sequences through the paged runner, then free."""
        from powerfast.runtime.runner import ModelRunner

        page_size = self.runner_kwargs.get("page_size", 16)
        pages = [-(-len(seq) // page_size) for seq in sequences]
        sized = any(self.runner_kwargs.get(k) is not None for k in ("num_pages", "max_memory", "gpu_memory_fraction"))
        if sized and self._runner is None:
            self._runner = ModelRunner(self.model, **self.runner_kwargs)
        # chunks of at most batch_size sequences and, for a pool of fixed size, at most its pages
        capacity = self._runner.cache.num_pages if sized else None
        chunks: list[list[int]] = [[]]
        chunk_pages = 0
        for index, need in enumerate(pages):
            if chunks[-1] and (len(chunks[-1]) == self.batch_size or (capacity and chunk_pages + need > capacity)):
                chunks.append([])
                chunk_pages = 0
            chunks[-1].append(index)
            chunk_pages += need
        needed = max(sum(pages[i] for i in chunk) for chunk in chunks)
        if not sized and (self._runner is None or self._runner.cache.num_pages < needed):
            old = 0
            if self._runner is not None:
                old = self._runner.cache.num_pages
                self._runner.restore_attention()
                self._runner = None  # drop the old pool before allocating the new one
            self._runner = ModelRunner(self.model, **self.runner_kwargs, num_pages=max(needed, 2 * old, 64))
        runner = self._runner
        out = torch.empty(len(sequences), self.vocab_size, dtype=torch.float32)
        try:
            for chunk in chunks:
                seqs, logits = runner.prefill([list(sequences[i]) for i in chunk])
                runner.free(seqs)
                out[chunk] = torch.log_softmax(logits.float(), dim=-1).cpu()
        finally:
            runner.restore_attention()
        return out

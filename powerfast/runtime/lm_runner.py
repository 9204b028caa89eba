"""Any :class:`~powerfast.LanguageModel` behind the runner interface, without a KV cache.

:class:`LMRunner` implements :class:`powerfast.runtime.protocol.Runner` (``prefill``,
``decode``, ``fork``, ``free`` and the facts ``vocab_size`` / ``eos_token_ids`` /
``context_length``; no KV pool: ``cache`` is None) for a model that only scores token lists,
such as the paper's toy (:mod:`powerfast.evaluation.toy`). Each call rescores the sequences'
full token lists, so it is for small models and exactness tests, not speed.
Logits are the model's log-probabilities (float32; -inf for impossible tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from powerfast.runtime.lm import LanguageModel

__all__ = ["LMRunner", "TokenSequence"]


class TokenSequence:
    """A sequence handle of :class:`LMRunner`: its token ids (``length`` of them)."""

    __slots__ = ("tokens", "freed")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.freed = False

    @property
    def length(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


class LMRunner:
    """The runner interface (:class:`~powerfast.runtime.protocol.Runner`) over a LanguageModel,
    on the CPU and without a KV pool; ``live_sequences`` counts unfreed handles."""

    cache = None  # no KV pool: nothing to reserve or check
    device = torch.device("cpu")

    def __init__(self, lm: LanguageModel, context_length: int | None = None) -> None:
        self.lm = lm
        self.vocab_size = int(lm.vocab_size)
        self.eos_token_ids = tuple(lm.eos_token_ids)
        self.context_length = context_length
        self.live_sequences = 0
        self.num_forwards = 0  # prefill / decode calls, and the rows over them, as ModelRunner counts
        self.forward_rows = 0

    def _new(self, tokens: list[int]) -> TokenSequence:
        self.live_sequences += 1
        return TokenSequence(tokens)

    def _logits(self, seqs: Sequence[TokenSequence]) -> torch.Tensor:
        self.num_forwards += 1
        self.forward_rows += len(seqs)
        return self.lm.next_token_logprobs([s.tokens for s in seqs]).to(torch.float32)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[TokenSequence], torch.Tensor]:
        seqs = [self._new([int(t) for t in p]) for p in prompts]
        return seqs, self._logits(seqs)

    def decode(self, seqs: Sequence[TokenSequence], next_tokens) -> torch.Tensor:
        tokens = next_tokens.tolist() if isinstance(next_tokens, torch.Tensor) else list(next_tokens)
        if len(tokens) != len(seqs):
            raise ValueError(f"{len(tokens)} tokens for {len(seqs)} sequences")
        for seq, token in zip(seqs, tokens):
            self._check_live(seq)
            seq.tokens.append(int(token))
        return self._logits(seqs)

    def fork(self, seq: TokenSequence, n: int, length: int | None = None) -> list[TokenSequence]:
        self._check_live(seq)
        length = len(seq.tokens) if length is None else length
        if not 0 <= length <= len(seq.tokens):
            raise ValueError(f"fork length {length} outside [0, {len(seq.tokens)}]")
        return [self._new(seq.tokens[:length]) for _ in range(n)]

    def free(self, seqs: TokenSequence | Iterable[TokenSequence]) -> None:
        for seq in [seqs] if isinstance(seqs, TokenSequence) else list(seqs):
            self._check_live(seq)
            seq.freed = True
            self.live_sequences -= 1

    @staticmethod
    def _check_live(seq: TokenSequence) -> None:
        if seq.freed:
            raise ValueError("sequence used after it was freed")

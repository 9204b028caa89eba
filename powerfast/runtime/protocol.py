"""The runner interface: everything the samplers and the engine use of a runner
(powerfast/DESIGN.md section 3).

A runner holds sequences of token ids and returns next-token logits: it prefills prompts,
decodes one token per sequence, forks a sequence into children that share its prefix, and
frees sequences. It knows nothing of alpha or of any sampler. :class:`Runner` declares it
as a :class:`typing.Protocol`: an object with these members is a runner, whatever its class.
Two ship with powerfast: :class:`powerfast.runtime.runner.ModelRunner` (a Hugging Face causal
LM on the paged KV cache) and :class:`powerfast.runtime.lm_runner.LMRunner` (any
:class:`~powerfast.LanguageModel`, rescored in full at every call). ``tests/test_protocol.py``
runs the engine and the samplers on an object that has only these members.

:func:`eos_token_ids` is the one helper for end-of-sequence ids: what a runner's (or a
:class:`~powerfast.LanguageModel`'s) ``eos_token_ids`` holds, from an id, a list of ids or what
a Hugging Face model declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from powerfast.runtime.cache import PagedKVCache

__all__ = ["Runner", "SequenceHandle", "eos_token_ids"]


@runtime_checkable
class SequenceHandle(Protocol):
    """A runner's handle on one sequence. Callers read only its length and pass it back to
    the runner that made it; everything else about it is the runner's."""

    @property
    def length(self) -> int:
        """Positions the sequence holds (prompt and appended tokens)."""
        ...


@runtime_checkable
class Runner(Protocol):
    """What a runner offers the samplers and the engine.

    vocab_size:     token ids are in [0, vocab_size); logits have vocab_size columns
    context_length: positions a sequence may hold at most (prompt and completion), or None
                    for no limit
    eos_token_ids:  every id that ends a completion (a tuple; () for none)
    device:         where logits come back and where token tensors passed to ``decode`` live
    cache:          the paged KV pool, read for admission and budget checks (its
                    ``page_size``, ``num_pages``, ``pages_free``, ``bytes_per_page``), or
                    None for a runner without one (nothing to reserve, nothing checked)
    num_forwards, forward_rows: forwards run and the sequences over them (cumulative host ints)
    """

    vocab_size: int
    context_length: int | None
    eos_token_ids: tuple[int, ...]
    device: torch.device
    cache: PagedKVCache | None
    num_forwards: int
    forward_rows: int

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[SequenceHandle], torch.Tensor]:
        """New sequences for N non-empty prompts: (N handles, logits (N, V) after each prompt's last token)."""
        ...

    def decode(self, seqs: Sequence[SequenceHandle], next_tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token to each of N live sequences (a list, or an (N,) tensor on ``device``):
        logits (N, V) after the new tokens."""
        ...

    def fork(self, seq: SequenceHandle, n: int, length: int | None = None) -> list[SequenceHandle]:
        """n new sequences holding the first ``length`` positions of ``seq`` (default all)."""
        ...

    def free(self, seqs: Iterable[SequenceHandle]) -> None:
        """Release sequences; each is freed once, parents and children in any order."""
        ...


def eos_token_ids(eos_token_id: int | Iterable[int] | None = None, *, hf_model=None) -> tuple[int, ...]:
    """The ids that end a sequence, as a tuple of distinct ids in their order: the one helper
    for end-of-sequence ids.

    eos_token_id: an id, a list of ids, or None (no id; or, with ``hf_model``, the model's)
    hf_model:     a Hugging Face model whose declared ids are taken when ``eos_token_id`` is
                  None: its generation config's ``eos_token_id`` (an int or a list: instruct
                  models often list several), else its config's
    """
    if eos_token_id is None and hf_model is not None:
        eos_token_id = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            config = hf_model.config
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"eos_token_id must be an int >= 0, a list of them, or None; got {eos_token_id!r}")
    return tuple(dict.fromkeys(ids))

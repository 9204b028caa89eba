"""Exact power distributions by enumeration: the oracle for small models.

For a prefix h, a horizon of ``num_tokens`` tokens and an exponent alpha,

    pi(x_next | h)  ∝  sum over continuations c = (x_next, ...) of p(c | h)^alpha

where a continuation has exactly ``num_tokens`` tokens or fewer ending in EOS (nothing
follows an EOS). Equivalently pi(x) ∝ p(x | h)^alpha * zeta(x) with

    zeta(x) = sum over suffixes s of p(s | h, x)^alpha,

the suffixes having ``num_tokens - 1`` tokens or fewer ending in EOS (and zeta(EOS) = 1).

Everything is enumerated level by level, each level in batches through
``model.next_token_logprobs``, and accumulated in float64 log space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from powerfast.runtime.lm import HFLanguageModel, LanguageModel
from powerfast.runtime.protocol import eos_token_ids

__all__ = ["MAX_SEQUENCES", "as_language_model", "continuations", "power_conditional", "scaling_factor",
           "sequence_distribution"]

MAX_SEQUENCES = 2_000_000
"""Default refusal limit on ``vocab_size ** num_tokens`` (the sequences enumerated)."""


def as_language_model(model) -> LanguageModel:
    """``model`` itself if it is a :class:`~powerfast.LanguageModel`; a Hugging Face causal LM
    wrapped in :class:`~powerfast.HFLanguageModel`; TypeError for anything else."""
    if isinstance(model, LanguageModel):
        return model
    if hasattr(model, "config") and hasattr(model, "forward") and hasattr(model.config, "vocab_size"):
        return HFLanguageModel(model)
    raise TypeError(
        f"model must be a powerfast.LanguageModel (vocab_size, eos_token_ids, next_token_logprobs), e.g. "
        f"powerfast.HFLanguageModel(hf_model) or powerfast.TableLM, or a Hugging Face causal LM; "
        f"got {type(model).__name__}"
    )


def _check_args(model: LanguageModel, prefix_ids: Sequence[int], alpha: float, num_tokens: int, max_sequences: int) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    for token in prefix_ids:
        if not 0 <= int(token) < model.vocab_size:
            raise ValueError(f"prefix token {token} is outside the vocabulary [0, {model.vocab_size})")
    count = model.vocab_size**num_tokens
    if count > max_sequences:
        raise ValueError(
            f"exact enumeration of vocab_size ** num_tokens = {model.vocab_size}**{num_tokens} = {count} "
            f"sequences exceeds the limit of {max_sequences}; use a smaller vocabulary or horizon "
            "(or raise max_sequences)"
        )


def continuations(
    model: LanguageModel,
    prefix_ids: Sequence[int],
    num_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 4096,
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Every continuation of ``prefix_ids`` with positive probability.

    Continuations have exactly ``num_tokens`` tokens, or fewer when they end in EOS (any of
    the EOS ids). ``eos_token_id=None`` uses the model's ``eos_token_ids``.
    model: a LanguageModel or a Hugging Face causal LM (wrapped in HFLanguageModel).
    returns (continuations, logprobs): the token tuples and their float64 log p(c | prefix), (C,)
    """
    model = as_language_model(model)
    eos = frozenset(model.eos_token_ids if eos_token_id is None else eos_token_ids(eos_token_id))
    prefix = tuple(int(t) for t in prefix_ids)
    done: list[tuple[int, ...]] = []
    done_logprobs: list[torch.Tensor] = []
    live: list[tuple[int, ...]] = [()]
    live_logprobs = torch.zeros(1, dtype=torch.float64)
    if num_tokens == 0:
        return [()], live_logprobs
    for depth in range(num_tokens):
        next_live: list[tuple[int, ...]] = []
        next_logprobs: list[torch.Tensor] = []
        for start in range(0, len(live), batch_size):
            chunk = live[start : start + batch_size]
            step = model.next_token_logprobs([prefix + c for c in chunk]).to(torch.float64).cpu()
            joint = live_logprobs[start : start + batch_size, None] + step  # (n, V)
            rows, tokens = torch.nonzero(torch.isfinite(joint), as_tuple=True)
            for row, token in zip(rows.tolist(), tokens.tolist()):
                seq = chunk[row] + (token,)
                if token in eos or depth == num_tokens - 1:
                    done.append(seq)
                    done_logprobs.append(joint[row, token].reshape(1))
                else:
                    next_live.append(seq)
                    next_logprobs.append(joint[row, token].reshape(1))
        live = next_live
        live_logprobs = torch.cat(next_logprobs) if next_logprobs else torch.zeros(0, dtype=torch.float64)
        if not live:
            break
    logprobs = torch.cat(done_logprobs) if done_logprobs else torch.zeros(0, dtype=torch.float64)
    return done, logprobs


def power_conditional(
    model: LanguageModel,
    prefix_ids: Sequence[int],
    alpha: float,
    num_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    max_sequences: int = MAX_SEQUENCES,
) -> torch.Tensor:
    """Exact pi(x_next | prefix) of the power distribution over ``num_tokens``-token futures.

    model:         any :class:`~powerfast.LanguageModel`, or a Hugging Face causal LM (wrapped
                   in :class:`~powerfast.HFLanguageModel`); anything else is a TypeError
    prefix_ids:    the prompt and the tokens generated so far
    alpha:         the exponent (> 0; 1 gives the model's own next-token distribution)
    num_tokens:    horizon, counting the next token itself
    eos_token_id:  end-of-sequence id or ids; None uses the model's (every EOS id it declares)
    max_sequences: refuse (ValueError) when ``vocab_size ** num_tokens`` exceeds it
    returns:       (vocab_size,) float64 probabilities
    """
    model = as_language_model(model)
    _check_args(model, prefix_ids, alpha, num_tokens, max_sequences)
    seqs, logprobs = continuations(model, prefix_ids, num_tokens, eos_token_id)
    first = torch.tensor([s[0] for s in seqs], dtype=torch.long)
    weights = alpha * logprobs
    mass = torch.zeros(model.vocab_size, dtype=torch.float64).index_add_(0, first, torch.exp(weights - weights.max()))
    return mass / mass.sum()


def scaling_factor(
    model: LanguageModel,
    prefix_ids: Sequence[int],
    token: int,
    alpha: float,
    num_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    max_sequences: int = MAX_SEQUENCES,
) -> float:
    """Exact zeta(token) = sum over suffixes s of p(s | prefix, token)^alpha.

    ``num_tokens`` is the same horizon as in :func:`power_conditional` (it counts
    ``token``), so the suffixes have ``num_tokens - 1`` tokens or fewer ending in EOS and
    ``power_conditional[x] ∝ p(x | prefix)^alpha * scaling_factor(..., x, ...)``.
    Returns 1.0 for an EOS id or ``num_tokens == 1`` (the empty suffix).
    """
    model = as_language_model(model)
    _check_args(model, prefix_ids, alpha, num_tokens, max_sequences)
    if not 0 <= int(token) < model.vocab_size:
        raise ValueError(f"token {token} is outside the vocabulary [0, {model.vocab_size})")
    eos = frozenset(model.eos_token_ids if eos_token_id is None else eos_token_ids(eos_token_id))
    if num_tokens == 1 or int(token) in eos:
        return 1.0
    _, logprobs = continuations(model, list(prefix_ids) + [int(token)], num_tokens - 1, eos)
    return float(torch.exp(torch.logsumexp(alpha * logprobs, dim=0)))


def sequence_distribution(
    model: LanguageModel,
    prefix_ids: Sequence[int],
    alpha: float,
    num_tokens: int,
    eos_token_id: int | None = None,
    max_sequences: int = MAX_SEQUENCES,
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """The exact power distribution over whole completions: ``p(c | prefix)^alpha / Z``.

    Completions are those of :func:`continuations` (``num_tokens`` tokens, or fewer ending
    in EOS): what a sampler with ``max_new_tokens = num_tokens`` can return.
    returns (completions, probs (C,) float64 summing to 1)
    """
    _check_args(model, prefix_ids, alpha, num_tokens, max_sequences)
    seqs, logprobs = continuations(model, prefix_ids, num_tokens, eos_token_id)
    return seqs, torch.softmax(alpha * logprobs, dim=0)

"""Prompts: the one rule that turns a string, a token-id list or chat messages into the
prompt's token ids (the same for ``generate``, the engine, the server and evaluation), and the
checks of the generation budget."""

from __future__ import annotations

from collections.abc import Sequence

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


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` itself if it is an int > 0; ValueError naming the value otherwise."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    return max_new_tokens

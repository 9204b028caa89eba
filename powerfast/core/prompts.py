"""Prompts: the one rule that turns a string, a token-id list or chat messages into the
prompt's token ids (the same for ``generate``, the engine, the server and evaluation), and the
checks of the generation budget."""

from __future__ import annotations

from collections.abc import Sequence

# -------------------------------------------------------------------------- prompts


class PromptError(ValueError):
    """A prompt that cannot be encoded; ``field`` is "prompt", "messages" or "max_tokens"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _template(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:  # BatchEncoding in newer versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_prompt(prompt, tokenizer=None, *, chat_template: bool = True, vocab_size: int | None = None,
                  name: str = "the prompt") -> list[int]:
    """The one rule for a prompt, used by ``generate``, the engine, the server and evaluation:

    - text: with ``chat_template`` and a tokenizer that has a chat template, a one-turn user
      conversation with the generation prompt appended; otherwise the tokenizer's ids of
      the text (its special tokens included, e.g. BOS);
    - chat messages (``[{"role": ..., "content": ...}, ...]``): the tokenizer's chat template
      with the generation prompt (a template is required);
    - token ids: as they are (each in ``[0, vocab_size)`` when ``vocab_size`` is given).

    Raises :class:`PromptError` (a ValueError naming the field) for anything else, an empty
    prompt, text without a tokenizer, or messages the template refuses.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("prompt", f"{name} is empty")
        if tokenizer is None:
            raise PromptError("prompt", f"{name} is text but no tokenizer was given; give token ids")
        if chat_template and getattr(tokenizer, "chat_template", None):
            return _template(tokenizer, [{"role": "user", "content": prompt}])
        ids = [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
        if not ids:
            raise PromptError("prompt", f"{name} is empty once tokenized")
        return ids
    if _is_messages(prompt):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PromptError("messages", "chat messages need a tokenizer with a chat template")
        try:
            return _template(tokenizer, list(prompt))
        except Exception as error:  # noqa: BLE001 - a template's own complaint about the messages
            raise PromptError("messages", f"the chat template refused the messages: {error}") from None
    if not isinstance(prompt, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
        shown = list(prompt)[:8] if isinstance(prompt, (list, tuple)) else type(prompt).__name__
        raise PromptError("prompt", f"{name} must be text, int token ids or chat messages, got {shown!r}")
    if not prompt:
        raise PromptError("prompt", f"{name} is empty")
    if vocab_size is not None:
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise PromptError("prompt", f"token id {bad[0]} of {name} is outside the vocabulary [0, {vocab_size})")
    return list(prompt)


def check_fits(ids: list[int], context_length: int | None, max_new_tokens: int | None, name: str = "the prompt",
               budget_name: str = "max_new_tokens") -> None:
    """PromptError unless the prompt and the budget fit the model's context."""
    if context_length is None:
        return
    need = len(ids) + (max_new_tokens or 0)
    if need > context_length:
        # the prompt alone is the problem, or only the budget makes it too long
        field = "prompt" if len(ids) >= context_length else "max_tokens"
        raise PromptError(field, f"{name} has {len(ids)} tokens; with {budget_name}={max_new_tokens} that is "
                                 f"{need}, more than the model's context of {context_length} positions")


def encode_prompts(prompts, tokenizer=None, chat_template: bool = True, context_length: int | None = None,
                   max_new_tokens: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """Prompts (one prompt, or a list of them: text, chat messages or token-id lists) ->
    token-id lists, each by :func:`encode_prompt`, each checked to fit ``context_length``
    with ``max_new_tokens``. Raises PromptError (a ValueError) naming the prompt's index."""
    if isinstance(prompts, str) or _is_messages(prompts) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PromptError("prompt", f"prompts must be a non-empty list of strings or token-id lists, got {prompts!r}")
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(prompt, tokenizer, chat_template=chat_template, vocab_size=vocab_size,
                            name=f"prompt {index}")
        check_fits(ids, context_length, max_new_tokens, name=f"prompt {index}")
        encoded.append(ids)
    return encoded


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` itself if it is an int > 0; ValueError naming the value otherwise."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    return max_new_tokens

"""Incremental detokenisation: the text of a growing list of token ids, with work per update
proportional to the new tokens, not to the whole text.

Decoding a suffix of ids on its own can differ from the same ids inside the whole text
(a SentencePiece tokenizer drops the leading space of a text's first token; a byte-level BPE
may end a window inside a multi-byte character). So each update decodes a small *window*:
the ids from ``prefix`` (a few tokens before the new ones) to the end, and keeps what that
window adds to the decoding of its own first part, ``ids[prefix:read]``. A window whose text
ends in an unfinished character (U+FFFD) is held back until a later token completes it, or
until :meth:`IncrementalDetokenizer.update` is called with ``final=True``. Should a window's
text not extend its first part (a tokenizer whose clean-up rules look across the boundary),
the update falls back to decoding everything once. ``tests/test_detokenizer.py`` checks the
result equals ``tokenizer.decode(all ids)`` for the tokenizers the project uses.
"""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
_FALLBACK_WINDOW = 4  # ids of context kept before the next window after a full decode


class IncrementalDetokenizer:
    """The text of one request's tokens (``skip_special_tokens=True``), updated as they grow.

    text:  the decoded text of the ids up to the last complete character
    """

    __slots__ = ("tokenizer", "text", "_prefix", "_read", "_seen")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # first id of the window
        self._read = 0  # ids before this are in ``text``
        self._seen = 0  # len(ids) at the last update

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> str:
        """``text`` after ``ids`` (the same list, grown since the last call); with ``final``
        an unfinished last character is kept as U+FFFD, as a full decode gives it."""
        if len(ids) == self._seen and not final:
            return self.text
        self._seen = len(ids)
        if self._read == len(ids):
            return self.text
        before = self._decode(ids[self._prefix:self._read])
        while not before and self._prefix > 0:  # context that decodes to nothing (special tokens): widen
            self._prefix = max(0, self._prefix - _FALLBACK_WINDOW)
            before = self._decode(ids[self._prefix:self._read])
        window = self._decode(ids[self._prefix:])
        if not window.startswith(before):  # the boundary is not clean for this tokenizer: decode once in full
            text = self._decode(ids)
            if text.endswith(_REPLACEMENT) and not final:
                return self.text  # an unfinished character: wait for the next token
            self.text = text
            self._prefix, self._read = max(0, len(ids) - _FALLBACK_WINDOW), len(ids)
            return self.text
        if window.endswith(_REPLACEMENT) and not final:
            return self.text  # an unfinished character: wait for the next token
        self.text += window[len(before):]
        self._prefix, self._read = self._read, len(ids)
        return self.text

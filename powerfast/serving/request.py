"""A request inside the engine (its state) and what the engine reports of it (:class:`RequestOutput`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from powerfast.samplers.program import Tokens
from powerfast.serving.detokenizer import IncrementalDetokenizer
from powerfast.serving.params import SamplingParams

__all__ = ["FINISH_REASONS", "RequestOutput", "Request"]

FINISH_REASONS = ("stop", "length", "abort", "error")
"""Why a request ended: EOS or a stop string, the token budget, an abort, an error."""


@dataclass
class RequestOutput:
    """What :meth:`Engine.step` reports of a request: tokens that became final since the
    last output (plain and greedy: every step; power: every block; MCMC, SMC, best-of-N and
    sir: at the end) and everything so far.

    new_text / text: incremental detokenisation (a tokenizer is needed; "" without one);
    text that could be the start of a stop string or of a multi-byte character is held
    back until it is not. decoded_tokens: every token decoded for the request so far
    (candidates, rollouts, proposals, particles...), the prompt excluded.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    decoded_tokens: int
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    result: Any = None  # the sampler's GenerationResult (with stats) when its program ran to its end;
    # None when the engine ended it first (an EOS or stop string streamed by a decode loop, an abort)
    seed: int | None = None  # the request's seed: the one it was given, or the one drawn when it was added


class Request:
    """A request's state inside the engine."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sampler, need: int,
                 detokenizer: IncrementalDetokenizer | None = None, stream: bool = True) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampler = sampler
        self.need = need  # KV pages reserved while it runs
        self.stream = stream  # False: no outputs before the final one
        self.program = None
        self.pending = None  # the Prefill / Decode / Sample the program waits on
        self.token_ids: list[int] = []
        self.text = ""
        self.detokenizer = detokenizer  # None without a tokenizer: no text
        self.stop_scan = 0  # characters of ``text`` already searched for stop strings
        self.sent_tokens = 0
        self.sent_text = 0
        self.decoded = 0
        self.forwards = 0  # model forwards with rows of this request
        self.forward_rows = 0  # its own rows over them
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.stopped_by_string = False
        self.eos: tuple[int, ...] = ()
        self.loop_row = None  # its decode loop's row when the engine steps the loop itself (serving/loops.py)
        self.streamed: list[Tokens | int] = []  # this step's sampled tokens: yielded, or a launched row's place

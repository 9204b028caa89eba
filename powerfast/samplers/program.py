"""Step programs: samplers written as generators of the forwards they need (powerfast/DESIGN.md section 8).

A sampler's work on a set of prompts is a *program*: a generator that yields one
request for a forward at a time and receives its result,

    seqs, logits = yield Prefill(prompt_ids)      # new sequences, (N, V) last-position logits
    logits = yield Decode(seqs, tokens)           # one token appended to each, (N, V) logits

    sampled = yield Sample(logits, seed, counter, ...)  # one token per row (see sampling.py)

and returns the results when done. Forks and frees are no forwards: a program calls the
runner for them directly. Sampling is yielded rather than called so that the engine can
sample the rows of all its requests in one launch
(:func:`powerfast.samplers.sampling.sample_all`). A program may also yield what became
final, for streaming:

    yield Tokens(tokens, live)      # sampled tokens of its output rows (device tensors, no sync)
    yield Final(index, token_ids)   # host token ids of prompt ``index`` that can no longer change

A decode loop whose rows are its outputs marks its Samples ``stream=True`` instead of
yielding Tokens: a streaming driver reports the reply's tokens, one resume fewer per token
(the driver sends None back for Tokens and Final). A streaming decode loop of one row with
nothing but its tokens to keep (a plain, low-temperature or greedy request) yields the whole
loop instead of its steps:

    continuations = yield Loop(seq, first_logits, num_steps, seed, temperature, eos_token_ids)

and a driver runs it: ``drive`` as the loop itself would, step by step; the engine as one row of
a batch it steps itself, with the same offsets, so the same draws from the same logits. :func:`drive` runs one program alone on a runner,
which is what every ``generate`` does; :class:`powerfast.serving.engine.Engine` runs many at once
and merges their decodes into one forward per step. A program holds sequences only inside
``try/finally``: closing it (``program.close()``, what an abort does) frees them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch

from powerfast.samplers.sampling import Sample, sample_all

__all__ = ["Prefill", "Decode", "Sample", "Tokens", "Final", "Loop", "Program", "drive"]


class Prefill(NamedTuple):
    """Prefill these prompts (N lists of token ids); the program receives (N sequences, (N, V) logits)."""

    prompts: list[list[int]]


class Decode(NamedTuple):
    """Append ``tokens[i]`` to ``seqs[i]``; the program receives the (N, V) logits after them.

    tokens: (N,) int64 device tensor or a list of N ints.
    """

    seqs: list
    tokens: Any


class Tokens(NamedTuple):
    """The tokens a decode loop sampled this step: ``tokens`` (N,) int64 and ``live`` (N,)
    bool (rows that had not ended before this step; only their tokens are appended).
    Row i is the program's output i (yielded by programs whose rows are their outputs)."""

    tokens: torch.Tensor
    live: torch.Tensor


class Final(NamedTuple):
    """Host token ids appended to prompt ``index``'s output that can no longer change."""

    index: int
    token_ids: list[int]


class Loop(NamedTuple):
    """A whole streaming decode loop of one row: ``num_steps`` tokens sampled after the
    sequence ``seq`` whose next-token logits are ``first_logits`` (1, V), at ``temperature``
    (0: argmax) with the loop's ``seed`` (step ``t`` draws at offset ``seed * SEED_MIX + t``),
    each token streamed, EOS ids ``eos_token_ids`` (the first one ends the row in the sampling
    op); the row stops at one of them, or after ``num_steps``. The program receives the
    loop's :class:`~powerfast.samplers.decoding.Continuations` (its EOS checked every 32 steps,
    as :func:`~powerfast.samplers.decoding.continuations_program` does). ``run()`` is the
    loop as a program of Samples and Decodes, for a driver that runs it step by step."""

    seq: Any
    first_logits: torch.Tensor
    num_steps: int
    seed: int
    temperature: float
    eos_token_ids: tuple[int, ...]
    run: Callable[[], Any]


Program = Generator[Any, Any, Any]


def drive(program: Program, runner) -> Any:
    """Run ``program`` alone on ``runner`` to its end and return its value.

    Prefills and decodes go to the runner one by one, exactly as the program yields them,
    and each Sample to one call of the sampling operator; streaming yields are ignored. If the runner raises, the program is closed (its
    ``finally`` blocks free what it holds) and the error propagates.
    """
    try:
        request = next(program)
        while True:
            if isinstance(request, Decode):
                reply = runner.decode(request.seqs, request.tokens)
            elif isinstance(request, Sample):
                [reply] = sample_all([request])
            elif isinstance(request, Prefill):
                reply = runner.prefill(request.prompts)
            elif isinstance(request, (Tokens, Final)):
                reply = None
            elif isinstance(request, Loop):  # the loop itself, step by step
                reply = drive(request.run(), runner)
            else:
                raise TypeError(f"a step program yielded {type(request).__name__}, not a Prefill, Decode, Sample, "
                                f"Tokens, Final or Loop")
            request = program.send(reply)
    except StopIteration as done:
        return done.value
    finally:
        program.close()

"""The serving engine: requests that come and go between decode steps (DESIGN.md section 8).

Every sampler is a *step program* (:mod:`powerfast.program`): a generator that yields
the forwards it needs (prefill these prompts, decode these sequences with these tokens)
and receives their logits; forks and frees it does itself, at once. :class:`Engine`
keeps a set of running programs, one per request, and at each :meth:`Engine.step`
advances every one of them to its next forward, merges all the decode work (whatever the
methods) into ONE batched decode forward and all prefills into one packed prefill
forward, and hands each program its rows of the logits. A request added between two
steps joins at the next one.

Random numbers belong to requests: each request's program draws from its own seed
stream (``SamplingParams.seed``), so what a request samples does not depend on what
shares its batches. The logits themselves can differ in the last bits with the batch
composition (different kernels, reduction orders), which can flip a draw that sits on a
boundary: same distribution, rarely the same tokens. A request alone gives the tokens of
``make_sampler(...).generate([prompt])`` with the same seed.

Admission: a request is admitted only when the KV blocks its method can hold at its
peak (``sampler.peak_kv_blocks``) fit next to the reservations of the running requests;
otherwise it waits in a bounded queue (:class:`QueueFullError` when full). A request that
could never fit (its peak exceeds the whole pool, or settings past the engine's limits)
is refused at once (:class:`RequestTooLargeError`). Reservations are upper bounds, so
``OutOfBlocksError`` cannot happen. ``abort`` closes the program: its blocks are freed
before ``abort`` returns (or at the start of the next step when called from another thread
while a step runs).

Threads: :meth:`Engine.add_request` and :meth:`Engine.abort` may be called from any
thread; :meth:`Engine.step` from one thread at a time. :class:`AsyncEngine` runs the
steps in a background thread and serves ``async for`` streams to asyncio tasks.
"""

from __future__ import annotations

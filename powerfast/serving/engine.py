"""The serving engine: requests that come and go between decode steps (powerfast/DESIGN.md section 8).

Every sampler is a *step program* (:mod:`powerfast.samplers.program`): a generator that yields
the forwards it needs (prefill these prompts, decode these sequences with these tokens)
and receives their logits; forks and frees it does itself, at once. :class:`Engine`
keeps a set of running programs, one per request, and at each :meth:`Engine.step`
advances every one of them to its next forward, merges all the decode work (whatever the
methods) into ONE batched decode forward and all prefills into one packed prefill
forward, and hands each program its rows of the logits. The programs then ask for their
tokens (a ``Sample`` each), and the engine samples the rows of all of them in ONE launch
of the sampling op after each forward (:func:`powerfast.samplers.sampling.sample_all`:
per-row offsets, temperatures and EOS ids as device tensors; each request's rows keep
the offsets its own loop gives them). A request added between two steps joins at the
next one.

Random numbers belong to requests: each request's program draws from its own seed
stream (``SamplingParams.seed``), so what a request samples does not depend on what
shares its batches. A request without a seed gets one when it is added, from the operating
system's randomness (:meth:`SamplingParams.resolved`), and is planned then, once: nothing
later draws a seed, and no library's use of torch's global generator can change one. The
logits themselves can differ in the last bits with the batch composition (different
kernels, reduction orders), which can flip a draw that sits on a boundary: same
distribution, rarely the same tokens. A request alone gives the tokens of
``make_sampler(...).generate([prompt])`` with the same seed.

Admission: a request is admitted only when the KV pages its method can hold at its
peak (``sampler.peak_kv_pages``) fit next to the reservations of the running requests;
otherwise it waits in a bounded queue (:class:`QueueFullError` when full). A request that
could never fit (its peak exceeds the whole pool, or settings past the engine's limits)
is refused at once (:class:`RequestTooLargeError`). Reservations are upper bounds, so
``OutOfPagesError`` cannot happen. ``abort`` closes the program: its pages are freed
before ``abort`` returns (or at the start of the next step when called from another thread
while a step runs).

Threads: :meth:`Engine.add_request` and :meth:`Engine.abort` may be called from any
thread; :meth:`Engine.step` from one thread at a time. :class:`AsyncEngine` runs the
steps in a background thread and serves ``async for`` streams to asyncio tasks.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from powerfast.runtime.protocol import Runner
from powerfast.samplers.program import Decode, Final, Loop, Prefill, Tokens
from powerfast.core.prompts import PromptError, check_fits, encode_prompt
from powerfast.samplers.sampling import Launch, Sample, sample_launch
from powerfast.serving import faults
from powerfast.serving.detokenizer import IncrementalDetokenizer
from powerfast.serving.errors import InvalidRequestError, QueueFullError, RequestTooLargeError
from powerfast.serving.loops import LoopBatch
from powerfast.serving.params import SamplingParams
from powerfast.serving.request import FINISH_REASONS, Request, RequestOutput

__all__ = ["Engine", "EngineStats"]


@dataclass
class EngineStats:
    """A snapshot of the engine's state and counters (cumulative since it started).

    tokens_by_phase counts the requests that have ended: a program that ran to its end
    reports its own phases (prefill, sample, candidates, rollouts, proposals, refresh...);
    one the engine ended counts its prompt as prefill and what it decoded as "sample" (a
    decode loop ended at its EOS or stop string), "stopped early" (a stop string inside a
    power block), "aborted" or "failed"."""

    num_waiting: int
    num_running: int
    kv_pages_total: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_reserved: int
    num_steps: int
    num_forwards: int
    forward_rows: int
    last_step_forwards: int
    sample_launches: int
    last_step_sample_launches: int
    requests_finished: dict[str, int]
    requests_rejected: dict[str, int]
    tokens_by_phase: dict[str, int]
    max_queue: int


# --------------------------------------------------------------------------- engine


class Engine:
    """Continuous batching of step programs over one runner (:class:`powerfast.runtime.protocol.Runner`).

    model:        a Hugging Face causal LM or a ready runner (a ModelRunner, an LMRunner, ...)
    tokenizer:    for string and chat prompts, stop strings and ``text`` (optional)
    max_queue:    requests waiting for admission at most (:class:`QueueFullError` past it)
    max_branches: sequences one request may decode at once at most (power K x M, SMC's N,
                  best-of-N's and sir's N): a guard against one request taking the whole batch
    runner_kwargs: passed to the ModelRunner built around ``model`` (page_size,
                  num_pages, max_memory, backend, ...)
    """

    def __init__(self, model, tokenizer=None, *, max_queue: int = 256, max_branches: int = 4096,
                 **runner_kwargs) -> None:
        from powerfast.samplers.base import as_runner

        for name, value in (("max_queue", max_queue), ("max_branches", max_branches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.runner: Runner = as_runner(model, **runner_kwargs)
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_branches = max_branches
        self.cache = self.runner.cache
        self.device = self.runner.device
        self.context_length = self.runner.context_length
        self.vocab_size = self.runner.vocab_size
        self._lock = threading.Lock()  # guards the queues and counters (short holds only)
        self._step_lock = threading.Lock()  # held for a whole step
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids: dict[str, Request] = {}
        self._deferred_aborts: set[str] = set()
        self._ready: list[RequestOutput] = []  # outputs produced outside a step, returned by the next
        self._reserved = 0
        self._counter = itertools.count()
        self.num_steps = 0
        self.last_step_forwards = 0
        self.sample_launches = 0
        self.last_step_sample_launches = 0
        self.last_step_rows: dict[str, int] = {}
        """Rows each request had in the last step's decode forward (the merged batch)."""
        self._finished = dict.fromkeys(FINISH_REASONS, 0)
        self._rejected = {"queue_full": 0, "invalid": 0, "too_large": 0}
        self._tokens_by_phase: dict[str, int] = {}
        self.forward_errors_are_fatal = False
        """Whether a failed forward or sampling launch ends the step with the error (tensor
        parallelism: a forward is a collective, and a rank that fails alone breaks the
        lockstep) instead of failing only the requests in it."""
        self.sampled: list[tuple[str, torch.Tensor]] | None = None
        """None, or a list that each step fills with (request id, sampled tokens) of every
        sampling launch (device tensors, in launch order) and that turns on
        ``last_step_positions``: what the tensor-parallel step guard hashes."""
        self.sampled_host: list[int] | None = None
        """With ``sampled`` on: the step's sampled tokens of ``sampled``, flattened in its order,
        read to the host in the step's one device-to-host copy (with the streamed tokens)."""
        self.last_step_positions: dict[str, int] = {}
        """With ``sampled`` on: the positions each request's rows held in the last step's
        decode forward, summed (its sequences' lengths before the new token)."""
        self._loops = LoopBatch(self.device)  # the one-row streaming decode loops the engine steps itself
        self._launches: list[Launch] = []  # the sampling launches of the running step
        self._launched_rows = 0  # their rows so far: a streamed Sample's first row is read at its place
        self._fault = faults.from_env()  # test-only (powerfast/serving/faults.py); None normally

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None, *,
                    chat_template: bool = True, stream: bool = True) -> str:
        """Queue a request; it is admitted at a step when its KV need fits. Thread-safe.

        prompt: a string, chat messages ``[{"role": "user", "content": "..."}, ...]`` or a
                list of token ids, read by the rule ``generate`` uses
                (:func:`powerfast.core.prompts.encode_prompt`): a string becomes a one-turn
                user conversation through the tokenizer's chat template when it has one and
                ``chat_template`` is True, and is tokenised as it is otherwise
        stream: whether :meth:`step` reports the request's tokens as they become final (an
                output per step with new tokens); False: only its final output, and no
                per-step work for its text (it is decoded once at the end, or every step
                only when stop strings must be looked for). The tokens are the same.
        A request without a seed gets a fresh one here (:meth:`SamplingParams.resolved`;
        its outputs report it as ``seed``).
        Returns the request id. Raises InvalidRequestError (a bad prompt or params),
        RequestTooLargeError (could never fit), QueueFullError.
        """
        prompt_ids, params, sampler, need = self._check_request(prompt, params, chat_template)
        with self._lock:
            request_id = self._claim_id(request_id)
            self._enqueue(request_id, prompt_ids, params, sampler, need, stream)
        return request_id

    def _check_request(self, prompt, params, chat_template: bool):
        """``(prompt_ids, params, sampler, need)`` of a new request: its prompt encoded, its
        params resolved (the seed drawn, if none was given) and its plan (its sampler and the
        KV pages it needs at its peak): the one plan the request gets. Counts a rejection and
        raises as :meth:`add_request` says (InvalidRequestError, RequestTooLargeError)."""
        try:
            if not isinstance(params, SamplingParams):
                raise InvalidRequestError("params", f"params must be SamplingParams, got {type(params).__name__}")
            prompt_ids = self._encode(prompt, params.max_tokens, chat_template)
            params = params.resolved()
            sampler, need = self._plan(prompt_ids, params)
        except RequestTooLargeError:
            self._count_rejected("too_large")
            raise
        except InvalidRequestError:
            self._count_rejected("invalid")
            raise
        return prompt_ids, params, sampler, need

    def _id_in_use(self, request_id: str) -> bool:
        """Whether a request with this id is known and unfinished (lock held)."""
        return request_id in self._ids

    def _queued(self) -> int:
        """Requests waiting for admission (lock held)."""
        return len(self._waiting)

    def _claim_id(self, request_id: str | None) -> str:
        """The new request's id (a fresh one for None), checked against the ids in use and
        the queue's room; counts a rejection and raises otherwise. Lock held."""
        if request_id is None:
            request_id = f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        if self._id_in_use(request_id):
            self._rejected["invalid"] += 1
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if self._queued() >= self.max_queue:
            self._rejected["queue_full"] += 1
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); try again later")
        return request_id

    def _enqueue(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sampler, need: int,
                 stream: bool = True) -> None:
        """Queue a checked request under a claimed id (lock held)."""
        detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        request = Request(request_id, prompt_ids, params, sampler, need, detokenizer, stream)
        self._waiting.append(request)
        self._ids[request_id] = request

    def abort(self, request_id: str) -> bool:
        """End a request now (finish reason "abort") and free its pages; False if unknown or
        already finished. Thread-safe: called while another thread runs a step, the abort
        takes effect when that step ends."""
        with self._lock:
            request = self._ids.get(request_id)
            if request is None:
                return False
            if request in self._waiting:  # not admitted: nothing to free
                self._waiting.remove(request)
                self._ready.append(self._finish(request, "abort"))
                return True
        if self._step_lock.acquire(blocking=False):
            try:
                out = self._abort_running(request)
            finally:
                self._step_lock.release()
            if out is not None:
                with self._lock:
                    self._ready.append(out)
        else:
            with self._lock:
                self._deferred_aborts.add(request_id)
        return True

    def running_requests(self) -> list[Request]:
        """The admitted requests still running, in admission order (thread-safe; read-only)."""
        with self._lock:
            return list(self._running)

    def request_ids(self) -> list[str]:
        """The ids of every request not yet finished (waiting or running). Thread-safe."""
        with self._lock:
            return list(self._ids)

    def has_unfinished(self) -> bool:
        """Whether any request waits or runs (or an output is still to be returned)."""
        with self._lock:
            return bool(self._waiting or self._running or self._ready)

    def run(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams], *,
            chat_template: bool = True) -> list[RequestOutput]:
        """Add every prompt (one params for all, or one each), step until all have finished;
        the final output of each, in order (the requests do not stream: only their final
        outputs are made). What ``generate`` is for a fixed set of prompts,
        with the engine's per-request random streams (request i of a shared params gets
        seed ``params.seed + i`` when a seed is set)."""
        if isinstance(params, SamplingParams):
            params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                      for i in range(len(prompts))]
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp, chat_template=chat_template, stream=False) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stats(self) -> EngineStats:
        with self._lock:
            total = self.cache.num_pages if self.cache is not None else 0
            free = self.cache.pages_free if self.cache is not None else 0
            return EngineStats(
                num_waiting=len(self._waiting), num_running=len(self._running), kv_pages_total=total,
                kv_pages_used=total - free, kv_pages_free=free, kv_pages_reserved=self._reserved,
                num_steps=self.num_steps, num_forwards=self.runner.num_forwards,
                forward_rows=self.runner.forward_rows, last_step_forwards=self.last_step_forwards,
                sample_launches=self.sample_launches, last_step_sample_launches=self.last_step_sample_launches,
                requests_finished=dict(self._finished), requests_rejected=dict(self._rejected),
                tokens_by_phase=dict(self._tokens_by_phase), max_queue=self.max_queue,
            )

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One scheduling step: apply aborts, admit what fits, run every request's program to
        its next forward, then one packed prefill forward (new requests) and ONE decode
        forward for the decode work of all running requests, whatever their method; after
        each forward, one sampling launch for every row whose program asks for a token.
        Returns the outputs of requests that have new final tokens or finished."""
        return self._step()

    def _step(self, admit: list[str] | None = None) -> list[RequestOutput]:
        """:meth:`step`, admitting the waiting requests that fit (``admit`` None) or exactly
        the requests ``admit`` names, in its order (decided on another rank)."""
        with self._step_lock:
            if self._fault is not None:
                self._fault.before_step(self.num_steps)
            if self.sampled is not None:
                self.sampled.clear()
                self.sampled_host = None
            self._launches, self._launched_rows = [], 0
            outputs = self._take_ready()
            self._apply_deferred_aborts(outputs)
            self._admit(outputs, admit)
            forwards = 0
            self.last_step_rows = {}
            self.last_step_positions = {}
            self.last_step_sample_launches = 0
            prefills = [r for r in self._running if isinstance(r.pending, Prefill)]
            if prefills:
                forwards += 1
                self._run_prefill(prefills, outputs)
                self._run_samples(outputs)
            decodes = [r for r in self._running if isinstance(r.pending, Decode)]
            loop_seqs, loop_tokens = self._loops.decode_inputs()
            if decodes or loop_seqs:
                forwards += 1
                self._run_decode(decodes, outputs, loop_seqs, loop_tokens)
                self._run_samples(outputs)
            self._collect_streamed(outputs)
            self.last_step_forwards = forwards
            self.num_steps += 1
            self._apply_deferred_aborts(outputs)
            return outputs

    def _take_ready(self) -> list[RequestOutput]:
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    def _apply_deferred_aborts(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            aborts, self._deferred_aborts = self._deferred_aborts, set()
        for request_id in aborts:
            request = self._ids.get(request_id)
            if request is not None and request.program is not None:
                out = self._abort_running(request)
                if out is not None:
                    outputs.append(out)

    def _abort_running(self, request: Request) -> RequestOutput | None:
        """Close a running request's program (its finally blocks free every sequence it
        holds) and end it; None if it has already ended. Call with ``_step_lock`` held."""
        if request not in self._running:
            return None
        request.program.close()
        with self._lock:
            self._running.remove(request)
            self._reserved -= request.need
            return self._finish(request, "abort")

    def admissions(self) -> list[str]:
        """The ids of the waiting requests a step would admit now: in order, while their
        reservations fit in the pool beside the running requests' (thread-safe)."""
        with self._lock:
            return self._fitting()

    def _fitting(self) -> list[str]:
        """:meth:`admissions` with ``_lock`` held."""
        total = self.cache.num_pages if self.cache is not None else 0
        admitted, reserved = [], self._reserved
        for request in self._waiting:
            if self.cache is not None and reserved + request.need > total:
                break
            admitted.append(request.id)
            reserved += request.need
        return admitted

    def _admit(self, outputs: list[RequestOutput], admit: list[str] | None = None) -> None:
        """Start the waiting requests that fit (``admit`` None), or exactly those ``admit``
        names: the first ones of the queue, in order (RuntimeError for any other: the ranks
        of a tensor-parallel engine disagree)."""
        started = []
        with self._lock:
            for request_id in self._fitting() if admit is None else admit:
                if not self._waiting or self._waiting[0].id != request_id:
                    head = self._waiting[0].id if self._waiting else "nothing"
                    raise RuntimeError(f"step {self.num_steps} admits request {request_id!r}, but the head of this "
                                       f"engine's queue is {head!r}")
                request = self._waiting.popleft()
                self._running.append(request)
                self._reserved += request.need
                started.append(request)
        for request in started:
            sampler = request.sampler
            sampler._forward_mark = None  # its stats count its own forwards and rows (the engine's count)
            request.eos = () if request.params.ignore_eos else self.runner.eos_token_ids
            request.program = sampler.program([request.prompt_ids], request.params.max_tokens, request.eos,
                                              stream=True)
            self._advance(request, None, outputs, first=True)

    def _run_prefill(self, requests: list[Request], outputs: list[RequestOutput]) -> None:
        prompts = [p for r in requests for p in r.pending.prompts]
        try:
            seqs, logits = self.runner.prefill(prompts)
        except Exception as error:  # noqa: BLE001 - the requests end, the engine goes on
            if self.forward_errors_are_fatal:
                raise
            for request in requests:
                outputs.append(self._fail(request, error))
            return
        start = 0
        for request in requests:
            n = len(request.pending.prompts)
            request.forwards += 1
            request.forward_rows += n
            self._advance(request, (seqs[start : start + n], logits[start : start + n]), outputs)
            start += n

    def _run_decode(self, requests: list[Request], outputs: list[RequestOutput], loop_seqs: list = (),
                    loop_tokens: torch.Tensor | None = None) -> None:
        """One decode forward: the batched loops' rows first (``loop_seqs``, their last tokens
        ``loop_tokens``), then every Decode of ``requests``, in order."""
        looped = len(loop_seqs)
        if len(requests) == 1 and not looped:  # alone: exactly the program's own call (what ``drive`` makes)
            seqs, tokens = requests[0].pending
        elif not requests:
            seqs, tokens = loop_seqs, loop_tokens
        else:
            seqs = [*loop_seqs, *(s for r in requests for s in r.pending.seqs)]
            tokens = self._joined_tokens(([loop_tokens] if looped else []) + [r.pending.tokens for r in requests])
        loop_rows = self._loops.rows if looped else []
        if self.sampled is not None:  # the step guard's positions (host ints, no sync)
            for row in loop_rows:
                self.last_step_positions[row.request.id] = row.seq.length
            for request in requests:
                self.last_step_positions[request.id] = sum(seq.length for seq in request.pending.seqs)
        try:
            logits = self.runner.decode(seqs, tokens)
        except Exception as error:  # noqa: BLE001
            if self.forward_errors_are_fatal:
                raise
            for request in [row.request for row in loop_rows] + requests:
                outputs.append(self._fail(request, error))
            return
        if looped:
            self._loops.decoded(logits[:looped])
            step_rows = self.last_step_rows
            for row in loop_rows:
                request = row.request
                step_rows[request.id] = 1
                request.decoded += 1
                request.forwards += 1
                request.forward_rows += 1
            if not requests:
                return
            logits = logits[looped:]
        sizes = [len(request.pending.seqs) for request in requests]
        for request, n, rows in zip(requests, sizes, torch.split(logits, sizes)):
            self.last_step_rows[request.id] = n
            request.decoded += n
            request.forwards += 1
            request.forward_rows += n
            self._advance(request, rows, outputs)

    def _run_samples(self, outputs: list[RequestOutput]) -> None:
        """Answer every program that waits on a Sample, all rows in one launch, and run
        them on; repeat while some ask again (a loop that ended and began the next phase
        on logits it already had), so that every program waits on a forward after it."""
        while True:
            waiting = [r for r in self._running if isinstance(r.pending, Sample)]
            due = self._loops.due()
            if not waiting and due is None:
                return
            try:
                launch = sample_launch([r.pending for r in waiting], due)
            except Exception as error:  # noqa: BLE001 - the requests end, the engine goes on
                if self.forward_errors_are_fatal:
                    raise
                for request in [row.request for row in self._loops.abandon_due()] + waiting:
                    outputs.append(self._fail(request, error))
                return
            if self._fault is not None:
                launch = self._fault.after_sampling(self.num_steps, launch, self.vocab_size)
            replies = launch.replies
            self.sample_launches += 1
            self.last_step_sample_launches += 1
            row = self._launched_rows
            self._launches.append(launch)
            ended = []
            if due is not None:
                answer = launch.rows
                looped = self._loops.sampled(answer)
                first = len(self._loops.rows) - len(looped)  # the due rows are the last ones
                if self.sampled is not None:
                    self.sampled.extend((r.request.id, answer.tokens[i : i + 1]) for i, r in enumerate(looped))
                for index, loop_row in enumerate(looped):
                    if loop_row.dead:
                        continue
                    loop_row.request.streamed.append(row + index)
                    if loop_row.last_step:
                        ended.append((first + index, loop_row))  # its place among all the rows
                row += len(looped)
            if self.sampled is not None:
                self.sampled.extend((request.id, reply.tokens) for request, reply in zip(waiting, replies))
            if ended:  # the budget's last token: the loop's result goes to its program
                launched = torch.cat([done.tokens for done in self._launches])  # this step's sampled tokens
                for index, loop_row in ended:
                    request = loop_row.request
                    unread = launched[torch.tensor(request.streamed, dtype=torch.long, device=launched.device)]
                    request.pending = request.loop_row = None
                    request.streamed = []
                    self._advance(request, self._loops.finish(loop_row, index, unread), outputs)
            for request, reply in zip(waiting, replies):
                pending = request.pending
                if pending.stream:  # read after the step, all requests' at once: its first row's place
                    request.streamed.append(row)
                row += pending.logits.shape[0]
                self._advance(request, reply, outputs)
            self._launched_rows = row

    def _joined_tokens(self, tokens: list) -> torch.Tensor:
        """The decode forward's (rows,) int64 input: every request's Decode tokens, in order.
        The sampled tokens a decode loop feeds back are 1-D int64 tensors on the device,
        joined in one ``cat``; anything else is converted first."""
        try:  # the common case in one call: checking each tensor first costs more than the cat
            joined = torch.cat(tokens)
        except (TypeError, RuntimeError):  # host lists or ints, 0-d tensors, another device
            joined = None
        if joined is None or joined.dim() != 1 or joined.dtype != torch.long or joined.device != self.device:
            joined = torch.cat([self._token_tensor(t) for t in tokens])
        return joined

    def _token_tensor(self, tokens) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            return tokens.reshape(-1).to(device=self.device, dtype=torch.long)
        from powerfast.ops.device import upload_ints

        return upload_ints([int(t) for t in tokens], torch.long, self.device)

    def _advance(self, request: Request, reply, outputs: list[RequestOutput], first: bool = False) -> None:
        """Send ``reply`` to the program and run it to its next forward (or its end),
        collecting what it streams; report new tokens or the end in ``outputs``."""
        program = request.program
        streamed = False
        try:
            message = next(program) if first else program.send(reply)
            while isinstance(message, (Tokens, Final)):
                if isinstance(message, Tokens):  # read after the step, all requests' at once
                    request.streamed.append(message)
                elif message.index == 0 and message.token_ids:
                    if request.first_token is None:
                        request.first_token = time.monotonic()
                    request.token_ids.extend(message.token_ids)
                    streamed = True
                if streamed and self._hit_stop_string(request):
                    program.close()
                    self._count_phases({"prefill": len(request.prompt_ids), "stopped early": request.decoded})
                    outputs.append(self._end(request, "stop"))
                    return
                message = program.send(None)
        except StopIteration as done:
            [result] = done.value
            final_ids = list(result.token_ids)
            if final_ids[: len(request.token_ids)] != request.token_ids and request.detokenizer is not None:
                request.detokenizer = IncrementalDetokenizer(self.tokenizer)  # not a continuation: decode anew
                request.text, request.stop_scan = "", 0
            request.token_ids = final_ids
            stopped = self._hit_stop_string(request)
            ended_on_eos = bool(result.token_ids) and result.token_ids[-1] in request.eos
            reason = "stop" if stopped or ended_on_eos or len(result.token_ids) < request.params.max_tokens else "length"
            self._count_phases(result.stats.tokens_by_phase)
            result.stats.num_forwards, result.stats.forward_rows = request.forwards, request.forward_rows
            request.decoded = result.stats.tokens_total
            outputs.append(self._end(request, reason, result))
            return
        except Exception as error:  # noqa: BLE001 - one request's failure ends only that request
            outputs.append(self._fail(request, error))
            return
        if not isinstance(message, (Prefill, Decode, Sample, Loop)):
            program.close()
            outputs.append(self._fail(request, TypeError(f"a step program yielded {type(message).__name__}")))
            return
        request.pending = message
        if type(message) is Loop:  # the engine steps the loop itself, as a row of its batch
            request.loop_row = self._loops.join(request, message)
        if streamed and request.stream:
            outputs.append(self._output(request, finished=False))

    def _count_phases(self, counts: dict[str, int]) -> None:
        with self._lock:
            for phase_name, count in counts.items():
                self._tokens_by_phase[phase_name] = self._tokens_by_phase.get(phase_name, 0) + count

    def _collect_streamed(self, outputs: list[RequestOutput]) -> None:
        """Append the tokens the running decode loops sampled this step (one device-to-host
        copy for all requests) and report them; a request whose token is one of its EOS ids
        or completes a stop string ends here, without decoding further. With ``sampled`` on,
        every token the step sampled rides on the same copy (``sampled_host``, for the guard).

        A streamed Sample left its first row's place among the step's launched rows
        (``request.streamed``: an int), read from the launches' whole token and live tensors;
        a ``Tokens`` yield its own tensors (their first row: a streaming loop has one row)."""
        launches, self._launches, self._launched_rows = self._launches, [], 0
        flat = [(r, m) for r in self._running for m in r.streamed]
        guarded = [t.reshape(-1).to(torch.long) for _, t in self.sampled] if self.sampled else []
        if not flat:
            if guarded:
                self.sampled_host = torch.cat(guarded).tolist()
            return
        yielded = [m if m.tokens.shape[0] == 1 else Tokens(m.tokens[:1], m.live[:1])
                   for _, m in flat if not isinstance(m, int)]
        launched = sum(launch.tokens.shape[0] for launch in launches)
        # one device-to-host copy: the launches' tokens, then the yielded ones, the live flags in the
        # same order, then the guard's tokens
        parts = ([launch.tokens for launch in launches] + [m.tokens for m in yielded]
                 + [launch.was_active for launch in launches] + [m.live for m in yielded])
        count = launched + len(yielded)
        host = torch.cat([torch.cat(parts[: len(parts) // 2]).to(torch.long),
                          torch.cat(parts[len(parts) // 2 :]).to(torch.long), *guarded]).tolist()
        if guarded:
            self.sampled_host = host[2 * count :]
        touched: dict[str, Request] = {}
        now = time.monotonic()
        position = launched  # the next yielded row
        for request, streamed in flat:
            request.streamed = []
            if isinstance(streamed, int):
                row = streamed
            else:
                row, position = position, position + 1
            if host[count + row] and not (request.token_ids and request.token_ids[-1] in request.eos):
                if request.first_token is None:
                    request.first_token = now
                request.token_ids.append(host[row])
                if request.loop_row is not None:
                    request.loop_row.history.append(host[row])
                touched[request.id] = request
        for request in touched.values():
            ended = request.token_ids[-1] in request.eos
            if ended and request.loop_row is not None and request.loop_row.eos_check:
                # the loop itself looks at its EOS at this step and returns: its result, as when run alone
                loop_row, request.pending, request.loop_row = request.loop_row, None, None
                self._advance(request, self._loops.finish(loop_row), outputs)
            elif self._hit_stop_string(request) or ended:
                request.program.close()  # frees its sequences; the tokens so far are the output
                request.decoded = max(request.decoded, len(request.token_ids))  # each token was sampled
                self._count_phases({"prefill": len(request.prompt_ids), "sample": len(request.token_ids)})
                outputs.append(self._end(request, "stop"))
            elif request.stream:
                outputs.append(self._output(request, finished=False))

    # ------------------------------------------------------------------ endings and text

    def _hit_stop_string(self, request: Request) -> bool:
        """Refresh the request's text; True (and the text cut) when a stop string appeared.
        Only the new text (and the few characters before it a stop string may start in) is
        searched. Without stop strings nothing is looked for and the text is left to the next
        output (a request that does not stream decodes its text once, at its end)."""
        stops = request.params.stop
        if self.tokenizer is None or not stops:
            return False
        self._refresh_text(request)
        start = max(0, request.stop_scan - max(len(s) for s in stops) + 1)
        request.stop_scan = len(request.text)
        cuts = [request.text.find(s, start) for s in stops]
        cuts = [c for c in cuts if c >= 0]
        if cuts:
            request.text = request.text[: min(cuts)]
            request.stopped_by_string = True
            return True
        return False

    def _end(self, request: Request, reason: str, result=None) -> RequestOutput:
        with self._lock:
            self._running.remove(request)
            self._reserved -= request.need
            return self._finish(request, reason, result=result)

    def _fail(self, request: Request, error: BaseException) -> RequestOutput:
        if request.program is not None:
            request.program.close()
        with self._lock:
            if request in self._running:
                self._running.remove(request)
                self._reserved -= request.need
            return self._finish(request, "error", error=f"{type(error).__name__}: {error}")

    def _finish(self, request: Request, reason: str, result=None, error: str | None = None) -> RequestOutput:
        """Record the end (call with ``_lock`` held) and make the last output."""
        self._finished[reason] += 1
        self._ids.pop(request.id, None)
        if request.loop_row is not None:
            self._loops.drop(request.loop_row)
        if reason in ("abort", "error"):  # the program reported no phases: count what the engine saw
            counts = {"aborted" if reason == "abort" else "failed": request.decoded}
            if request.program is not None:
                counts["prefill"] = len(request.prompt_ids)
            for phase_name, count in counts.items():  # (``_lock`` is held: not _count_phases)
                self._tokens_by_phase[phase_name] = self._tokens_by_phase.get(phase_name, 0) + count
        out = self._output(request, finished=True, reason=reason)
        out.result, out.error = result, error
        return out

    def _output(self, request: Request, finished: bool, reason: str | None = None) -> RequestOutput:
        now = time.monotonic()
        if self.tokenizer is not None and not request.stopped_by_string:
            self._refresh_text(request, final=finished)
        shown = len(request.text) if finished else self._safe_text_length(request)
        new_tokens = request.token_ids[request.sent_tokens :]
        new_text = request.text[request.sent_text : shown] if shown > request.sent_text else ""
        if new_tokens and request.first_token is None:
            request.first_token = now
        request.sent_tokens = len(request.token_ids)
        request.sent_text = max(request.sent_text, shown)
        return RequestOutput(
            request_id=request.id, new_token_ids=new_tokens, new_text=new_text, token_ids=list(request.token_ids),
            text=request.text[: request.sent_text], finished=finished, finish_reason=reason,
            prompt_tokens=len(request.prompt_ids), decoded_tokens=request.decoded, arrival_time=request.arrival,
            first_token_time=request.first_token, finish_time=now if finished else None, seed=request.params.seed,
        )

    def _refresh_text(self, request: Request, final: bool = False) -> None:
        """The request's ``text`` after its new tokens (incremental: work in proportion to the
        new tokens; ``final`` keeps an unfinished last character, as a full decode does)."""
        request.text = request.detokenizer.update(request.token_ids, final)

    @staticmethod
    def _safe_text_length(request: Request) -> int:
        """Characters of the text that can be shown while running: not a trailing partial
        character, nor what could be the start of a stop string."""
        text = request.text
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        for stop in request.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k : end] == stop[:k]:
                    end -= k
                    break
        return end

    # ------------------------------------------------------------------ admission

    def _encode(self, prompt, max_tokens: int, chat_template: bool) -> list[int]:
        """The prompt's token ids by the one rule of :func:`powerfast.core.prompts.encode_prompt`."""
        try:
            ids = encode_prompt(prompt, self.tokenizer, chat_template=chat_template, vocab_size=self.vocab_size)
            check_fits(ids, self.context_length, max_tokens, budget_name="max_tokens")
        except PromptError as error:
            raise InvalidRequestError(error.field, str(error)) from None
        return ids

    def _sampler(self, params: SamplingParams):
        """The request's own sampler, with its own seed stream, from resolved params: drawing
        a seed here would give each process its own (ValueError for params without one)."""
        if params.seed is None:
            raise ValueError("a request's sampler is built from resolved params (SamplingParams.resolved): "
                             "this one has no seed")
        return params.sampler(self.runner, self.tokenizer)

    def _plan(self, prompt_ids: list[int], params: SamplingParams):
        """The request's own sampler (its own seed stream; ``params`` resolved) and its peak
        KV need in pages."""
        branches, which = params.branches()
        if branches > self.max_branches:
            raise RequestTooLargeError(which, f"the request decodes up to {branches} sequences at once ({which}); "
                                              f"this engine allows {self.max_branches} (max_branches)")
        sampler = self._sampler(params)
        if self.cache is None:
            return sampler, 0
        need = sampler.peak_kv_pages([len(prompt_ids)], params.max_tokens, self.cache.page_size) or 0
        if need > self.cache.num_pages:
            raise RequestTooLargeError(
                "max_tokens", f"{params.method} with a {len(prompt_ids)}-token prompt and max_tokens={params.max_tokens} "
                              f"can hold {need} KV pages at its peak; the whole pool has {self.cache.num_pages} "
                              f"({self.cache.page_size} positions each): lower max_tokens or the method's branches")
        return sampler, need

    def _count_rejected(self, why: str) -> None:
        with self._lock:
            self._rejected[why] += 1

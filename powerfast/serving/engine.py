"""The serving engine: requests that come and go between decode steps (powerfast/DESIGN.md section 8).

Every sampler is a *step program* (:mod:`powerfast.samplers.program`): a generator that yields
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

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from powerfast.core.config import METHODS, MCMCConfig, PowerConfig, SMCConfig, method_config
from powerfast.samplers.program import Decode, Final, Prefill, Tokens

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineClosedError",
    "EngineStats",
    "FINISH_REASONS",
    "InvalidRequestError",
    "QueueFullError",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]

FINISH_REASONS = ("stop", "length", "abort", "error")
"""Why a request ended: EOS or a stop string, the token budget, an abort, an error."""


# --------------------------------------------------------------------------- errors


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; ``field`` names the bad field (the message its value)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RequestTooLargeError(InvalidRequestError):
    """A request that could never run: its peak KV need exceeds the whole pool, or its
    settings exceed the engine's limits. The message gives the need and the limit."""


class QueueFullError(RuntimeError):
    """The waiting queue is full; try again later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down, or its step loop stopped on an error."""


# ------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for: the method and its settings, validated on construction
    (:class:`InvalidRequestError` naming the field). Settings of other methods are ignored.

    method:      one of :data:`powerfast.core.config.METHODS`
    max_tokens:  the token budget (> 0)
    temperature: of "plain" and "best-of-n" (0: greedy)
    seed:        the request's own random stream (None: a fresh one)
    stop:        stop strings: the text is cut before the first one found
    ignore_eos:  generate the whole budget whatever the model samples
    alpha:       the exponent of "power", "mcmc" and "smc"; T = 1 / alpha of "low-temp"
    block_size, num_candidates, top_k, num_rollouts, horizon, jackknife, rollout_proposal,
    reuse_rollouts:  "power" (B, L, K, M, H; see :class:`powerfast.core.config.PowerConfig`);
                 block_size is also "mcmc"'s B
    mcmc_steps:  "mcmc"'s N_MCMC
    num_particles, ess_threshold, resample_every, ramp_tokens, resampler: "smc"
    num_samples: "best-of-n"'s N

    The defaults of power, MCMC and SMC are scaled for serving (small blocks, few
    branches), not the papers' settings.
    """

    method: str = "plain"
    max_tokens: int = 256
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    alpha: float = 4.0
    block_size: int = 16
    num_candidates: int = 8
    top_k: int = 4
    num_rollouts: int = 4
    horizon: int = 16
    jackknife: bool = True
    rollout_proposal: str = "base"
    reuse_rollouts: bool = False
    mcmc_steps: int = 2
    num_particles: int = 8
    ess_threshold: float = 0.5
    resample_every: int = 16
    ramp_tokens: int = 0
    resampler: str = "systematic"
    num_samples: int = 4

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InvalidRequestError("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"max_tokens must be an int > 0, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        try:
            self.config()
        except (ValueError, TypeError) as error:
            raise InvalidRequestError(_field_named_in(str(error)), str(error)) from None

    def config(self):
        """The method's validated config (PowerConfig, MCMCConfig, SMCConfig or SamplingConfig)."""
        power = mcmc = smc = None
        if self.method == "power":
            power = PowerConfig(self.alpha, self.block_size, self.num_candidates, self.top_k, self.num_rollouts,
                                self.horizon, self.jackknife, self.rollout_proposal, self.reuse_rollouts)
        elif self.method == "mcmc":
            mcmc = MCMCConfig(self.alpha, self.block_size, self.mcmc_steps)
        elif self.method == "smc":
            smc = SMCConfig(self.alpha, self.num_particles, self.ess_threshold, self.resample_every, self.ramp_tokens,
                            self.resampler)
        return method_config(self.method, alpha=self.alpha, temperature=self.temperature,
                             num_samples=self.num_samples, power_config=power, mcmc_config=mcmc, smc_config=smc)

    def sampler(self, runner, tokenizer=None):
        """The sampler (``make_sampler``) that does what these params ask, with its own seed
        stream: what the engine runs for a request, and ``sampler.generate([prompt])`` the
        same computation outside the engine."""
        from powerfast.samplers.factory import make_sampler

        config = self.config()
        slot = {"power": "power_config", "mcmc": "mcmc_config", "smc": "smc_config"}.get(self.method)
        settings = {slot: config} if slot else {}
        return make_sampler(self.method, runner, tokenizer, alpha=self.alpha, seed=self.seed,
                            temperature=self.temperature, num_samples=self.num_samples, **settings)

    def branches(self) -> tuple[int, str]:
        """(most sequences the request decodes at once, the field that sets it)."""
        if self.method == "power":
            first = self.top_k if self.block_size == 1 else self.num_candidates
            return max(first, self.top_k * self.num_rollouts), "num_rollouts"
        if self.method == "smc":
            return self.num_particles, "num_particles"
        if self.method == "best-of-n":
            return self.num_samples, "num_samples"
        return 1, "method"


SamplingParams.FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))

_CONFIG_WORDS = {"eta": "resampler"}


def _field_named_in(message: str) -> str:
    """The SamplingParams field a config error message is about (its first word naming one)."""
    for word in message.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if word in SamplingParams.FIELDS:
            return word
        if word in _CONFIG_WORDS:
            return _CONFIG_WORDS[word]
    return "method"


@dataclass
class RequestOutput:
    """What :meth:`Engine.step` reports of a request: tokens that became final since the
    last output (plain and greedy: every step; power: every block; MCMC, SMC and
    best-of-N: at the end) and everything so far.

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
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_reserved: int
    num_steps: int
    num_forwards: int
    forward_rows: int
    last_step_forwards: int
    requests_finished: dict[str, int]
    requests_rejected: dict[str, int]
    tokens_by_phase: dict[str, int]
    max_queue: int


class _Request:
    """A request's state inside the engine."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sampler, need: int) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampler = sampler
        self.need = need  # KV blocks reserved while it runs
        self.program = None
        self.pending = None  # the Prefill / Decode the program waits on
        self.token_ids: list[int] = []
        self.text = ""
        self.text_of = 0  # how many of token_ids ``text`` was decoded from
        self.sent_tokens = 0
        self.sent_text = 0
        self.decoded = 0
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.stopped_by_string = False
        self.eos: tuple[int, ...] = ()
        self.streamed: list[Tokens] = []  # this step's sampled tokens, still on the device


# --------------------------------------------------------------------------- engine


class Engine:
    """Continuous batching of step programs over one :class:`powerfast.runtime.runner.ModelRunner`.

    model:        a Hugging Face causal LM or a ready ModelRunner (or an LMRunner)
    tokenizer:    for string and chat prompts, stop strings and ``text`` (optional)
    max_queue:    requests waiting for admission at most (:class:`QueueFullError` past it)
    max_branches: sequences one request may decode at once at most (power K x M, SMC's N,
                  best-of-N's N): a guard against one request taking the whole batch
    runner_kwargs: passed to the ModelRunner built around ``model`` (block_size,
                  num_blocks, max_memory, backend, ...)
    """

    def __init__(self, model, tokenizer=None, *, max_queue: int = 256, max_branches: int = 4096,
                 **runner_kwargs) -> None:
        from powerfast.samplers.base import as_runner

        for name, value in (("max_queue", max_queue), ("max_branches", max_branches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.runner = as_runner(model, **runner_kwargs)
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_branches = max_branches
        self.cache = getattr(self.runner, "cache", None)
        self.device = getattr(self.runner, "device", torch.device("cpu"))
        probe = SamplingParams(method="greedy").sampler(self.runner, tokenizer)
        self.context_length = probe.context_length
        self.vocab_size = probe.vocab_size
        self._lock = threading.Lock()  # guards the queues and counters (short holds only)
        self._step_lock = threading.Lock()  # held for a whole step
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids: dict[str, _Request] = {}
        self._deferred_aborts: set[str] = set()
        self._ready: list[RequestOutput] = []  # outputs produced outside a step, returned by the next
        self._reserved = 0
        self._counter = itertools.count()
        self.num_steps = 0
        self.last_step_forwards = 0
        self.last_step_rows: dict[str, int] = {}
        """Rows each request had in the last step's decode forward (the merged batch)."""
        self._finished = dict.fromkeys(FINISH_REASONS, 0)
        self._rejected = {"queue_full": 0, "invalid": 0, "too_large": 0}
        self._tokens_by_phase: dict[str, int] = {}

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; it is admitted at a step when its KV need fits. Thread-safe.

        prompt: a string (tokenised as it is, no chat template), a list of token ids, or
                chat messages ``[{"role": "user", "content": "..."}, ...]`` (the
                tokenizer's chat template, with the generation prompt)
        Returns the request id. Raises InvalidRequestError (a bad prompt or params),
        RequestTooLargeError (could never fit), QueueFullError.
        """
        try:
            if not isinstance(params, SamplingParams):
                raise InvalidRequestError("params", f"params must be SamplingParams, got {type(params).__name__}")
            prompt_ids = self._encode(prompt, params.max_tokens)
            sampler, need = self._plan(prompt_ids, params)
        except RequestTooLargeError:
            self._count_rejected("too_large")
            raise
        except InvalidRequestError:
            self._count_rejected("invalid")
            raise
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
            if request_id in self._ids:
                self._rejected["invalid"] += 1
                raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
            if len(self._waiting) >= self.max_queue:
                self._rejected["queue_full"] += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); try again later")
            request = _Request(request_id, prompt_ids, params, sampler, need)
            self._waiting.append(request)
            self._ids[request_id] = request
        return request_id

    def abort(self, request_id: str) -> bool:
        """End a request now (finish reason "abort") and free its blocks; False if unknown or
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

    def has_unfinished(self) -> bool:
        """Whether any request waits or runs (or an output is still to be returned)."""
        with self._lock:
            return bool(self._waiting or self._running or self._ready)

    def run(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
        """Add every prompt (one params for all, or one each), step until all have finished;
        the final output of each, in order. What ``generate`` is for a fixed set of prompts,
        with the engine's per-request random streams (request i of a shared params gets
        seed ``params.seed + i`` when a seed is set)."""
        if isinstance(params, SamplingParams):
            params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                      for i in range(len(prompts))]
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stats(self) -> EngineStats:
        with self._lock:
            total = self.cache.num_blocks if self.cache is not None else 0
            free = self.cache.blocks_free if self.cache is not None else 0
            return EngineStats(
                num_waiting=len(self._waiting), num_running=len(self._running), kv_blocks_total=total,
                kv_blocks_used=total - free, kv_blocks_free=free, kv_blocks_reserved=self._reserved,
                num_steps=self.num_steps, num_forwards=getattr(self.runner, "num_forwards", 0),
                forward_rows=getattr(self.runner, "forward_rows", 0), last_step_forwards=self.last_step_forwards,
                requests_finished=dict(self._finished), requests_rejected=dict(self._rejected),
                tokens_by_phase=dict(self._tokens_by_phase), max_queue=self.max_queue,
            )

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One scheduling step: apply aborts, admit what fits, run every request's program to
        its next forward, then one packed prefill forward (new requests) and ONE decode
        forward for the decode work of all running requests, whatever their method.
        Returns the outputs of requests that have new final tokens or finished."""
        with self._step_lock:
            outputs = self._take_ready()
            self._apply_deferred_aborts(outputs)
            self._admit(outputs)
            forwards = 0
            self.last_step_rows = {}
            prefills = [r for r in self._running if isinstance(r.pending, Prefill)]
            if prefills:
                forwards += 1
                self._run_prefill(prefills, outputs)
            decodes = [r for r in self._running if isinstance(r.pending, Decode)]
            if decodes:
                forwards += 1
                self._run_decode(decodes, outputs)
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

    def _abort_running(self, request: _Request) -> RequestOutput | None:
        """Close a running request's program (its finally blocks free every sequence it
        holds) and end it; None if it has already ended. Call with ``_step_lock`` held."""
        if request not in self._running:
            return None
        request.program.close()
        with self._lock:
            self._running.remove(request)
            self._reserved -= request.need
            return self._finish(request, "abort")

    def _admit(self, outputs: list[RequestOutput]) -> None:
        """Start waiting requests in order while their reservations fit in the pool."""
        total = self.cache.num_blocks if self.cache is not None else 0
        while True:
            with self._lock:
                if not self._waiting or (self.cache is not None and self._reserved + self._waiting[0].need > total):
                    return
                request = self._waiting.popleft()
                self._running.append(request)
                self._reserved += request.need
            sampler = request.sampler
            sampler._forward_mark = sampler._forward_counts()
            request.eos = sampler.eos_token_id(request.params.ignore_eos)
            request.program = sampler.program([request.prompt_ids], request.params.max_tokens, request.eos,
                                              stream=True)
            self._advance(request, None, outputs, first=True)

    def _run_prefill(self, requests: list[_Request], outputs: list[RequestOutput]) -> None:
        prompts = [p for r in requests for p in r.pending.prompts]
        try:
            seqs, logits = self.runner.prefill(prompts)
        except Exception as error:  # noqa: BLE001 - the requests end, the engine goes on
            for request in requests:
                outputs.append(self._fail(request, error))
            return
        start = 0
        for request in requests:
            n = len(request.pending.prompts)
            self._advance(request, (seqs[start : start + n], logits[start : start + n]), outputs)
            start += n

    def _run_decode(self, requests: list[_Request], outputs: list[RequestOutput]) -> None:
        if len(requests) == 1:  # alone: exactly the program's own call (what ``drive`` makes)
            seqs, tokens = requests[0].pending
        else:
            seqs = [s for r in requests for s in r.pending.seqs]
            tokens = torch.cat([self._token_tensor(r.pending.tokens) for r in requests])
        try:
            logits = self.runner.decode(seqs, tokens)
        except Exception as error:  # noqa: BLE001
            for request in requests:
                outputs.append(self._fail(request, error))
            return
        start = 0
        for request in requests:
            n = len(request.pending.seqs)
            self.last_step_rows[request.id] = n
            request.decoded += n
            self._advance(request, logits[start : start + n], outputs)
            start += n

    def _token_tensor(self, tokens) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            return tokens.reshape(-1).to(device=self.device, dtype=torch.long)
        from powerfast.core import ops

        return ops.upload_ints([int(t) for t in tokens], torch.long, self.device)

    def _advance(self, request: _Request, reply, outputs: list[RequestOutput], first: bool = False) -> None:
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
            request.token_ids, request.text_of = list(result.token_ids), -1  # the text is decoded anew
            stopped = self._hit_stop_string(request)
            ended_on_eos = bool(result.token_ids) and result.token_ids[-1] in request.sampler.eos_token_id(
                request.params.ignore_eos)
            reason = "stop" if stopped or ended_on_eos or len(result.token_ids) < request.params.max_tokens else "length"
            self._count_phases(result.stats.tokens_by_phase)
            request.decoded = result.stats.tokens_total
            outputs.append(self._end(request, reason, result))
            return
        except Exception as error:  # noqa: BLE001 - one request's failure ends only that request
            outputs.append(self._fail(request, error))
            return
        if not isinstance(message, (Prefill, Decode)):
            program.close()
            outputs.append(self._fail(request, TypeError(f"a step program yielded {type(message).__name__}")))
            return
        request.pending = message
        if streamed:
            outputs.append(self._output(request, finished=False))

    def _count_phases(self, counts: dict[str, int]) -> None:
        with self._lock:
            for phase_name, count in counts.items():
                self._tokens_by_phase[phase_name] = self._tokens_by_phase.get(phase_name, 0) + count

    def _collect_streamed(self, outputs: list[RequestOutput]) -> None:
        """Append the tokens the running decode loops sampled this step (one device-to-host
        copy for all requests) and report them; a request whose token is one of its EOS ids
        or completes a stop string ends here, without decoding further."""
        flat = [(r, m) for r in self._running for m in r.streamed]
        if not flat:
            return
        tokens = torch.stack([m.tokens[0] for _, m in flat]).tolist()
        live = torch.stack([m.live[0] for _, m in flat]).tolist()
        touched: dict[str, _Request] = {}
        for (request, _), token, alive in zip(flat, tokens, live):
            request.streamed = []
            if alive and not (request.token_ids and request.token_ids[-1] in request.eos):
                request.token_ids.append(int(token))
                touched[request.id] = request
        for request in touched.values():
            ended = request.token_ids[-1] in request.eos
            if self._hit_stop_string(request) or ended:
                request.program.close()  # frees its sequences; the tokens so far are the output
                request.decoded = max(request.decoded, len(request.token_ids))  # each token was sampled
                self._count_phases({"prefill": len(request.prompt_ids), "sample": len(request.token_ids)})
                outputs.append(self._end(request, "stop"))
            else:
                outputs.append(self._output(request, finished=False))

    # ------------------------------------------------------------------ endings and text

    def _hit_stop_string(self, request: _Request) -> bool:
        """Refresh the request's text; True (and the text cut) when a stop string appeared."""
        if self.tokenizer is None:
            return False
        self._refresh_text(request)
        cuts = [request.text.find(s) for s in request.params.stop]
        cuts = [c for c in cuts if c >= 0]
        if cuts:
            request.text = request.text[: min(cuts)]
            request.stopped_by_string = True
            return True
        return False

    def _end(self, request: _Request, reason: str, result=None) -> RequestOutput:
        with self._lock:
            self._running.remove(request)
            self._reserved -= request.need
            return self._finish(request, reason, result=result)

    def _fail(self, request: _Request, error: BaseException) -> RequestOutput:
        if request.program is not None:
            request.program.close()
        with self._lock:
            if request in self._running:
                self._running.remove(request)
                self._reserved -= request.need
            return self._finish(request, "error", error=f"{type(error).__name__}: {error}")

    def _finish(self, request: _Request, reason: str, result=None, error: str | None = None) -> RequestOutput:
        """Record the end (call with ``_lock`` held) and make the last output."""
        self._finished[reason] += 1
        self._ids.pop(request.id, None)
        if reason in ("abort", "error"):  # the program reported no phases: count what the engine saw
            counts = {"aborted" if reason == "abort" else "failed": request.decoded}
            if request.program is not None:
                counts["prefill"] = len(request.prompt_ids)
            for phase_name, count in counts.items():  # (``_lock`` is held: not _count_phases)
                self._tokens_by_phase[phase_name] = self._tokens_by_phase.get(phase_name, 0) + count
        out = self._output(request, finished=True, reason=reason)
        out.result, out.error = result, error
        return out

    def _output(self, request: _Request, finished: bool, reason: str | None = None) -> RequestOutput:
        now = time.monotonic()
        if self.tokenizer is not None and not request.stopped_by_string:
            self._refresh_text(request)
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
            first_token_time=request.first_token, finish_time=now if finished else None,
        )

    def _refresh_text(self, request: _Request) -> None:
        """Decode the request's tokens into ``text`` unless it is already of these tokens."""
        if request.text_of != len(request.token_ids) or not request.token_ids:
            request.text = self.tokenizer.decode(request.token_ids, skip_special_tokens=True)
            request.text_of = len(request.token_ids)

    @staticmethod
    def _safe_text_length(request: _Request) -> int:
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

    def _encode(self, prompt, max_tokens: int) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "the prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "a text prompt needs a tokenizer; give token ids")
            ids = [int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequestError("messages", "chat messages need a tokenizer with a chat template")
            try:
                ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            except Exception as error:  # noqa: BLE001 - a template's own complaint about the messages
                raise InvalidRequestError("messages", f"the chat template refused the messages: {error}") from None
            if hasattr(ids, "keys") and "input_ids" in ids:
                ids = ids["input_ids"]
            ids = [int(t) for t in ids]
        elif isinstance(prompt, (list, tuple)):
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise InvalidRequestError("prompt", f"a prompt must be text, token ids or chat messages, got {list(prompt)[:8]!r}")
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise InvalidRequestError("prompt", f"a prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        if self.context_length is not None:
            if len(ids) >= self.context_length:
                raise InvalidRequestError("prompt", f"the prompt has {len(ids)} tokens; the model's context is "
                                                    f"{self.context_length} positions")
            if len(ids) + max_tokens > self.context_length:
                raise InvalidRequestError("max_tokens", f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} "
                                                        f"that is {len(ids) + max_tokens}, more than the model's context "
                                                        f"of {self.context_length} positions")
        return ids

    def _plan(self, prompt_ids: list[int], params: SamplingParams):
        """The request's own sampler (its own seed stream) and its peak KV need in blocks."""
        branches, which = params.branches()
        if branches > self.max_branches:
            raise RequestTooLargeError(which, f"the request decodes up to {branches} sequences at once ({which}); "
                                              f"this engine allows {self.max_branches} (max_branches)")
        sampler = params.sampler(self.runner, self.tokenizer)
        if self.cache is None:
            return sampler, 0
        need = sampler.peak_kv_blocks([len(prompt_ids)], params.max_tokens, self.cache.block_size) or 0
        if need > self.cache.num_blocks:
            raise RequestTooLargeError(
                "max_tokens", f"{params.method} with a {len(prompt_ids)}-token prompt and max_tokens={params.max_tokens} "
                              f"can hold {need} KV blocks at its peak; the whole pool has {self.cache.num_blocks} "
                              f"({self.cache.block_size} positions each): lower max_tokens or the method's branches")
        return sampler, need

    def _count_rejected(self, why: str) -> None:
        with self._lock:
            self._rejected[why] += 1


# --------------------------------------------------------------------- async engine


class AsyncEngine:
    """An :class:`Engine` stepped by one background thread, for asyncio servers.

    ``async for out in engine.generate(prompt, params)`` streams a request's outputs; many
    asyncio tasks may do so at once. The thread starts on the first request (or
    :meth:`start`) and steps while there is work; :meth:`shutdown` aborts everything
    and stops it. A consumer that stops iterating (``aclose``, a cancelled task, a
    client that disconnected) aborts its request, which frees its blocks within a step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None

    async def start(self) -> None:
        """Start the step thread (idempotent)."""
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="powerfast-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Abort every request, stop the thread and refuse new requests."""
        self._closed = True
        with self.engine._lock:
            ids = list(self.engine._ids)
        for request_id in ids:
            self.engine.abort(request_id)
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        for queue in list(self._queues.values()):
            queue.put_nowait(EngineClosedError("the engine was shut down"))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come, the last with ``finished=True``. Raises
        InvalidRequestError / RequestTooLargeError / QueueFullError / EngineClosedError
        before yielding anything."""
        if self._closed or self._error is not None:
            raise EngineClosedError(f"the engine is not running{f': {self._error}' if self._error else ''}")
        await self.start()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self.engine.add_request(prompt, params, request_id)
            self._wake.set()
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
                self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:  # runs on the event loop
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _run(self) -> None:
        """The step thread."""
        engine = self.engine
        while not self._closed or engine.has_unfinished():
            if not engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except BaseException as error:  # noqa: BLE001 - reported to every waiting request
                self._error = error
                failure = EngineClosedError(f"the engine's step failed: {type(error).__name__}: {error}")
                self._loop.call_soon_threadsafe(self._fail_all, failure)
                return
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)

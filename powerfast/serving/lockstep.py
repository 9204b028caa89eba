"""One engine over a tensor-parallel model: rank 0 decides, the other ranks follow.

Every rank holds an :class:`~powerfast.serving.engine.Engine` over its shard of the model, and
every rank must compute the same step: the all-reduces inside a forward sum the ranks' partial
activations, so ranks that fed different tokens would go on silently wrong. Lockstep is built
in, not hoped for: everything a step depends on that could differ between processes is
decided once, on rank 0 (the :class:`LeaderEngine`, behind the HTTP server), and travels to
every rank in that step's :class:`StepCommand`:

- the requests added since the last step, fully resolved: the prompt's token ids, the
  :class:`SamplingParams` with their seed filled in (a request without one gets it from the
  operating system's randomness when rank 0 adds it), and the KV pages it reserves;
- the aborts, in their order among the adds;
- the admissions: the ids of the waiting requests this step starts, in order.

A follower (:func:`follow`) decides nothing: it builds each request's sampler from the
resolved params (refusing params without a seed), admits exactly the ids it is given (a
RuntimeError for any other than its queue's head), steps, and reads no clock and draws no
seed for a decision.

Each step's command travels over a gloo group of its own (Python objects, whatever the
model's backend) whose timeout is a year: a follower waits as long as the server is idle.
After each step every rank posts its digest of the step (the step guard,
:mod:`powerfast.serving.guard`) in a background all-gather on a second gloo group, with a
bounded timeout; before the next forward every rank checks it, and digests that differ stop
every rank there, with one line. While requests are in flight the server also bounds each
step (``AsyncEngine(step_timeout=...)``: a step past it fails the requests with a 503 and the
server exits), and a rank that dies closes its connections, so the others' next collective
fails at once; the leader fails its in-flight requests and exits non-zero, and torchrun ends
the rest (powerfast/DESIGN.md section 9). :meth:`LeaderEngine.stop` checks the last step and
ends the followers.
"""

from __future__ import annotations

import datetime
import threading
from typing import NamedTuple

from powerfast.serving.engine import Engine
from powerfast.serving.guard import fingerprint, verify
from powerfast.serving.params import SamplingParams

__all__ = ["DEFAULT_STEP_TIMEOUT", "GUARD_TIMEOUT", "LeaderEngine", "StepCommand", "follow"]

DEFAULT_STEP_TIMEOUT = 60.0
"""Seconds a step of a tensor-parallel server may take before it stops (``serve --step-timeout``)."""

GUARD_TIMEOUT = 60.0
"""Seconds a rank waits for the others' digests of a step (posted at the end of the same step)."""

_STOP = "stop"  # the command that ends the followers


class StepCommand(NamedTuple):
    """What rank 0 sends every rank before a step: all the step depends on that rank 0 decided.

    step:     the step's number (rank 0's ``num_steps``; a follower checks it is its own)
    requests: ``("add", request_id, prompt_ids, params, need, stream)`` with resolved params (a seed)
              and the KV pages the request reserves, or ``("abort", request_id)``, in the
              order they were made
    admit:    the ids of the waiting requests the step starts, in order
    """

    step: int
    requests: list
    admit: list[str]


def _groups():
    """(command group, guard group), gloo both; every rank creates them, in this order. The
    commands' timeout is a year (a follower waits while the server is idle); the guard's is
    bounded (every rank posts its digest at the end of the same step)."""
    import torch.distributed as dist

    commands = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    guard = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=GUARD_TIMEOUT))
    return commands, guard


class _Channel:
    """One rank's end of lockstep: each step's command from rank 0, and the step guard.

    After a step every rank posts its digest in an all-gather on the guard group that runs in
    the background (``async_op``); when the next command has been sent (rank 0) or received
    (the others), every rank waits for it and compares, before anything of the next step
    runs: a divergence stops every rank at the same point, where one more exchange can name
    the request that differs."""

    def __init__(self) -> None:
        self.group, self.guard_group = _groups()
        self._posted = None  # (step, work, gathered, per_request) of the last step

    def record(self, engine: Engine, step: int, outputs: list) -> None:
        """Hash the step just run and post the digest to every rank (in the background)."""
        import torch
        import torch.distributed as dist

        digest, per_request = fingerprint(engine, step, outputs)
        mine = torch.tensor([digest], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.guard_group))]
        work = dist.all_gather(gathered, mine, group=self.guard_group, async_op=True)
        self._posted = (step, work, gathered, per_request)

    def _digests(self) -> tuple[int | None, list[int], list]:
        """(the last step, every rank's digest of it, this rank's per-request digests), once
        the last step's exchange is done (nothing posted yet: (None, [], []))."""
        if self._posted is None:
            return None, [], []
        step, work, gathered, per_request = self._posted
        self._posted = None
        work.wait()
        return step, [int(t.item()) for t in gathered], per_request

    def check(self) -> None:
        """Wait for the last step's digests and compare them (DivergenceError on every rank
        when they differ). Every rank calls it at the same point: after the next command is
        on its way, before anything of the next step runs."""
        step, digests, per_request = self._digests()
        verify(step, digests, per_request, self.guard_group)

    def send(self, command) -> None:
        """Rank 0: send ``command`` (a StepCommand or _STOP) to every rank, then check the
        last step (the wait overlaps the command's way to the others)."""
        _broadcast(command, self.group)
        self.check()

    def receive(self):
        """Another rank: rank 0's next command (a StepCommand or _STOP), once the last step is
        checked."""
        command = _broadcast(None, self.group)
        self.check()
        return command


def _broadcast(value, group):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _apply(engine: Engine, requests: list, sampler_of) -> None:
    """A step's adds and aborts, in the order they were made: each add queued with the sampler
    ``sampler_of(request_id, params)`` gives and the reservation rank 0 computed."""
    for command in requests:
        if command[0] == "add":
            _, request_id, prompt_ids, params, need, stream = command
            sampler = sampler_of(request_id, params)
            with engine._lock:
                engine._enqueue(request_id, prompt_ids, params, sampler, need, stream)
        else:
            Engine.abort(engine, command[1])


def _lockstep(engine: Engine) -> None:
    """What every rank's engine does differently under lockstep: a failed forward ends the
    step (not only its requests), and each step records its sampled tokens for the guard."""
    engine.forward_errors_are_fatal = True
    engine.sampled = []


class LeaderEngine(Engine):
    """Rank 0's engine: :meth:`add_request` checks and plans a request now (its errors are the
    engine's; a missing seed is drawn here) and queues it; :meth:`abort` queues an abort;
    :meth:`step` applies them, decides the step's admissions, checks the last step with every
    rank and sends them the :class:`StepCommand`, then steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _lockstep(self)
        self._channel = _Channel()
        self._commands: list = []
        self._pending: dict[str, object] = {}  # id -> sampler, of requests added but not yet applied
        self._stopped = False
        self._broadcasting = threading.Lock()  # one exchange on the wire at a time

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None, *,
                    chat_template: bool = True, stream: bool = True) -> str:
        prompt_ids, params, sampler, need = self._check_request(prompt, params, chat_template)
        with self._lock:
            request_id = self._claim_id(request_id)
            self._pending[request_id] = sampler
            self._commands.append(("add", request_id, list(prompt_ids), params, need, stream))
        return request_id

    def _id_in_use(self, request_id: str) -> bool:
        return super()._id_in_use(request_id) or request_id in self._pending

    def _queued(self) -> int:
        return super()._queued() + len(self._pending)

    def _enqueue(self, request_id, prompt_ids, params, sampler, need, stream=True) -> None:
        super()._enqueue(request_id, prompt_ids, params, sampler, need, stream)
        self._pending.pop(request_id, None)  # in the same hold of the lock: the id is never free

    def abort(self, request_id: str) -> bool:
        with self._lock:
            known = self._id_in_use(request_id)
            if known:
                self._commands.append(("abort", request_id))
        return known

    def request_ids(self) -> list[str]:
        with self._lock:
            return [*self._ids, *sorted(self._pending)]

    def has_unfinished(self) -> bool:
        with self._lock:
            if self._commands:
                return True
        return super().has_unfinished()

    def step(self):
        with self._broadcasting:
            if self._stopped:
                raise RuntimeError("the tensor-parallel engine was stopped")
            with self._lock:
                requests, self._commands = self._commands, []
            _apply(self, requests, lambda request_id, params: self._pending[request_id])  # planned when added
            command = StepCommand(self.num_steps, requests, self.admissions())
            self._channel.send(command)
            outputs = self._step(command.admit)
            self._channel.record(self, command.step, outputs)
        return outputs

    def stop(self, timeout: float = 10.0) -> bool:
        """Check the last step with every rank and end their loops (once; call when no step
        runs any more). Waits at most ``timeout`` seconds (a rank that is gone cannot hold
        it); True when every follower was told."""
        if not self._broadcasting.acquire(timeout=timeout):  # a step is still held in a collective
            return False
        try:
            if self._stopped:
                return True
            self._stopped = True
        finally:
            self._broadcasting.release()
        done = threading.Event()

        def send() -> None:
            try:
                self._channel.send(_STOP)
                done.set()
            except Exception:  # noqa: BLE001 - a rank already gone, or a last divergence (the followers say it)
                pass

        thread = threading.Thread(target=send, name="powerfast-stop", daemon=True)
        thread.start()
        thread.join(timeout)
        return done.is_set()


def follow(engine: Engine) -> None:
    """A rank other than 0: check the last step with every rank, apply the next command from
    rank 0 and step; until rank 0 stops. Raises (DivergenceError, a collective's error, ...)
    on the first step that fails: the caller should exit at once."""
    _lockstep(engine)
    channel = _Channel()

    def sampler_of(request_id: str, params) -> object:
        if not isinstance(params, SamplingParams) or params.seed is None:
            raise RuntimeError(f"rank 0 sent request {request_id!r} without a resolved seed: a follower draws none")
        return engine._sampler(params)

    while True:
        command = channel.receive()
        if command == _STOP:
            return
        if not isinstance(command, StepCommand) or command.step != engine.num_steps:
            got = command.step if isinstance(command, StepCommand) else type(command).__name__
            raise RuntimeError(f"rank 0 sent step {got} while this rank is at step {engine.num_steps}")
        _apply(engine, command.requests, sampler_of)
        outputs = engine._step(command.admit)
        channel.record(engine, command.step, outputs)

"""One engine over a tensor-parallel model: rank 0 schedules, the other ranks follow.

Every rank holds an :class:`~powerfast.serving.engine.Engine` over its shard of the model.
The engine is deterministic: the same requests, added and aborted at the same points between
the same steps, give the same admissions, forks, tokens and frees. So rank 0 (the
:class:`LeaderEngine`, behind the HTTP server) takes requests and aborts at any time but
applies them only at the start of its next step, after sending that step's list of them to
every rank; each other rank (:func:`follow`) receives the list, applies it and steps. The
lists travel over a gloo group of their own (Python objects, whatever the model's backend),
whose timeout is a year: a follower waits as long as the server is idle. :meth:`LeaderEngine.stop`
ends the followers.
"""

from __future__ import annotations

import datetime
import threading

from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

__all__ = ["LeaderEngine", "follow"]

_STOP = "stop"


def _command_group():
    """The group the command lists travel on (every rank creates it, in the same order)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def _broadcast(value, group):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _apply(engine: Engine, commands: list) -> None:
    """A step's adds and aborts, in the order they were made. The leader checked each add when
    it arrived (its id and the queue's room included), so here it is only planned on this
    rank and queued."""
    for command in commands:
        if command[0] == "add":
            _, request_id, prompt_ids, params = command
            _, sampler, need = engine._check_request(prompt_ids, params, chat_template=False)
            with engine._lock:
                engine._enqueue(request_id, prompt_ids, params, sampler, need)
        else:
            Engine.abort(engine, command[1])


class LeaderEngine(Engine):
    """Rank 0's engine: :meth:`add_request` checks a request now (its errors are the
    engine's) and queues it; :meth:`abort` queues an abort; :meth:`step` sends the queued
    commands to every rank, applies them and steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._group = _command_group()
        self._commands: list = []
        self._pending: set[str] = set()  # ids added but not yet applied
        self._stopped = False
        self._broadcasting = threading.Lock()  # one command list on the wire at a time

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None, *,
                    chat_template: bool = True) -> str:
        prompt_ids, _, _ = self._check_request(prompt, params, chat_template)
        with self._lock:
            request_id = self._claim_id(request_id)
            self._pending.add(request_id)
            self._commands.append(("add", request_id, list(prompt_ids), params))
        return request_id

    def _id_in_use(self, request_id: str) -> bool:
        return super()._id_in_use(request_id) or request_id in self._pending

    def _queued(self) -> int:
        return super()._queued() + len(self._pending)

    def _enqueue(self, request_id, prompt_ids, params, sampler, need) -> None:
        super()._enqueue(request_id, prompt_ids, params, sampler, need)
        self._pending.discard(request_id)  # in the same hold of the lock: the id is never free

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
            with self._lock:
                commands, self._commands = self._commands, []
            _broadcast(commands, self._group)
            _apply(self, commands)
        return super().step()

    def stop(self) -> None:
        """End every follower's loop (once; call when no step runs any more)."""
        with self._broadcasting:
            if not self._stopped:
                self._stopped = True
                _broadcast(_STOP, self._group)


def follow(engine: Engine) -> None:
    """A rank other than 0: apply each step's commands from rank 0 and step, until it stops."""
    group = _command_group()
    while True:
        commands = _broadcast(None, group)
        if commands == _STOP:
            return
        _apply(engine, commands)
        engine.step()

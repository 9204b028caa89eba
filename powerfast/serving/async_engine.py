"""The engine for asyncio servers: one background thread steps it, tasks stream their requests."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from powerfast.serving.engine import Engine, EngineStats
from powerfast.serving.errors import EngineClosedError
from powerfast.serving.params import SamplingParams
from powerfast.serving.request import RequestOutput

__all__ = ["AsyncEngine"]


# --------------------------------------------------------------------- async engine


class AsyncEngine:
    """An :class:`Engine` stepped by one background thread, for asyncio servers.

    ``async for out in engine.generate(prompt, params)`` streams a request's outputs; many
    asyncio tasks may do so at once. The thread starts on the first request (or
    :meth:`start`) and steps while there is work; :meth:`shutdown` aborts everything
    and stops it. A consumer that stops iterating (``aclose``, a cancelled task, a
    client that disconnected) aborts its request, which frees its pages within a step.

    A step that raises stops the engine for good: every request in flight ends with an
    :class:`EngineClosedError` naming the cause, new ones are refused with it, :attr:`failure`
    holds it and the callbacks given to :meth:`on_failure` are called once.
    step_timeout: seconds a step may run (None: no limit); past it the engine fails the same
                  way, without waiting for the step (a watchdog thread; tensor-parallel
                  serving sets it, since a rank that stops answering can hold a step forever)
    """

    def __init__(self, engine: Engine, step_timeout: float | None = None) -> None:
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds or None, got {step_timeout!r}")
        self.engine = engine
        self.step_timeout = step_timeout
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._failing = threading.Lock()
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self._step_started: float | None = None  # monotonic time the running step began
        self._step_number = 0

    @property
    def failure(self) -> BaseException | None:
        """What stopped the engine's steps (an EngineClosedError naming the cause), or None."""
        return self._error

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._closed

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(failure)`` once when a step fails or times out (from the thread that
        found it; at once if it already has)."""
        with self._failing:
            if self._error is None:
                self._failure_callbacks.append(callback)
                return
        callback(self._error)

    async def start(self) -> None:
        """Start the step thread (idempotent)."""
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="powerfast-engine", daemon=True)
            self._thread.start()
            if self.step_timeout is not None:
                threading.Thread(target=self._watch, name="powerfast-engine-watchdog", daemon=True).start()

    async def shutdown(self) -> None:
        """Abort every request, stop the thread and refuse new requests. After a failure the
        thread is not waited for (it may be held in a step that never ends)."""
        self._closed = True
        if self._error is None:
            for request_id in self.engine.request_ids():
                self.engine.abort(request_id)
        self._wake.set()
        if self._thread is not None and self._error is None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, self.step_timeout)
        for queue in list(self._queues.values()):
            queue.put_nowait(EngineClosedError(str(self._error) if self._error else "the engine was shut down"))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None, *,
                       chat_template: bool = True, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come, the last with ``finished=True`` (with ``stream``
        False only that one: :meth:`Engine.add_request`). Raises
        InvalidRequestError / RequestTooLargeError / QueueFullError / EngineClosedError
        before yielding anything."""
        if self._error is not None:
            raise EngineClosedError(str(self._error))
        if self._closed:
            raise EngineClosedError("the engine is not running: it was shut down")
        await self.start()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self.engine.add_request(prompt, params, request_id, chat_template=chat_template, stream=stream)
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
        while (not self._closed or engine.has_unfinished()) and self._error is None:
            if not engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._step_number = engine.num_steps
            self._step_started = time.monotonic()
            try:
                outputs = engine.step()
            except BaseException as error:  # noqa: BLE001 - reported to every waiting request
                self._fail(EngineClosedError(f"the engine's step {self._step_number} failed: "
                                             f"{type(error).__name__}: {error}"))
                return
            finally:
                self._step_started = None
            if self._error is not None:  # the watchdog gave up on this step: its outputs are void
                return
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _watch(self) -> None:
        """The watchdog: fail the engine when a step has run past ``step_timeout``."""
        period = min(1.0, self.step_timeout / 4)
        while self._error is None and not (self._closed and (self._thread is None or not self._thread.is_alive())):
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout:
                self._fail(EngineClosedError(f"the engine's step {self._step_number} did not finish within "
                                             f"{self.step_timeout:g} s"))
                return
            time.sleep(period)

    def _fail(self, failure: EngineClosedError) -> None:
        """Stop for good on ``failure`` (once): every waiting request gets it, then the callbacks."""
        with self._failing:
            if self._error is not None:
                return
            self._error = failure
            callbacks, self._failure_callbacks = self._failure_callbacks, []
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, failure)
        for callback in callbacks:
            callback(failure)

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(EngineClosedError(str(error)))

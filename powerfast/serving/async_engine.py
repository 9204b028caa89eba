"""The engine for asyncio servers: one background thread steps it, tasks stream their requests."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

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
        for request_id in self.engine.request_ids():
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

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None, *,
                       chat_template: bool = True) -> AsyncIterator[RequestOutput]:
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
            self.engine.add_request(prompt, params, request_id, chat_template=chat_template)
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

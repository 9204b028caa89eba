"""Prometheus metrics of the server, in the text exposition format 0.0.4, written by hand.

:class:`ServingMetrics` observes the :class:`powerfast.serving.request.RequestOutput` stream of
every request the server answers (time to first token, latency) and counts the HTTP
responses by status; :func:`render` turns an :class:`powerfast.serving.engine.EngineStats`
(requests by state, tokens by phase, KV blocks, queue depth) plus those observations into
the text a Prometheus server scrapes from ``GET /metrics``. Pure Python: no client library.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

__all__ = ["CONTENT_TYPE", "Histogram", "ServingMetrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Bucket upper bounds in seconds: from a few ms (a tiny model on a GPU) to minutes (power
#: sampling of long completions on a CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

PREFIX = "powerfast_"


def _number(value: float) -> str:
    """A sample value as the format spells it (``+Inf``, ``NaN``, integers without ``.0``)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _label_value(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str] | None, float]]) -> list[str]:
    """The lines of one metric family: HELP, TYPE, then one line per (labels, value)."""
    full = PREFIX + name
    lines = [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


class Histogram:
    """Cumulative-bucket histogram of observations (seconds).

    bounds: the buckets' upper bounds, increasing; ``+Inf`` is added when rendered.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram bounds must be a non-empty increasing sequence, got {bounds}")
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"a histogram observation must be finite, got {value}")
        self.count += 1
        self.sum += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break

    def lines(self, name: str, help_text: str) -> list[str]:
        full = PREFIX + name
        lines = [f"# HELP {full} {help_text}", f"# TYPE {full} histogram"]
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            lines.append(f'{full}_bucket{{le="{_number(bound)}"}} {running}')
        lines.append(f'{full}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{full}_sum {_number(self.sum)}")
        lines.append(f"{full}_count {self.count}")
        return lines


class ServingMetrics:
    """What the server observes beyond the engine's own counters.

    ``observe(output)`` for every :class:`RequestOutput` a response is built from: the time to
    first token is recorded at a request's first output with tokens, the latency at its
    finished output (requests the client abandoned have neither). ``response(status)`` counts
    each HTTP response of the API endpoints by status code. Safe to call from any thread.
    """

    def __init__(self, ttft_buckets: Sequence[float] = TTFT_BUCKETS,
                 latency_buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.time_to_first_token = Histogram(ttft_buckets)
        self.request_latency = Histogram(latency_buckets)
        self.responses: dict[int, int] = {}
        self._first_token_seen: set[str] = set()
        self._lock = threading.Lock()

    def observe(self, output) -> None:
        with self._lock:
            request_id = output.request_id
            if output.first_token_time is not None and request_id not in self._first_token_seen:
                self._first_token_seen.add(request_id)
                self.time_to_first_token.observe(max(0.0, output.first_token_time - output.arrival_time))
            if output.finished:
                self._first_token_seen.discard(request_id)
                if output.finish_time is not None:
                    self.request_latency.observe(max(0.0, output.finish_time - output.arrival_time))

    def forget(self, request_id: str) -> None:
        """Drop what is held for a request that ends without a finished output (aborted)."""
        with self._lock:
            self._first_token_seen.discard(request_id)

    def response(self, status: int) -> None:
        with self._lock:
            self.responses[int(status)] = self.responses.get(int(status), 0) + 1

    def lines(self) -> list[str]:
        with self._lock:
            lines = _family("http_responses_total", "counter", "HTTP responses of the API endpoints by status code.",
                            [({"code": str(code)}, count) for code, count in sorted(self.responses.items())])
            lines += self.time_to_first_token.lines(
                "time_to_first_token_seconds", "Seconds from a request's arrival to its first final token.")
            lines += self.request_latency.lines(
                "request_latency_seconds", "Seconds from a request's arrival to its end (requests run to the end).")
        return lines


def render(stats, metrics: ServingMetrics | None = None) -> str:
    """The exposition text of an :class:`EngineStats` and, when given, a :class:`ServingMetrics`."""
    lines: list[str] = []
    lines += _family("requests_waiting", "gauge", "Requests in the waiting queue.", [(None, stats.num_waiting)])
    lines += _family("requests_running", "gauge", "Requests admitted and running.", [(None, stats.num_running)])
    lines += _family("requests_finished_total", "counter", "Requests finished, by finish reason.",
                     [({"reason": reason}, count) for reason, count in sorted(stats.requests_finished.items())])
    lines += _family("requests_rejected_total", "counter", "Requests refused at admission, by reason.",
                     [({"reason": reason}, count) for reason, count in sorted(stats.requests_rejected.items())])
    lines += _family("tokens_total", "counter", "Tokens by phase of the requests that ended (prefill: prompt tokens).",
                     [({"phase": phase}, count) for phase, count in sorted(stats.tokens_by_phase.items())])
    lines += _family("kv_blocks", "gauge", "KV cache blocks by state.",
                     [({"state": "used"}, stats.kv_blocks_used), ({"state": "free"}, stats.kv_blocks_free),
                      ({"state": "reserved"}, stats.kv_blocks_reserved)])
    lines += _family("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [(None, stats.kv_blocks_total)])
    lines += _family("queue_depth", "gauge", "Requests waiting for admission.", [(None, stats.num_waiting)])
    lines += _family("queue_capacity", "gauge", "Most requests the waiting queue holds.", [(None, stats.max_queue)])
    lines += _family("engine_steps_total", "counter", "Scheduling steps run.", [(None, stats.num_steps)])
    lines += _family("forwards_total", "counter", "Model forwards run.", [(None, stats.num_forwards)])
    lines += _family("forward_rows_total", "counter", "Rows over all model forwards.", [(None, stats.forward_rows)])
    if metrics is not None:
        lines += metrics.lines()
    return "\n".join(lines) + "\n"

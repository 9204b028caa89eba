"""Prometheus metrics of the server, exposed with ``prometheus_client``.

:class:`ServingMetrics` holds a private :class:`prometheus_client.CollectorRegistry` (never
the library's global one: several servers and engines may live in one process) with

- the engine's gauges and counters (requests by state, tokens by phase, KV pages, queue
  depth, steps, forwards): an :class:`EngineCollector` builds them at every scrape from one
  :class:`powerfast.serving.engine.EngineStats` snapshot, so no engine state is copied;
- what the server observes itself: the time to first token and the latency of each request
  (histograms, in seconds, from its :class:`powerfast.serving.request.RequestOutput`
  stream) and the HTTP responses of the API endpoints by status code (a counter).

:func:`render` writes the registry in the Prometheus text format (0.0.4) that a Prometheus
server scrapes from ``GET /metrics``; :data:`CONTENT_TYPE` is its media type. Besides these
families, the library writes a ``<name>_created`` gauge (Unix time) for each of the
server's counters and histograms.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from powerfast.serving.engine import EngineStats

__all__ = ["CONTENT_TYPE", "EngineCollector", "ServingMetrics", "render"]

#: The media type of what :func:`render` writes: ``text/plain; version=0.0.4; charset=utf-8``,
#: the type prometheus_client's own handlers send with it. (From prometheus_client 0.23 on,
#: ``CONTENT_TYPE_LATEST`` names format 1.0.0, which the library sends only to a scraper that
#: asks for it; before 0.23 it is the 0.0.4 type.)
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

#: Bucket upper bounds in seconds: from a few ms (a tiny model on a GPU) to minutes (power
#: sampling of long completions on a CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

PREFIX = "powerfast_"


def _labelled(family: Metric, samples: Iterable[tuple[str, float]]) -> Metric:
    """``family`` (with one label) given one sample per (label value, value)."""
    for label, value in samples:
        family.add_metric([str(label)], value)
    return family


class EngineCollector:
    """A prometheus_client collector of the engine's gauges and counters.

    stats: a callable returning the engine's current :class:`EngineStats` (``engine.stats``);
    :meth:`collect` calls it once per scrape and builds every family from that snapshot.
    """

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield GaugeMetricFamily(PREFIX + "requests_waiting", "Requests in the waiting queue.", value=stats.num_waiting)
        yield GaugeMetricFamily(PREFIX + "requests_running", "Requests admitted and running.", value=stats.num_running)
        yield _labelled(CounterMetricFamily(PREFIX + "requests_finished_total", "Requests finished, by finish reason.",
                                            labels=["reason"]), sorted(stats.requests_finished.items()))
        yield _labelled(CounterMetricFamily(PREFIX + "requests_rejected_total",
                                            "Requests refused at admission, by reason.", labels=["reason"]),
                        sorted(stats.requests_rejected.items()))
        yield _labelled(CounterMetricFamily(PREFIX + "tokens_total",
                                            "Tokens by phase of the requests that ended (prefill: prompt tokens).",
                                            labels=["phase"]), sorted(stats.tokens_by_phase.items()))
        yield _labelled(GaugeMetricFamily(PREFIX + "kv_pages", "KV cache pages by state.", labels=["state"]),
                        [("used", stats.kv_pages_used), ("free", stats.kv_pages_free),
                         ("reserved", stats.kv_pages_reserved)])
        yield GaugeMetricFamily(PREFIX + "kv_pages_total", "KV cache pages in the pool.", value=stats.kv_pages_total)
        yield GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting for admission.", value=stats.num_waiting)
        yield GaugeMetricFamily(PREFIX + "queue_capacity", "Most requests the waiting queue holds.",
                                value=stats.max_queue)
        yield CounterMetricFamily(PREFIX + "engine_steps_total", "Scheduling steps run.", value=stats.num_steps)
        yield CounterMetricFamily(PREFIX + "forwards_total", "Model forwards run.", value=stats.num_forwards)
        yield CounterMetricFamily(PREFIX + "forward_rows_total", "Rows over all model forwards.",
                                  value=stats.forward_rows)


class ServingMetrics:
    """The metrics of one server, in a :class:`CollectorRegistry` of their own (``registry``).

    ttft_buckets, latency_buckets: the histograms' bucket upper bounds in seconds, increasing
        (``+Inf`` is added).
    engine_stats: a callable returning the engine's :class:`EngineStats` (``engine.stats``),
        read at every scrape; or None, and :meth:`watch` later (``build_app`` does).

    ``observe(output)`` for every :class:`RequestOutput` a response is built from: the time to
    first token is recorded at a request's first output with tokens, the latency at its
    finished output (requests the client abandoned have neither). ``response(status)`` counts
    each HTTP response of the API endpoints by status code. Safe to call from any thread.
    """

    def __init__(self, ttft_buckets: Sequence[float] = TTFT_BUCKETS, latency_buckets: Sequence[float] = LATENCY_BUCKETS,
                 *, engine_stats: Callable[[], EngineStats] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.http_responses = Counter(PREFIX + "http_responses_total",
                                      "HTTP responses of the API endpoints by status code.", ["code"],
                                      registry=self.registry)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first final token.",
                                             buckets=ttft_buckets, registry=self.registry)
        self.request_latency = Histogram(PREFIX + "request_latency_seconds",
                                         "Seconds from a request's arrival to its end (requests run to the end).",
                                         buckets=latency_buckets, registry=self.registry)
        self._engine: EngineCollector | None = None
        self._first_token_seen: set[str] = set()
        self._lock = threading.Lock()
        if engine_stats is not None:
            self.watch(engine_stats)

    def watch(self, engine_stats: Callable[[], EngineStats]) -> None:
        """Expose the engine's gauges and counters from ``engine_stats()``, called at every
        scrape, in place of those of the engine watched before (if any)."""
        with self._lock:
            if self._engine is not None:
                self.registry.unregister(self._engine)
            self._engine = EngineCollector(engine_stats)
            self.registry.register(self._engine)

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
        self.http_responses.labels(code=str(int(status))).inc()


def render(metrics: ServingMetrics) -> str:
    """The exposition text of ``metrics``' registry (Prometheus text format 0.0.4): the
    server's counter and histograms, then the engine's families when it watches one."""
    return generate_latest(metrics.registry).decode("utf-8")

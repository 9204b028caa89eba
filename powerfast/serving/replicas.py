"""Engine replicas behind one OpenAI-compatible endpoint, on Ray Serve (``serve --replicas N``).

Each replica is a Ray Serve replica (one actor, one process) that loads its own model and
runs its own :class:`~powerfast.serving.engine.Engine` behind the app of
:func:`~powerfast.serving.server.build_app`: the same endpoints, errors and metrics as one
process. Ray Serve does the rest, none of it written here: its proxy routes each HTTP request
to one replica, autoscales between the bounds, calls each replica's ``check_health`` (the
engine's health: a failed step or a stopped engine makes the replica unhealthy) and replaces
a replica that fails it or dies. A request in flight on a replica that dies ends with an
error from the proxy; the other replicas' requests go on.

From Python::

    from ray import serve
    from powerfast.serving.replicas import ReplicaConfig, replica_deployment

    serve.start(http_options={"port": 8000})
    serve.run(replica_deployment(ReplicaConfig(model="gemma3-270m"), num_replicas=2), route_prefix="/")

Ray Serve is an optional extra: ``pip install 'powerfast[replicas]'``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["REPLICAS_EXTRA_HINT", "ReplicaConfig", "build_replica_app", "replica_deployment", "require_serve",
           "serve_replicas"]

REPLICAS_EXTRA_HINT = "pip install 'powerfast[replicas]'"

#: The application's name on the Ray Serve cluster.
APP_NAME = "powerfast"

#: Requests the proxy sends one replica at a time: the engine batches what it holds, so the
#: default is far above Ray Serve's own (which suits models that take one request at a time).
DEFAULT_MAX_ONGOING_REQUESTS = 64

_DTYPES = ("float32", "bfloat16", "float16")


def require_serve():
    """The ``ray.serve`` module, or an ImportError that says how to install it."""
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError(f"replicas need Ray Serve ({error}): {REPLICAS_EXTRA_HINT}") from None
    return serve


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica builds: the model, its engine and its app.

    model:             a local Hugging Face folder, a .gguf file or a packaged model's name
                       (None: the embedded default), loaded by every replica
    dtype:             float32, bfloat16 or float16
    kv_memory_mib:     each replica's KV cache budget (None: the runtime's default)
    max_queue:         requests waiting for admission in one replica before it answers 429
    served_model_name: the model name of the API (None: the model's name, as ``serve`` gives it)
    api_key:           when set, every endpoint but /health needs ``Authorization: Bearer KEY``
    step_timeout:      seconds an engine step may run before the replica's engine fails
    env:               environment variables set in each replica before the model loads
    """

    model: str | None = None
    dtype: str = "float32"
    kv_memory_mib: int | None = None
    max_queue: int = 256
    served_model_name: str | None = None
    api_key: str | None = None
    step_timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.kv_memory_mib is not None and (isinstance(self.kv_memory_mib, bool) or self.kv_memory_mib < 1):
            raise ValueError(f"kv_memory_mib must be >= 1 MiB or None, got {self.kv_memory_mib!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {self.max_queue!r}")
        if self.step_timeout is not None and not self.step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds or None, got {self.step_timeout!r}")

    @property
    def name(self) -> str:
        """The model name the API serves."""
        if self.served_model_name:
            return self.served_model_name
        from powerfast.runtime.models import served_model_name

        return served_model_name(self.model)

    def check_model(self) -> None:
        """FileNotFoundError now, before any replica starts, for a model that is no packaged
        name and no existing path (each replica would fail to load it, over and over)."""
        from powerfast.runtime.models import NAMED_MODELS

        if self.model is None or self.model in NAMED_MODELS or Path(self.model).exists():
            return
        raise FileNotFoundError(f"model {self.model!r} is no packaged model ({', '.join(NAMED_MODELS)}) and no "
                                "existing folder or .gguf file")


def build_replica_app(config: ReplicaConfig, threads: int | None = None):
    """The FastAPI app of one replica: ``config``'s model loaded here, an engine over it.

    threads: torch's intra-op threads (None: torch's default)."""
    import torch

    from powerfast.runtime.models import load_model
    from powerfast.serving.async_engine import AsyncEngine
    from powerfast.serving.engine import Engine
    from powerfast.serving.server import build_app

    os.environ.update(config.env)
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(config.model, dtype=getattr(torch, config.dtype))
    if tokenizer is None:
        raise ValueError(f"model {config.model} has no tokenizer files: the server needs one for text prompts")
    runner_kwargs = {} if config.kv_memory_mib is None else {"max_memory": config.kv_memory_mib << 20}
    engine = Engine(model, tokenizer, max_queue=config.max_queue, **runner_kwargs)
    return build_app(AsyncEngine(engine, step_timeout=config.step_timeout), config.name, api_key=config.api_key)


def _replica_class(config: ReplicaConfig, threads: int | None):
    """The deployment's class: Ray Serve's ingress over the app :func:`build_replica_app`
    builds inside the replica, plus the health check Ray Serve calls."""
    serve = require_serve()

    def build():  # runs in the replica, once, when it starts
        return build_replica_app(config, threads)

    class PowerfastReplica:
        """One engine replica (an actor); Ray Serve routes HTTP requests to its app."""

        def check_health(self) -> None:
            """Raises when the engine cannot serve: Ray Serve then replaces this replica."""
            engine = self.app.state.engine
            if engine.failure is not None:
                raise RuntimeError(f"the replica's engine failed: {engine.failure}")
            if engine.closed:
                raise RuntimeError("the replica's engine has stopped")

        def replica_state(self) -> dict[str, Any]:
            """This replica's process and engine: pid, KV pages in use, requests running and
            waiting, requests finished by reason (for operators and tests)."""
            stats = self.app.state.engine.stats()
            return {"pid": os.getpid(), "kv_pages_used": stats.kv_pages_used, "num_running": stats.num_running,
                    "num_waiting": stats.num_waiting, "requests_finished": dict(stats.requests_finished)}

    return serve.ingress(build)(PowerfastReplica)


def replica_deployment(config: ReplicaConfig | None = None, *, num_replicas: int = 1, max_replicas: int | None = None,
                       cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
                       max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
                       target_ongoing_requests: float | None = None,
                       health_check_period_s: float = 5.0, health_check_timeout_s: float = 30.0):
    """A Ray Serve application of engine replicas: ``serve.run(replica_deployment(...))``.

    num_replicas:    replicas to run (with ``max_replicas``: the least autoscaling keeps)
    max_replicas:    autoscale between ``num_replicas`` and this many (None: a fixed count)
    cpus_per_replica, gpus_per_replica: what each replica reserves on the cluster (its torch
                     uses that many threads)
    max_ongoing_requests: requests the proxy sends one replica at a time; the rest wait in
                     the proxy (the replica's engine admits what its KV pool holds and queues
                     the rest up to ``config.max_queue``)
    target_ongoing_requests: the load per replica autoscaling aims at (default: half of
                     ``max_ongoing_requests``)
    health_check_period_s, health_check_timeout_s: how often Ray Serve calls a replica's
                     health check, and how long it waits for the answer
    """
    config = ReplicaConfig() if config is None else config
    _check_count(num_replicas, "num_replicas")
    if max_replicas is not None:
        _check_count(max_replicas, "max_replicas")
        if max_replicas < num_replicas:
            raise ValueError(f"max_replicas must be >= num_replicas ({num_replicas}), got {max_replicas}")
    _check_count(max_ongoing_requests, "max_ongoing_requests")
    for value, what in ((cpus_per_replica, "cpus_per_replica"), (health_check_period_s, "health_check_period_s"),
                        (health_check_timeout_s, "health_check_timeout_s")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{what} must be a number > 0, got {value!r}")
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, (int, float)) or gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be a number >= 0, got {gpus_per_replica!r}")
    if target_ongoing_requests is not None and not target_ongoing_requests > 0:
        raise ValueError(f"target_ongoing_requests must be > 0, got {target_ongoing_requests!r}")
    serve = require_serve()
    options: dict[str, Any] = {
        "name": "PowerfastReplica",
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica,
                              "runtime_env": {"env_vars": dict(config.env)}},
        "max_ongoing_requests": max_ongoing_requests,
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": health_check_timeout_s,
    }
    if max_replicas is None or max_replicas == num_replicas:
        options["num_replicas"] = num_replicas
    else:
        target = max_ongoing_requests / 2 if target_ongoing_requests is None else target_ongoing_requests
        options["autoscaling_config"] = {"min_replicas": num_replicas, "initial_replicas": num_replicas,
                                         "max_replicas": max_replicas, "target_ongoing_requests": target}
    threads = max(1, int(cpus_per_replica))
    return serve.deployment(**options)(_replica_class(config, threads)).bind()


def _check_count(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


def serve_replicas(config: ReplicaConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   num_replicas: int = 1, max_replicas: int | None = None, cpus_per_replica: float = 1.0,
                   gpus_per_replica: float | None = None, ready=None) -> int:
    """``powerfast serve --replicas N``: start (or join, ``address``) a Ray cluster, run the
    replicas behind Ray Serve's proxy on ``host:port`` until SIGINT or SIGTERM, then shut
    Serve down (and Ray, when this call started it). ``gpus_per_replica`` None: 1 when the
    cluster has GPUs, else 0. ``ready(url)`` is called once every replica answers."""
    config.check_model()
    serve = require_serve()
    import ray

    started_ray = False
    if not ray.is_initialized():
        init: dict[str, Any] = {"address": address, "logging_level": "WARNING"}
        if address is None:
            init["include_dashboard"] = False
        try:
            ray.init(**init)
        except ConnectionError as error:
            raise ValueError(f"cannot reach a Ray cluster at address {address!r}: {error}") from None
        started_ray = True
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        app = replica_deployment(config, num_replicas=num_replicas, max_replicas=max_replicas,
                                 cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica)
        serve.start(http_options={"host": host, "port": port})
        count = f"{num_replicas}" if max_replicas in (None, num_replicas) else f"{num_replicas} to {max_replicas}"
        _say(f"powerfast serve: starting {count} replica(s) of {config.name} on Ray Serve "
             f"({cpus_per_replica:g} CPU, {gpus_per_replica:g} GPU each)")
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{host}:{port}/v1"
        _say(f"serving {config.name} on {url} ({count} replica(s) on Ray Serve; "
             f"{'API key required' if config.api_key else 'no API key'})")
        if ready is not None:
            ready(url)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        _say("powerfast serve: stopping the replicas")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

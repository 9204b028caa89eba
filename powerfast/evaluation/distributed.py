"""Scale-out of an evaluation on Ray: units on worker actors, one driver writing the files.

A unit is (problem, run seed, method), as in :mod:`powerfast.evaluation`. Each worker is a
Ray actor that builds the methods once (loads the model once, on its own GPU when the
cluster has GPUs) and runs the units it is sent; the driver lists the units still to do,
sends them out, and alone grades and writes the results through the same
:class:`~powerfast.evaluation.EvaluationRun` as a single-process run: the same files, the
same format, the same resumption. A unit's sample seed depends on the unit alone
(:func:`~powerfast.evaluation.unit_seed`), so the samples are those of a single-process run.

Fault tolerance: a worker that dies (killed, out of memory, its node lost) is replaced by
a fresh one and the units it had not returned are sent again; a unit is recorded only
when its result reaches the driver, so nothing is lost or written twice. Interrupting the
driver and running the same command again resumes, as a single-process run does.

Ray is an optional dependency (``pip install 'powerfast[ray]'``), imported only when a
Ray run starts: ``import powerfast`` never imports it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Callable, Mapping, Sequence

from powerfast.evaluation import (
    EvaluationRun,
    Generation,
    Method,
    Summary,
    Task,
    Unit,
    WorkerStats,
    check_generations,
    unit_batches,
)

__all__ = ["RAY_EXTRA_HINT", "require_ray", "run_evaluation_on_ray"]

RAY_EXTRA_HINT = "pip install 'powerfast[ray]'"

#: Calls queued on one worker at a time: the next units are already there when it finishes.
CALLS_IN_FLIGHT_PER_WORKER = 2


def require_ray():
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"Ray runs need the ray package: {RAY_EXTRA_HINT}") from None
    return ray


class EvalWorker:
    """The body of one Ray actor: builds the methods on its first call, then runs units.

    ``make_methods``: a picklable callable returning ``{name: generate(prompts, seeds)}``;
    it runs inside the actor (where the model is loaded, once).
    """

    def __init__(self, make_methods: Callable[[], Mapping[str, Method]]) -> None:
        self.make_methods = make_methods
        self.methods: Mapping[str, Method] | None = None
        self.load_seconds = 0.0

    def run(self, method: str, prompts: list[str], sample_seeds: list[int]) -> tuple[list[Generation], float, dict]:
        """Generate ``prompts`` with ``method``; returns (generations, seconds, where this ran)."""
        if self.methods is None:
            started = time.perf_counter()
            self.methods = dict(self.make_methods())
            self.load_seconds = time.perf_counter() - started
        if method not in self.methods:
            raise ValueError(f"worker has no method {method!r}; it built {sorted(self.methods)}")
        started = time.perf_counter()
        generations = self.methods[method](prompts, sample_seeds)
        seconds = time.perf_counter() - started
        import socket

        return generations, seconds, {"host": socket.gethostname(), "pid": os.getpid(), "load_seconds": self.load_seconds}


def _check_positive(value, what: str, integer: bool = True) -> None:
    """ValueError naming ``value`` unless it is None or a number > 0 (an int when ``integer``)."""
    kinds = int if integer else (int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds) or not value > 0):
        raise ValueError(f"{what} must be {'an int' if integer else 'a number'} > 0, got {value!r}")


def run_evaluation_on_ray(
    task: Task | str | os.PathLike,
    make_methods: Callable[[], Mapping[str, Method]],
    method_names: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    seeds: Sequence[int] = (0,),
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    units_per_call: int = 1,
    max_worker_failures: int | None = None,
    progress: bool = True,
    ray_init_kwargs: Mapping | None = None,
) -> Summary:
    """:func:`powerfast.evaluation.run_evaluation` with the units run on Ray workers.

    make_methods:    picklable, no arguments, returns ``{name: generate(prompts, seeds)}``
                     for at least ``method_names``; each worker calls it once
    method_names:    the methods to evaluate, in order (the names of the result files)
    address:         an existing cluster (``"auto"``, ``"ray://host:10001"``); None starts a
                     local Ray instance, or uses the one this process already started
    workers:         actors, each holding its own model; None: one per GPU of the cluster,
                     or, without GPUs, the cluster's CPUs // ``cpus_per_worker``
    cpus_per_worker: CPUs reserved per actor (torch in the actor uses that many threads)
    gpus_per_worker: GPUs per actor; None: 1 when the cluster has GPUs, else 0
    units_per_call:  most units of one method sent in one call (fewer when the units left
                     would not keep every worker busy; with ``powerfast.cli.eval_methods``
                     they decode together in the worker's engine; a dead worker's
                     unreturned calls are redone)
    max_worker_failures: workers that may die before the run gives up (default
                     ``max(4, 2 * workers)``): a unit that kills every worker stops the run
    ray_init_kwargs: extra ``ray.init`` arguments when this call starts Ray

    Returns the summary, whose ``workers`` rows give each actor's units and busy seconds.
    Ray is shut down at the end only if this call started it.
    """
    _check_positive(workers, "workers")
    _check_positive(cpus_per_worker, "cpus_per_worker", integer=False)
    if gpus_per_worker is not None and (isinstance(gpus_per_worker, bool) or gpus_per_worker < 0):
        raise ValueError(f"gpus_per_worker must be a number >= 0 or None, got {gpus_per_worker!r}")
    _check_positive(units_per_call, "units_per_call")
    if max_worker_failures is not None and (isinstance(max_worker_failures, bool)
                                            or not isinstance(max_worker_failures, int) or max_worker_failures < 0):
        raise ValueError(f"max_worker_failures must be an int >= 0 or None, got {max_worker_failures!r}")
    if not callable(make_methods):
        raise ValueError(f"make_methods must be callable, got {make_methods!r}")
    ray = require_ray()

    run = EvaluationRun(task, method_names, out_dir, limit=limit, seeds=seeds, progress=progress)
    started_ray = False
    actors: dict[int, object] = {}
    started = time.perf_counter()
    stats: list[WorkerStats] = []
    try:
        if not run.pending:  # everything is recorded: no need for Ray
            return run.finish([], time.perf_counter() - started)
        if not ray.is_initialized():
            init = {"address": address, "logging_level": "WARNING"}
            if address is None:
                init["include_dashboard"] = False
            init.update(ray_init_kwargs or {})
            try:
                ray.init(**init)
            except ConnectionError as error:
                raise ValueError(f"cannot reach a Ray cluster at address {address!r}: {error}") from None
            started_ray = True
        resources = ray.cluster_resources()
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        if workers is None:
            if gpus_per_worker > 0:
                workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker))
            else:
                workers = max(1, int(resources.get("CPU", 1) // cpus_per_worker))
        if max_worker_failures is None:
            max_worker_failures = max(4, 2 * workers)
        # no more per call than keeps every worker busy
        per_call = max(1, min(units_per_call, -(-len(run.pending) // workers)))
        queue = deque(unit_batches(run.pending, per_call))
        workers = min(workers, len(queue))
        print(f"powerfast: {len(run.pending)} units on {workers} Ray worker(s)"
              f" ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU each)", file=sys.stderr)
        remote_worker = ray.remote(EvalWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0
        )
        worker_stats: dict[int, WorkerStats] = {}
        in_flight: dict[object, tuple[int, list[Unit]]] = {}
        failures = 0

        def start_worker(slot: int, name: str) -> None:
            actors[slot] = remote_worker.remote(make_methods)
            worker_stats[slot] = WorkerStats(name)
            stats.append(worker_stats[slot])

        def submit(slot: int) -> None:
            while queue and sum(s == slot for s, _ in in_flight.values()) < CALLS_IN_FLIGHT_PER_WORKER:
                batch = queue.popleft()
                ref = actors[slot].run.remote(batch[0].method, [u.problem.prompt for u in batch],
                                              [u.sample_seed for u in batch])
                in_flight[ref] = (slot, batch)

        for slot in range(workers):
            start_worker(slot, f"worker-{slot}")
        while queue or in_flight:
            for slot in actors:
                submit(slot)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, batch = in_flight.pop(ref)
            try:
                generations, seconds, where = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError) as error:
                # the worker is gone: every call it had not returned goes back to the queue, in order
                lost = [batch] + [b for r, (s, b) in list(in_flight.items()) if s == slot]
                for r in [r for r, (s, _) in in_flight.items() if s == slot]:
                    del in_flight[r]
                queue.extendleft(reversed(lost))
                failures += 1
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if failures > max_worker_failures:
                    raise RuntimeError(
                        f"{failures} Ray workers died (max_worker_failures={max_worker_failures}); last: {first_line}"
                    ) from error
                print(f"powerfast: {worker_stats[slot].worker} died ({type(error).__name__}); "
                      f"replacing it and redoing its {sum(len(b) for b in lost)} unit(s)", file=sys.stderr)
                try:
                    ray.kill(actors[slot], no_restart=True)
                except Exception:  # already gone
                    pass
                start_worker(slot, f"worker-{slot}.{failures}")
                continue
            except ray.exceptions.RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, Exception):  # the method itself failed: as in a single process
                    raise cause from None
                raise
            check_generations(batch[0].method, generations, len(batch))
            stats_of_worker = worker_stats[slot]
            stats_of_worker.add(len(batch), seconds)
            stats_of_worker.where = f"{where['host']}:{where['pid']}"
            stats_of_worker.load_seconds = where["load_seconds"]
            for unit, generation in zip(batch, generations):
                run.record(unit, generation)
    finally:
        run.close()
        for handle in actors.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        if started_ray:
            ray.shutdown()
    return run.finish(stats, time.perf_counter() - started)

"""Running an evaluation: units, resumable records, the summary and the accuracy-vs-time plot.

A *method* is any callable ``generate(prompts: list[str], sample_seeds: list[int]) ->
list[Generation]`` returning, for each prompt, the generated continuation (not the
prompt), its length in tokens, the seconds spent on it and, when known, every token
decoded for it (its compute). A *unit* is one (problem, run seed, method); its sample
seed depends on the unit alone (:func:`unit_seed`).
:func:`run_evaluation` runs methods on a task and appends one JSON line per sample to
``out_dir/<task>/<method>-seed<seed>.jsonl``; a rerun skips the samples already recorded,
so an interrupted run continues where it stopped. :class:`EvaluationRun` is the driver's
part (units to do, the one writer, the summary), shared with the Ray run of
:mod:`powerfast.evaluation.distributed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from powerfast.evaluation.grading import _require
from powerfast.evaluation.tasks import Problem, Task, load_task

# ---------------------------------------------------------------------------------------
# Running an evaluation

@dataclass
class Generation:
    """What a method returns for one prompt: the continuation, its token count, its time.

    ``decoded_tokens`` is the compute it cost: every token decoded for it (candidates,
    rollouts, proposals, particles, the continuation's own), when the method knows it;
    recorded as the record's ``decoded_tokens`` (left out of the record when None).
    """

    text: str
    num_tokens: int
    seconds: float
    decoded_tokens: int | None = None


#: The signature of a method: ``generate(prompts, sample_seeds) -> one Generation per prompt``,
#: with one seed per prompt (see :func:`unit_seed`).
Method = Callable[[list[str], list[int]], list[Generation]]


@dataclass
class MethodSummary:
    """Aggregate of one method over all its recorded samples (problems x seeds)."""

    method: str
    n: int
    correct: int
    pass_at_1: float
    seconds_per_prompt: float
    tokens_per_prompt: float
    pass_at_1_per_seed: dict[int, float] = field(default_factory=dict)
    #: every token decoded for the samples over their seconds (sum / sum; see :func:`decoded_tokens`)
    decoded_tokens_per_second: float = math.nan
    #: samples recorded without ``decoded_tokens``: their ``num_tokens`` counted in its place
    decoded_tokens_missing: int = 0


@dataclass
class Summary:
    """The result of :func:`run_evaluation`: one row per method, and where files went.

    ``workers`` and ``wall_seconds`` describe the invocation that wrote it: units produced
    and seconds busy per worker (one ``local`` worker for a single-process run).
    """

    task: str
    rows: list[MethodSummary]
    out_dir: str
    workers: list[WorkerStats] = field(default_factory=list)
    wall_seconds: float | None = None

    @property
    def table(self) -> str:
        """A plain-text table: method, n, pass@1, seconds and tokens per prompt."""
        header = ("method", "n", "pass@1", "sec/prompt", "tokens/prompt")
        lines = [
            (r.method, str(r.n), f"{r.pass_at_1:.4f}", f"{r.seconds_per_prompt:.3f}", f"{r.tokens_per_prompt:.1f}")
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])

    @property
    def throughput_table(self) -> str:
        """A plain-text table of each method's decoded tokens per second (sum of every
        record's decoded tokens over the sum of its seconds)."""
        header = ("method", "decoded tokens/s")
        lines = [(r.method, f"{r.decoded_tokens_per_second:.1f}") for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        text = "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])
        for r in self.rows:
            if r.decoded_tokens_missing:
                text += (f"\n{r.method}: {r.decoded_tokens_missing} of {r.n} records without decoded_tokens "
                         f"(num_tokens counted instead)")
        return text

    @property
    def worker_table(self) -> str:
        """A plain-text table of this invocation's workers: units, busy seconds, units/s."""
        header = ("worker", "where", "units", "busy s", "units/s", "load s")
        lines = [(w.worker, w.where or "-", str(w.units), f"{w.busy_seconds:.1f}", f"{w.units_per_second:.3f}",
                  f"{w.load_seconds:.1f}") for w in self.workers]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])

    def __str__(self) -> str:
        text = f"task {self.task}\n{self.table}\n\n{self.throughput_table}"
        if self.workers:
            units = sum(w.units for w in self.workers)
            text += f"\n\n{self.worker_table}"
            if self.wall_seconds:
                text += f"\n{units} units in {self.wall_seconds:.1f} s: {units / self.wall_seconds:.3f} units/s"
        return text


def read_samples(path: str | os.PathLike) -> dict[str, dict]:
    """The samples recorded in a results file, by problem id (first record wins).

    A malformed *last* line, left by a run killed mid-write, is cut off the file so that
    new samples append cleanly; a malformed line anywhere else is a ValueError.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    samples: dict[str, dict] = {}
    offset = 0
    for i, raw in enumerate(lines):
        if raw.strip():
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not a sample record")
            except ValueError as exc:
                if i != last:
                    raise ValueError(f"{path}: malformed line {i + 1}: {exc}") from None
                with open(path, "r+b") as f:  # drop the partial last line
                    f.truncate(offset)
                return samples
            samples.setdefault(str(record["id"]), record)
        offset += len(raw) + 1
    if data and not data.endswith(b"\n"):  # a complete last record without its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return samples


def _check_method_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise ValueError("no methods to evaluate: pass a dict {name: generate}")
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+=-]+", name):
            raise ValueError(f"method name {name!r} must be letters, digits, '_', '.', '+', '=' or '-'")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names!r}")
    return names


def _check_methods(methods: Mapping[str, Method]) -> None:
    _check_method_names(list(methods))
    for name, fn in methods.items():
        if not callable(fn):
            raise ValueError(f"method {name!r} is not callable: {fn!r}")


def unit_seed(problem_id: str, seed: int, method: str) -> int:
    """The sampling seed of one unit (problem, run seed, method): 63 bits of a SHA-256 digest.

    It depends on the unit alone, never on which worker runs it, in which batch or when, so
    a run on one process and a run spread over many workers give the same samples. Pinned
    by a test: changing it changes every recorded sample.
    """
    digest = hashlib.sha256(f"{method}\n{seed}\n{problem_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Unit:
    """One sample to produce: a problem, a method name and a run seed.

    ``sample_seed`` is what the method is given (see :func:`unit_seed`).
    """

    problem: Problem
    method: str
    seed: int

    @property
    def sample_seed(self) -> int:
        return unit_seed(self.problem.id, self.seed, self.method)


@dataclass
class WorkerStats:
    """Throughput of one worker in one invocation: units it produced and seconds it spent on them.

    ``where`` is ``host:pid`` of a Ray worker, ``load_seconds`` the time it took to build its
    methods (load the model); neither counts in ``busy_seconds``.
    """

    worker: str
    units: int = 0
    busy_seconds: float = 0.0
    where: str = ""
    load_seconds: float = 0.0

    @property
    def units_per_second(self) -> float:
        return self.units / self.busy_seconds if self.busy_seconds > 0 else math.nan

    def add(self, units: int, seconds: float) -> None:
        self.units += units
        self.busy_seconds += seconds

    def to_dict(self) -> dict:
        return {"worker": self.worker, "where": self.where, "units": self.units, "busy_seconds": self.busy_seconds,
                "units_per_second": self.units_per_second, "load_seconds": self.load_seconds}


class EvaluationRun:
    """The driver's side of an evaluation, shared by the single-process and the Ray runs.

    It validates the settings, reads what is already recorded, lists the units still to do
    (:attr:`pending`, in method, seed, problem order), and is the only writer of the files:
    :meth:`record` grades a unit's generation and appends its line (flushed at once) to
    ``out_dir/<task>/<method>-seed<seed>.jsonl``; :meth:`finish` writes the summary files.
    A unit recorded twice is a RuntimeError: nothing is ever written twice.
    """

    def __init__(self, task: Task | str | os.PathLike, method_names: Sequence[str], out_dir: str | os.PathLike,
                 limit: int | None = None, seeds: Sequence[int] = (0,), progress: bool = True) -> None:
        if isinstance(task, (str, os.PathLike)):
            task = load_task(task)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        seeds = list(seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds!r}")
        self.task = task
        self.method_names = _check_method_names(method_names)
        self.seeds = seeds
        self.problems = task.problems[:limit] if limit is not None else list(task.problems)
        self.task_dir = Path(out_dir) / task.name
        self.task_dir.mkdir(parents=True, exist_ok=True)
        self.done = {
            (name, seed): read_samples(self._path(name, seed)) for name in self.method_names for seed in seeds
        }
        self.pending = [
            Unit(p, name, seed)
            for name in self.method_names for seed in seeds for p in self.problems
            if p.id not in self.done[(name, seed)]
        ]
        per_method = len(seeds) * len(self.problems)
        self._total = {name: per_method for name in self.method_names}
        self._count = {
            name: sum(sum(p.id in self.done[(name, s)] for p in self.problems) for s in seeds)
            for name in self.method_names
        }
        self._files: dict[tuple[str, int], object] = {}
        self._bar = _progress_bar(sum(self._total.values()), sum(self._count.values()), task.name, progress)
        self._show_counts()

    def _path(self, name: str, seed: int) -> Path:
        return self.task_dir / f"{name}-seed{seed}.jsonl"

    def _show_counts(self) -> None:
        self._bar.set_postfix_str(", ".join(f"{m} {self._count[m]}/{self._total[m]}" for m in self.method_names))

    def record(self, unit: Unit, generation: Generation) -> dict:
        """Grade ``generation`` of ``unit`` and append its record; returns the record."""
        recorded = self.done[(unit.method, unit.seed)]
        if unit.problem.id in recorded:
            raise RuntimeError(f"unit {unit.method}/seed {unit.seed}/{unit.problem.id!r} is already recorded")
        grade = self.task.grade(unit.problem, generation.text)
        record = {
            "id": unit.problem.id, "method": unit.method, "seed": unit.seed, "prompt": unit.problem.prompt,
            "completion": generation.text, "answer": grade.answer, "reference": unit.problem.reference,
            "correct": bool(grade.correct), "num_tokens": int(generation.num_tokens),
            "seconds": float(generation.seconds),
        }
        if generation.decoded_tokens is not None:
            record["decoded_tokens"] = int(generation.decoded_tokens)
        key = (unit.method, unit.seed)
        if key not in self._files:
            self._files[key] = open(self._path(*key), "a", encoding="utf-8")
        out = self._files[key]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        recorded[unit.problem.id] = record
        self._count[unit.method] += 1
        self._bar.update(1)
        self._show_counts()
        return record

    def close(self) -> None:
        """Close the results files and the progress bar (safe to call twice)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bar.close()

    def finish(self, workers: Sequence[WorkerStats] = (), wall_seconds: float | None = None) -> Summary:
        """Close the files, write ``summary.json``, ``summary.txt`` and the plot; return the summary.

        ``workers`` and ``wall_seconds`` describe this invocation (units produced, per worker).
        """
        self.close()
        samples = {k: [v[p.id] for p in self.problems if p.id in v] for k, v in self.done.items()}
        summary = summarise(self.task.name, samples, self.task_dir)
        summary.workers = list(workers)
        summary.wall_seconds = wall_seconds
        saved = {"task": summary.task, "problems": len(self.problems), "seeds": self.seeds,
                 "rows": [asdict(r) for r in summary.rows]}
        if workers:
            saved["workers"] = [w.to_dict() for w in workers]
            saved["wall_seconds"] = wall_seconds
        (self.task_dir / "summary.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        (self.task_dir / "summary.txt").write_text(str(summary) + "\n", encoding="utf-8")
        plot_accuracy_vs_time(summary, self.task_dir / "accuracy_vs_time.png")
        return summary


def unit_batches(units: Sequence[Unit], batch_size: int) -> list[list[Unit]]:
    """Consecutive runs of at most ``batch_size`` units of one method (one ``generate`` call each)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batches: list[list[Unit]] = []
    for unit in units:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].method == unit.method:
            batches[-1].append(unit)
        else:
            batches.append([unit])
    return batches


def run_evaluation(
    task: Task | str | os.PathLike,
    methods: Mapping[str, Method],
    out_dir: str | os.PathLike,
    limit: int | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    batch_size: int = 1,
) -> Summary:
    """Run every method, seed and problem of a task in this process; record, grade and summarise.

    ``task`` is a :class:`Task` or a spec for :func:`load_task`; ``limit`` keeps the first
    ``limit`` problems. A unit is (problem, seed, method); each method is called as
    ``generate(prompts, sample_seeds)`` with up to ``batch_size`` prompts (one by default)
    and one seed per prompt, derived from its unit by :func:`unit_seed`; each sample becomes
    one line of ``out_dir/<task>/<method>-seed<seed>.jsonl``, flushed as soon as it is
    graded. Problems already in that file are skipped, so rerunning resumes a stopped run.
    Writes ``summary.json``, ``summary.txt`` and ``accuracy_vs_time.png`` next to the
    results, computed from everything recorded for the selected problems.
    :func:`powerfast.evaluation.distributed.run_evaluation_on_ray` is the same run on Ray workers.
    """
    _check_methods(methods)
    unit_batches([], batch_size)  # checks batch_size before any file is touched
    run = EvaluationRun(task, list(methods), out_dir, limit=limit, seeds=seeds, progress=progress)
    worker = WorkerStats("local")
    started = time.perf_counter()
    try:
        batches = unit_batches(run.pending, batch_size)
        for batch in batches:
            name = batch[0].method
            began = time.perf_counter()
            gens = methods[name]([u.problem.prompt for u in batch], [u.sample_seed for u in batch])
            worker.add(len(batch), time.perf_counter() - began)
            check_generations(name, gens, len(batch))
            for unit, gen in zip(batch, gens):
                run.record(unit, gen)
    finally:
        run.close()
    return run.finish([worker], time.perf_counter() - started)


def check_generations(name: str, gens, expected: int) -> None:
    """ValueError unless ``gens`` is a list of ``expected`` :class:`Generation` (what method ``name`` returned)."""
    if not isinstance(gens, list) or len(gens) != expected:
        got = f"{len(gens)} items" if isinstance(gens, list) else type(gens).__name__
        raise ValueError(f"method {name!r} returned {got} for {expected} prompt(s); expected a list of Generation")
    for g in gens:
        if not isinstance(g, Generation):
            raise ValueError(f"method {name!r} returned a {type(g).__name__}, not a Generation")


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="unit", file=sys.stderr, disable=not enabled)


def decoded_tokens(record: Mapping) -> tuple[int, bool]:
    """The tokens decoded for a record and whether the record says so: its ``decoded_tokens``,
    or, in a record written without it (before the field existed, or by a method that does
    not know it), its ``num_tokens`` and False."""
    value = record.get("decoded_tokens")
    if value is None:
        return int(record["num_tokens"]), False
    return int(value), True


def summarise(task: str, samples: Mapping[tuple[str, int], list[dict]], out_dir: str | os.PathLike) -> Summary:
    """Aggregate recorded samples, keyed by (method, seed), into one row per method."""
    by_method: dict[str, dict[int, list[dict]]] = {}
    for (name, seed), records in samples.items():
        by_method.setdefault(name, {})[seed] = list(records)
    rows = []
    for name, per_seed in by_method.items():
        records = [r for rs in per_seed.values() for r in rs]
        n = len(records)
        correct = sum(bool(r["correct"]) for r in records)
        mean = lambda key: sum(float(r[key]) for r in records) / n if n else math.nan
        by_seed = {seed: sum(bool(r["correct"]) for r in rs) / len(rs) for seed, rs in per_seed.items() if rs}
        decoded = [decoded_tokens(r) for r in records]
        seconds = sum(float(r["seconds"]) for r in records)
        rows.append(
            MethodSummary(
                name, n, correct, correct / n if n else math.nan, mean("seconds"), mean("num_tokens"), by_seed,
                sum(d for d, _ in decoded) / seconds if seconds > 0 else math.nan,
                sum(not known for _, known in decoded),
            )
        )
    return Summary(task, rows, str(out_dir))


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95% at the default z).

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a
    point at 0 or n correct. Returns (nan, nan) for n = 0.
    """
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends, not rounded ones
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def plot_accuracy_vs_time(summary: Summary, path: str | os.PathLike) -> None:
    """Save :func:`accuracy_vs_time_figure` as a PNG."""
    accuracy_vs_time_figure(summary).savefig(str(path), format="png")


def accuracy_vs_time_figure(summary: Summary):
    """A scatter plot of pass@1 against seconds per prompt, one labelled point per method
    (a matplotlib Figure).

    The accuracy axis is [0, 1]. A method with several samples (problems x seeds) gets the
    95% Wilson interval of its pass@1 as an error bar, every sample counted as one trial.
    """
    _require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    with_intervals = False
    for row in summary.rows:
        if row.n == 0:
            continue
        x, y = row.seconds_per_prompt, row.pass_at_1
        if row.n > 1:
            low, high = wilson_interval(row.correct, row.n)
            ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", markersize=6, capsize=4, clip_on=False)
            with_intervals = True
        else:
            ax.scatter([x], [y], s=40, clip_on=False)
        ax.annotate(f"{row.method} ({row.correct}/{row.n})", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("seconds per prompt")
    ax.set_ylabel("accuracy (pass@1)" + (", 95% Wilson interval" if with_intervals else ""))
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"{summary.task}: accuracy vs time")
    ax.grid(True, alpha=0.3)
    if any(r.n and r.seconds_per_prompt > 0 for r in summary.rows):
        positive = [r.seconds_per_prompt for r in summary.rows if r.n and r.seconds_per_prompt > 0]
        if max(positive) / min(positive) > 20:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 (not 10^0), no crowded minor labels
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.2)  # room for the labels of the outermost points
    fig.tight_layout()
    return fig


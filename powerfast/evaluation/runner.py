"""Running methods on a task: resumable JSONL records, the summary table and the plot."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from powerfast.evaluation.grading import _require
from powerfast.evaluation.tasks import Task, load_task


@dataclass
class Generation:
    """What a method returns for one prompt: the continuation, its token count, its time."""

    text: str
    num_tokens: int
    seconds: float


#: The signature of a method: ``generate(prompts, seed) -> one Generation per prompt``.
Method = Callable[[list[str], int], list[Generation]]


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


@dataclass
class Summary:
    """The result of :func:`run_evaluation`: one row per method, and where files went."""

    task: str
    rows: list[MethodSummary]
    out_dir: str

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

    def __str__(self) -> str:
        return f"task {self.task}\n{self.table}"


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


def _check_methods(methods: Mapping[str, Method]) -> None:
    if not methods:
        raise ValueError("no methods to evaluate: pass a dict {name: generate}")
    for name, fn in methods.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+=-]+", name):
            raise ValueError(f"method name {name!r} must be letters, digits, '_', '.', '+', '=' or '-'")
        if not callable(fn):
            raise ValueError(f"method {name!r} is not callable: {fn!r}")


def run_evaluation(
    task: Task | str | os.PathLike,
    methods: Mapping[str, Method],
    out_dir: str | os.PathLike,
    limit: int | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    batch_size: int = 1,
) -> Summary:
    """Run every method, seed and problem of a task; record, grade and summarise.

    ``task`` is a :class:`Task` or a spec for :func:`load_task`; ``limit`` keeps the first
    ``limit`` problems. Each method is called as ``generate(prompts, seed)`` with up to
    ``batch_size`` prompts (one by default) and the run seed; each sample becomes one line
    of ``out_dir/<task>/<method>-seed<seed>.jsonl``, flushed as soon as it is graded.
    Problems already in that file are skipped, so rerunning resumes a stopped run. Writes
    ``summary.json``, ``summary.txt`` and ``accuracy_vs_time.png`` next to the results,
    computed from everything recorded for the selected problems.
    """
    if isinstance(task, (str, os.PathLike)):
        task = load_task(task)
    _check_methods(methods)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    problems = task.problems[:limit] if limit is not None else list(task.problems)
    task_dir = Path(out_dir) / task.name
    task_dir.mkdir(parents=True, exist_ok=True)

    done = {
        (name, seed): read_samples(task_dir / f"{name}-seed{seed}.jsonl") for name in methods for seed in seeds
    }
    total = len(methods) * len(seeds) * len(problems)
    already = sum(sum(p.id in done[key] for p in problems) for key in done)
    bar = _progress_bar(total, already, f"{task.name}", progress)
    try:
        for name, generate in methods.items():
            for seed in seeds:
                recorded = done[(name, seed)]
                todo = [p for p in problems if p.id not in recorded]
                path = task_dir / f"{name}-seed{seed}.jsonl"
                bar.set_description(f"{task.name} {name} seed {seed}")
                with open(path, "a", encoding="utf-8") as out:
                    for start in range(0, len(todo), batch_size):
                        batch = todo[start : start + batch_size]
                        gens = generate([p.prompt for p in batch], seed)
                        _check_generations(name, gens, len(batch))
                        for problem, gen in zip(batch, gens):
                            grade = task.grade(problem, gen.text)
                            record = {
                                "id": problem.id, "method": name, "seed": seed, "prompt": problem.prompt,
                                "completion": gen.text, "answer": grade.answer, "reference": problem.reference,
                                "correct": bool(grade.correct), "num_tokens": int(gen.num_tokens),
                                "seconds": float(gen.seconds),
                            }
                            out.write(json.dumps(record, ensure_ascii=False) + "\n")
                            out.flush()
                            recorded[problem.id] = record
                            bar.update(1)
    finally:
        bar.close()

    summary = summarise(task.name, {k: [v[p.id] for p in problems if p.id in v] for k, v in done.items()}, task_dir)
    (task_dir / "summary.json").write_text(
        json.dumps(
            {"task": summary.task, "problems": len(problems), "seeds": seeds, "rows": [asdict(r) for r in summary.rows]},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (task_dir / "summary.txt").write_text(str(summary) + "\n", encoding="utf-8")
    plot_accuracy_vs_time(summary, task_dir / "accuracy_vs_time.png")
    return summary


def _check_generations(name: str, gens, expected: int) -> None:
    if not isinstance(gens, list) or len(gens) != expected:
        got = f"{len(gens)} items" if isinstance(gens, list) else type(gens).__name__
        raise ValueError(f"method {name!r} returned {got} for {expected} prompt(s); expected a list of Generation")
    for g in gens:
        if not isinstance(g, Generation):
            raise ValueError(f"method {name!r} returned a {type(g).__name__}, not a Generation")


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="sample", file=sys.stderr, disable=not enabled)


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
        rows.append(
            MethodSummary(
                name, n, correct, correct / n if n else math.nan, mean("seconds"), mean("num_tokens"), by_seed
            )
        )
    return Summary(task, rows, str(out_dir))


def plot_accuracy_vs_time(summary: Summary, path: str | os.PathLike) -> None:
    """Save a scatter plot of pass@1 against seconds per prompt, one labelled point per method."""
    _require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in summary.rows:
        if row.n == 0:
            continue
        ax.scatter([row.seconds_per_prompt], [row.pass_at_1], s=40)
        ax.annotate(row.method, (row.seconds_per_prompt, row.pass_at_1), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("seconds per prompt")
    ax.set_ylabel("accuracy (pass@1)")
    ax.set_title(f"{summary.task}: accuracy vs time")
    ax.grid(True, alpha=0.3)
    if any(r.n and r.seconds_per_prompt > 0 for r in summary.rows):
        positive = [r.seconds_per_prompt for r in summary.rows if r.n and r.seconds_per_prompt > 0]
        if max(positive) / min(positive) > 20:
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(str(path), format="png")

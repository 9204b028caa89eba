"""Evaluation: tasks and grading, resumable runs (one process or Ray workers), and the
fidelity measurements against the exact power distribution (the exact oracle, the paper's toy).

Modules: :mod:`~powerfast.evaluation.tasks` (tasks and prompts), :mod:`~powerfast.evaluation.grading`
(answer extraction and graders), :mod:`~powerfast.evaluation.runs` (units, records, summaries, the
plot), :mod:`~powerfast.evaluation.distributed` (the same run on Ray workers),
:mod:`~powerfast.evaluation.exact` (the exact oracle), :mod:`~powerfast.evaluation.toy` (the paper's
toy check) and :mod:`~powerfast.evaluation.fidelity` (every method against the exact distribution).
The names of the first three are re-exported here: ``from powerfast.evaluation import load_task``.
"""

from powerfast.evaluation.grading import (  # noqa: F401
    CODE_STOP_SEQUENCES,
    EVAL_EXTRA_HINT,
    Grade,
    choice_letter,
    extract_boxed,
    math_equal,
    run_python,
    truncate_code,
)
from powerfast.evaluation.runs import (  # noqa: F401
    EvaluationRun,
    Generation,
    Method,
    MethodSummary,
    Summary,
    Unit,
    WorkerStats,
    accuracy_vs_time_figure,
    check_generations,
    plot_accuracy_vs_time,
    read_samples,
    run_evaluation,
    summarise,
    unit_batches,
    unit_seed,
    wilson_interval,
)
from powerfast.evaluation.tasks import (  # noqa: F401
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

__all__ = ['CHOICE_LETTERS', 'CHOICE_TEMPLATE', 'CODE_STOP_SEQUENCES', 'CODE_TEMPLATE', 'EVAL_EXTRA_HINT', 'EvaluationRun', 'Generation', 'Grade', 'KNOWN_TASKS', 'MATH_TEMPLATE', 'Method', 'MethodSummary', 'Problem', 'Summary', 'Task', 'Unit', 'WorkerStats', 'accuracy_vs_time_figure', 'check_generations', 'choice_letter', 'extract_boxed', 'gpqa_prompt', 'load_task', 'math_equal', 'plot_accuracy_vs_time', 'read_records', 'read_samples', 'run_evaluation', 'run_python', 'summarise', 'truncate_code', 'unit_batches', 'unit_seed', 'wilson_interval']


def __getattr__(name: str):
    """Submodules on first use (``powerfast.evaluation.exact``): no import costs before it."""
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")

"""Single-step arithmetic problems with exact integer answers: the ``arithmetic`` task.

A small instruction-tuned model (the embedded SmolLM2-135M-Instruct) solves some of these and
not others, so sampling methods can be told apart on them in minutes on a CPU, where
MATH500 and HumanEval sit near zero.

The problems come from :func:`generate`, a pure function of its seed and count (one
``random.Random(seed)``, never the global random state). The kinds are taken in turn
(:data:`KINDS` order: problem 1 is ``add``, problem 2 ``add-teen``, ...), so the first N
problems of the set hold every kind in equal shares. Each prompt is the question followed
by :data:`ANSWER_INSTRUCTION`; no prompt occurs twice. Answers are graded exactly by
:func:`powerfast.evaluation.grading.integer_answer`.

The shipped set, ``powerfast/data/arithmetic.json``, is ``dumps(generate())``, written by
``python -m bench.make_arithmetic``. Its 300 problems were studied (bench/studies/arithmetic):
they are spent for choosing settings.

**Split sets** (:data:`SPLIT_SETS`): fresh problems for validation-then-test studies, each
a :class:`ProblemSet` with its own kinds and generator seed, its first ``validation``
problems the validation split and the rest the test split (fixed in the data file, field
``split``). ``arithmetic2`` is single-step again, with wider ranges (the spent set used up
most of the small ones) and none of the spent prompts; ``multistep`` holds two- and
three-step problems answered with worked steps (``(a + b) * c - d``). Both are written by
``python -m bench.make_arithmetic --set NAME``; tasks ``NAME-val`` and ``NAME-test`` load
them (:func:`powerfast.evaluation.tasks.load_task`). Every set has two prompt formats
(:func:`format_prompt`): ``chat`` (the question and an instruction, for an
instruction-tuned model under its chat template) and ``fewshot`` (plain text: three worked
examples, then ``Q: <question>\nA:``, for a base model; the completion ends at a blank
line or a new ``Q:``).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Callable

#: The seed of the shipped set.
DEFAULT_SEED = 20250801

#: Problems in the shipped set.
DEFAULT_COUNT = 300

#: Follows every question: it makes the model state the number, not an essay about it.
ANSWER_INSTRUCTION = "Reply with only the number."


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: ``prompt`` is what the model is given, ``answer`` the exact result."""

    id: str
    kind: str
    prompt: str
    answer: int
    split: str | None = None  # "validation" or "test" in a split set; None in the spent set


def _add(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b


def _add_teen(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        a, b = b, a
    return f"What is {a} + {b}?", a + b


def _add_ten(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(1, 40)
    if rng.random() < 0.5:
        return f"What is {a} + 10?", a + 10
    return f"What is 10 + {a}?", a + 10


def _sub(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(2, 12)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", a - b


def _mul(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} * {b}?", a * b


def _times(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", a * b


#: The kinds, in the order problems take them, with what draws one question and its answer:
#:
#: ``add``       ``What is a + b?``, a and b in 1..9
#: ``add-teen``  ``What is a + b?``, one of them in 10..20, the other in 2..20
#: ``add-ten``   ``What is a + 10?`` or ``What is 10 + a?``, a in 1..40
#: ``sub``       ``What is a - b?``, a in 2..12, b in 1..a-1 (a positive result)
#: ``mul``       ``What is a * b?``, a and b in 2..9
#: ``times``     ``What is a times b?``, a and b in 2..9
KINDS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add": _add,
    "add-teen": _add_teen,
    "add-ten": _add_ten,
    "sub": _sub,
    "mul": _mul,
    "times": _times,
}

# Draws of one kind before giving up on a new prompt (a count beyond what the kind's ranges hold).
_MAX_DRAWS = 10_000


def generate(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[ArithmeticProblem]:
    """``count`` problems drawn from ``random.Random(seed)``, ids ``arith-0001`` on.

    Problem i (from 0) is of kind ``list(KINDS)[i % len(KINDS)]``; a drawn prompt seen
    before is drawn again. The same seed and count give the same list on every machine
    and Python version (``random.Random.randint`` and ``random`` are stable for a seed).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = random.Random(seed)
    kinds = list(KINDS)
    seen: set[str] = set()
    problems = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        for _ in range(_MAX_DRAWS):
            question, answer = KINDS[kind](rng)
            prompt = f"{question} {ANSWER_INSTRUCTION}"
            if prompt not in seen:
                break
        else:
            raise ValueError(f"kind {kind!r} has no new prompt left for {count} problems")
        seen.add(prompt)
        problems.append(ArithmeticProblem(f"arith-{i + 1:04d}", kind, prompt, answer))
    return problems


def dumps(problems: list[ArithmeticProblem]) -> str:
    """The JSON text of a data file: a list of ``{id, kind, prompt, answer}`` (and ``split``
    in a split set), one field a line."""
    records = [{k: v for k, v in asdict(p).items() if k != "split" or v is not None} for p in problems]
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def loads(text: str) -> list[ArithmeticProblem]:
    """The problems of a data file's text (the inverse of :func:`dumps`)."""
    records = json.loads(text)
    problems = []
    for i, rec in enumerate(records):
        fields = {"id", "kind", "prompt", "answer"}
        if not isinstance(rec, dict) or set(rec) not in (fields, fields | {"split"}):
            raise ValueError(f"arithmetic record {i + 1} is not an object with id, kind, prompt, answer "
                             f"(and optionally split): {rec!r}")
        if not isinstance(rec["answer"], int) or isinstance(rec["answer"], bool):
            raise ValueError(f"arithmetic record {rec['id']!r}: answer {rec['answer']!r} is not an integer")
        split = rec.get("split")
        if split not in (None, *SPLITS):
            raise ValueError(f"arithmetic record {rec['id']!r}: split {split!r} is not one of {SPLITS}")
        problems.append(ArithmeticProblem(str(rec["id"]), str(rec["kind"]), str(rec["prompt"]), rec["answer"], split))
    return problems


# ------------------------------------------------------------------------- split sets
# In a split set a problem's ``prompt`` is the bare question ("What is (3 + 4) * 5?");
# :func:`format_prompt` makes it what a model is given.

#: The splits of a split set, in the order of its problems.
SPLITS = ("validation", "test")


def _add_wide(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    return f"What is {a} + {b}?", a + b


def _add_ten_wide(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(1, 90)
    return (f"What is {a} + 10?", a + 10) if rng.random() < 0.5 else (f"What is 10 + {a}?", a + 10)


def _sub_wide(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(3, 30)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", a - b


def _mul_wide(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} * {b}?", a * b


def _times_wide(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", a * b


def _add_mul(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 3)
    return f"What is ({a} + {b}) * {c}?", (a + b) * c


def _mul_add(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 9)
    return f"What is {a} * {b} + {c}?", a * b + c


def _mul_sub(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    c = rng.randint(1, min(9, a * b - 1))
    return f"What is {a} * {b} - {c}?", a * b - c


def _add_sub(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    c = rng.randint(1, min(9, a + b - 1))
    return f"What is {a} + {b} - {c}?", a + b - c


def _add_mul_sub(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(1, 6), rng.randint(1, 6), rng.randint(2, 3)
    d = rng.randint(1, min(9, (a + b) * c - 1))
    return f"What is ({a} + {b}) * {c} - {d}?", (a + b) * c - d


def _add_add_add(rng: random.Random) -> tuple[str, int]:
    a, b, c, d = (rng.randint(1, 9) for _ in range(4))
    return f"What is {a} + {b} + {c} + {d}?", a + b + c + d


#: ``arithmetic2``'s kinds: the spent set's six with wider ranges (``add`` a, b in 2..19;
#: ``add-teen`` as before; ``add-ten`` a in 1..90; ``sub`` a in 3..30, b in 1..a-1;
#: ``mul`` and ``times`` a, b in 2..12).
SINGLE_STEP_KINDS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add": _add_wide,
    "add-teen": _add_teen,
    "add-ten": _add_ten_wide,
    "sub": _sub_wide,
    "mul": _mul_wide,
    "times": _times_wide,
}

#: ``multistep``'s kinds: four of two steps, two of three.
#:
#: ``add-mul``      ``(a + b) * c``, a, b in 1..9, c in 2..3
#: ``mul-add``      ``a * b + c``, a, b in 2..6, c in 1..9
#: ``mul-sub``      ``a * b - c``, a, b in 2..6, c in 1..min(9, ab - 1)
#: ``add-sub``      ``a + b - c``, a, b in 2..15, c in 1..min(9, a + b - 1)
#: ``add-mul-sub``  ``(a + b) * c - d``, a, b in 1..6, c in 2..3, d in 1..min(9, (a + b)c - 1)
#: ``add-add-add``  ``a + b + c + d``, each in 1..9
#:
#: Sized so that greedy decoding of the embedded SmolLM2-135M-Instruct lands in 15-60%
#: (with operands up to 40 it scored 12% on the first 60 validation problems).
MULTISTEP_KINDS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add-mul": _add_mul,
    "mul-add": _mul_add,
    "mul-sub": _mul_sub,
    "add-sub": _add_sub,
    "add-mul-sub": _add_mul_sub,
    "add-add-add": _add_add_add,
}


@dataclass(frozen=True)
class ProblemSet:
    """A split set: ``count`` problems of ``kinds`` (taken in turn) from ``random.Random(seed)``,
    ids ``<id_prefix>-0001`` on, the first ``validation`` of them the validation split.
    ``instruction`` follows the question in the ``chat`` format; ``examples`` are the
    ``fewshot`` format's worked examples (question, answer text), none of them a problem of
    the set; with ``excludes_spent`` no question of the spent set (:func:`generate`) is drawn."""

    name: str
    kinds: dict
    seed: int
    count: int
    validation: int
    id_prefix: str
    instruction: str
    examples: tuple[tuple[str, str], ...]
    excludes_spent: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.name}.json"


#: The split sets by name (data files ``powerfast/data/<name>.json``).
SPLIT_SETS: dict[str, ProblemSet] = {
    "arithmetic2": ProblemSet(
        "arithmetic2", SINGLE_STEP_KINDS, seed=20261207, count=300, validation=100, id_prefix="arith2",
        instruction=ANSWER_INSTRUCTION,
        examples=(("What is 14 + 23?", "37"), ("What is 7 * 13?", "91"), ("What is 31 - 17?", "14")),
        excludes_spent=True,
    ),
    "multistep": ProblemSet(
        "multistep", MULTISTEP_KINDS, seed=20261208, count=300, validation=100, id_prefix="multi",
        instruction="Work it out step by step, then end with: The answer is <number>.",
        examples=(
            ("What is (7 + 4) * 2?", "7 + 4 = 11. 11 * 2 = 22. The answer is 22."),
            ("What is 7 * 3 - 5?", "7 * 3 = 21. 21 - 5 = 16. The answer is 16."),
            ("What is 3 + 8 + 2 + 6?", "3 + 8 = 11. 11 + 2 = 13. 13 + 6 = 19. The answer is 19."),
        ),
    ),
}

#: Prompt formats of a split set (:func:`format_prompt`).
PROMPT_FORMATS = ("chat", "fewshot")

#: Where a ``fewshot`` completion ends: the model starts a new example.
FEWSHOT_STOP = ("\n\n", "\nQ:")


def format_prompt(problem_set: ProblemSet, question: str, prompt_format: str = "chat") -> str:
    """What a model is given for ``question``: ``chat``, the question and the set's
    instruction (for a chat template); ``fewshot``, plain text for a base model::

        Q: <example question>
        A: <example answer>

        (three examples)

        Q: <question>
        A:
    """
    if prompt_format == "chat":
        return f"{question} {problem_set.instruction}"
    if prompt_format == "fewshot":
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in problem_set.examples)
        return f"{shots}Q: {question}\nA:"
    raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def generate_set(problem_set: ProblemSet) -> list[ArithmeticProblem]:
    """The problems of a split set (its prompts the bare questions): a pure function of the
    set's declaration. No prompt occurs twice, none is a few-shot example's question, and
    with ``excludes_spent`` none is a question of the spent set (:func:`generate`)."""
    rng = random.Random(problem_set.seed)
    kinds = list(problem_set.kinds)
    seen = {q for q, _ in problem_set.examples}
    if problem_set.excludes_spent:
        seen |= {p.prompt[: -len(ANSWER_INSTRUCTION) - 1] for p in generate()}
    problems = []
    for i in range(problem_set.count):
        kind = kinds[i % len(kinds)]
        for _ in range(_MAX_DRAWS):
            question, answer = problem_set.kinds[kind](rng)
            if question not in seen:
                break
        else:
            raise ValueError(f"set {problem_set.name!r}: kind {kind!r} has no new question left")
        seen.add(question)
        split = SPLITS[0] if i < problem_set.validation else SPLITS[1]
        problems.append(ArithmeticProblem(f"{problem_set.id_prefix}-{i + 1:04d}", kind, question, answer, split))
    return problems

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
``python bench/make_arithmetic.py``.
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
    """The JSON text of the data file: a list of ``{id, kind, prompt, answer}``, one field a line."""
    return json.dumps([asdict(p) for p in problems], indent=1, ensure_ascii=False) + "\n"


def loads(text: str) -> list[ArithmeticProblem]:
    """The problems of a data file's text (the inverse of :func:`dumps`)."""
    records = json.loads(text)
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or set(rec) != {"id", "kind", "prompt", "answer"}:
            raise ValueError(f"arithmetic record {i + 1} is not an object with id, kind, prompt, answer: {rec!r}")
        if not isinstance(rec["answer"], int) or isinstance(rec["answer"], bool):
            raise ValueError(f"arithmetic record {rec['id']!r}: answer {rec['answer']!r} is not an integer")
        problems.append(ArithmeticProblem(str(rec["id"]), str(rec["kind"]), str(rec["prompt"]), rec["answer"]))
    return problems

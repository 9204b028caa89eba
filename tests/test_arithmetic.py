"""Tests of the arithmetic task: the generator, the shipped data file, the integer grader and
the task's loading and grading. No model."""

import ast
import json
import operator
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from powerfast.evaluation import KNOWN_TASKS, Problem, Task, arithmetic, load_task
from powerfast.evaluation.grading import integer_answer

ROOT = Path(__file__).resolve().parent.parent

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_QUESTION = re.compile(r"What is (.+)\? " + re.escape(arithmetic.ANSWER_INSTRUCTION))


def recompute(prompt: str) -> int:
    """The answer of a prompt, computed again from its text alone."""
    m = _QUESTION.fullmatch(prompt)
    assert m, prompt
    question = m.group(1)
    tree = ast.parse(question.replace(" times ", " * "), mode="eval").body
    assert isinstance(tree, ast.BinOp) and type(tree.op) in _OPS, prompt
    assert isinstance(tree.left, ast.Constant) and isinstance(tree.right, ast.Constant), prompt
    return _OPS[type(tree.op)](tree.left.value, tree.right.value)


# --- the generator -----------------------------------------------------------------------


def test_same_seed_same_problems():
    assert arithmetic.generate(120, seed=3) == arithmetic.generate(120, seed=3)
    assert arithmetic.generate() == arithmetic.generate()
    assert arithmetic.generate(120, seed=3) != arithmetic.generate(120, seed=4)


def test_generator_leaves_the_global_random_state_alone():
    import random

    random.seed(0)
    before = random.random()
    random.seed(0)
    arithmetic.generate(60, seed=1)
    assert random.random() == before


def test_shipped_set_size_ids_and_kinds():
    problems = arithmetic.generate()
    assert len(problems) >= 300
    ids = [p.id for p in problems]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"arith-\d{4}", i) for i in ids)
    assert ids[:3] == ["arith-0001", "arith-0002", "arith-0003"]
    assert len({p.prompt for p in problems}) == len(problems)
    counts = {kind: sum(p.kind == kind for p in problems) for kind in arithmetic.KINDS}
    assert set(counts) == {p.kind for p in problems}
    assert min(counts.values()) > 0 and max(counts.values()) - min(counts.values()) <= 1
    # the kinds come in turn, so any prefix is balanced
    assert [p.kind for p in problems[: len(counts)]] == list(arithmetic.KINDS)


def test_answers_are_right():
    for p in arithmetic.generate():
        assert type(p.answer) is int
        assert recompute(p.prompt) == p.answer, p


def test_kinds_stay_in_their_ranges():
    for p in arithmetic.generate():
        numbers = [int(n) for n in re.findall(r"\d+", p.prompt)]
        if p.kind == "add":
            assert all(1 <= n <= 9 for n in numbers) and "+" in p.prompt
        elif p.kind == "add-teen":
            assert all(2 <= n <= 20 for n in numbers) and max(numbers) >= 10 and "+" in p.prompt
        elif p.kind == "add-ten":
            assert 10 in numbers and all(1 <= n <= 40 for n in numbers) and "+" in p.prompt
        elif p.kind == "sub":
            assert 1 <= numbers[1] < numbers[0] <= 12 and p.answer > 0 and " - " in p.prompt
        elif p.kind == "mul":
            assert all(2 <= n <= 9 for n in numbers) and "*" in p.prompt
        elif p.kind == "times":
            assert all(2 <= n <= 9 for n in numbers) and " times " in p.prompt
        else:
            raise AssertionError(f"unexpected kind {p.kind!r}")


def test_generator_refuses_impossible_counts():
    with pytest.raises(ValueError, match="count"):
        arithmetic.generate(0)
    with pytest.raises(ValueError, match="no new prompt"):
        arithmetic.generate(6 * 200)  # more distinct products than 2..9 x 2..9 holds


# --- the data file -----------------------------------------------------------------------


def test_data_file_is_the_generators_output():
    text = resources.files("powerfast.data").joinpath("arithmetic.json").read_text(encoding="utf-8")
    assert text == arithmetic.dumps(arithmetic.generate())
    assert arithmetic.loads(text) == arithmetic.generate()


def test_make_script_writes_the_same_bytes(tmp_path):
    out = tmp_path / "arithmetic.json"
    cmd = [sys.executable, str(ROOT / "bench" / "make_arithmetic.py"), "--out", str(out)]
    env = {"PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    first = out.read_bytes()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert out.read_bytes() == first
    assert first == (ROOT / "powerfast" / "data" / "arithmetic.json").read_bytes()
    out.write_bytes(first.replace(b'"arith-0001"', b'"arith-0000"'))
    check = subprocess.run(cmd + ["--check"], capture_output=True, env=env, text=True)
    assert check.returncode == 1 and "differs" in check.stdout


def test_loads_rejects_non_integer_answers():
    bad = [{"id": "arith-0001", "kind": "add", "prompt": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(ValueError, match="not an integer"):
        arithmetic.loads(json.dumps(bad))


# --- the grader --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7", 7),
        ("7.", 7),
        ("The answer is 14.", 14),
        ("The answer is: **14**.", 14),
        ("8 + 9 = 17", 17),
        ("3 + 9 = 22", 22),  # a wrong answer is still the answer
        ("12 - 5 is 7, since 7 + 5 = 12.", 7),  # the first result, not the last number
        ("The sum is 5 + 17 = 22", 22),  # "is 5 + ..." starts an expression
        ("6 times 3 equals 18 apples", 18),
        ("It is equal to 8", 8),
        ("x = -5", -5),
        ("The result is -12.", -12),
        ("4 - 9 = \u22125", -5),  # Unicode minus
        ("12-5", 5),  # an operator, not a sign: the last number
        ("That makes 1,000 in all", 1000),
        ("it is 1,234,567.", 1234567),
        ("14.0", 14),
        ("= 2.5", None),  # not an integer
        ("no number here", None),
        ("", None),
        ("Twelve.", None),  # words are not numbers
        ("Half of 54 is 27. I said 27 is the answer, not 28.", 27),
        ("Double 6 is a constant, 6 times", 6),  # no result marker: the last number
        ("1 + 9 = \n1 + 11 = 12", 12),
    ],
)
def test_integer_answer(text, expected):
    assert integer_answer(text) == expected


# --- the task ----------------------------------------------------------------------------


def test_load_task_arithmetic():
    assert "arithmetic" in KNOWN_TASKS
    task = load_task("arithmetic")
    assert task.name == "arithmetic" and task.kind == "exact"
    generated = arithmetic.generate()
    assert [p.id for p in task.problems] == [p.id for p in generated]
    assert [p.prompt for p in task.problems] == [p.prompt for p in generated]
    assert [p.reference for p in task.problems] == [str(p.answer) for p in generated]
    assert load_task("Arithmetic").problems == task.problems


def test_exact_grading():
    task = load_task("arithmetic")
    p = task.problems[0]
    answer = int(p.reference)
    right = task.grade(p, f"{p.prompt.split('?')[0][8:]} = {answer}.")
    assert right.correct and right.answer == str(answer)
    wrong = task.grade(p, f"The answer is {answer + 1}.")
    assert not wrong.correct and wrong.answer == str(answer + 1)
    none = task.grade(p, "I cannot say.")
    assert not none.correct and none.answer is None
    neg = Task("t", "exact", [Problem("n", "What is 4 - 9?", "-5")])
    assert neg.grade(neg.problems[0], "4 - 9 = -5").correct
    assert not neg.grade(neg.problems[0], "4 - 9 = 5").correct


def test_exact_task_needs_integer_references():
    with pytest.raises(ValueError, match="not an integer"):
        Task("t", "exact", [Problem("a", "What is half of 5?", "2.5")])
    with pytest.raises(ValueError, match="unknown task kind"):
        Task("t", "integer", [])

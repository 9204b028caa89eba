"""Tests of the split arithmetic sets (``arithmetic2``, ``multistep``): the generator, the
shipped files, the splits, both prompt formats, the stated-answer grader and the tasks.
No model."""

import ast
import operator
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from powerfast.evaluation import arithmetic, load_task
from powerfast.evaluation.grading import stated_answer

ROOT = Path(__file__).resolve().parent.parent
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(question: str) -> int:
    """The value of ``What is <expression>?``, computed again from the text (integers, + - *)."""
    m = re.fullmatch(r"What is (.+)\?", question)
    assert m, question

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        assert isinstance(node, ast.BinOp) and type(node.op) in _OPS, question
        return _OPS[type(node.op)](value(node.left), value(node.right))

    return value(ast.parse(m.group(1).replace(" times ", " * "), mode="eval").body)


@pytest.mark.parametrize("name", list(arithmetic.SPLIT_SETS))
def test_shipped_file_is_the_generators_output(name):
    problem_set = arithmetic.SPLIT_SETS[name]
    text = resources.files("powerfast.data").joinpath(problem_set.file_name).read_text(encoding="utf-8")
    assert text == arithmetic.dumps(arithmetic.generate_set(problem_set))
    assert arithmetic.loads(text) == arithmetic.generate_set(problem_set)


@pytest.mark.parametrize("name", list(arithmetic.SPLIT_SETS))
def test_sets_answers_splits_and_freshness(name):
    problem_set = arithmetic.SPLIT_SETS[name]
    problems = arithmetic.generate_set(problem_set)
    assert len(problems) == problem_set.count == 300
    assert [p.split for p in problems] == ["validation"] * 100 + ["test"] * 200
    assert len({p.id for p in problems}) == len({p.prompt for p in problems}) == len(problems)
    for p in problems:
        assert evaluate(p.prompt) == p.answer, p
        assert p.answer > 0
    kinds = list(problem_set.kinds)
    assert [p.kind for p in problems] == [kinds[i % len(kinds)] for i in range(len(problems))]
    # no example question is a problem; the single-step set shares no question with the spent set
    assert not {q for q, _ in problem_set.examples} & {p.prompt for p in problems}
    spent = {p.prompt.rsplit("?", 1)[0] + "?" for p in arithmetic.generate()}
    overlap = spent & {p.prompt for p in problems}
    assert not overlap if problem_set.excludes_spent else True
    # the examples' answers are right, and end with the stated answer in the multi-step set
    for question, answer_text in problem_set.examples:
        graded = stated_answer(answer_text) if name == "multistep" else int(answer_text)
        assert graded == evaluate(question)


def test_multistep_kinds_have_two_or_three_steps():
    for p in arithmetic.generate_set(arithmetic.SPLIT_SETS["multistep"]):
        operators = re.findall(r" [-+*] ", p.prompt)
        assert len(operators) == (3 if p.kind.count("-") == 2 else 2), p


def test_make_script_check_for_a_set(tmp_path):
    out = tmp_path / "multistep.json"
    cmd = [sys.executable, str(ROOT / "bench" / "make_arithmetic.py"), "--set", "multistep", "--out", str(out)]
    env = {"PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert out.read_bytes() == (ROOT / "powerfast" / "data" / "multistep.json").read_bytes()
    out.write_bytes(out.read_bytes().replace(b'"validation"', b'"test"', 1))
    check = subprocess.run(cmd + ["--check"], capture_output=True, env=env, text=True)
    assert check.returncode == 1 and "differs" in check.stdout and "set multistep" in check.stdout


def test_loads_rejects_an_unknown_split():
    bad = '[{"id": "a", "kind": "add", "prompt": "What is 1 + 1?", "answer": 2, "split": "train"}]'
    with pytest.raises(ValueError, match="split 'train'"):
        arithmetic.loads(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 + 3 = 5. 5 * 4 = 20. The answer is 20.", 20),  # not the first step's 5
        ("The answer is: **-7**", -7),
        ("answer = 12", 12),
        ("So the Answer is 1,200.", 1200),
        ("The answer is 8. Q: What is 2 + 2? The answer is 4.", 8),  # the first statement
        ("The answer is unclear; 3 + 4 = 7", 7),  # no number after it: the last number
        ("3 + 4 = 7. 7 * 2 =", 2),  # cut mid-way: the last number (wrong, as it should be)
        ("no number", None),
        ("The answer is 2.5", None),
        ("The answer is 5 * 3 = 15. 15 - 8 = 7. The answer is 7.", 7),  # an expression is no answer
        ("The answer is 7 + 6 + 2 + 1.", 1),  # only an expression: the last number
    ],
)
def test_stated_answer(text, expected):
    assert stated_answer(text) == expected


def test_split_tasks_load_both_formats():
    val, test = load_task("multistep-val"), load_task("multistep-test")
    assert (len(val.problems), len(test.problems)) == (100, 200)
    assert not {p.id for p in val.problems} & {p.id for p in test.problems}
    assert val.kind == "stated" and val.chat_template and val.stop == ()
    first = val.problems[0]
    assert first.prompt == f"{first.extra['question']} {arithmetic.SPLIT_SETS['multistep'].instruction}"
    few = load_task("multistep-val-fewshot")
    assert few.name == "multistep-val-fewshot" and not few.chat_template and few.stop == arithmetic.FEWSHOT_STOP
    assert few.problems[0].prompt.startswith("Q: What is (7 + 4) * 2?\nA: 7 + 4 = 11.")
    assert few.problems[0].prompt.endswith(f"\n\nQ: {first.extra['question']}\nA:")
    assert [p.reference for p in few.problems] == [p.reference for p in val.problems]
    single = load_task("arithmetic2-test")
    assert single.kind == "exact" and len(single.problems) == 200
    assert single.problems[0].prompt.endswith(arithmetic.ANSWER_INSTRUCTION)


def test_split_task_grading_and_unknown_names():
    task = load_task("multistep-val")
    p = task.problems[0]
    right = task.grade(p, f"Step one gives 1 = 1. The answer is {p.reference}.")
    assert right.correct and right.answer == p.reference
    assert not task.grade(p, f"The answer is {int(p.reference) + 1}. Or {p.reference}").correct
    with pytest.raises(ValueError, match="unknown task 'nosuchset-val'"):
        load_task("nosuchset-val")
    with pytest.raises(ValueError, match="prompt format"):
        arithmetic.format_prompt(arithmetic.SPLIT_SETS["multistep"], "What is 1 + 1?", "base")

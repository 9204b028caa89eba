"""powerfast compare: the statistics against hand-worked values, a recorded run end to end,
records without decoded_tokens, and the one-line errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest
from test_cli import tiny_model_dir  # noqa: F401, F811  (fixture)

from powerfast import cli
from powerfast.evaluation import Generation, load_task, run_evaluation, wilson_interval
from powerfast.evaluation.compare import compare, holm, mcnemar_exact

# ---------------------------------------------------------------------------------------
# McNemar's exact test


@pytest.mark.parametrize("b, c, p", [
    (0, 5, 2 * 1 / 2**5),                      # 0.0625
    (5, 0, 2 * 1 / 2**5),
    (1, 9, 2 * (1 + 10) / 2**10),              # C(10,0) + C(10,1) = 11: 0.021484375
    (2, 8, 2 * (1 + 10 + 45) / 2**10),         # 0.109375
    (2, 6, 2 * (1 + 8 + 28) / 2**8),           # 0.2890625
    (0, 1, 1.0),                               # 2 * 1/2
    (3, 3, 1.0),                               # 2 * 42/64 > 1: capped
    (4, 4, 1.0),
    (0, 0, 1.0),                               # no discordant pair
    (0, 20, 2 / 2**20),
])
def test_mcnemar_exact_hand_computed(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-15, abs=0)


def test_mcnemar_exact_matches_scipy_binomtest():
    rng = random.Random(12345)
    cases = [(rng.randrange(0, 60), rng.randrange(0, 60)) for _ in range(200)] + [(700, 820), (5000, 5200), (1, 2000)]
    for b, c in cases:
        expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300), (b, c)
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


@pytest.mark.parametrize("b, c", [(-1, 2), (1.0, 2), (True, 3), (2, None)])
def test_mcnemar_exact_rejects_non_counts(b, c):
    with pytest.raises(ValueError):
        mcnemar_exact(b, c)


# ---------------------------------------------------------------------------------------
# Wilson intervals (z = 1.959964): p=0 gives high = z^2 / (n + z^2); p=1 gives low = n / (n + z^2)


@pytest.mark.parametrize("correct, n, low, high", [
    (0, 10, 0.0, 3.841459 / 13.841459),          # 0.277533
    (10, 10, 10 / 13.841459, 1.0),               # 0.722467
    (5, 10, 0.236593, 0.763407),                 # centre 1/2, half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    (81, 263, 0.255289, 0.366210),               # the textbook example (statsmodels' proportion_confint, wilson)
])
def test_wilson_known_values(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=2e-6)


def test_wilson_matches_scipy():
    for correct, n in [(0, 1), (1, 3), (4, 10), (9, 10), (81, 263), (299, 300), (17, 1000)]:
        ci = binomtest(correct, n).proportion_ci(method="wilson")
        assert wilson_interval(correct, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


# ---------------------------------------------------------------------------------------
# Holm


def test_holm_hand_worked():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # 0.2 x 3 = 0.6; 0.4 x 2 = 0.8; 0.7 x 1 = 0.7 -> 0.8
    assert holm([0.4, 0.7, 0.2]) == pytest.approx([0.8, 0.8, 0.6])
    # capped at 1: 0.4 x 3 = 1.2 -> 1, and every later one at least that
    assert holm([0.4, 0.5, 0.45]) == [1.0, 1.0, 1.0]
    assert holm([0.6, 0.01]) == pytest.approx([0.6, 0.02])
    assert holm([0.3]) == [0.3]
    assert holm([]) == []


def test_holm_is_monotone_and_at_least_the_raw_values():
    rng = random.Random(7)
    for _ in range(100):
        p = [rng.random() ** 3 for _ in range(rng.randrange(1, 8))]
        adjusted = holm(p)
        assert all(a >= x and a <= 1.0 for a, x in zip(adjusted, p))
        ranked = [adjusted[i] for i in sorted(range(len(p)), key=lambda i: p[i])]
        assert ranked == sorted(ranked)


# ---------------------------------------------------------------------------------------
# A recorded run end to end


def write_records(folder: Path, method: str, seed: int, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{method}-seed{seed}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            record = {"id": row["id"], "method": method, "seed": seed, "prompt": "p", "completion": "c",
                      "answer": None, "reference": "1", "correct": row["correct"], "num_tokens": row["num_tokens"],
                      "seconds": row["seconds"]}
            if "decoded_tokens" in row:
                record["decoded_tokens"] = row["decoded_tokens"]
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def run_dir(tmp_path):
    """Ten problems, one seed. plain: right on p0-p3. power: right on p0-p8 (b=0, c=5).
    mcmc: right on p2-p9 (b=2: p0, p1; c=6: p4-p9), recorded without decoded_tokens."""
    task = tmp_path / "run" / "toy"
    ids = [f"p{i}" for i in range(10)]
    write_records(task, "plain", 0, [{"id": p, "correct": i < 4, "num_tokens": 20, "seconds": 0.5,
                                      "decoded_tokens": 100} for i, p in enumerate(ids)])
    write_records(task, "power", 0, [{"id": p, "correct": i < 9, "num_tokens": 20, "seconds": 2.0,
                                      "decoded_tokens": 1000 + i} for i, p in enumerate(ids)])
    write_records(task, "mcmc", 0, [{"id": p, "correct": i >= 2, "num_tokens": 50, "seconds": 0.1 * i}
                                     for i, p in enumerate(ids)])
    (task / "summary.json").write_text("{}")  # other files of the folder are not records
    return tmp_path / "run"


def test_compare_numbers(run_dir):
    comparison = compare(run_dir)
    [task] = comparison.tasks
    assert (task.task, task.baseline, task.pairing, task.seeds_per_problem) == ("toy", "plain", "seed", 1)
    rows = {m.method: m for m in task.methods}
    assert [m.method for m in task.methods] == ["plain", "mcmc", "power"]  # the baseline first
    plain, power, mcmc = rows["plain"], rows["power"], rows["mcmc"]
    assert (plain.n, plain.correct, plain.accuracy) == (10, 4, 0.4)
    assert (plain.wilson_low, plain.wilson_high) == pytest.approx((0.168180, 0.687326), abs=1e-6)
    assert (power.wilson_low, power.wilson_high) == pytest.approx((0.595850, 0.982124), abs=1e-6)
    assert (mcmc.wilson_low, mcmc.wilson_high) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert plain.decoded_tokens_per_problem == 100 and power.decoded_tokens_per_problem == 1004.5
    assert mcmc.decoded_tokens_per_problem == 50 and mcmc.decoded_tokens_missing == 10  # num_tokens instead
    assert plain.decoded_tokens_missing == 0
    assert (plain.seconds_per_problem, power.seconds_per_problem) == (0.5, 2.0)
    assert mcmc.seconds_per_problem == pytest.approx(0.45)
    assert plain.baseline and plain.b is None and plain.p_value is None
    assert (power.pairs, power.b, power.c) == (10, 0, 5)
    assert (mcmc.pairs, mcmc.b, mcmc.c) == (10, 2, 6)
    assert power.p_value == 0.0625
    assert mcmc.p_value == pytest.approx(2 * 37 / 256)  # 2 (C(8,0) + C(8,1) + C(8,2)) / 2^8
    assert power.p_holm == pytest.approx(0.125)  # 0.0625 x 2
    assert mcmc.p_holm == pytest.approx(2 * 37 / 256)  # max(0.125, 0.289 x 1)

    text = str(comparison)
    lines = text.splitlines()
    assert lines[0] == "task toy: baseline plain; paired per (problem, seed), one seed per problem"
    assert lines[1].split()[:4] == ["method", "n", "accuracy", "Wilson"]
    by_name = {line.split()[0]: line.split() for line in lines[3:6]}
    assert by_name["power"] == ["power", "10", "0.9000", "0.5958-0.9821", "1004.5", "2.000", "10", "0", "5",
                                "0.0625", "0.125"]
    assert by_name["mcmc"] == ["mcmc", "10", "0.8000", "0.4902-0.9433", "50.0", "0.450", "10", "2", "6",
                               "0.2891", "0.2891"]
    assert by_name["plain"] == ["plain", "(baseline)", "10", "0.4000", "0.1682-0.6873", "100.0", "0.500",
                                "-", "-", "-", "-", "-"]
    assert "mcmc: 10 of 10 records without decoded_tokens (num_tokens counted instead)" in text
    assert "plain: " not in text and "power: " not in text


def test_compare_baseline_choice(run_dir):
    task = compare(run_dir, baseline="power").tasks[0]
    rows = {m.method: m for m in task.methods}
    assert task.baseline == "power" and [m.method for m in task.methods] == ["power", "mcmc", "plain"]
    assert (rows["plain"].b, rows["plain"].c, rows["plain"].p_value) == (5, 0, 0.0625)
    assert (rows["mcmc"].b, rows["mcmc"].c) == (2, 1)  # power right, mcmc wrong: p0, p1; the reverse: p9
    # without plain, the default baseline is the first method alphabetically
    (run_dir / "toy" / "plain-seed0.jsonl").unlink()
    assert compare(run_dir).tasks[0].baseline == "mcmc"


def test_save_writes_json_and_plot(run_dir, tmp_path):
    comparison = compare(run_dir)
    written = comparison.save(tmp_path / "all.json")
    task_dir = run_dir / "toy"
    assert set(written) == {task_dir / "comparison.json", task_dir / "accuracy_vs_decoded_tokens.png",
                            tmp_path / "all.json"}
    saved = json.loads((task_dir / "comparison.json").read_text())
    assert saved["baseline"] == "plain" and saved["pairing"] == "seed"
    rows = {m["method"]: m for m in saved["methods"]}
    assert (rows["power"]["b"], rows["power"]["c"], rows["power"]["p_value"], rows["power"]["p_holm"]) == \
        (0, 5, 0.0625, 0.125)
    assert rows["mcmc"]["decoded_tokens_missing"] == 10 and rows["plain"]["p_value"] is None
    assert json.loads((tmp_path / "all.json").read_text())["tasks"][0] == saved
    png = (task_dir / "accuracy_vs_decoded_tokens.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_plot_axes(run_dir):
    from powerfast.evaluation.compare import accuracy_vs_decoded_tokens_figure

    task = compare(run_dir).tasks[0]
    ax = accuracy_vs_decoded_tokens_figure(task).axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylim() == (0.0, 1.0)
    low, high = ax.get_xlim()
    assert low <= 50 and high >= 1004.5  # every method in view
    labels = [t.get_text() for t in ax.texts]
    assert "plain (4/10), baseline" in labels and "power (9/10)" in labels and "mcmc (8/10)" in labels


def test_cli_compare_prints_the_table(run_dir, tmp_path, capsys):
    assert cli.main(["compare", str(run_dir), "--json", str(tmp_path / "c.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == str(compare(run_dir)) + "\n"
    assert "0.0625" in captured.out and "decoded tokens/problem" in captured.out
    assert json.loads((tmp_path / "c.json").read_text())["tasks"][0]["baseline"] == "plain"
    assert (run_dir / "toy" / "accuracy_vs_decoded_tokens.png").exists()
    # a task folder given directly, and --task
    assert cli.main(["compare", str(run_dir / "toy"), "--baseline", "mcmc"]) == 0
    assert capsys.readouterr().out.startswith("task toy: baseline mcmc;")
    assert cli.main(["compare", str(run_dir), "--task", "toy"]) == 0


# ---------------------------------------------------------------------------------------
# Several seeds per problem


@pytest.fixture
def seeded_run(tmp_path):
    """Problems q0-q3. plain and power with seeds 0-2, mcmc with seeds 0-1 (1 = right)."""
    outcomes = {
        "plain": {"q0": [1, 1, 1], "q1": [1, 1, 0], "q2": [0, 0, 0], "q3": [1, 0, 0]},
        "power": {"q0": [0, 0, 0], "q1": [1, 1, 1], "q2": [1, 1, 0], "q3": [1, 1, 1]},
        "mcmc": {"q0": [1, 0], "q1": [1, 1], "q2": [0, 1], "q3": [1, 1]},
    }
    for method, by_problem in outcomes.items():
        for seed in range(3 if method != "mcmc" else 2):
            write_records(tmp_path / "math", method, seed,
                          [{"id": q, "correct": bool(r[seed]), "num_tokens": 10, "seconds": 1.0, "decoded_tokens": 30}
                           for q, r in by_problem.items()])
    return tmp_path


def test_several_seeds_pair_per_problem_and_seed(seeded_run):
    task = compare(seeded_run).tasks[0]
    rows = {m.method: m for m in task.methods}
    assert task.seeds_per_problem == 3
    # power vs plain per (problem, seed): q0 b b b; q1 - - c; q2 c c -; q3 - c c
    assert (rows["power"].pairs, rows["power"].b, rows["power"].c) == (12, 3, 5)
    assert rows["power"].p_value == pytest.approx(2 * (1 + 8 + 28 + 56) / 2**8)
    # mcmc on seeds 0-1 only: q0 - b; q1 - -; q2 - c; q3 - c
    assert (rows["mcmc"].pairs, rows["mcmc"].b, rows["mcmc"].c) == (8, 1, 2)
    assert rows["mcmc"].seeds == [0, 1] and rows["power"].seeds == [0, 1, 2]
    text = str(task)
    assert "paired per (problem, seed), up to 3 seeds per problem" in text and "not independent" in text


def test_several_seeds_majority_pairing(seeded_run):
    task = compare(seeded_run, pairing="majority").tasks[0]
    rows = {m.method: m for m in task.methods}
    # power vs plain, majority of 3: plain T T F F, power F T T T
    assert (rows["power"].pairs, rows["power"].b, rows["power"].c) == (4, 1, 2)
    # mcmc vs plain on their common seeds 0-1: plain [1,1] [1,1] [0,0] [1,0]; mcmc [1,0] [1,1] [0,1] [1,1]
    # a tie is wrong: plain T T F F, mcmc F T F T
    assert (rows["mcmc"].pairs, rows["mcmc"].b, rows["mcmc"].c) == (4, 1, 1)
    assert rows["mcmc"].n == 8 and rows["power"].n == 12  # accuracy still over every record
    assert "majority over the seeds both methods ran" in str(task)
    assert cli.main(["compare", str(seeded_run), "--pairing", "majority"]) == 0


def test_methods_without_common_problems_are_not_tested(tmp_path):
    write_records(tmp_path / "t", "plain", 0, [{"id": "a", "correct": True, "num_tokens": 1, "seconds": 1.0}])
    write_records(tmp_path / "t", "power", 0, [{"id": "b", "correct": True, "num_tokens": 1, "seconds": 1.0}])
    write_records(tmp_path / "t", "mcmc", 0, [{"id": "a", "correct": False, "num_tokens": 1, "seconds": 1.0}])
    task = compare(tmp_path).tasks[0]
    rows = {m.method: m for m in task.methods}
    assert (rows["power"].pairs, rows["power"].p_value, rows["power"].p_holm) == (0, None, None)
    assert (rows["mcmc"].b, rows["mcmc"].c, rows["mcmc"].p_value, rows["mcmc"].p_holm) == (1, 0, 1.0, 1.0)
    assert "power: no problem and seed in common with the baseline: not tested" in str(task)


def test_a_partial_last_line_is_left_out_and_the_file_kept(run_dir):
    path = run_dir / "toy" / "power-seed0.jsonl"
    before = path.read_bytes()
    path.write_bytes(before + b'{"id": "p10", "correct": tr')
    task = compare(run_dir).tasks[0]
    assert {m.method: m.n for m in task.methods}["power"] == 10
    assert "power-seed0.jsonl: a partial last line" in str(task)
    assert path.read_bytes() == before + b'{"id": "p10", "correct": tr'  # compare never writes records


# ---------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_missing_directory(tmp_path, capsys):
    err = one_line_error(capsys, ["compare", str(tmp_path / "nowhere")])
    assert err == f"powerfast compare: error: run directory {str(tmp_path / 'nowhere')!r} does not exist\n"


def test_directory_without_records(tmp_path, capsys):
    (tmp_path / "empty-task").mkdir()
    (tmp_path / "empty-task" / "notes.txt").write_text("x")
    err = one_line_error(capsys, ["compare", str(tmp_path)])
    assert err.startswith(f"powerfast compare: error: no records in {str(tmp_path)!r}")


def test_unknown_baseline(run_dir, capsys):
    err = one_line_error(capsys, ["compare", str(run_dir), "--baseline", "greedy"])
    assert err == ("powerfast compare: error: unknown baseline 'greedy' in task toy: "
                   "the methods are mcmc, plain, power\n")
    with pytest.raises(ValueError, match="unknown baseline 'greedy'"):
        compare(run_dir, baseline="greedy")


def test_unknown_task_and_malformed_record(run_dir, capsys):
    err = one_line_error(capsys, ["compare", str(run_dir), "--task", "math500"])
    assert err == f"powerfast compare: error: unknown task 'math500' in {str(run_dir)!r}: the tasks are toy\n"
    path = run_dir / "toy" / "plain-seed0.jsonl"
    path.write_text('{"id": "p0", "correct": true}\n' + path.read_text())
    err = one_line_error(capsys, ["compare", str(run_dir)])
    assert err.endswith("plain-seed0.jsonl: malformed record on line 1: no num_tokens, seconds\n")


def test_compare_imports_no_torch(run_dir):
    program = ("import sys\nfrom powerfast import cli\n"
               f"code = cli.main(['compare', {str(run_dir)!r}])\n"
               "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------
# decoded_tokens in the records and the summary's throughput


def test_records_carry_decoded_tokens_and_summary_throughput(tmp_path):
    task_file = tmp_path / "two.jsonl"
    task_file.write_text('{"id": "one", "prompt": "1/2?", "answer": "\\\\frac{1}{2}"}\n'
                         '{"id": "two", "prompt": "1+1?", "answer": "2"}\n')
    task = load_task(task_file)
    costly = lambda prompts, seeds: [Generation(r"\boxed{2}", 4, 2.0, decoded_tokens=40) for _ in prompts]
    unknown = lambda prompts, seeds: [Generation(r"\boxed{0.5}", 5, 0.5) for _ in prompts]
    summary = run_evaluation(task, {"costly": costly, "unknown": unknown}, tmp_path / "out", progress=False)
    folder = tmp_path / "out" / task.name
    costly_records = [json.loads(x) for x in (folder / "costly-seed0.jsonl").read_text().splitlines()]
    unknown_records = [json.loads(x) for x in (folder / "unknown-seed0.jsonl").read_text().splitlines()]
    assert [r["decoded_tokens"] for r in costly_records] == [40, 40]
    assert all("decoded_tokens" not in r for r in unknown_records)
    rows = {r.method: r for r in summary.rows}
    assert rows["costly"].decoded_tokens_per_second == 20.0  # 80 tokens / 4 s
    assert rows["unknown"].decoded_tokens_per_second == 10.0  # num_tokens instead: 10 / 1 s
    assert (rows["costly"].decoded_tokens_missing, rows["unknown"].decoded_tokens_missing) == (0, 2)
    text = (folder / "summary.txt").read_text()
    assert "decoded tokens/s" in text and "20.0" in text
    assert "unknown: 2 of 2 records without decoded_tokens (num_tokens counted instead)" in text
    saved = {r["method"]: r for r in json.loads((folder / "summary.json").read_text())["rows"]}
    assert saved["costly"]["decoded_tokens_per_second"] == 20.0 and saved["unknown"]["decoded_tokens_missing"] == 2
    assert saved["costly"]["tokens_per_prompt"] == 4  # the existing fields stay
    comparison = compare(tmp_path / "out", baseline="costly").tasks[0]
    rows = {m.method: m for m in comparison.methods}
    assert (rows["costly"].correct, rows["unknown"].correct) == (1, 1)
    assert (rows["unknown"].b, rows["unknown"].c, rows["unknown"].p_value) == (1, 1, 1.0)
    assert rows["costly"].decoded_tokens_per_problem == 40 and rows["unknown"].decoded_tokens_per_problem == 5


def test_eval_records_the_engine_decoded_tokens(tiny_model_dir, tmp_path, capsys):
    """The command's records carry the engine's count: power decodes candidates and rollouts
    beyond its completion, plain exactly its completion."""
    fixture = Path(__file__).parent / "fixtures" / "math3.jsonl"
    args = ["eval", "--task", str(fixture), "--methods", "plain,power", "--seeds", "0", "--out", str(tmp_path),
            "--model", str(tiny_model_dir), "--block-size", "2", "--candidates", "3", "--top-k", "2",
            "--rollouts", "2", "--horizon", "2", "--max-new-tokens", "4", "--no-chat-template", "--ignore-eos"]
    assert cli.main(args) == 0
    read = lambda name: [json.loads(x) for x in (tmp_path / "math3" / name).read_text().splitlines()]
    plain, power = read("plain-seed0.jsonl"), read("power-seed0.jsonl")
    assert len(plain) == len(power) == 3
    assert all(r["decoded_tokens"] == r["num_tokens"] == 4 for r in plain)
    assert all(r["decoded_tokens"] > r["num_tokens"] == 4 for r in power)
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task math3: baseline plain;") and "without decoded_tokens" not in out

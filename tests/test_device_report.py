"""bench/device_report.py: the results JSON, the pytest summary and the check of $OUT.

The GPU script's whole run is checked by CI's smoke run (``SMOKE=1 bash
bench/device_check.sh``); these tests give the bookkeeping the inputs a smoke run never
produces: failing and killed pytest logs, too many files, a stage with no table.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import device_report

FINISHED_LOG = """\
tests/test_ops_kv.py::test_write_kv_on_cuda[dtype0] PASSED                [ 25%]
tests/test_ops_kv.py::test_write_kv_on_cuda[dtype1] FAILED                [ 50%]
tests/test_runner.py::test_runner_on_cuda ERROR                           [ 75%]
tests/test_cache.py::test_copy_on_write_on_cuda_never_synchronises SKIPPED [100%]
=========================== short test summary info ============================
FAILED tests/test_ops_kv.py::test_write_kv_on_cuda[dtype1] - AssertionError: 0.5 > 1e-05
ERROR tests/test_runner.py::test_runner_on_cuda - RuntimeError: CUDA out of memory
====== 1 failed, 1 passed, 1 skipped, 500 deselected, 1 error in 93.21s (0:01:33) ======
"""


def test_pytest_summary_names_every_failed_and_erroring_test_once():
    summary = device_report.pytest_summary(FINISHED_LOG)
    assert summary["finished"]
    assert summary["counts"] == {"failed": 1, "passed": 1, "skipped": 1, "deselected": 500, "error": 1}
    assert summary["failed"] == [
        "FAILED tests/test_ops_kv.py::test_write_kv_on_cuda[dtype1]",
        "ERROR tests/test_runner.py::test_runner_on_cuda",
    ]


def test_pytest_summary_of_a_log_cut_by_a_timeout_counts_what_finished():
    cut = "\n".join(FINISHED_LOG.splitlines()[:3])  # killed before the short summary
    summary = device_report.pytest_summary(cut)
    assert not summary["finished"]
    assert summary["counts"] == {"passed": 1, "failed": 1, "error": 1}
    assert len(summary["failed"]) == 2


def write_run(out: Path, stages: dict[str, str], tables: dict[str, str]) -> None:
    """What the script leaves: table.txt sections and results.json entries."""
    text = ""
    for name, status in stages.items():
        text += f"\n== {name} (limit 60 s)\n{tables.get(name, '')}-- {name}: {status}, 3 s of 60 s\n"
        device_report.add(out / device_report.RESULTS_FILE, name, status, 3.0, 60.0, None)
    (out / device_report.TABLE_FILE).write_text(text)
    (out / "log.txt").write_text("progress\n")


def test_check_passes_a_complete_run_and_merges_stage_numbers(tmp_path):
    stage_json = tmp_path / "numbers.json"
    stage_json.write_text(json.dumps({"tok_s": 12.5}))
    out = tmp_path / "out"
    out.mkdir()
    write_run(out, {"tests": "ok", "e2e": "ok"}, {"tests": "pytest: 3 passed\n", "e2e": "a table\n"})
    device_report.add(out / device_report.RESULTS_FILE, "e2e", "ok", 4.0, 60.0, stage_json)
    assert device_report.check(out, ["tests", "e2e"], max_files=8, require_ok=True) == []
    stages = json.loads((out / device_report.RESULTS_FILE).read_text())["stages"]
    assert list(stages) == ["tests", "e2e"] and stages["e2e"]["results"] == {"tok_s": 12.5}


def test_check_names_every_problem(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    write_run(out, {"tests": "ok", "kernels": "timed out at 60 s"}, {"tests": "pytest: 3 passed\n"})
    for i in range(5):
        (out / f"extra{i}.txt").write_text("x")
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")  # 3 folders deep
    problems = device_report.check(out, ["tests", "kernels", "runtime"], max_files=8, require_ok=True)
    text = "\n".join(problems)
    assert "9 files" in text
    assert "deep.txt is more than 2 folders deep" in text
    assert "stage 'kernels' printed no table" in text
    assert "stage 'kernels': timed out at 60 s" in text
    assert "stage 'runtime' printed no table" in text and "stage 'runtime' is missing" in text
    assert "'tests'" not in text
    assert len(problems) == 6
    # without --require-ok a stage that ran but failed is reported, not a check failure
    assert len(device_report.check(out, ["tests", "kernels"], max_files=9, require_ok=False)) == 2

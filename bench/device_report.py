"""Bookkeeping of bench/device_check.sh: one JSON of every stage's numbers, the pytest
summary, and the final check of what the script leaves under $OUT.

    python -m bench.device_report add RESULTS_JSON STAGE STATUS SECONDS LIMIT [STAGE_JSON]
    python -m bench.device_report pytest PYTEST_LOG [--json PATH]
    python -m bench.device_report check OUT_DIR STAGE [STAGE ...] [--max-files 8] [--require-ok]

``add`` merges one stage's result into RESULTS_JSON (rewritten whole after each stage, so a
run killed later still leaves the stages before it). ``pytest`` prints pytest's closing
line and every FAILED / ERROR test, also from a log cut short by a timeout. ``check``
fails (exit 1, saying why) if OUT_DIR holds more than ``--max-files`` files or anything
more than two folders deep, if a stage did not print its table into OUT_DIR/table.txt,
or (``--require-ok``) if a stage's status is not ``ok``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

TABLE_FILE = "table.txt"
RESULTS_FILE = "results.json"
MAX_DEPTH = 2  # folders between OUT_DIR and a file

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")
_CLOSING = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s")
_VERBOSE_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def add(results_path: Path, stage: str, status: str, seconds: float, limit: float, stage_json: Path | None) -> None:
    """Merge one stage into the results file (created if missing)."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {"stages": {}}
    entry = {"status": status, "seconds": seconds, "limit_s": limit}
    if stage_json is not None and stage_json.exists():
        try:
            entry["results"] = json.loads(stage_json.read_text())
        except json.JSONDecodeError as error:  # a stage killed while writing
            entry["results_error"] = f"{stage_json.name}: {error}"
    results["stages"][stage] = entry
    temporary = results_path.with_name(results_path.name + ".partial")
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, results_path)


def pytest_summary(log_text: str) -> dict:
    """Counts, failing test ids and whether pytest got to its closing line."""
    lines = log_text.splitlines()
    closing = next((m.group(1) for line in reversed(lines) if (m := _CLOSING.match(line))), None)
    failed: list[str] = []
    outcomes: dict[str, int] = {}
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            failed.append(line.split(" - ")[0])
        elif m := _VERBOSE_RESULT.match(line):
            outcome = m.group(2).lower()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome in ("failed", "error"):
                failed.append(f"{m.group(2)} {m.group(1)}")
    failed = list(dict.fromkeys(failed))  # the verbose line and the short summary name one test twice
    if closing is not None:
        counts = {word.rstrip("s") if word.startswith(("error", "warning")) else word: int(n)
                  for n, word in _COUNT.findall(closing)}
    else:
        counts = outcomes
    return {"finished": closing is not None, "closing_line": closing, "counts": counts, "failed": failed}


def print_pytest(summary: dict, limit: int = 40) -> None:
    if summary["finished"]:
        print(f"pytest: {summary['closing_line']}")
    else:
        so_far = ", ".join(f"{n} {word}" for word, n in summary["counts"].items()) or "no test finished"
        print(f"pytest did not finish (time limit?): {so_far} so far")
    for item in summary["failed"][:limit]:
        print(item)
    if len(summary["failed"]) > limit:
        print(f"... and {len(summary['failed']) - limit} more (see the log)")


def check(out_dir: Path, stages: list[str], max_files: int, require_ok: bool) -> list[str]:
    """Problems with what the script left in out_dir (empty when all is well)."""
    problems = []
    files = [p for p in out_dir.rglob("*") if not p.is_dir()]
    if len(files) > max_files:
        problems.append(f"{len(files)} files under {out_dir}, at most {max_files} come back: "
                        + ", ".join(str(p.relative_to(out_dir)) for p in files))
    for path in files:
        if len(path.relative_to(out_dir).parts) - 1 > MAX_DEPTH:
            problems.append(f"{path.relative_to(out_dir)} is more than {MAX_DEPTH} folders deep")
    table_path = out_dir / TABLE_FILE
    table = table_path.read_text() if table_path.exists() else ""
    results_path = out_dir / RESULTS_FILE
    results = json.loads(results_path.read_text())["stages"] if results_path.exists() else {}
    for stage in stages:
        section = re.search(rf"^== {re.escape(stage)} .*?\n(.*?)^-- {re.escape(stage)}: ", table, re.S | re.M)
        if section is None or not section.group(1).strip():
            problems.append(f"stage {stage!r} printed no table into {TABLE_FILE}")
        status = results.get(stage, {}).get("status")
        if status is None:
            problems.append(f"stage {stage!r} is missing from {RESULTS_FILE}")
        elif require_ok and status != "ok":
            problems.append(f"stage {stage!r}: {status}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_add = commands.add_parser("add", help="merge one stage into the results JSON")
    p_add.add_argument("results", type=Path)
    p_add.add_argument("stage")
    p_add.add_argument("status")
    p_add.add_argument("seconds", type=float)
    p_add.add_argument("limit", type=float)
    p_add.add_argument("stage_json", type=Path, nargs="?")
    p_pytest = commands.add_parser("pytest", help="closing line and failing tests of a pytest log")
    p_pytest.add_argument("log", type=Path)
    p_pytest.add_argument("--json", type=Path, default=None)
    p_check = commands.add_parser("check", help="what the script left under OUT")
    p_check.add_argument("out", type=Path)
    p_check.add_argument("stages", nargs="+")
    p_check.add_argument("--max-files", type=int, default=8)
    p_check.add_argument("--require-ok", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "add":
        add(args.results, args.stage, args.status, args.seconds, args.limit, args.stage_json)
        return 0
    if args.command == "pytest":
        summary = pytest_summary(args.log.read_text(errors="replace") if args.log.exists() else "")
        print_pytest(summary)
        if args.json is not None:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    problems = check(args.out, args.stages, args.max_files, args.require_ok)
    for problem in problems:
        print(f"check: {problem}")
    if not problems:
        files = sum(1 for p in args.out.rglob("*") if not p.is_dir())
        print(f"check: {files} files under {args.out}, every stage printed its table")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

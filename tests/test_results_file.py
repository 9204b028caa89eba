"""bench/RESULTS.md stays the current table of each measure: its index resolves, every dated
history file under bench/results/ exists and is linked, no data row stands twice, and the
pre-registered text of the study "where does power sampling win?" is the text committed before
its test ran."""

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "RESULTS.md"
HISTORY = BENCH / "results"

#: The first words of each pre-registered paragraph and the start of the sha256 of the whole
#: paragraph as it was committed (the plan in e1e6738, the pass-3 rules in 67648c7, the choice,
#: the prediction and the first amendment in 5c1c632, the choice's K = M = 16 outcome in ede45be,
#: the second amendment in 97cbd64 and d7f257d).
PREREGISTERED = {
    "**The validation plan, written before any pass": "daa5b961c2a7d8ea",
    "1. **Pass 1: candidate proposal and level.**": "81b09cabaec947d7",
    "**Pass 3's remaining arms, committed before they run": "4db7a4624e566eaf",
    "**The choice (validation only": "e4e8297f24fe3052",
    "**Prediction, written before any test record**": "ea868605a6be6979",
    "**The test run.**": "13f7c5bbe722c9d8",
    "**Amendment 2, written before": "eebfb7ffa86871d2",
}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def repeated_rows(text: str) -> list[str]:
    """Table rows holding a number that stand more than once (a table's header row excepted)."""
    lines = text.splitlines()
    rows = [line for i, line in enumerate(lines)
            if line.startswith("|") and re.search(r"\d", line) and not re.fullmatch(r"[|\-: ]+", line)
            and not (i + 1 < len(lines) and re.fullmatch(r"\|[|\-: ]+", lines[i + 1]))]
    return sorted(row for row, count in Counter(rows).items() if count > 1)


def test_the_index_links_every_measure_and_each_link_lands_on_a_heading():
    text = RESULTS.read_text()
    anchors = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    # a tool's output quoted in <details> has headings of its own: they are not measures
    outside_details = re.sub(r"<details>.*?</details>", "", text, flags=re.S)
    measures = [slug(h) for h in re.findall(r"^## (.+)$", outside_details, re.M)]
    assert len(measures) >= 15
    assert sorted(set(links) - anchors) == []
    assert sorted(set(measures) - set(links)) == []  # every measure is in the index


def test_every_dated_history_file_exists_is_linked_and_links_back():
    text = RESULTS.read_text()
    linked = set(re.findall(r"\]\(results/([^)#]+)\)", text))
    files = {path.name for path in HISTORY.glob("*.md")}
    assert linked == files
    assert len(files) >= 4
    for name in files:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}\.md", name)
        history = (HISTORY / name).read_text()
        assert history.startswith(f"# {name[:-3]}\n")
        assert "](../RESULTS.md)" in history


def test_no_data_row_stands_twice_in_results():
    assert repeated_rows(RESULTS.read_text()) == []


def test_the_repeat_check_finds_a_table_pasted_twice():
    table = "| method | ms |\n|---|---:|\n| plain | 0.871 |\n| power | 2.468 |\n"
    assert repeated_rows(table) == []
    assert repeated_rows(table + "\n" + table) == ["| plain | 0.871 |", "| power | 2.468 |"]


@pytest.mark.parametrize("start", sorted(PREREGISTERED))
def test_the_preregistered_study_text_is_unchanged(start):
    paragraphs = [p for p in re.split(r"\n\s*\n", RESULTS.read_text()) if p.startswith(start)]
    assert len(paragraphs) == 1, f"{start!r} must open exactly one paragraph of bench/RESULTS.md"
    assert hashlib.sha256(paragraphs[0].encode()).hexdigest()[:16] == PREREGISTERED[start]

"""The docs cannot rot unseen: README.md and every page of docs/ are read, and

- every command is parsed by the parser that would run it: ``powerfast ...`` (also
  ``.venv/bin/powerfast``, ``python -m powerfast.cli`` and ``torchrun ... -m powerfast.cli``) by
  ``powerfast.cli.build_parser``, with the method settings of ``sample`` and ``eval`` checked as the
  command checks them before loading a model; ``python -m powerfast.evaluation.fidelity`` as
  ``powerfast fidelity``; ``python bench/<x>.py ...``, ``python -m bench.<x> ...`` and
  ``torchrun ... bench/<x>.py ...`` by that module's ``build_parser()``. Commands are the lines of
  bash / sh / shell / console fences (after joining ``\\`` continuations), the ``$ `` lines of
  other fences, and inline code spans that start like a command and hold an option; an inline span holding a
  placeholder (``...``, ``|``, ``[``, ``<``, or an upper-case word such as PROMPT) is a grammar,
  not a command, and is not parsed. Other programs' lines (pip, curl, ray, nsys options) are not
  parsed.
- every ```python fence runs in a fresh interpreter, unless the line right before the fence is
  ``<!-- not run: REASON -->``; a mark without a reason fails. A fence right after a snippet
  whose preceding line is ``<!-- output of the snippet above -->`` must be exactly what the
  snippet prints.
- mkdocs.yml's navigation lists every page of docs/ and only those, and every include of a
  README section (``--8<-- "README.md:NAME"``, one copy of the set-up commands) names a section
  that README.md marks with ``[start:NAME]`` and ``[end:NAME]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
OUTPUT_MARK = "<!-- output of the snippet above -->"
# bench scripts the lab package takes over (bench/lab/<name>.py, run as python -m bench.lab.<name>):
# while one still sits at bench/<name>.py without build_parser(), only its existence is checked
LAB_SCRIPTS = {"study", "adaptive", "score_completions"}
WRAPPERS = ("torchrun", "nsys")


@dataclass
class Fence:
    path: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str | None  # the line right before the fence, if it is an HTML comment
    before: list[str]  # the two lines before the fence


def fences(text: str, path: str = "<text>") -> list[Fence]:
    """Every fenced block of a Markdown text (indented fences too, as in a list)."""
    lines = text.splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = re.match(r"^(\s*)```\s*([\w-]*)", lines[index])
        if not opening:
            index += 1
            continue
        indent, lang = opening.group(1), opening.group(2).lower()
        start = index
        index += 1
        body = []
        while index < len(lines) and not re.match(rf"^{indent}```\s*$", lines[index]):
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        previous = lines[start - 1].strip() if start else ""
        found.append(Fence(path, start + 1, lang, "\n".join(body) + "\n",
                           previous if previous.startswith("<!--") else None,
                           [line.strip() for line in lines[max(0, start - 2):start]]))
        index += 1
    return found


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation": the line goes on
        return True
    return False


def _logical_lines(text: str) -> list[str]:
    """Lines with their ``\\`` continuations, and quotes that span lines, joined."""
    joined, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if _open_quote(pending + line):
            pending += line + "\n"
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


_STARTS = re.compile(r"^(\.venv(-vllm)?/bin/)?(powerfast|python3?|torchrun)\s")
_PLACEHOLDER = re.compile(r"\.\.\.|\||\[|<|\b[A-Z]{2,}[A-Z_]*\b")


def commands(text: str, path: str = "<text>") -> list[tuple[str, str]]:
    """(where, command) of every command of a Markdown text (see the module's docstring)."""
    found = []
    for fence in fences(text, path):
        for line in _logical_lines(fence.text):
            stripped = line.strip()
            if fence.lang in SHELL:
                stripped = stripped[2:] if stripped.startswith("$ ") else stripped
            elif fence.lang in ("", "text") and stripped.startswith("$ "):
                stripped = stripped[2:]
            else:
                continue
            if stripped and not stripped.startswith("#"):
                found.append((f"{path}:{fence.line}", stripped))
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if _STARTS.match(span + " ") and " -" in span and not _PLACEHOLDER.search(span):
            found.append((f"{path} (inline)", span))
    return found


def _segments(command: str) -> list[list[str]]:
    words = shlex.split(command, comments=True)
    segments, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    return [s for s in segments + [current] if s]


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """Parse as the program would; argparse's exit becomes a ValueError with its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit as stop:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {stop.code}")


def _check_powerfast(args: list[str]) -> None:
    from powerfast import cli

    parsed = _parse(cli.build_parser(args), args)
    if parsed.command == "sample":
        cli.method_settings(parsed.method, parsed)
    elif parsed.command == "eval":
        for method in [m for m in parsed.methods.split(",") if m]:
            cli.method_settings(method, parsed)


def _check_bench(module: str, args: list[str]) -> None:
    """``module`` is bench.<x> or bench.lab.<x>."""
    name = module.split(".")[-1]
    relative = Path(*module.split(".")).with_suffix(".py")
    if not (ROOT / relative).is_file():
        raise ValueError(f"{relative} does not exist")
    loaded = importlib.import_module(module)
    if not hasattr(loaded, "build_parser"):
        if name in LAB_SCRIPTS and module == f"bench.{name}":
            return  # the lab package gives it build_parser() where it moves it
        raise ValueError(f"{module} has no build_parser()")
    _parse(loaded.build_parser(), args)


def check_command(command: str) -> str | None:
    """None if every program of ``command`` that is ours parses its arguments, else the error."""
    try:
        for words in _segments(command):
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the program
                words = words[1:]
            if not words:
                continue
            program = Path(words[0]).name
            rest = words[1:]
            if program in WRAPPERS:  # torchrun / nsys profile: skip their options (each "--name value" or "--name=value")
                rest = rest[1:] if program == "nsys" else rest
                while rest and rest[0].startswith("-") and rest[0] != "-m":
                    rest = rest[1:] if "=" in rest[0] else rest[2:]
                if program == "torchrun":  # then a script or -m module, as python takes them
                    program = "python"
                else:  # nsys: then the program it runs
                    program, rest = (Path(rest[0]).name, rest[1:]) if rest else ("", [])
            if program == "powerfast":
                _check_powerfast(rest)
            elif program in ("python", "python3"):
                if rest[:2] == ["-m", "powerfast.cli"]:
                    _check_powerfast(rest[2:])
                elif rest[:2] == ["-m", "powerfast.evaluation.fidelity"]:
                    _check_powerfast(["fidelity", *rest[2:]])
                elif len(rest) >= 2 and rest[0] == "-m" and rest[1].startswith("bench."):
                    _check_bench(rest[1], rest[2:])
                elif rest and re.fullmatch(r"bench/(\w+/)*\w+\.py", rest[0]):
                    _check_bench(rest[0][:-3].replace("/", "."), rest[1:])
    except (ValueError, ImportError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def snippets(text: str, path: str = "<text>") -> list[tuple[Fence, str | None]]:
    """(fence, expected output or None) of every ```python fence that runs; a ValueError for a
    not-run mark without a reason."""
    found = []
    all_fences = fences(text, path)
    for index, fence in enumerate(all_fences):
        if fence.lang != "python":
            continue
        if fence.mark and fence.mark.startswith("<!-- not run"):
            reason = NOT_RUN.match(fence.mark)
            if not reason or not reason.group(1).strip():
                raise ValueError(f"{path}:{fence.line}: a not-run mark needs a reason: {fence.mark}")
            continue
        expected = None
        following = all_fences[index + 1] if index + 1 < len(all_fences) else None
        if following is not None and following.mark == OUTPUT_MARK:
            expected = following.text
        found.append((fence, expected))
    return found


def run_snippet(code: str, cwd: Path) -> tuple[bool, str]:
    """(exit status 0, stdout + stderr) of ``code`` in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    return proc.returncode == 0, proc.stdout + proc.stderr


def _read(path: Path) -> str:
    return path.read_text()


ALL_COMMANDS = [(where, command) for path in DOCS for where, command in commands(_read(path), path.relative_to(ROOT).as_posix())]
ALL_SNIPPETS = [(f"{fence.path}:{fence.line}", fence.text, expected)
                for path in DOCS for fence, expected in snippets(_read(path), path.relative_to(ROOT).as_posix())]


def test_the_docs_hold_commands_and_snippets():
    # the reader found what it must: the README's commands and the site's snippets
    assert sum("README.md" in where for where, _ in ALL_COMMANDS) >= 4
    assert any(cmd.startswith("python bench/") for _, cmd in ALL_COMMANDS)
    assert len(ALL_SNIPPETS) >= 2 and len(DOCS) >= 10


@pytest.mark.parametrize("where, command", ALL_COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in ALL_COMMANDS])
def test_every_command_parses(where, command):
    assert check_command(command) is None, f"{where}: {command}\n{check_command(command)}"


@pytest.mark.parametrize("where, code, expected", ALL_SNIPPETS, ids=[w for w, _, _ in ALL_SNIPPETS])
@pytest.mark.slow
def test_every_python_snippet_runs(where, code, expected, tmp_path):
    ok, output = run_snippet(code, tmp_path)
    assert ok, f"{where} failed:\n{output[-3000:]}"
    if expected is not None:
        assert output == expected, f"{where} printed\n{output}\nnot what the page shows:\n{expected}"


def test_the_navigation_lists_every_page():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material" and config.get("docs_dir", "docs") == "docs"

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    listed = list(pages(config["nav"]))
    assert sorted(listed) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(listed) == len(set(listed))


def test_every_include_names_a_marked_section():
    includes = [(page.name, file, section) for page in DOCS[1:]
                for file, section in re.findall(r'^--8<-- "([^":]+):(\w+)"$', _read(page), re.M)]
    assert ("getting-started.md", "README.md", "setup") in includes
    for page, file, section in includes:
        text = _read(ROOT / file)
        start, end = text.find(f"--8<-- [start:{section}]"), text.find(f"--8<-- [end:{section}]")
        assert 0 <= start < end, f"{page} includes {file}:{section}, which {file} does not mark"
        assert "```" in text[start:end]


def test_the_readme_is_a_front_door():
    readme = _read(ROOT / "README.md")
    assert len(readme.splitlines()) <= 200
    first = fences(readme)[0]
    assert first.lang == "bash" and "mkdocs serve" in readme
    setup = [c for c in _logical_lines(first.text) if c.strip() and not c.startswith("#")]
    assert len(setup) == 2 and len(first.text.splitlines()) >= 2 * 5  # two commands, each broken over lines
    assert setup[0].strip().split("&&")[-1].split()[0].endswith("powerfast")
    assert setup[1].strip().endswith(".venv/bin/python -m pytest")


# the checker itself: a bad command, a bad snippet and a mark without a reason are caught

def test_the_checker_catches_bad_commands():
    assert check_command("powerfast sample 'hi' --seed 0 --max-new-tokens 8") is None
    assert "invalid choice" in check_command("powerfast smaple 'hi'")
    assert "unrecognized arguments: --no-such-flag" in check_command("powerfast sample 'hi' --no-such-flag")
    assert "alpha" in check_command("powerfast sample 'hi' --alpha 0")  # a setting checked before any model
    assert "invalid choice" in check_command("powerfast eval --task arithmetic --methods plain --preset nope")
    assert "unrecognized" in check_command(".venv/bin/pip install x && .venv/bin/powerfast toy --no-bias")
    assert "unrecognized" in check_command("torchrun --nproc-per-node 2 -m powerfast.cli serve --no-such-port 8000")
    assert "unrecognized" in check_command("torchrun --nproc-per-node 3 bench/tp_guard.py --no-such-flag")
    assert "unrecognized" in check_command("python -m powerfast.evaluation.fidelity --drows 10")
    assert "unrecognized" in check_command("python bench/e2e.py --model tiny --no-such-flag")
    assert "invalid choice" in check_command("python -m bench.e2e --model huge")
    assert "does not exist" in check_command("python bench/no_such_script.py --quick")
    assert "does not exist" in check_command("python -m bench.lab.no_such_study --out x")
    assert "unrecognized" in check_command("nsys profile --trace=cuda,nvtx -o timeline powerfast toy --no-bias")
    assert check_command("curl -s http://127.0.0.1:8000/health") is None  # not ours: not parsed


def test_the_checker_finds_commands_where_they_are():
    text = ("Run `powerfast toy --bias` or `powerfast profile PROMPT ...`.\n\n"
            "```bash\n# a comment\n.venv/bin/powerfast sample \"x\" \\\n    --seed 1\n```\n\n"
            "```\n$ powerfast toy\nToy problem of the paper\n#### 51\n```\n")
    assert [c for _, c in commands(text)] == ['.venv/bin/powerfast sample "x"      --seed 1', "powerfast toy",
                                              "powerfast toy --bias"]


def test_the_checker_catches_bad_snippets(tmp_path):
    page = ("```python\nprint(1 + 1)\n```\n\n" + OUTPUT_MARK + "\n```\n2\n```\n\n"
            "```python\nraise SystemExit(3)\n```\n\n"
            "<!-- not run: needs a GPU -->\n```python\nimport torch; torch.zeros(1, device='cuda')\n```\n")
    found = snippets(page)
    assert [(fence.text, expected) for fence, expected in found] == [("print(1 + 1)\n", "2\n"),
                                                                     ("raise SystemExit(3)\n", None)]
    assert run_snippet(found[0][0].text, tmp_path) == (True, "2\n")
    ok, _ = run_snippet(found[1][0].text, tmp_path)
    assert not ok
    ok, output = run_snippet("import powerfast.no_such_module\n", tmp_path)
    assert not ok and "ModuleNotFoundError" in output
    with pytest.raises(ValueError, match="needs a reason"):
        snippets("<!-- not run: -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        snippets("<!-- not run -->\n```python\nprint(1)\n```\n")

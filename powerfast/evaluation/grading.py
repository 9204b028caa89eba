"""Answer extraction and grading: boxed answers, math-verify equality, choice letters, and
HumanEval programs run in a subprocess with a time limit.

The graders need the ``eval`` extra: ``pip install 'powerfast[eval]'``.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterable

# ---------------------------------------------------------------------------------------
# Optional dependencies (the eval extra)

EVAL_EXTRA_HINT = "pip install 'powerfast[eval]'"


def _require(module: str):
    """Import an optional dependency of the ``eval`` extra, with an install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"powerfast.evaluation needs {module!r}: {EVAL_EXTRA_HINT}") from exc


# ---------------------------------------------------------------------------------------
# Answer extraction and grading

#: A code completion is cut at the first of these (all at column 0): whatever follows the
#: function body (another function, a class, a main block, a print, a comment) is dropped.
CODE_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass(frozen=True)
class Grade:
    """The answer extracted from a completion and whether it is correct."""

    answer: str | None
    correct: bool


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in text.

    Braces are matched with nesting, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.
    ``\\boxed 5`` (no braces) gives the token up to the next space or ``$``. Returns None
    when there is no box or the last one is never closed (a truncated generation).
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = j = matches[-1].end()
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{" and text[k - 1] != "\\":
                depth += 1
            elif text[k] == "}" and text[k - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip()
        return None
    if j == i:  # neither a brace nor a space after the command
        return None
    token = re.match(r"[^\s$]+", text[j:])
    return token.group(0) if token else None


def _math_verify_kwargs() -> tuple[dict, dict]:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _normalise_plain(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,;!: ]|\\left|\\right|\\displaystyle|[\s$]", "", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def math_equal(answer: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference (both LaTeX), by math-verify.

    Identical strings after removing spacing, ``$`` and ``\\left``/``\\right`` count as equal
    first (for answers math-verify cannot parse, like plain words).
    """
    if _normalise_plain(answer) == _normalise_plain(reference):
        return True
    mv = _require("math_verify")
    parse_kw, verify_kw = _math_verify_kwargs()
    try:
        gold = mv.parse("$" + reference + "$", **parse_kw)
        pred = mv.parse("\\boxed{" + answer + "}", **parse_kw)
        return bool(gold) and bool(pred) and bool(mv.verify(gold, pred, **verify_kw))
    except Exception:  # a grader crash is a wrong answer, never a crashed run
        return False


def choice_letter(answer: str | None) -> str | None:
    """The letter A-D of a boxed multiple-choice answer (``B``, ``(B)``, ``\\text{B}``, ``B) ...``)."""
    if answer is None:
        return None
    s = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    m = re.fullmatch(r"\(?([A-Da-d])\)?(?:[.):]\s*.*)?", s, flags=re.DOTALL)
    return m.group(1).upper() if m else None


def truncate_code(completion: str, stops: Iterable[str] = CODE_STOP_SEQUENCES) -> str:
    """Cut a code completion at the first stop sequence (see :data:`CODE_STOP_SEQUENCES`)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def run_python(program: str, timeout: float = 10.0) -> bool:
    """Run ``program`` in a fresh ``python`` subprocess in a temporary directory.

    True when it runs to its end within ``timeout`` seconds: the exit status is 0 and a
    random marker printed after the program's last line is the last line of its output
    (so an early ``sys.exit(0)`` inside the code under test is a failure, not a pass).
    On timeout the whole process group is killed. This isolates a run from the caller
    (own process, own directory, minimal environment) but it is not a sandbox: the code
    runs with the caller's permissions.
    """
    marker = "powerfast-done-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="powerfast-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program + f"\n\nprint({marker!r}, flush=True)\n")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        with open(os.path.join(tmp, "stdout.txt"), "w+b") as stdout:
            proc = subprocess.Popen(
                [sys.executable, "-I", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            finally:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            stdout.seek(max(0, os.fstat(stdout.fileno()).st_size - 256))
            tail = stdout.read().decode("utf-8", "replace").rstrip().splitlines()
        return status == 0 and bool(tail) and tail[-1] == marker




# ---------------------------------------------------------------------------------------
# Exact integer answers

# A number as written in a completion: an optional minus sign (not when it follows a letter,
# a digit or ')', where it is the operator of "12-5"), then digits with optional thousands
# commas ("1,000") and an optional decimal part ("2.5", "14.0"); never the tail of a longer
# number. A '.' with no digit after it ("22.") ends the sentence, not the number.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?")

# A marker of a result: "=", the word "is", "equals" or "equal to", then only spaces, ':',
# '*' (Markdown bold) or '$' before the number.
_RESULT = re.compile(r"(?:=|\bis\b|\bequals\b|\bequal to\b)[\s:*$]*")

# What makes a number the start of an expression rather than a result ("is 5 + 17 = 22").
_OPERATOR_AFTER = re.compile(r"\s*(?:[-+*/×÷^]|(?:x|times|plus|minus|divided)\b)")


def _number_value(token: str) -> int | None:
    value = token.replace(",", "")
    if "." in value:
        whole, fraction = value.split(".")
        if fraction.strip("0"):
            return None  # "2.5" is not an integer
        value = whole
    return int(value)


def _marked_number(text: str, markers: re.Pattern) -> int | None:
    """The first number right after a match of ``markers`` that does not start an expression,
    else the last number, else None (the rule of :func:`integer_answer` and :func:`stated_answer`)."""
    text = text.replace("\u2212", "-")
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    starts = {m.start(): m for m in numbers}
    for marker in markers.finditer(text):
        number = starts.get(marker.end())
        if number is not None and not _OPERATOR_AFTER.match(text, number.end()):
            return _number_value(number.group(0))
    return _number_value(numbers[-1].group(0))


_STATED = re.compile(r"\banswer\s*(?:is|:|=)[\s:*$]*", re.IGNORECASE)


def stated_answer(text: str) -> int | None:
    """The integer a worked-steps completion states as its answer, or None.

    The number right after the first ``answer is`` (or ``answer:``, ``answer =``; any case;
    only spaces, ``:``, ``*`` or ``$`` in between) that does not start an expression (is not
    followed by an operator, as in :func:`integer_answer`): ``"2 + 3 = 5. 5 * 4 = 20. The
    answer is 20."`` gives 20, where :func:`integer_answer` would take the first step's 5, and
    ``"The answer is 5 * 3 = 15. ... The answer is 13."`` gives 13. Without
    such a statement, the last number in the text (a completion cut by the budget mid-way
    is then usually wrong, as it should be); None when the text has no number. Numbers are
    read as by :func:`integer_answer`.
    """
    return _marked_number(text, _STATED)


def integer_answer(text: str) -> int | None:
    """The integer a completion gives as its answer, or None.

    The rule, in order:

    1. The first number that directly follows a result marker (``=``, ``is``, ``equals``,
       ``equal to``; only spaces, ``:``, ``*`` or ``$`` in between) and is not itself
       followed by an operator (``+ - * / × ÷ ^``, ``x``, ``times``, ``plus``, ``minus``,
       ``divided``), which would make it the start of an expression: ``"12 - 5 is 7"``
       gives 7, ``"The sum is 5 + 17 = 22"`` gives 22.
    2. Otherwise the last number in the text.
    3. None when the text has no number.

    Numbers: ``-5`` is negative unless the ``-`` follows a letter, a digit or ``)`` (then it
    is a minus operator: ``"12-5"`` holds 12 and 5); ``1,000`` is one thousand; a trailing
    ``.`` ends the sentence (``"22."`` is 22); ``14.0`` is 14; a number with a nonzero
    decimal part (``2.5``) is not an integer, and the answer is None when the rule picks
    it. The Unicode minus ``−`` counts as ``-``. Words ("twelve") are not numbers.
    """
    return _marked_number(text, _RESULT)

"""A study: named arms of ``powerfast eval`` on one task, compute-matched best-of-N and sir, one comparison.

A study is a small JSON spec (or the same as a Python dict)::

    {
      "task": "math500",                 # or a .json/.jsonl file, as for powerfast eval --task
      "seeds": [0, 1],                   # or "0,1" (default [0])
      "limit": 50,                       # first N problems (default: all)
      "concurrency": 64,                 # --concurrency of every arm (default: eval's)
      "settings": {"model": "path/to/model", "max_new_tokens": 3072},   # every arm's flags
      "baseline": "plain",               # the arm the comparison tests the others against
      "match_best_of_n": false,          # true: every power, mcmc and smc arm; or a list of arm names
      "match_sir": false,                # the same forms, for compute-matched sir
      "arms": [
        {"name": "plain", "method": "plain"},
        {"name": "power-a4", "method": "power", "settings": {"alpha": 4}, "match_best_of_n": true,
         "match_sir": true},
        {"name": "power-a8", "method": "power", "settings": {"alpha": 8, "block_size": 96}}
      ]
    }

Settings are the flags of ``powerfast eval``, by setting name (``num_candidates``) or by
flag (``candidates``, ``block-size``): a value becomes ``--flag value``, ``true`` a bare
``--flag`` (a bool setting: its flag when the value is not its default), ``false`` or
``null`` nothing. An arm's settings override the common ones.

Each arm runs as its own ``powerfast eval`` invocation (in this process, its output on
stderr) into ``STUDY_DIR/arms/<name>/``, so a rerun of the study resumes every arm: an arm
whose units (the first ``limit`` problems x the seeds) are all recorded is skipped without
loading the model, an arm stopped half-way redoes only its missing units.
``STUDY_DIR/arms/<name>/arm.json`` keeps what made an arm's samples (its method, the
settings that method reads, the model, dtype, ``max_new_tokens``, ``ignore_eos`` and
``no_chat_template``); rerunning an arm that has records with any of them changed is an
error naming the change (remove its folder or rename the arm). Settings a method does not
read (``alpha`` for ``plain``) may change freely.

Compute-matched best-of-N: for an arm marked ``match_best_of_n`` the study runs the plain
arm first (``"plain_arm"`` names it; default the arm named ``plain``, else the only arm of
method ``plain``), then the arm, then ``best-of-n`` as the arm ``bon-for-<arm>`` with
``num_samples = max(1, floor(ratio + 1/2))``, ``ratio`` the arm's mean decoded tokens per
problem over the plain arm's (or the ``"sample_arm"``'s, below) (means over the study's units; a record without
``decoded_tokens`` counts its ``num_tokens``, as ``powerfast compare`` does): the nearest
integer, halves rounded up (20.5 gives 21). Best-of-N draws N samples of plain decoding,
so its compute is about N times plain's; it runs with the common settings and the plain
arm's (``temperature`` included). ``STUDY_DIR/manifest.json`` records the arms, their
commands, their decoded tokens per problem, and per match the two means, the ratio and N.

A plain arm stops at a task's stop strings; a best-of-N or sir sample runs to EOS or
``max_new_tokens`` (its weight reads the whole sample), so on a few-shot task one sample
costs more than a plain problem and the plain ratio would give too large an N. ``"sample_arm":
"<name>"`` names an arm of method ``best-of-n`` with ``num_samples`` k >= 2 (at k = 1 the one
sample streams and stops at stop strings, as plain does); it runs right after the plain arm,
one sample's cost is its decoded tokens per problem over k, and N is the arm's decoded tokens
over that (the manifest's match says ``sample_arm``).

Compute-matched sir: ``match_sir`` (the same forms as ``match_best_of_n``, on an arm or on
the spec) adds the arm ``sir-for-<arm>`` after the arm (and after its best-of-N when both are
asked for): ``sir`` (sampling-importance-resampling: N plain samples, one of them drawn by
p^alpha / q) with the same N, the plain arm's settings and the arm's ``alpha`` (its own, else
the common one, else the default, as the arm has), so it targets the arm's p^alpha at the
arm's decoded tokens. The manifest's match of an arm names each of its baselines
(``bon_arm``, ``sir_arm``); N is computed once per arm for both.

Matched arms with the same N (and, for sir, the same alpha) draw the same samples (same
seeds, same settings), so an arm with no records whose command, but for its name, is an
arm's already finished copies that arm's record files instead of running (the manifest says
``copied_from``): power arms that differ only in the rollout estimator usually decode about
the same tokens and share one best-of-N (and one sir).

Then ``STUDY_DIR/combined/<task>/<arm>-seed<seed>.jsonl`` is rebuilt from the arms'
records of the study's units, each record's ``method`` set to the arm's name (the arms'
own files are never modified), and ``powerfast compare`` runs on ``STUDY_DIR/combined``
(baseline ``--baseline``, else the spec's ``baseline``, else ``plain``): the table goes to
``STUDY_DIR/comparison.txt`` and stdout, ``comparison.json`` and
``accuracy_vs_decoded_tokens.png`` into the combined task folder.

    python -m bench.lab.study study.json --out runs/study [--baseline plain] [--dry-run]

``--dry-run`` prints each arm, how many of its units are recorded, and its
``powerfast eval`` command (a matched best-of-N's or sir's ``--num-samples`` once both means
are known, ``<N>`` before), and runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["MATCHED_BASELINES", "Arm", "MatchedBaseline", "Study", "arm_argv", "arm_identity", "choose_num_samples",
           "build_parser", "combine", "identity_changes", "load_spec", "main", "matched_arm", "matched_num_samples",
           "mean_decoded_tokens", "read_arm_records", "run_study", "settings_argv"]

#: Arms whose method is one of these are matched when ``match_best_of_n`` (``match_sir``) is ``true``.
POWER_METHODS = ("power", "mcmc", "smc")


@dataclass(frozen=True)
class MatchedBaseline:
    """A compute-matched baseline: the spec key that asks for it (on an arm or on the spec),
    the :class:`Arm` flag it sets, the short name of its arms (``<short>-for-<arm>``, the
    manifest's ``<short>_arm``) and the method they run."""

    key: str
    flag: str
    short: str
    method: str

    def arm_name(self, arm_name: str) -> str:
        return f"{self.short}-for-{arm_name}"


#: The compute-matched baselines, in the order they run after their arm: best-of-N keeps the
#: likeliest of N plain samples; sir draws one of them by p^alpha / q at the arm's alpha.
MATCHED_BASELINES = (MatchedBaseline("match_best_of_n", "match", "bon", "best-of-n"),
                     MatchedBaseline("match_sir", "match_sir", "sir", "sir"))
#: Flags the study itself sets on every arm's command.
_RESERVED = {"task", "methods", "out", "seeds", "limit", "concurrency"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_RESULTS_FILE = re.compile(r".+-seed-?\d+\.jsonl")


# ---------------------------------------------------------------------------------------
# The pure part: tokens, N, flags, records


def mean_decoded_tokens(records: Iterable[Mapping]) -> float:
    """Mean decoded tokens per record (one record: one problem and seed): a record's
    ``decoded_tokens``, or its ``num_tokens`` when it has none. ValueError for no record."""
    from powerfast.evaluation.runs import decoded_tokens

    counts = [decoded_tokens(r)[0] for r in records]
    if not counts:
        raise ValueError("no records to average decoded tokens over")
    return sum(counts) / len(counts)


def choose_num_samples(ratio: float) -> int:
    """``max(1, floor(ratio + 1/2))``: the nearest integer, halves rounded up, at least 1."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"the compute ratio must be a finite number >= 0, got {ratio!r}")
    return max(1, math.floor(ratio + 0.5))


def matched_num_samples(arm_records: Iterable[Mapping], plain_records: Iterable[Mapping],
                        samples_per_record: int = 1) -> dict[str, float | int]:
    """The best-of-N matching an arm's compute: ``{"arm_tokens_per_problem",
    "plain_tokens_per_problem", "ratio", "num_samples"}`` from the two arms' records; with
    ``samples_per_record`` k the second arm's records hold k samples each (a best-of-k arm),
    and one sample's cost is their mean over k."""
    arm = mean_decoded_tokens(arm_records)
    plain = mean_decoded_tokens(plain_records) / samples_per_record
    if plain <= 0:
        raise ValueError(f"the plain arm decoded {plain} tokens per problem: no ratio to match")
    ratio = arm / plain
    return {"arm_tokens_per_problem": arm, "plain_tokens_per_problem": plain, "ratio": ratio,
            "num_samples": choose_num_samples(ratio)}


def _settings_by_option() -> dict[str, Any]:
    from powerfast.core.config import SETTINGS

    return {s.option[2:].replace("-", "_"): s for s in SETTINGS.values() if s.kind is not bool}


def canonical_key(key: str) -> str:
    """A setting's name for its name or flag (``candidates`` -> ``num_candidates``), else the
    flag with underscores (``--max-new-tokens`` -> ``max_new_tokens``)."""
    from powerfast.core.config import SETTINGS

    name = str(key).lstrip("-").replace("-", "_")
    if name in SETTINGS:
        return name
    setting = _settings_by_option().get(name)
    return setting.name if setting is not None else name


def canonical_settings(settings: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"{where}: settings must be an object, got {settings!r}")
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = canonical_key(key)
        if name in _RESERVED:
            raise ValueError(f"{where}: {key!r} is set by the study itself (its own key), not a setting")
        if name in out:
            raise ValueError(f"{where}: {key!r} names a setting given twice")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: setting {key!r} must be a number, a string or a bool, got {value!r}")
        out[name] = value
    return out


def settings_argv(settings: Mapping[str, Any]) -> list[str]:
    """The ``powerfast eval`` flags of canonical settings (see the module)."""
    from powerfast.core.config import SETTINGS

    argv: list[str] = []
    for name, value in settings.items():
        if value is None:
            continue
        setting = SETTINGS.get(name)
        if setting is not None and setting.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"setting {name} must be true or false, got {value!r}")
            if value != setting.default:
                argv.append(setting.option)
            continue
        flag = setting.option if setting is not None else "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            continue
        argv += [flag, str(value)]
    return argv


def _read_records(path: Path) -> list[dict]:
    """The records of a results file, read only: first record of an id wins, a partial last
    line (an interrupted write) is left out."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    records: dict[str, dict] = {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not a sample record")
        except ValueError as exc:
            if i == last:
                continue
            raise ValueError(f"{path}: malformed line {i + 1}: {exc}") from None
        records.setdefault(str(record["id"]), record)
    return list(records.values())


def read_arm_records(arm_dir: str | Path, task_name: str, method: str, seeds: Sequence[int],
                     problem_ids: Sequence[str] | None = None) -> dict[int, list[dict]]:
    """{seed: records} of one arm (``arm_dir/<task>/<method>-seed<seed>.jsonl``); with
    ``problem_ids``, only those problems, in that order."""
    out = {}
    for seed in seeds:
        records = _read_records(Path(arm_dir) / task_name / f"{method}-seed{seed}.jsonl")
        if problem_ids is not None:
            by_id = {str(r["id"]): r for r in records}
            records = [by_id[str(pid)] for pid in problem_ids if str(pid) in by_id]
        out[seed] = records
    return out


def combine(study_dir: str | Path, task_name: str, arms: Sequence[tuple[str, str]], seeds: Sequence[int],
            problem_ids: Sequence[str] | None = None) -> list[Path]:
    """Rebuild ``study_dir/combined/<task>/<name>-seed<seed>.jsonl`` from the arms
    ``(name, method)`` (records of ``study_dir/arms/<name>``), each record's ``method`` set
    to the arm's name; results files already there are removed first. Returns the files."""
    folder = Path(study_dir) / "combined" / task_name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file() and _RESULTS_FILE.fullmatch(old.name):
            old.unlink()
    written = []
    for name, method in arms:
        for seed, records in read_arm_records(Path(study_dir) / "arms" / name, task_name, method, seeds,
                                              problem_ids).items():
            if not records:
                continue
            path = folder / f"{name}-seed{seed}.jsonl"
            with open(path, "w", encoding="utf-8") as out:
                for record in records:
                    out.write(json.dumps({**record, "method": name}, ensure_ascii=False) + "\n")
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# The spec


@dataclass
class Arm:
    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    match: bool = False  # match_best_of_n: followed by bon-for-<name>
    match_sir: bool = False  # match_sir: followed by sir-for-<name>
    matched_to: str | None = None  # a bon-for-<arm> or sir-for-<arm>: the arm it matches

    def baselines(self) -> list[MatchedBaseline]:
        """The compute-matched baselines this arm is followed by."""
        return [b for b in MATCHED_BASELINES if getattr(self, b.flag)]


@dataclass
class Study:
    task: str
    seeds: list[int]
    limit: int | None
    concurrency: int | None
    settings: dict[str, Any]
    arms: list[Arm]
    baseline: str
    plain_arm: str | None
    sample_arm: str | None = None  # whose decoded tokens per problem are one matched sample's cost

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _seeds(value) -> list[int]:
    if value is None:
        return [0]
    if isinstance(value, str):
        value = [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError(f"seeds must be a non-empty list of ints, got {value!r}")
    try:
        seeds = [int(x) for x in value if not isinstance(x, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be a non-empty list of ints, got {value!r}") from None
    if len(seeds) != len(value) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, got {value!r}")
    return seeds


def _positive_or_none(spec: Mapping, key: str) -> int | None:
    value = spec.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    return value


def load_spec(spec: Mapping | str | Path, baseline: str | None = None) -> Study:
    """The validated study of a spec (a dict, or the path of its JSON file); ``baseline``
    overrides the spec's."""
    from powerfast.core.config import METHODS

    if not isinstance(spec, Mapping):
        spec = json.loads(Path(spec).read_text(encoding="utf-8"))
    keys = [b.key for b in MATCHED_BASELINES]
    known = {"task", "seeds", "limit", "concurrency", "settings", "arms", "baseline", "plain_arm", "sample_arm",
             *keys}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in the study: {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
    if not isinstance(spec.get("task"), str) or not spec["task"]:
        raise ValueError("the study needs a task (a name or a file, as for powerfast eval --task)")
    arms = []
    raw_arms = spec.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ValueError("the study needs a non-empty list of arms")
    for i, raw in enumerate(raw_arms):
        if not isinstance(raw, Mapping) or set(raw) - {"name", "method", "settings", *keys}:
            raise ValueError(f"arm {i}: an object with name, method, optional settings, {' and '.join(keys)}, "
                             f"got {raw!r}")
        name, method = raw.get("name"), raw.get("method")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"arm {i}: name must be letters, digits, '.', '_', '+', '-' (a file name), got {name!r}")
        if method not in METHODS:
            raise ValueError(f"arm {name}: method must be one of {', '.join(METHODS)}, got {method!r}")
        arm = Arm(name, method, canonical_settings(raw.get("settings"), f"arm {name}"))
        for kind in MATCHED_BASELINES:
            match = raw.get(kind.key, False)
            if not isinstance(match, bool):
                raise ValueError(f"arm {name}: {kind.key} must be true or false, got {match!r}")
            setattr(arm, kind.flag, match)
        arms.append(arm)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be distinct, got {', '.join(names)}")
    for kind in MATCHED_BASELINES:
        _spec_matching(spec.get(kind.key, False), kind, arms)
    plain_arm = spec.get("plain_arm")
    if plain_arm is not None and plain_arm not in names:
        raise ValueError(f"plain_arm {plain_arm!r} is not an arm: the arms are {', '.join(names)}")
    if plain_arm is None:
        plains = [a.name for a in arms if a.method == "plain"]
        plain_arm = "plain" if "plain" in names else (plains[0] if len(plains) == 1 else None)
    matched = [a for a in arms if a.baselines()]
    if matched:
        if plain_arm is None:
            raise ValueError("a compute-matched baseline (best-of-N, sir) needs a plain arm: name one 'plain' or "
                             "set plain_arm")
        if plain_arm in [a.name for a in matched]:
            raise ValueError(f"the plain arm {plain_arm!r} cannot be matched against itself")
        clash = [b.arm_name(a.name) for a in matched for b in a.baselines() if b.arm_name(a.name) in names]
        if clash:
            raise ValueError(f"arm name(s) {', '.join(clash)} are the names of the compute-matched baseline arms")
    sample_arm = spec.get("sample_arm")
    if sample_arm is not None:
        if sample_arm not in names:
            raise ValueError(f"sample_arm {sample_arm!r} is not an arm: the arms are {', '.join(names)}")
        one = next(a for a in arms if a.name == sample_arm)
        k = one.settings.get("num_samples")
        if one.method != "best-of-n" or isinstance(k, bool) or not isinstance(k, int) or k < 2 or one.baselines():
            raise ValueError(f"sample_arm {sample_arm!r} must be an unmatched best-of-n arm with num_samples >= 2 "
                             f"(at 1 a sample streams and stops at stop strings like plain; a matched best-of-N's "
                             f"do not), got method {one.method!r} and settings {one.settings!r}")
    chosen = baseline if baseline is not None else spec.get("baseline", "plain")
    if not isinstance(chosen, str) or not chosen:
        raise ValueError(f"baseline must be an arm's name, got {chosen!r}")
    limit = _positive_or_none(spec, "limit")
    concurrency = _positive_or_none(spec, "concurrency")
    return Study(spec["task"], _seeds(spec.get("seeds")), limit, concurrency,
                 canonical_settings(spec.get("settings"), "settings"), arms, chosen, plain_arm, sample_arm)


def _spec_matching(matching, baseline: MatchedBaseline, arms: list[Arm]) -> None:
    """Apply the spec's ``match_best_of_n`` / ``match_sir``: true (every power, mcmc and smc
    arm), false, or a list of arm names; arms marked themselves stay marked."""
    names = [a.name for a in arms]
    if matching is True:
        chosen = {a.name for a in arms if a.method in POWER_METHODS}
    elif isinstance(matching, list):
        for name in matching:
            if name not in names:
                raise ValueError(f"{baseline.key} names {name!r}, not an arm: the arms are {', '.join(names)}")
        chosen = set(matching)
    elif matching is False:
        chosen = set()
    else:
        raise ValueError(f"{baseline.key} must be true, false or a list of arm names, got {matching!r}")
    for arm in arms:
        setattr(arm, baseline.flag, getattr(arm, baseline.flag) or arm.name in chosen)


def arm_argv(study: Study, arm: Arm, study_dir: str | Path) -> list[str]:
    """The ``powerfast eval`` arguments of an arm (the settings last)."""
    argv = ["eval", "--task", study.task, "--methods", arm.method, "--seeds", ",".join(map(str, study.seeds)),
            "--out", str(Path(study_dir) / "arms" / arm.name)]
    if study.limit is not None:
        argv += ["--limit", str(study.limit)]
    if study.concurrency is not None:
        argv += ["--concurrency", str(study.concurrency)]
    return argv + settings_argv(arm_settings(study, arm))


def arm_settings(study: Study, arm: Arm) -> dict[str, Any]:
    return {**study.settings, **arm.settings}


def run_order(study: Study) -> list[Arm]:
    """The plain arm (and the sample arm) first when an arm is matched; each matched arm
    followed by its compute-matched baselines (:data:`MATCHED_BASELINES` order)."""
    order = list(study.arms)
    if any(a.baselines() for a in order):
        first = [study.arm(study.plain_arm)] + ([study.arm(study.sample_arm)] if study.sample_arm else [])
        order = first + [a for a in order if a not in first]
    return order


def matched_arm(study: Study, arm: Arm, baseline: MatchedBaseline, num_samples: int | None) -> Arm:
    """The arm ``<short>-for-<arm>`` of a compute-matched baseline: the plain arm's settings
    and N samples (``<N>`` while N is not known yet); sir also takes the arm's alpha (the
    arm's own, else the common one; None, no flag: the default, as the arm has)."""
    plain = study.arm(study.plain_arm)
    settings = {**plain.settings, "num_samples": num_samples if num_samples is not None else "<N>"}
    if baseline.method == "sir":
        settings["alpha"] = arm_settings(study, arm).get("alpha")
    return Arm(baseline.arm_name(arm.name), baseline.method, settings, matched_to=arm.name)


# ---------------------------------------------------------------------------------------
# Running


def _say(text: str) -> None:
    print(f"[study] {text}", file=sys.stderr, flush=True)


def _run_eval(argv: list[str]) -> int:
    """``powerfast eval`` in this process, its output on stderr (stdout is the comparison's)."""
    from powerfast import cli

    with contextlib.redirect_stdout(sys.stderr):
        return cli.main(argv)


def _units(study_dir: Path, task_name: str, arm: Arm, seeds, problem_ids) -> dict[int, list[dict]]:
    return read_arm_records(study_dir / "arms" / arm.name, task_name, arm.method, seeds, problem_ids)


#: Flags of powerfast eval besides the method's settings that change its samples.
_SAMPLE_FLAGS = ("model", "dtype", "max_new_tokens", "ignore_eos", "no_chat_template")


def arm_identity(argv: Sequence[str]) -> dict[str, Any]:
    """What makes an arm's samples: its method, the config the method reads (settings it
    ignores left out, the preset's defaults filled in) and the flags in ``_SAMPLE_FLAGS``,
    as ``powerfast eval`` parses ``argv``. ValueError for arguments it refuses."""
    import dataclasses

    from powerfast import cli

    try:
        args = cli.build_parser(list(argv)).parse_args(list(argv))
    except SystemExit:
        raise ValueError(f"powerfast eval refuses {shlex.join(argv)} (its message above)") from None
    config = dataclasses.asdict(cli.method_settings(args.methods, args))
    return {"method": args.methods, **{k: config[k] for k in sorted(config)},
            **{k: getattr(args, k) for k in _SAMPLE_FLAGS}}


def identity_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """The settings that differ between two identities, as ``"name=old -> new, ..."`` ("" when
    none). A setting missing from ``before`` (added to powerfast after those records were
    made) does not count while it is at its default: the records were made with that value."""
    from powerfast.core.config import SETTINGS

    def differs(key: str) -> bool:
        if key not in before and key in SETTINGS and now.get(key) == SETTINGS[key].default:
            return False
        return before.get(key) != now.get(key)

    return ", ".join(f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now)) if differs(k))


def _check_arm_config(study_dir: Path, arm: Arm, argv: list[str]) -> None:
    """ValueError when the arm has records made with another identity; else write its arm.json."""
    folder = study_dir / "arms" / arm.name
    path = folder / "arm.json"
    identity = arm_identity(argv)
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))["identity"]
        changed = identity_changes(before, identity)
        if changed and any(folder.glob(f"*/{arm.method}-seed*.jsonl")):
            raise ValueError(f"arm {arm.name} has records made with other settings ({changed}): "
                             f"remove {folder} or rename the arm")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": shlex.join(["powerfast", *argv]), "identity": identity}, indent=1) + "\n",
                    encoding="utf-8")


def run_study(spec: Mapping | str | Path, study_dir: str | Path, baseline: str | None = None,
              dry_run: bool = False, run_eval=_run_eval) -> dict:
    """Run (or, ``dry_run``, describe) a study into ``study_dir``; returns the manifest.

    ``run_eval(argv) -> exit code`` runs one ``powerfast eval`` (default: in this process).
    """
    from powerfast.evaluation.tasks import load_task

    study = load_spec(spec, baseline)
    study_dir = Path(study_dir)
    task = load_task(study.task)
    problems = task.problems[:study.limit] if study.limit is not None else list(task.problems)
    problem_ids = [str(p.id) for p in problems]
    wanted = len(problem_ids) * len(study.seeds)
    manifest: dict[str, Any] = {"task": study.task, "task_name": task.name, "seeds": study.seeds,
                                "limit": study.limit, "problems": len(problem_ids), "baseline": study.baseline,
                                "plain_arm": study.plain_arm, "arms": [], "matches": []}
    tokens: dict[str, float] = {}
    order: list[Arm] = []

    def flat(records_by_seed):
        return [r for rs in records_by_seed.values() for r in rs]

    def _finished_twin(arm: Arm, argv: list[str]) -> Arm | None:
        """An arm already done whose samples this one would repeat (same identity, all units)."""
        identity = arm_identity(argv)
        for other in order:
            if (other.method == arm.method and tokens.get(other.name) is not None
                    and arm_identity(arm_argv(study, other, study_dir)) == identity):
                return other
        return None

    def one_arm(arm: Arm) -> None:
        argv = arm_argv(study, arm, study_dir)
        command = shlex.join(["powerfast", *argv])
        records = _units(study_dir, task.name, arm, study.seeds, problem_ids)
        done = sum(len(rs) for rs in records.values())
        entry = {"name": arm.name, "method": arm.method, "settings": arm_settings(study, arm),
                 "folder": str(study_dir / "arms" / arm.name), "command": command, "units": wanted}
        if arm.matched_to is not None:
            entry["matched_to"] = arm.matched_to
        if dry_run:
            if arm.matched_to is None or "<N>" not in argv:
                arm_identity(argv)  # powerfast eval would refuse it: say so now
            print(f"{arm.name} ({arm.method}): {done}/{wanted} units recorded\n  {command}")
        elif done == wanted:
            _check_arm_config(study_dir, arm, argv)
            _say(f"arm {arm.name} ({arm.method}): {done}/{wanted} units recorded, skipped")
        elif done == 0 and (twin := _finished_twin(arm, argv)) is not None:
            _check_arm_config(study_dir, arm, argv)
            _copy_records(study_dir, task.name, twin, arm, study.seeds)
            entry["copied_from"] = twin.name
            _say(f"arm {arm.name} ({arm.method}): the same command as arm {twin.name} but its name, whose "
                 f"units are all recorded: its records copied, nothing run")
            records = _units(study_dir, task.name, arm, study.seeds, problem_ids)
            done = sum(len(rs) for rs in records.values())
        else:
            _check_arm_config(study_dir, arm, argv)
            _say(f"arm {arm.name} ({arm.method}): {done}/{wanted} units recorded, running: {command}")
            code = run_eval(argv)
            if code != 0:
                raise RuntimeError(f"arm {arm.name}: powerfast eval exited with {code}: {command}")
            records = _units(study_dir, task.name, arm, study.seeds, problem_ids)
            done = sum(len(rs) for rs in records.values())
            if done != wanted:
                raise RuntimeError(f"arm {arm.name}: {done} of {wanted} units recorded after {command}")
        if done == wanted:
            tokens[arm.name] = entry["decoded_tokens_per_problem"] = mean_decoded_tokens(flat(records))
            if not dry_run:
                _say(f"arm {arm.name}: {tokens[arm.name]:.1f} decoded tokens per problem")
        manifest["arms"].append(entry)
        order.append(arm)
        if not dry_run:
            _write_manifest(study_dir, manifest)

    for arm in run_order(study):
        one_arm(arm)
        baselines = arm.baselines()
        if not baselines:
            continue
        cost_arm = study.sample_arm or study.plain_arm  # its tokens per problem / k: one sample's cost
        num_samples = None
        if arm.name in tokens and cost_arm in tokens:
            cost_records = flat(_units(study_dir, task.name, study.arm(cost_arm), study.seeds, problem_ids))
            arm_records = flat(_units(study_dir, task.name, arm, study.seeds, problem_ids))
            per_record = study.arm(cost_arm).settings["num_samples"] if study.sample_arm else 1
            match = matched_num_samples(arm_records, cost_records, per_record)
            num_samples = match["num_samples"]
            extra = {"sample_arm": cost_arm} if study.sample_arm else {}
            manifest["matches"].append({"arm": arm.name, **{f"{b.short}_arm": b.arm_name(arm.name) for b in baselines},
                                        **match, **extra})
            say = print if dry_run else _say
            say(f"{', '.join(b.arm_name(arm.name) for b in baselines)}: ratio {match['ratio']:.3f} = "
                f"{match['arm_tokens_per_problem']:.1f} / {match['plain_tokens_per_problem']:.1f} decoded tokens per "
                f"problem ({cost_arm}{f' / {per_record}' if per_record > 1 else ''}) -> num_samples {num_samples}")
        elif not dry_run:
            raise RuntimeError(f"arm {arm.name} or {cost_arm} has no records to match")
        for baseline in baselines:
            one_arm(matched_arm(study, arm, baseline, num_samples))

    if dry_run:
        return manifest
    _write_manifest(study_dir, manifest)
    combine(study_dir, task.name, [(a.name, a.method) for a in order], study.seeds, problem_ids)
    from powerfast.evaluation.compare import compare

    comparison = compare(study_dir / "combined", baseline=study.baseline, task=task.name)
    comparison.save()
    text = str(comparison)
    (study_dir / "comparison.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    _say(f"written: {study_dir / 'manifest.json'}, {study_dir / 'comparison.txt'}, {study_dir / 'combined'}")
    return manifest


def _copy_records(study_dir: Path, task_name: str, source: Arm, target: Arm, seeds: Sequence[int]) -> None:
    """The record files of ``source`` (one per seed) copied into ``target``'s folder."""
    for seed in seeds:
        name = f"{source.method}-seed{seed}.jsonl"
        src = study_dir / "arms" / source.name / task_name / name
        dst = study_dir / "arms" / target.name / task_name / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _write_manifest(study_dir: Path, manifest: Mapping) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the study's JSON file")
    parser.add_argument("--out", required=True, metavar="STUDY_DIR", help="the study's folder (rerun to resume)")
    parser.add_argument("--baseline", default=None, metavar="ARM",
                        help="the arm the comparison tests the others against (default: the spec's, else plain)")
    parser.add_argument("--dry-run", action="store_true", help="print the arms and their commands; run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_study(args.spec, args.out, baseline=args.baseline, dry_run=args.dry_run)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

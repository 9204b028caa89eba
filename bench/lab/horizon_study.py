"""How many rollouts each horizon needs: the spread of log zeta_hat on a real model.

For a few decisions (the first token after each of a few prompts, token level: the Top-K
next tokens are the candidates), every cell (estimator, horizon H, rollouts M) draws
independent replicates of log zeta_hat for every candidate:

- ``base``: rollouts from p, weight p(s)^(alpha - 1) (the paper's);
- ``tempered``: rollouts from p at T = 1/alpha, weight prod_t sum_x p(x | h_t)^alpha;
- ``resampled``: the tempered rollouts resampled every ``resample_every`` tokens as one group
  (the product of the stage means; the same as ``tempered`` when H <= resample_every).

Each replicate is one :meth:`powerfast.samplers.power.PowerSampler.decisions` estimate (no
jackknife: the plain log mean weight). The results go to a JSONL file, one line per
replicate, as each batch of replicates finishes; a rerun with the same file skips what is
there, and draws the same numbers as an uninterrupted run would (each batch's seed is a
function of its cell and its first replicate), so the study survives being stopped.
Cells run cheapest first (M x H), so a partial run covers the small cells whole.

:func:`summarise` turns the lines into the table: per cell the standard deviation of log
zeta_hat over replicates (the mean over the candidates of all decisions), next to the
alpha x log-probability gaps between the candidates (what the estimate must resolve), and
how often the argmax of the estimated choice distribution (alpha log p + log zeta_hat) of
one replicate agrees with the reference argmax at the largest M (its replicates' mean log
zeta_hat).

    python -m bench.lab.horizon_study bench/horizon_study.jsonl [--horizons 4,8,16,32,64]
        [--rollouts 4,16,64,256] [--estimators base,tempered,resampled] [--replicates 8]
        [--max-rows 1024] [--decisions 0,1] [--seed 0] [--summary-only]

runs (or continues) the study on the embedded model, then prints the table of what the file
holds; ``--summary-only`` prints the table and runs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["STUDY_PROMPTS", "ESTIMATORS", "cells", "run_study", "read_lines", "summarise", "format_summary",
           "build_parser", "main"]

STUDY_PROMPTS = (
    "What is 17 * 23? Think step by step.",
    "What is 48 + 75?",
    "What is 9 times 8? Answer briefly.",
    "Is 91 a prime number? Explain.",
)
"""The decisions of the study: the first token of the answer to each (chat template applied)."""

ESTIMATORS = ("base", "tempered", "resampled")
PROGRESS_EVERY = 60.0  # seconds between progress lines inside one long cell


def _settings(estimator: str, resample_every: int) -> dict:
    if estimator == "base":
        return dict(rollout_proposal="base")
    if estimator == "tempered":
        return dict(rollout_proposal="tempered")
    if estimator == "resampled":
        return dict(rollout_proposal="tempered", rollout_resample_every=resample_every, rollout_groups=1)
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")


def cells(estimators: Sequence[str], horizons: Sequence[int], rollouts: Sequence[int],
          replicates: int, big_m: int = 256, big_m_replicates: int = 3) -> list[tuple[str, int, int, int]]:
    """(estimator, H, M, replicates) for every cell, cheapest first (M x H, then estimator):
    ``replicates`` each, ``big_m_replicates`` from M = ``big_m`` on."""
    for name in estimators:
        _settings(name, 8)
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2 (a spread needs two), got {replicates}")
    for what, values in (("horizons", horizons), ("rollouts", rollouts)):
        for value in values:
            if value < 1:
                raise ValueError(f"{what} must be >= 1, got {value}")
    out = [(e, h, m, big_m_replicates if m >= big_m else replicates) for e in estimators for h in horizons
           for m in rollouts]
    return sorted(out, key=lambda c: (c[1] * c[2], c[2], c[1], ESTIMATORS.index(c[0])))


def _seed(base_seed: int, decision: int, estimator: str, horizon: int, m: int, first_replicate: int) -> int:
    key = f"{base_seed}:{decision}:{estimator}:{horizon}:{m}:{first_replicate}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % (2**62)


def read_lines(path: str | os.PathLike) -> list[dict]:
    """The study's lines so far ([] when the file does not exist); a half-written last line
    (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON") from None
    return out


def _cut_partial_line(path: Path) -> None:
    """Drop a half-written last line (no newline at the end), so new lines append cleanly."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _duration(seconds: float) -> str:
    """``seconds`` for a progress line: "40 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def check_decisions(decisions: Sequence[int], count: int = len(STUDY_PROMPTS)) -> Sequence[int]:
    """``decisions`` if each is an index into ``count`` prompts; ValueError naming the first that is not."""
    for decision in decisions:
        if not 0 <= decision < count:
            raise ValueError(f"decisions must lie in 0..{count - 1} (one per prompt), got {decision}")
    return decisions


def run_study(path: str | os.PathLike, runner, tokenizer=None, *, prompts: Sequence = STUDY_PROMPTS,
              estimators: Sequence[str] = ESTIMATORS, horizons: Sequence[int] = (4, 8, 16, 32, 64),
              rollouts: Sequence[int] = (4, 16, 64, 256), replicates: int = 8, top_k: int = 4, alpha: float = 4.0,
              resample_every: int = 8, seed: int = 0, max_rows: int = 1024,
              decisions: Sequence[int] | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or continue) the study, appending one line per replicate to ``path``; returns
    every line. ``max_rows`` bounds the rollouts decoded at once (replicates x K x M), which
    bounds the KV memory; a cell with more is run in batches of replicates. ``decisions`` (indices
    into ``prompts``; None: all) draws only those decisions' lines, so that processes on copies
    of the file can split a cell: each line's numbers are the same whichever process draws it,
    since a batch's seed is a function of its cell, decision and first replicate. ``progress`` gets
    a line first (the rollout tokens left to decode), then one per cell: how long it took and
    the time left, estimated from this run's rate in rollout tokens per second so far; a cell
    that runs longer than ``PROGRESS_EVERY`` seconds also says, between its batches, how far
    it has got."""
    from powerfast.samplers.factory import make_sampler

    # the settings are checked before the file is touched
    plan = cells(estimators, horizons, rollouts, replicates)
    chosen = set(range(len(prompts)) if decisions is None else check_decisions(decisions, len(prompts)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _cut_partial_line(path)
    done = {(d["decision"], d["estimator"], d["H"], d["M"], d["replicate"]) for d in read_lines(path)}
    todos = [[[r for r in range(count) if decision in chosen and (decision, estimator, horizon, m, r) not in done]
               for decision in range(len(prompts))] for estimator, horizon, m, count in plan]
    # the cost of what is left, in rollout tokens (replicates x K x M x (H + 1) per decision)
    costs = [sum(len(todo) for todo in todo_cell) * top_k * m * (horizon + 1)
             for (_, horizon, m, _), todo_cell in zip(plan, todos)]
    left = sum(costs)
    if progress is not None:
        progress(f"{len(plan)} cells, {sum(1 for c in costs if c)} with replicates to draw: "
                 f"{left} rollout tokens to decode")
    run_started, spent = time.perf_counter(), 0
    last_said = run_started

    def eta() -> str:
        if not left:
            return "nothing left"
        return f"about {_duration(left * (time.perf_counter() - run_started) / spent)} left at this run's rate " \
               f"({left} rollout tokens)"

    with open(path, "a", encoding="utf-8") as out:
        for index, ((estimator, horizon, m, count), todo_cell) in enumerate(zip(plan, todos)):
            cell_started = time.perf_counter()
            name = (f"cell {index + 1}/{len(plan)} ({estimator}, H={horizon}, M={m}, {count} replicates "
                    f"x {len(prompts)} decisions)")
            cell_left = costs[index]
            for decision, prompt in enumerate(prompts):
                todo = todo_cell[decision]
                per_call = max(1, max_rows // (top_k * m))
                for start in range(0, len(todo), per_call):
                    batch = todo[start : start + per_call]
                    sampler = make_sampler("power", runner, tokenizer, seed=_seed(seed, decision, estimator, horizon,
                                                                                  m, batch[0]),
                                           alpha=alpha, block_size=1, top_k=top_k, num_rollouts=m, horizon=horizon,
                                           jackknife=False, **_settings(estimator, resample_every))
                    started = time.perf_counter()
                    records = sampler.decisions([prompt] * len(batch), horizon + 1, ignore_eos=True)
                    seconds = (time.perf_counter() - started) / len(batch)
                    for replicate, record in zip(batch, records):
                        line = dict(decision=decision, estimator=estimator, H=horizon, M=m, replicate=replicate,
                                    alpha=alpha, candidates=[c[0] for c in record.candidates],
                                    candidate_logprobs=record.candidate_logprobs, log_zeta=record.log_zeta,
                                    rollout_ess=record.rollout_ess, seconds=seconds)
                        out.write(json.dumps(line) + "\n")
                    out.flush()
                    cost = len(batch) * top_k * m * (horizon + 1)
                    spent, left, cell_left = spent + cost, left - cost, cell_left - cost
                    # a long cell says where it is at most once a PROGRESS_EVERY seconds
                    if progress is not None and cell_left and time.perf_counter() - last_said >= PROGRESS_EVERY:
                        progress(f"{name}: {costs[index] - cell_left} of {costs[index]} rollout tokens; {eta()}")
                        last_said = time.perf_counter()
            if progress is not None:
                if not costs[index]:
                    progress(f"{name} already there")
                    continue
                progress(f"{name} done in {_duration(time.perf_counter() - cell_started)}; {eta()}")
                last_said = time.perf_counter()
    return read_lines(path)


def summarise(lines: Sequence[dict]) -> dict:
    """Per (estimator, H, M): replicates, the std of log zeta_hat over replicates (mean over
    every candidate of every decision), its mean, mean seconds per replicate, and the
    agreement of each replicate's argmax with the largest M's (None where that M is not
    there yet); and per decision the alpha x log-prob gaps between adjacent candidates."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for line in lines:
        groups.setdefault((line["estimator"], line["H"], line["M"]), {}).setdefault(line["decision"], []).append(line)
    largest: dict[tuple, int] = {}
    for estimator, horizon, m in groups:
        largest[(estimator, horizon)] = max(m, largest.get((estimator, horizon), 0))

    def scores(line: dict) -> list[float]:
        return [line["alpha"] * lp + lz for lp, lz in zip(line["candidate_logprobs"], line["log_zeta"])]

    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    rows = []
    for (estimator, horizon, m), decisions in sorted(groups.items()):
        stds, means, seconds, agree, pairs = [], [], [], 0, 0
        reference_m = largest[(estimator, horizon)]
        reference = groups.get((estimator, horizon, reference_m), {})
        for decision, reps in decisions.items():
            seconds.extend(r["seconds"] for r in reps)
            for k in range(len(reps[0]["log_zeta"])):
                values = [r["log_zeta"][k] for r in reps if math.isfinite(r["log_zeta"][k])]
                if len(values) >= 2:
                    stds.append(statistics.stdev(values))
                    means.append(statistics.fmean(values))
            if m != reference_m and decision in reference:
                ref = reference[decision]
                mean_log_zeta = [statistics.fmean(r["log_zeta"][k] for r in ref) for k in range(len(ref[0]["log_zeta"]))]
                target = argmax([ref[0]["alpha"] * lp + lz for lp, lz in zip(ref[0]["candidate_logprobs"],
                                                                             mean_log_zeta)])
                for r in reps:
                    agree += argmax(scores(r)) == target
                    pairs += 1
        rows.append(dict(estimator=estimator, H=horizon, M=m,
                         replicates=min(len(v) for v in decisions.values()), decisions=len(decisions),
                         std_log_zeta=statistics.fmean(stds) if stds else float("nan"),
                         mean_log_zeta=statistics.fmean(means) if means else float("nan"),
                         seconds=statistics.fmean(seconds), reference_m=reference_m,
                         agreement=agree / pairs if pairs else None))
    gaps = {}
    for line in lines:
        if line["decision"] not in gaps:
            lps = sorted(line["candidate_logprobs"], reverse=True)
            gaps[line["decision"]] = [line["alpha"] * (a - b) for a, b in zip(lps, lps[1:])]
    return dict(rows=rows, gaps=gaps)


def format_summary(summary: dict) -> str:
    lines = ["| estimator | H | M | replicates x decisions | std of log zeta_hat | mean log zeta_hat "
             "| argmax agrees with M_ref | M_ref | s / replicate |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.2f}"
        lines.append(f"| {r['estimator']} | {r['H']} | {r['M']} | {r['replicates']} x {r['decisions']} "
                     f"| {r['std_log_zeta']:.3f} | {r['mean_log_zeta']:.2f} | {agreement} | {r['reference_m']} "
                     f"| {r['seconds']:.2f} |")
    lines.append("")
    lines.append("alpha x log-probability gaps between adjacent candidates (Top-K by probability), per decision:")
    for decision, gaps in sorted(summary["gaps"].items()):
        lines.append(f"- decision {decision}: " + ", ".join(f"{g:.2f}" for g in gaps))
    return "\n".join(lines)


# ------------------------------------------------------------------------ command


def _ints(text: str, flag: str) -> list[int]:
    """``"4,16, 64"`` as [4, 16, 64]; ValueError naming ``flag`` for anything else."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not all(item.lstrip("+-").isdigit() for item in items):
        raise ValueError(f"{flag} wants comma-separated integers, got {text!r}")
    return [int(item) for item in items]


def _kv_bytes_per_token(model) -> int:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.horizon_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="PATH.jsonl",
                        help="the study's lines: run (or continue) the cells missing there (rerun to resume)")
    parser.add_argument("--horizons", default="4,8,16,32,64", help="H values (default 4,8,16,32,64)")
    parser.add_argument("--rollouts", default="4,16,64,256", help="M values (default 4,16,64,256)")
    parser.add_argument("--estimators", default="base,tempered,resampled",
                        help="base, tempered, resampled (every 8 tokens) (default all three)")
    parser.add_argument("--replicates", type=int, default=8, help="per cell below M = 256 (default 8; 3 from M = 256 on)")
    parser.add_argument("--max-rows", type=int, default=1024,
                        help="rollouts decoded at once at most (bounds the KV memory; default 1024)")
    parser.add_argument("--decisions", default=None, metavar="LIST",
                        help="draw only these decisions (0-3; default all): processes on copies of PATH split "
                             "the cells, and their lines together are what one process would have drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary-only", action="store_true", help="print the table of what PATH holds, run nothing")
    return parser


def run(args: argparse.Namespace) -> str:
    """Run (or continue) the study ``args`` describe on the embedded model, unless
    ``--summary-only``; the table of what the file then holds."""
    if not args.summary_only:
        # every setting is checked before the model loads
        rows = args.max_rows
        if rows < 1:
            raise ValueError(f"--max-rows must be >= 1, got {rows}")
        horizons = _ints(args.horizons, "--horizons")
        rollouts = _ints(args.rollouts, "--rollouts")
        estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
        cells(estimators, horizons, rollouts, args.replicates)
        decisions = None if args.decisions is None else check_decisions(_ints(args.decisions, "--decisions"))
        from powerfast.runtime.models import load_model
        from powerfast.runtime.runner import ModelRunner

        model, tokenizer = load_model(None)
        # the KV pool: every rollout of a batch with its whole horizon, the prompts shared
        runner = ModelRunner(model, max_memory=max(512, rows * (max(horizons) + 64) * _kv_bytes_per_token(model)
                                                   >> 20) << 20)
        run_study(args.path, runner, tokenizer, horizons=horizons, rollouts=rollouts, estimators=estimators,
                  replicates=args.replicates, seed=args.seed, max_rows=rows, decisions=decisions,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    lines = read_lines(args.path)
    if not lines:
        raise ValueError(f"{args.path} holds no study lines yet")
    return format_summary(summarise(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except ValueError as error:
        print(f"horizon_study: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

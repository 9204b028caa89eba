"""bench/lab/study.py: compute-matched best-of-N and sir, the combined folder, resuming, and a tiny study end to end."""

import json
from pathlib import Path

import pytest
from test_cli import tiny_model_dir  # noqa: F401 - the same tiny model folder as the CLI tests

from bench.lab import study
from powerfast.evaluation.compare import compare
from powerfast.evaluation.tasks import load_task

FIXTURE = Path(__file__).parent / "fixtures" / "math3.jsonl"
BENCH = Path(__file__).resolve().parents[1] / "bench"  # the study specs stay beside the lab, not in it


def record(pid, method, decoded=None, num_tokens=5, correct=False, seed=0):
    r = {"id": pid, "method": method, "seed": seed, "prompt": "p", "completion": "c", "answer": None,
         "reference": "r", "correct": correct, "num_tokens": num_tokens, "seconds": 0.5}
    if decoded is not None:
        r["decoded_tokens"] = decoded
    return r


def write_records(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------------------
# N from the records


def test_num_samples_is_the_ratio_rounded_half_up():
    plain = [record("a", "plain", 15), record("b", "plain", 25)]  # 20 tokens per problem
    power = [record("a", "power", 400), record("b", "power", 420)]  # 410
    match = study.matched_num_samples(power, plain)
    assert match == {"arm_tokens_per_problem": 410.0, "plain_tokens_per_problem": 20.0, "ratio": 20.5,
                     "num_samples": 21}  # halves round up (Python's round would give 20)
    assert study.choose_num_samples(20.49) == 20 and study.choose_num_samples(2.5) == 3
    assert study.choose_num_samples(0.2) == 1 and study.choose_num_samples(0) == 1  # at least one sample
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            study.choose_num_samples(bad)


def test_records_without_decoded_tokens_count_their_num_tokens():
    plain = [record("a", "plain", num_tokens=20), record("b", "plain", num_tokens=20)]  # no decoded_tokens
    power = [record("a", "power", 300, num_tokens=7), record("b", "power", num_tokens=100)]  # one of each
    assert study.mean_decoded_tokens(plain) == 20.0
    assert study.mean_decoded_tokens(power) == 200.0
    assert study.matched_num_samples(power, plain)["num_samples"] == 10
    with pytest.raises(ValueError, match="no records"):
        study.mean_decoded_tokens([])
    with pytest.raises(ValueError, match="plain arm decoded 0"):
        study.matched_num_samples(power, [record("a", "plain", 0)])


# ---------------------------------------------------------------------------------------
# The combined folder


def test_combine_renames_the_methods_and_leaves_the_arms_alone(tmp_path):
    arms = tmp_path / "arms"
    plain = [record("x", "plain", 10, correct=True), record("y", "plain", 12), record("z", "plain", 9)]
    power = [record("y", "power", 100, correct=True), record("x", "power", 90, correct=True)]
    write_records(arms / "plain" / "t" / "plain-seed0.jsonl", plain)
    write_records(arms / "power-a4" / "t" / "power-seed0.jsonl", power)
    write_records(arms / "power-a4" / "t" / "power-seed1.jsonl", [record("x", "power", 80, seed=1)])
    before = {p: p.read_bytes() for p in arms.rglob("*.jsonl")}
    stale = tmp_path / "combined" / "t" / "removed-arm-seed0.jsonl"
    write_records(stale, plain)

    written = study.combine(tmp_path, "t", [("plain", "plain"), ("power-a4", "power")], [0, 1],
                            problem_ids=["x", "y"])

    folder = tmp_path / "combined" / "t"
    assert sorted(p.name for p in written) == ["plain-seed0.jsonl", "power-a4-seed0.jsonl", "power-a4-seed1.jsonl"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)  # the stale file is gone
    rows = [json.loads(line) for line in (folder / "power-a4-seed0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x", "y"]  # the study's problems, in its order
    assert all(r["method"] == "power-a4" for r in rows)
    assert {k: v for k, v in rows[0].items() if k != "method"} == {k: v for k, v in power[1].items() if k != "method"}
    plain_rows = [json.loads(line) for line in (folder / "plain-seed0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in plain_rows] == ["x", "y"] and {r["method"] for r in plain_rows} == {"plain"}
    assert {p: p.read_bytes() for p in arms.rglob("*.jsonl")} == before  # the arms' files unchanged

    table = str(compare(tmp_path / "combined", baseline="plain", task="t"))
    assert "plain (baseline)" in table and "power-a4" in table


# ---------------------------------------------------------------------------------------
# The spec and the flags


def test_settings_become_the_flags_of_powerfast_eval():
    settings = study.canonical_settings({"candidates": 3, "block-size": 2, "--top_k": 2, "jackknife": False,
                                         "reuse_rollouts": True, "rollout_proposal": "tempered",
                                         "no_chat_template": True, "ignore-eos": False, "kv_memory": None}, "test")
    assert list(settings)[:3] == ["num_candidates", "block_size", "top_k"]
    assert study.settings_argv(settings) == ["--candidates", "3", "--block-size", "2", "--top-k", "2",
                                             "--no-jackknife", "--reuse-rollouts", "--rollout-proposal", "tempered",
                                             "--no-chat-template"]
    assert study.settings_argv({"jackknife": True, "reuse_rollouts": False}) == []  # the defaults: no flag


def test_the_spec_is_checked():
    arms = [{"name": "plain", "method": "plain"}, {"name": "p4", "method": "power", "settings": {"alpha": 4}},
            {"name": "s", "method": "smc"}, {"name": "g", "method": "greedy"}]
    spec = {"task": "math500", "arms": arms, "match_best_of_n": True}
    s = study.load_spec(spec)
    assert [a.name for a in s.arms if a.match] == ["p4", "s"] and s.plain_arm == "plain" and s.baseline == "plain"
    assert s.seeds == [0] and study.load_spec({**spec, "seeds": "3,1"}).seeds == [3, 1]
    assert [a.name for a in study.load_spec({**spec, "match_best_of_n": ["g"]}).arms if a.match] == ["g"]
    bad = [
        ({**spec, "arms": arms + [{"name": "p4", "method": "plain"}]}, "distinct"),
        ({**spec, "arms": arms[1:]}, "needs a plain arm"),
        ({**spec, "arms": arms + [{"name": "bon-for-s", "method": "plain"}]}, "bon-for-s"),
        ({**spec, "settings": {"limit": 3}}, "set by the study"),
        ({**spec, "arms": [{"name": "x", "method": "beam"}]}, "method must be one of"),
        ({**spec, "arms": [{"name": "a/b", "method": "plain"}]}, "name must be"),
        ({**spec, "match_best_of_n": ["nope"]}, "not an arm"),
        ({**spec, "match_sir": ["nope"]}, "match_sir names 'nope', not an arm"),
        ({**spec, "match_sir": "yes"}, "match_sir must be true, false or a list"),
        ({**spec, "arms": arms + [{"name": "sir-for-s", "method": "plain"}], "match_sir": ["s"]}, "sir-for-s"),
        ({**spec, "arms": [{**arms[1], "match_sir": 1}, *arms]}, "match_sir must be true or false"),
        ({"task": "math500", "arms": arms[1:], "match_sir": True}, "needs a plain arm"),
        ({**spec, "plain_arm": "p4"}, "against itself"),
        ({**spec, "limit": 0}, "limit must be"),
        ({**spec, "extra": 1}, "unknown key"),
    ]
    for wrong, message in bad:
        with pytest.raises(ValueError, match=message):
            study.load_spec(wrong)


# ---------------------------------------------------------------------------------------
# Running, with a stand-in for powerfast eval (exact token counts) and with a tiny model


class FakeEval:
    """Writes the records ``powerfast eval`` would (only missing units): decoded tokens per
    method, best-of-n's and sir's N times plain's; counts the units it wrote."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.calls = []

    def __call__(self, argv):
        value = lambda flag: argv[argv.index(flag) + 1]
        method, out, task = value("--methods"), Path(value("--out")), load_task(value("--task"))
        limit = int(value("--limit")) if "--limit" in argv else None
        decoded = self.tokens[method] * (int(value("--num-samples")) if method in ("best-of-n", "sir") else 1)
        written = 0
        for seed in map(int, value("--seeds").split(",")):
            path = out / task.name / f"{method}-seed{seed}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            done = {json.loads(line)["id"] for line in path.read_text().splitlines()} if path.exists() else set()
            with open(path, "a") as f:
                for p in task.problems[:limit]:
                    if p.id not in done:
                        f.write(json.dumps(record(p.id, method, decoded, seed=seed, correct=method != "plain")) + "\n")
                        written += 1
        self.calls.append((method, written))
        return 0


def test_a_study_matches_runs_combines_and_resumes(tmp_path, capsys):
    spec = {"task": str(FIXTURE), "limit": 2, "seeds": [0, 1], "settings": {"alpha": 4.0},
            "arms": [{"name": "power-a4", "method": "power", "match_best_of_n": True},
                     {"name": "smc", "method": "smc"}, {"name": "plain", "method": "plain"}]}
    fake = FakeEval({"plain": 20, "power": 410, "smc": 300, "best-of-n": 20})
    manifest = study.run_study(spec, tmp_path, run_eval=fake)
    assert fake.calls == [("plain", 4), ("power", 4), ("best-of-n", 4), ("smc", 4)]  # plain first, then the match
    [match] = manifest["matches"]
    assert match["ratio"] == 20.5 and match["num_samples"] == 21 and match["bon_arm"] == "bon-for-power-a4"
    bon = [a for a in manifest["arms"] if a["name"] == "bon-for-power-a4"][0]
    assert "--num-samples 21" in bon["command"] and bon["decoded_tokens_per_problem"] == 420.0
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    table = (tmp_path / "comparison.txt").read_text()
    for name in ("plain (baseline)", "power-a4", "bon-for-power-a4", "smc"):
        assert name in table
    assert table.strip() in capsys.readouterr().out
    combined = sorted(p.name for p in (tmp_path / "combined" / "math3").glob("*.jsonl"))
    assert combined == [f"{n}-seed{s}.jsonl" for n in ("bon-for-power-a4", "plain", "power-a4", "smc") for s in (0, 1)]

    # a rerun runs nothing; an arm missing a unit redoes that unit only
    fake.calls.clear()
    assert study.run_study(spec, tmp_path, run_eval=fake)["matches"] == manifest["matches"]
    assert fake.calls == []
    path = tmp_path / "arms" / "smc" / "math3" / "smc-seed1.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    study.run_study(spec, tmp_path, run_eval=fake)
    assert fake.calls == [("smc", 1)]

    # an arm's records made with other settings are not resumed with new ones
    with pytest.raises(ValueError, match=r"arm power-a4 has records made with other settings \(alpha=4.0 -> 2.0\): "
                                         r"remove .*power-a4 or rename the arm"):
        study.run_study({**spec, "settings": {"alpha": 2.0}}, tmp_path, run_eval=fake)
    # nor is a best-of-N whose N has changed
    fake.calls.clear()
    fake.tokens["power"] = 100
    for p in (tmp_path / "arms" / "power-a4" / "math3").glob("*.jsonl"):
        p.unlink()
    with pytest.raises(ValueError, match=r"arm bon-for-power-a4 has records made with other settings "
                                         r"\(num_samples=21 -> 5\)"):
        study.run_study(spec, tmp_path, run_eval=fake)
    assert fake.calls == [("power", 4)]


def test_a_sample_arm_sets_the_cost_of_one_matched_sample(tmp_path):
    # plain stops at the task's stop strings, a best-of-N sample does not: N comes from best-of-2
    spec = {"task": str(FIXTURE), "limit": 2, "sample_arm": "one",
            "arms": [{"name": "power-a4", "method": "power", "match_best_of_n": True, "match_sir": True},
                     {"name": "plain", "method": "plain"},
                     {"name": "one", "method": "best-of-n", "settings": {"num_samples": 2}}]}
    fake = FakeEval({"plain": 20, "power": 410, "best-of-n": 50, "sir": 50})  # per sample: 2 x 50 per record
    manifest = study.run_study(spec, tmp_path, run_eval=fake)
    assert [m for m, _ in fake.calls] == ["plain", "best-of-n", "power", "best-of-n", "sir"]  # plain, one, arm, N
    [match] = manifest["matches"]
    assert (match["ratio"], match["num_samples"], match["sample_arm"]) == (8.2, 8, "one")  # 410 / (100 / 2), not 410 / 20
    assert all("--num-samples 8" in a["command"] for a in manifest["arms"] if a["name"].endswith("-for-power-a4"))
    # without it, the plain arm's tokens (the rule before)
    fake = FakeEval({"plain": 20, "power": 410, "best-of-n": 50, "sir": 50})
    other = {**spec, "arms": spec["arms"][:2]}
    del other["sample_arm"]
    assert study.run_study(other, tmp_path / "plain", run_eval=fake)["matches"][0]["num_samples"] == 21
    import re

    one = {**spec, "arms": [*spec["arms"][:2], {**spec["arms"][2], "settings": {"num_samples": 1}}]}
    for wrong, message in (({**spec, "sample_arm": "nope"}, "sample_arm 'nope' is not an arm"),
                           ({**spec, "sample_arm": "plain"}, "sample_arm 'plain' must be an unmatched best-of-n arm "
                                                             "with num_samples >= 2"),
                           (one, "got method 'best-of-n' and settings {'num_samples': 1}")):
        with pytest.raises(ValueError, match=re.escape(message)):
            study.load_spec(wrong)


def test_the_spec_asks_for_matched_sir_like_best_of_n():
    arms = [{"name": "plain", "method": "plain"}, {"name": "p4", "method": "power", "settings": {"alpha": 4}},
            {"name": "s", "method": "smc", "match_sir": True}, {"name": "g", "method": "greedy"}]
    s = study.load_spec({"task": "math500", "arms": arms})
    assert [(a.name, a.match, a.match_sir) for a in s.arms if a.baselines()] == [("s", False, True)]
    s = study.load_spec({"task": "math500", "arms": arms, "match_sir": True, "match_best_of_n": ["g"]})
    assert {a.name: [b.method for b in a.baselines()] for a in s.arms if a.baselines()} == \
        {"p4": ["sir"], "s": ["sir"], "g": ["best-of-n"]}
    order = [a.name for a in study.run_order(s)]
    assert order[0] == "plain"


def test_matched_sir_takes_the_arms_alpha_and_the_same_n(tmp_path, capsys):
    """Each matched arm is followed by its best-of-N and its sir, both with the N of the
    arm's decoded tokens; sir at the arm's alpha (its own, else the common one)."""
    spec = {"task": str(FIXTURE), "limit": 2, "seeds": [0, 1], "settings": {"alpha": 4.0},
            "match_sir": True,
            "arms": [{"name": "plain", "method": "plain", "settings": {"alpha": 9.0}},
                     {"name": "power-a2", "method": "power", "settings": {"alpha": 2.0}, "match_best_of_n": True},
                     {"name": "smc", "method": "smc"}]}
    fake = FakeEval({"plain": 20, "power": 410, "smc": 100, "best-of-n": 20, "sir": 20})
    manifest = study.run_study(spec, tmp_path, run_eval=fake)
    assert fake.calls == [("plain", 4), ("power", 4), ("best-of-n", 4), ("sir", 4), ("smc", 4), ("sir", 4)]
    matches = {m["arm"]: m for m in manifest["matches"]}
    assert matches["power-a2"]["bon_arm"] == "bon-for-power-a2" and matches["power-a2"]["sir_arm"] == "sir-for-power-a2"
    assert matches["power-a2"]["num_samples"] == 21 and "bon_arm" not in matches["smc"]
    assert matches["smc"]["sir_arm"] == "sir-for-smc" and matches["smc"]["num_samples"] == 5
    entries = {a["name"]: a for a in manifest["arms"]}
    sir = entries["sir-for-power-a2"]
    assert sir["matched_to"] == "power-a2" and sir["method"] == "sir"
    assert "--methods sir" in sir["command"] and "--num-samples 21" in sir["command"] and "--alpha 2.0" in sir["command"]
    assert sir["decoded_tokens_per_problem"] == 420.0  # N samples of plain's tokens
    assert "--alpha 4.0" in entries["sir-for-smc"]["command"]  # the common alpha, not the plain arm's 9
    assert "--num-samples 5" in entries["sir-for-smc"]["command"]
    assert json.loads((tmp_path / "arms" / "sir-for-power-a2" / "arm.json").read_text())["identity"]["alpha"] == 2.0
    table = (tmp_path / "comparison.txt").read_text()
    for name in ("bon-for-power-a2", "sir-for-power-a2", "sir-for-smc"):
        assert name in table
    combined = sorted(p.name for p in (tmp_path / "combined" / "math3").glob("sir-for-*.jsonl"))
    assert combined == [f"sir-for-{n}-seed{s}.jsonl" for n in ("power-a2", "smc") for s in (0, 1)]
    # a rerun runs nothing
    fake.calls.clear()
    assert study.run_study(spec, tmp_path, run_eval=fake)["matches"] == manifest["matches"]
    assert fake.calls == []


def test_matched_sir_arms_share_records_only_at_the_same_alpha(tmp_path, capsys):
    spec = {"task": str(FIXTURE), "limit": 2, "seeds": [0], "match_sir": True, "match_best_of_n": True,
            "arms": [{"name": "plain", "method": "plain"},
                     {"name": "power-a", "method": "power", "settings": {"alpha": 4.0}},
                     {"name": "power-b", "method": "power", "settings": {"alpha": 4.0, "rollout_proposal": "tempered"}},
                     {"name": "power-c", "method": "power", "settings": {"alpha": 2.0}}]}
    fake = FakeEval({"plain": 20, "power": 410, "best-of-n": 20, "sir": 20})
    manifest = study.run_study(spec, tmp_path, run_eval=fake)
    entries = {a["name"]: a for a in manifest["arms"]}
    assert entries["sir-for-power-b"]["copied_from"] == "sir-for-power-a"  # same N, same alpha
    assert "copied_from" not in entries["sir-for-power-c"]  # same N, another alpha: its own run
    assert entries["bon-for-power-c"]["copied_from"] == "bon-for-power-a"  # best-of-N has no alpha
    assert [c for c in fake.calls if c[0] == "sir"] == [("sir", 2), ("sir", 2)]


def test_a_best_of_n_with_the_same_n_as_a_finished_one_copies_its_records(tmp_path, capsys):
    spec = {"task": str(FIXTURE), "limit": 3, "seeds": [0, 1], "settings": {"alpha": 4.0},
            "arms": [{"name": "plain", "method": "plain"},
                     {"name": "power-a", "method": "power", "match_best_of_n": True},
                     {"name": "power-b", "method": "power", "settings": {"rollout_proposal": "tempered"},
                      "match_best_of_n": True}]}
    fake = FakeEval({"plain": 20, "power": 410, "best-of-n": 20})
    manifest = study.run_study(spec, tmp_path, run_eval=fake)
    # the same N (21) for both power arms: one best-of-N run, the other arm's records copied
    assert fake.calls == [("plain", 6), ("power", 6), ("best-of-n", 6), ("power", 6)]
    assert [m["num_samples"] for m in manifest["matches"]] == [21, 21]
    entries = {a["name"]: a for a in manifest["arms"]}
    assert entries["bon-for-power-b"]["copied_from"] == "bon-for-power-a"
    assert "copied_from" not in entries["bon-for-power-a"]
    for seed in (0, 1):
        a, b = (tmp_path / "arms" / f"bon-for-power-{x}" / "math3" / f"best-of-n-seed{seed}.jsonl" for x in "ab")
        assert a.read_bytes() == b.read_bytes() and len(a.read_text().splitlines()) == 3
    assert "arm bon-for-power-b (best-of-n): the same command as arm bon-for-power-a" in capsys.readouterr().err
    assert "bon-for-power-b" in (tmp_path / "comparison.txt").read_text()

    # a different N runs its own
    fake.calls.clear()
    fake.tokens["power"] = 100
    spec["arms"][2]["name"] = "power-c"
    study.run_study(spec, tmp_path, run_eval=fake)
    assert fake.calls == [("power", 6), ("best-of-n", 6)]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    spec = {"task": str(FIXTURE), "limit": 2, "match_best_of_n": True,
            "arms": [{"name": "power", "method": "power", "settings": {"block_size": 2}},
                     {"name": "plain", "method": "plain"}]}
    study.run_study(spec, tmp_path / "s", dry_run=True, run_eval=lambda argv: pytest.fail("ran an arm"))
    out = capsys.readouterr().out
    assert out.index("plain (plain): 0/2 units recorded") < out.index("power (power): 0/2")
    assert f"powerfast eval --task {FIXTURE} --methods power --seeds 0 --out {tmp_path / 's' / 'arms' / 'power'}" in out
    assert "--methods best-of-n" in out and "--num-samples '<N>'" in out
    study.run_study({**spec, "match_sir": ["power"]}, tmp_path / "s", dry_run=True,
                    run_eval=lambda argv: pytest.fail("ran an arm"))
    out = capsys.readouterr().out
    assert "sir-for-power (sir): 0/2 units recorded" in out and "--methods sir" in out
    assert out.index("bon-for-power (best-of-n)") < out.index("sir-for-power (sir)")
    assert not (tmp_path / "s").exists()


def test_a_tiny_study_end_to_end(tiny_model_dir, tmp_path, capsys):  # noqa: F811 - the imported fixture
    spec = {"task": str(FIXTURE), "limit": 2, "seeds": [0], "baseline": "plain",
            "settings": {"model": str(tiny_model_dir), "max_new_tokens": 3, "no_chat_template": True,
                         "block_size": 2, "candidates": 2, "top_k": 2, "rollouts": 2, "horizon": 2},
            "arms": [{"name": "plain", "method": "plain"},
                     {"name": "power-small", "method": "power", "match_best_of_n": True, "match_sir": True}]}
    calls = []

    def counted(argv):
        calls.append(argv[argv.index("--methods") + 1])
        return study._run_eval(argv)

    manifest = study.run_study(spec, tmp_path, run_eval=counted)
    assert calls == ["plain", "power", "best-of-n", "sir"]
    arm_file = lambda name, method: tmp_path / "arms" / name / "math3" / f"{method}-seed0.jsonl"
    means = {name: study.mean_decoded_tokens(json.loads(line) for line in arm_file(name, method).read_text().splitlines())
             for name, method in (("plain", "plain"), ("power-small", "power"))}
    [match] = manifest["matches"]
    assert match["ratio"] == pytest.approx(means["power-small"] / means["plain"])
    assert match["num_samples"] == max(1, int(means["power-small"] / means["plain"] + 0.5)) > 1
    bon = [a for a in manifest["arms"] if a["name"] == "bon-for-power-small"][0]
    assert f"--num-samples {match['num_samples']}" in bon["command"]
    sir = [a for a in manifest["arms"] if a["name"] == "sir-for-power-small"][0]
    assert f"--num-samples {match['num_samples']}" in sir["command"] and match["sir_arm"] == "sir-for-power-small"
    assert sir["decoded_tokens_per_problem"] > means["plain"]  # N plain samples' worth
    table = (tmp_path / "comparison.txt").read_text()
    assert "plain (baseline)" in table and "power-small" in table and "bon-for-power-small" in table
    assert (tmp_path / "combined" / "math3" / "comparison.json").is_file()
    for line in (tmp_path / "combined" / "math3" / "bon-for-power-small-seed0.jsonl").read_text().splitlines():
        assert json.loads(line)["method"] == "bon-for-power-small"
    assert [json.loads(l)["method"] for l in arm_file("bon-for-power-small", "best-of-n").read_text().splitlines()] \
        == ["best-of-n", "best-of-n"]

    files = {p: p.read_bytes() for p in (tmp_path / "arms").rglob("*.jsonl")}
    calls.clear()
    capsys.readouterr()
    assert study.run_study(spec, tmp_path, run_eval=counted)["matches"] == manifest["matches"]
    assert calls == []  # every unit recorded: no arm ran again
    assert {p: p.read_bytes() for p in (tmp_path / "arms").rglob("*.jsonl")} == files
    assert capsys.readouterr().err.count("units recorded, skipped") == 4


def test_the_arithmetic_study_spec_loads_and_its_commands_parse(tmp_path, capsys):
    """bench/study_arithmetic.json (the evidence study): every arm's command parses with
    powerfast eval's own parser (the dry run), the power arms get matched best-of-N arms."""
    spec = study.load_spec(json.loads((BENCH / "study_arithmetic.json").read_text()))
    assert spec.task == "arithmetic" and len(load_task(spec.task).problems) >= 300
    assert sorted(a.name for a in spec.arms if a.match) == ["power-adaptive", "power-base", "power-resampled",
                                                                "power-tempered"]
    assert study.main([str(BENCH / "study_arithmetic.json"), "--out", str(tmp_path / "s"),
                       "--dry-run"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    for name in ("greedy", "low-temp", "power-resampled", "bon-for-power-tempered", "smc", "mcmc"):
        assert name in text
    assert "--rollout-resample-every 8" in text and "--skip-share 0.99 --rollouts-per-round 2" in text and not (tmp_path / "s").exists()


def test_a_setting_added_after_the_records_counts_as_a_change_only_off_its_default():
    """Records made before a setting existed were made at its default: resuming them is safe
    while the setting stays there, and refused (naming it) once it moves."""
    from powerfast.core.config import SETTINGS

    before = {"method": "power", "alpha": 4.0, "max_new_tokens": 32}
    now = {**before, "skip_share": SETTINGS["skip_share"].default}
    assert study.identity_changes(before, now) == ""
    assert study.identity_changes(before, {**now, "skip_share": 0.99}) == "skip_share=None -> 0.99"
    assert study.identity_changes(before, {**now, "alpha": 2.0}) == "alpha=4.0 -> 2.0"
    # a key that is not a setting (a flag) has no default to fall back on
    assert study.identity_changes(before, {**now, "ignore_eos": False}) == "ignore_eos=None -> False"
    # and a setting that disappeared is a change too
    assert study.identity_changes({**before, "old": 1}, before) == "old=1 -> None"

"""The evaluation on Ray workers: a local Ray instance with 2 workers, a tiny random model.

Compared with a single-process run of the same units: the same records (completions,
answers, grades, token counts), every unit exactly once, also when a worker is killed in
the middle of a unit or the driver is interrupted and run again. Ray's start-up and the
workers' imports take seconds each on a 2-core machine: the matching test runs in CI,
the fault tests are marked slow.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import tiny_model_dir  # noqa: F401  (the fixture: a tiny Llama folder)

from powerfast import cli
from powerfast import evaluation as ev
from powerfast.evaluation.distributed import run_evaluation_on_ray

MATH3 = Path(__file__).parent / "fixtures" / "math3.jsonl"
METHODS = ["plain", "power"]
SEEDS = (0, 1)
UNITS = len(METHODS) * len(SEEDS) * 3


@pytest.fixture(scope="module")
def local_ray():
    """Ray on this machine with 2 CPUs, no dashboard, a small object store; shut down after."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'powerfast[ray]'")
    old = os.environ.get("POWERFAST_INTERPRET_OPS")
    os.environ["POWERFAST_INTERPRET_OPS"] = "0"  # torch sampling path in the driver and the workers alike
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="WARNING",
             log_to_driver=False)
    # test-module functions (the crashing method below) travel to the workers by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("POWERFAST_INTERPRET_OPS", None)
    else:
        os.environ["POWERFAST_INTERPRET_OPS"] = old


def eval_argv(model_dir, out_dir):
    return ["eval", "--task", str(MATH3), "--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)),
            "--out", str(out_dir), "--model", str(model_dir), "--max-new-tokens", "6", "--block-size", "2",
            "--candidates", "3", "--top-k", "2", "--rollouts", "2", "--horizon", "2", "--no-chat-template"]


def eval_args(model_dir, out_dir):
    return cli.build_parser().parse_args(eval_argv(model_dir, out_dir))


def make_methods(model_dir, out_dir):
    return functools.partial(cli.eval_methods, eval_args(model_dir, out_dir), METHODS, False)


def records(out_dir) -> dict:
    """Every record under out_dir/math3, keyed by (method, seed, id), without the timing."""
    found = {}
    for path in sorted((Path(out_dir) / "math3").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            key = (record["method"], record["seed"], record["id"])
            assert key not in found, f"{key} written twice"
            assert path.name == f"{record['method']}-seed{record['seed']}.jsonl"
            found[key] = {k: v for k, v in record.items() if k != "seconds"}
    return found


# first in the file: before the module's Ray instance starts
def test_an_unreachable_cluster_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'powerfast[ray]'")
    if __import__("ray").is_initialized():
        pytest.skip("this process already runs Ray: an address is not looked at")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # no running local cluster's address file to find
    args = ["eval", "--task", str(MATH3), "--methods", "plain", "--out", str(tmp_path), "--model", str(tiny_model_dir),
            "--ray", "auto"]
    assert cli.main(args) == 2
    assert "error: cannot reach a Ray cluster at address 'auto'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def single_process_records(tiny_model_dir, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("single")
    summary = ev.run_evaluation(MATH3, make_methods(tiny_model_dir, out)(), out, seeds=SEEDS, progress=False)
    assert [w.units for w in summary.workers] == [UNITS]
    found = records(out)
    assert len(found) == UNITS
    return found


@pytest.mark.slow
def test_ray_run_writes_the_records_of_a_single_process_run(tiny_model_dir, tmp_path, single_process_records,
                                                            capsys):
    # the command line, on the Ray instance this process already started
    assert cli.main(eval_argv(tiny_model_dir, tmp_path) + ["--ray", "--workers", "2"]) == 0
    assert records(tmp_path) == single_process_records
    # the samples differ between units: the seeds really are per unit
    texts = [r["completion"] for r in single_process_records.values() if r["method"] == "plain"]
    assert len(set(texts)) > 1
    saved = json.loads((tmp_path / "math3" / "summary.json").read_text())
    assert {r["method"]: r["n"] for r in saved["rows"]} == {"plain": 6, "power": 6}
    assert len(saved["workers"]) == 2 and sum(w["units"] for w in saved["workers"]) == UNITS
    assert all(w["busy_seconds"] > 0 for w in saved["workers"] if w["units"]) and saved["wall_seconds"] > 0
    assert all(w["where"].count(":") == 1 and w["load_seconds"] > 0 for w in saved["workers"] if w["units"])
    assert (tmp_path / "math3" / "accuracy_vs_time.png").exists()
    captured = capsys.readouterr()
    assert "units/s" in captured.out and "worker-1" in captured.out
    assert f"{UNITS} units on 2 Ray worker(s)" in captured.err and f"plain 6/6, power 6/6" in captured.err


class CrashOnce:
    """Methods that SIGKILL their own worker process in the middle of its second unit, once.

    The marker file makes the crash happen in one worker only, the replacement runs on.
    """

    def __init__(self, make, marker: Path):
        self.make, self.marker = make, marker

    def __call__(self):
        methods = self.make()
        marker, calls = self.marker, []

        def wrap(generate):
            def crashing(prompts, seeds):
                calls.append(1)
                if len(calls) == 2:
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        pass
                    else:
                        os.close(fd)
                        os.kill(os.getpid(), signal.SIGKILL)
                return generate(prompts, seeds)

            return crashing

        return {name: wrap(fn) for name, fn in methods.items()}


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_unit_recorded_once(tiny_model_dir, tmp_path, single_process_records,
                                                                   capsys):
    marker = tmp_path / "crashed"
    methods = CrashOnce(make_methods(tiny_model_dir, tmp_path), marker)
    summary = run_evaluation_on_ray(MATH3, methods, METHODS, tmp_path, seeds=SEEDS, workers=2, progress=False)
    assert marker.exists()  # a worker did die
    assert "died" in capsys.readouterr().err
    assert records(tmp_path) == single_process_records  # each unit once, and the same samples
    assert len(summary.workers) == 3  # two, and the replacement
    assert sum(w.units for w in summary.workers) == UNITS


@pytest.mark.slow
def test_an_interrupted_driver_resumes_without_repeating(tiny_model_dir, tmp_path, single_process_records,
                                                        monkeypatch):
    written = []
    record = ev.EvaluationRun.record

    def interrupt_after_four(self, unit, generation):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(unit)
        return record(self, unit, generation)

    monkeypatch.setattr(ev.EvaluationRun, "record", interrupt_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation_on_ray(MATH3, make_methods(tiny_model_dir, tmp_path), METHODS, tmp_path, seeds=SEEDS,
                              workers=2, progress=False)
    first = records(tmp_path)
    assert len(first) == 4
    monkeypatch.setattr(ev.EvaluationRun, "record", record)

    summary = run_evaluation_on_ray(MATH3, make_methods(tiny_model_dir, tmp_path), METHODS, tmp_path, seeds=SEEDS,
                                    workers=2, progress=False)
    assert sum(w.units for w in summary.workers) == UNITS - 4  # only the missing units ran
    assert records(tmp_path) == single_process_records
    assert {r.method: r.n for r in summary.rows} == {"plain": 6, "power": 6}

    # everything recorded: the same call starts no worker and changes no record
    done = run_evaluation_on_ray(MATH3, make_methods(tiny_model_dir, tmp_path), METHODS, tmp_path, seeds=SEEDS,
                                 workers=2, progress=False)
    assert done.workers == [] and records(tmp_path) == single_process_records


@pytest.mark.slow
def test_a_method_error_stops_the_run_with_its_message(tiny_model_dir, tmp_path, local_ray):
    def broken():
        return {"plain": lambda prompts, seeds: []}

    with pytest.raises(ValueError, match=r"method 'plain' returned 0 items for 1 prompt"):
        run_evaluation_on_ray(MATH3, broken, ["plain"], tmp_path, workers=1, progress=False)

    def raising():
        def generate(prompts, seeds):
            raise ValueError("max_new_tokens must be an int > 0, got 0")

        return {"plain": generate}

    with pytest.raises(ValueError, match="max_new_tokens must be an int > 0, got 0"):
        run_evaluation_on_ray(MATH3, raising, ["plain"], tmp_path, workers=1, progress=False)
    assert records(tmp_path) == {}


def test_bad_settings_are_refused_before_ray_starts(tmp_path):
    for kwargs, message in [({"workers": 0}, "workers must be an int > 0, got 0"),
                            ({"cpus_per_worker": -1}, "cpus_per_worker must be a number > 0, got -1"),
                            ({"units_per_call": 1.5}, "units_per_call must be an int > 0, got 1.5"),
                            ({"max_worker_failures": -1}, "max_worker_failures must be an int >= 0 or None, got -1"),
                            ({"gpus_per_worker": -0.5}, "gpus_per_worker must be a number >= 0 or None, got -0.5")]:
        with pytest.raises(ValueError, match=message):
            run_evaluation_on_ray(MATH3, dict, ["plain"], tmp_path, progress=False, **kwargs)


def test_without_ray_the_command_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["eval", "--task", str(MATH3), "--methods", "plain", "--out", str(tmp_path), "--model", str(tiny_model_dir),
            "--ray", "--workers", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "powerfast eval: error: Ray runs need the ray package: pip install 'powerfast[ray]'"
    assert not (tmp_path / "math3").exists()


def test_workers_without_ray_is_an_error(tmp_path, capsys):
    assert cli.main(["eval", "--task", str(MATH3), "--out", str(tmp_path), "--workers", "2"]) == 2
    assert "--workers 2 needs --ray" in capsys.readouterr().err


def test_importing_powerfast_never_imports_ray():
    code = "import sys, powerfast, powerfast.cli, powerfast.evaluation, powerfast.evaluation.distributed\nassert 'ray' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_ctrl_c_on_the_command_then_the_same_command_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'powerfast[ray]'")
    task = tmp_path / "many.jsonl"
    task.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"the answer is {i}", "answer": "3"}) + "\n"
                            for i in range(30)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "powerfast.cli", "eval", "--task", str(task), "--methods", "plain", "--out", str(out),
            "--model", str(tiny_model_dir), "--max-new-tokens", "48", "--ignore-eos", "--no-chat-template",
            "--ray", "--workers", "2", "--cpus-per-worker", "1"]
    env = dict(os.environ, POWERFAST_INTERPRET_OPS="0")
    results = out / "many" / "plain-seed0.jsonl"
    # SIGINT as a terminal gives it, even when these tests run in a background job (which starts
    # with SIGINT ignored, and Python then installs no handler: the signal would do nothing)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and len(results.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    before = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert 3 <= len(before) < 30

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{30 - len(before)} units on 2 Ray worker(s)" in again.stderr
    after = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert after[: len(before)] == before and sorted(after) == sorted(f"p{i}" for i in range(30))

"""Tensor parallelism on the CPU: a 2-process torchrun with gloo (OMP_NUM_THREADS=1, a free
port, bounded in time) against the single-process run of the same model and seeds.

The sharded logits differ from the single-process ones by about 1e-7 (reductions split
across ranks), so a sampled token could flip at a near-tie; the model and seeds here are
fixed and were checked to have none, and the comparison is exact (not loosened).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import WORDS, tiny_model_dir  # noqa: F401 - the CLI tests' model folder (4 heads, 2 KV heads)
from transformers import LlamaConfig

import tp_cases
from powerfast import cli
from powerfast.runtime import parallel
from powerfast.runtime.models import load_model

HERE = Path(__file__).resolve().parent
LIMIT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=LIMIT_S):
    env = dict(os.environ, OMP_NUM_THREADS="1", POWERFAST_INTERPRET_OPS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Both ranks' results of tests/tp_cases.py, and the single-process reference."""
    out = tmp_path_factory.mktemp("tp")
    proc = torchrun([str(HERE / "tp_cases.py"), str(tiny_model_dir), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    model, _ = load_model(tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:  # the ranks' ops: the torch references (not the interpreter)
        patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        return ranks, tp_cases.run_cases(model)


def test_every_method_draws_the_single_process_tokens_on_every_rank(sharded):
    ranks, reference = sharded
    assert [r["tp_size"] for r in ranks] == [2, 2]
    for name in tp_cases.CASES:
        assert ranks[0][name] == ranks[1][name] == reference[name], name
        assert all(len(ids) == tp_cases.MAX_NEW for ids in reference[name])


def test_admission_and_the_peak_kv_check_agree_across_ranks(sharded):
    ranks, reference = sharded
    assert [r["agreed_blocks"] for r in ranks] == [100, 100]  # rank r offered 100 + r
    assert ranks[0]["kv_check"] == ranks[1]["kv_check"] == reference["kv_check"]
    needed, num_blocks, in_use = reference["kv_check"]
    assert needed > num_blocks == 6 and in_use == 0


def test_the_engine_with_mixed_requests_and_an_abort_leaks_no_block_on_either_rank(sharded):
    ranks, reference = sharded
    for rank in ranks:
        assert rank["engine"] == reference["engine"]
        assert rank["engine_blocks_in_use"] == 0
    assert reference["engine"]["doomed"][0] == "abort" and reference["engine"]["power"][0] == "length"


def test_sample_and_eval_commands_under_torchrun_match_one_process(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")  # the ranks' ops
    small = ["--model", str(tiny_model_dir), "--seed", "3", "--ignore-eos", "--no-chat-template", "--block-size", "2",
             "--candidates", "3", "--top-k", "2", "--rollouts", "2", "--horizon", "2", "--max-new-tokens", "5"]
    proc = torchrun(["-m", "powerfast.cli", "sample", "the answer is", "--json", "--tensor-parallel", "2", *small])
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded_out = json.loads(proc.stdout)  # rank 0's JSON only: the other rank prints nothing
    assert cli.main(["sample", "the answer is", "--json", *small]) == 0
    single = json.loads(capsys.readouterr().out)
    assert sharded_out["token_ids"] == single["token_ids"] and sharded_out["text"] == single["text"]

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"the answer is {w}", "answer": w}) + "\n"
                            for i, w in enumerate(WORDS[5:8])))
    evaluate = ["eval", "--task", str(task), "--methods", "power,plain", "--seeds", "0,1", *small[:2], *small[4:]]
    proc = torchrun(["-m", "powerfast.cli", *evaluate, "--out", str(tmp_path / "tp"), "--tensor-parallel", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert cli.main([*evaluate, "--out", str(tmp_path / "one")]) == 0

    def completions(folder):
        files = sorted(folder.rglob("*-seed*.jsonl"))
        return {f.name: [(r["id"], r["completion"]) for r in map(json.loads, f.read_text().splitlines())]
                for f in files}

    written = completions(tmp_path / "tp")
    assert written == completions(tmp_path / "one") and len(written) == 4
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("powerfast-rank-*"))  # the other rank's copy removed


def test_a_model_whose_heads_do_not_divide_is_refused_before_loading(tmp_path):
    config = LlamaConfig(vocab_size=16, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=32)
    config.save_pretrained(tmp_path / "odd")  # the config alone: loading weights would fail otherwise
    proc = torchrun(["-m", "powerfast.cli", "sample", "x", "--model", str(tmp_path / "odd"), "--seed", "0",
                     "--tensor-parallel", "2"])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("powerfast sample")]
    assert sorted(lines) == ["powerfast sample (rank 1): error: tensor parallel size 2 must divide the model's 1 KV "
                             "heads and 3 attention heads",
                             "powerfast sample: error: tensor parallel size 2 must divide the model's 1 KV heads and "
                             "3 attention heads"]
    # refused on the config (there are no weights to load), no traceback of ours (torchrun
    # prints its own about the failed launch)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "powerfast" in line]


def test_launch_and_version_checks_are_one_line(capsys, monkeypatch):
    assert cli.main(["sample", "x", "--tensor-parallel", "2", "--seed", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "powerfast sample: error: --tensor-parallel 2 needs 2 processes: launch with torchrun --nproc-per-node 2 "
        "-m powerfast.cli ... (this launch has WORLD_SIZE=1)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["profile", "x", "--tensor-parallel", "2"]) == 2
    assert "runs sample, eval and serve; profile runs on one process" in capsys.readouterr().err
    assert cli.main(["sample", "x", "--tensor-parallel", "2"]) == 2
    assert "needs --seed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers.distributed", None)  # an install without DistributedConfig
    with pytest.raises(ImportError, match=rf"--tensor-parallel needs transformers >= {parallel.MIN_TRANSFORMERS} "
                                          r"\(DistributedConfig\); this is \d"):
        parallel.distributed_config(2)


POWER_BODY = dict(method="power", block_size=2, num_candidates=3, top_k=2, num_rollouts=2, horizon=2)


def test_serve_under_torchrun_answers_like_one_process_and_stops_every_rank(tiny_model_dir):  # noqa: F811
    """Rank 0 serves HTTP, rank 1 follows its steps: completions (plain and power, one of them
    while a stream is cut off and aborted) give the single-process sampler's text; SIGINT to
    torchrun ends both ranks."""
    import signal
    import threading
    import time

    import httpx

    from powerfast.samplers.factory import make_sampler

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", POWERFAST_INTERPRET_OPS="0")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "powerfast.cli", "serve", "--model", str(tiny_model_dir),
               "--tensor-parallel", "2", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "".join(log)[-3000:]
            try:
                if client.get("/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start:\n" + "".join(log)[-3000:]
            time.sleep(0.5)

        name = client.get("/v1/models").json()["data"][0]["id"]

        def completion(body):
            reply = client.post("/v1/completions", json={"model": name, "prompt": "the answer is", "max_tokens": 6,
                                                         "ignore_eos": True, **body})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        # a stream cut off after its first chunk: its request is aborted on every rank
        with client.stream("POST", "/v1/completions", json={"model": name, "prompt": "the answer is", "max_tokens": 40,
                                                            "ignore_eos": True, "stream": True, "seed": 1}) as stream:
            next(stream.iter_lines())
        texts = {seed: completion({"seed": seed, **body}) for seed, body in ((3, {}), (4, POWER_BODY))}

        model, tokenizer = load_model(tiny_model_dir)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("POWERFAST_INTERPRET_OPS", "0")
            for seed, body in ((3, {}), (4, POWER_BODY)):
                settings = {k: v for k, v in body.items() if k != "method"}
                sampler = make_sampler(body.get("method", "plain"), model, tokenizer, seed=seed, **settings)
                [result] = sampler.generate(["the answer is"], 6, ignore_eos=True, chat_template=False)
                assert texts[seed] == result.text, (seed, texts[seed], result.text)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the launch
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode is not None


def test_the_leader_applies_adds_and_aborts_at_its_next_step(tiny_model_dir, monkeypatch):  # noqa: F811
    """LeaderEngine on a 1-rank gloo group: a request is checked when added (a bad one is
    refused at once) but joins at the next step; an abort of a pending request is applied in
    order at that step; request_ids (what a server's shutdown aborts) lists pending ones too;
    a pending request's id is in use and holds a place in the queue, before and after it joins."""
    import torch.distributed as dist

    from powerfast.serving.errors import InvalidRequestError, QueueFullError
    from powerfast.serving.lockstep import LeaderEngine
    from powerfast.serving.params import SamplingParams

    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model, tokenizer = load_model(tiny_model_dir)
        engine = LeaderEngine(model, tokenizer, num_blocks=256, max_queue=2)
        params = SamplingParams(method="plain", max_tokens=4, seed=1, ignore_eos=True)
        kept = engine.add_request([3, 4, 5], params)
        doomed = engine.add_request([3, 4, 5], params)
        with pytest.raises(InvalidRequestError):
            engine.add_request([], params)
        with pytest.raises(InvalidRequestError, match=f"request id '{kept}' is already in use"):
            engine.add_request([3, 4, 5], params, request_id=kept)
        with pytest.raises(QueueFullError, match="2 requests waiting"):
            engine.add_request([3, 4, 5], params)
        assert engine.stats().requests_rejected == {"queue_full": 1, "invalid": 2, "too_large": 0}
        assert engine.stats().num_waiting == 0 and engine.has_unfinished()  # nothing applied yet
        assert set(engine.request_ids()) == {kept, doomed}
        assert engine.abort(doomed) and not engine.abort("no-such-id")
        finals = {}
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        with pytest.raises(InvalidRequestError, match="already in use"):  # applied: still in use
            engine.add_request([3, 4, 5], params, request_id=kept)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
        assert finals[doomed].finish_reason == "abort" and finals[kept].finish_reason == "length"
        assert len(finals[kept].token_ids) == 4 and engine.cache.blocks_in_use == 0
        assert engine.request_ids() == []
        engine.stop()
    finally:
        dist.destroy_process_group()

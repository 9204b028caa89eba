"""Tensor parallelism on the CPU: a 2-process torchrun with gloo (OMP_NUM_THREADS=1, a free
port, bounded in time) against the single-process run of the same model and seeds.

The sharded logits differ from the single-process ones by about 1e-7 (reductions split
across ranks), so a sampled token could flip at a near-tie; the model and seeds here are
fixed and were checked to have none, and the comparison is exact (not loosened).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import WORDS, tiny_model_dir  # noqa: F401 - the CLI tests' model folder (4 heads, 2 KV heads)
from transformers import LlamaConfig

import tp_cases
from powerfast import cli
from powerfast.runtime import parallel
from powerfast.runtime.models import load_model

# every test here launches ranks (torchrun) or loads a model per rank: seconds each
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
LIMIT_S = 600


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes a torchrun launch started (its children with RANK set;
    torchrun starts each in a session of its own)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != launcher:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(entry)
    return ranks


def alive(pids) -> list[int]:
    """The processes of ``pids`` still running (not gone, not a zombie)."""
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(pid)
        except OSError:
            pass
    return running


def rank_exit_codes(log: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's summary of a failed launch."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log)
    return {int(rank): int(code) for rank, code in found}


def ours(log: str) -> str:
    """The launch's log without uvicorn's access lines and tracebacks' frames (for messages)."""
    return "\n".join(line for line in log.splitlines() if line.strip() and not line.startswith((" ", "INFO:")))


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range, never handed out twice by this process.

    A port the kernel picks (bind to 0) lies in the ephemeral range, where the connections the
    ranks open while they load (gloo's, the store's clients) get their ports: one of them took the
    server's port before the server bound it once in CI ("address already in use"), and a second
    pick may return the first one again once its socket is closed. Below that range only a bind
    takes a port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in 10000..{low}")


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
    assert [r["agreed_pages"] for r in ranks] == [100, 100]  # rank r offered 100 + r
    assert ranks[0]["kv_check"] == ranks[1]["kv_check"] == reference["kv_check"]
    needed, num_pages, in_use = reference["kv_check"]
    assert needed > num_pages == 6 and in_use == 0


def test_the_engine_with_mixed_requests_and_an_abort_leaks_no_page_on_either_rank(sharded):
    ranks, reference = sharded
    for rank in ranks:
        assert rank["engine"] == reference["engine"]
        assert rank["engine_pages_in_use"] == 0
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
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
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
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the launch
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # every rank was interrupted and said so (rank 0 after uvicorn's shutdown), torchrun ended on
    # the signal, and no rank is left running
    reader.join(30)
    text = "".join(log)
    assert proc.returncode == 1, ours(text)
    assert "Application shutdown complete" in text and re.search(r"^interrupted$", text, re.M), ours(text)
    assert re.search(r"^interrupted \(rank 1\)$", text, re.M), ours(text)
    assert alive(ranks.values()) == []


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
        engine = LeaderEngine(model, tokenizer, num_pages=256, max_queue=2)
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
        assert len(finals[kept].token_ids) == 4 and engine.cache.pages_in_use == 0
        assert engine.request_ids() == []
        engine.stop()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------- serving on 3 ranks: lockstep


METHODS = ["plain", "low-temp", "greedy", "best-of-n", "sir", "power", "smc", "mcmc"]
MESSAGES = [{"role": "user", "content": "Say something."}]
BUDGET_S = 15  # a fault ends the launch within this many seconds


@pytest.fixture(scope="module")
def tp3_model_dir(tmp_path_factory):
    """A random tiny Llama whose 6 heads and 3 KV heads shard over 3 ranks, with the embedded
    SmolLM2 tokenizer (its chat template included), saved as a Hugging Face folder."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from powerfast.runtime.models import default_model_dir

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(default_model_dir(verbose=False))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("tp3-model")
    tokenizer.save_pretrained(folder)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked: power sampling has something to sharpen
    model.save_pretrained(folder)
    return folder


class ServeLaunch:
    """``powerfast serve --tensor-parallel N`` under torchrun, each rank through tests/tp_serve.py
    (its global torch generator seeded apart from the others'; its finished requests written to
    ``out/rank<R>.jsonl``), up and answering /health."""

    def __init__(self, model_dir, out: Path, nproc: int = 3, env: dict | None = None, args=()) -> None:
        import httpx

        self.out, self.nproc, self.port = out, nproc, free_port()
        environment = dict(os.environ, OMP_NUM_THREADS="1", POWERFAST_INTERPRET_OPS="0", PYTHONUNBUFFERED="1",
                           **(env or {}))
        environment["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), environment.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), str(HERE / "tp_serve.py"), str(out), "serve",
                   "--model", str(model_dir), "--tensor-parallel", str(nproc), "--host", "127.0.0.1", "--port",
                   str(self.port), *args]
        self.proc = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        self.ranks: dict[int, int] = {}
        deadline = time.monotonic() + 300
        try:
            while True:
                assert self.proc.poll() is None, ours(self.log)
                try:
                    if self.http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start:\n" + ours(self.log)
                time.sleep(0.5)
            self.ranks = rank_pids(self.proc.pid)
            assert sorted(self.ranks) == list(range(nproc)), self.ranks
        except BaseException:
            self.close()
            raise

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def chat(self, method: str, seed: int | None, stream: bool, max_tokens: int = 8, **extra):
        """(HTTP status, the text or the error body) of one chat completion."""
        body = {"messages": MESSAGES, "max_tokens": max_tokens, "method": method, "stream": stream, **extra}
        if seed is not None:
            body["seed"] = seed
        if not stream:
            reply = self.http.post("/v1/chat/completions", json=body)
            ok = reply.status_code == 200
            return reply.status_code, reply.json()["choices"][0]["message"]["content"] if ok else reply.json()
        with self.http.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                return reply.status_code, reply.json()
            text, errors = [], []
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    errors.append(event)
                elif event["choices"]:
                    text.append(event["choices"][0]["delta"].get("content") or "")
            return (200, "".join(text)) if not errors else (503, errors[0])

    def recorded(self, settle: float = 30.0) -> list[dict]:
        """What each rank recorded: {request id: (seed, finish reason, token ids)} per rank.

        Rank 0 answers a request as soon as its own step returns; the other ranks finished the
        same step (its collectives) but may not yet have appended their line. So this waits, up
        to ``settle`` seconds, until every rank holds as many complete lines as rank 0."""
        deadline = time.monotonic() + settle
        while True:
            ranks = []
            for rank in range(self.nproc):
                path = self.out / f"rank{rank}.jsonl"
                lines = path.read_text().splitlines(keepends=True) if path.exists() else []
                rows = [json.loads(line) for line in lines if line.endswith("\n")]
                ranks.append({row["id"]: (row["seed"], row["reason"], row["token_ids"]) for row in rows})
            if len({len(r) for r in ranks}) == 1 or time.monotonic() > deadline:
                return ranks
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        """The launch's exit status, once it and every rank ended and its output is read."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the launch did not end within {timeout} s:\n{ours(self.log)}") from None
        self.reader.join(30)
        return code

    def leftovers(self) -> list[int]:
        return alive([self.proc.pid, *self.ranks.values()])

    def close(self) -> None:
        """Whatever still runs of the launch ends (the ranks run in sessions of their own)."""
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for pid in alive(self.ranks.values()):
            os.kill(pid, signal.SIGKILL)


def single_process_texts(model_dir, cases) -> dict:
    """{(method, seed): text} of a single process's engine, the server's path (chat messages,
    the serving preset, max_tokens 8)."""
    from powerfast.serving.engine import Engine
    from powerfast.serving.params import SamplingParams

    model, tokenizer = load_model(model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        engine = Engine(model, tokenizer, num_pages=512)
        params = [SamplingParams(method=method, max_tokens=8, seed=seed) for method, seed in cases]
        outs = engine.run([MESSAGES] * len(cases), params, chat_template=False)
    return {case: out.text for case, out in zip(cases, outs)}


@pytest.fixture(scope="module", params=["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def served_every_method(request, tp3_model_dir, tmp_path_factory):
    """One 3-rank launch (global generators seeded apart per rank) answering every method,
    unseeded (all at once, with a bad request among them) and seeded (one at a time), streamed
    and not; then its health, KV pages and SIGINT. What the tests below check."""
    from concurrent.futures import ThreadPoolExecutor

    if request.param == "tiny":
        model_dir = tp3_model_dir
    else:
        from powerfast.runtime.models import default_model_dir

        model_dir = default_model_dir(verbose=False)  # SmolLM2-135M: 9 heads, 3 KV heads
    out = tmp_path_factory.mktemp(f"tp3-{request.param}")
    launch = ServeLaunch(model_dir, out)
    result = {"model": request.param}
    try:
        with ThreadPoolExecutor(8) as pool:
            unseeded = {(m, stream): pool.submit(launch.chat, m, None, stream) for m in METHODS
                        for stream in (False, True)}
            bad = pool.submit(launch.chat, "power", None, False, alpha=-1.0)
            result["unseeded"] = {key: future.result() for key, future in unseeded.items()}
            result["bad"] = bad.result()
        result["seeded"] = {(m, 3, stream): launch.chat(m, 3, stream) for m in METHODS for stream in (False, True)}
        result["health"] = launch.http.get("/health").status_code
        metrics = launch.http.get("/metrics").text
        result["kv_pages_used"] = float(re.search(r"^powerfast_kv_pages{state=\"used\"} (\S+)$", metrics, re.M).group(1))
        result["recorded"] = launch.recorded()
        os.killpg(launch.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the launch
        result["returncode"] = launch.wait(60)
        result["log"] = launch.log
        result["leftovers"] = launch.leftovers()
    finally:
        launch.close()
    result["reference"] = single_process_texts(model_dir, [(m, 3) for m in METHODS])
    return result


def test_serve_on_three_ranks_answers_every_method_seeded_or_not_streamed_or_not(served_every_method):
    """Before: an unseeded power request killed the launch (a collective mismatch), an unseeded
    MCMC request hung every rank. Now every request is answered, a seeded one with the text of
    a single process, a bad one with a 400 naming the field, and the server stays up with no
    KV page in use."""
    result = served_every_method
    for key, (status, text) in result["unseeded"].items():
        assert status == 200, (key, text)
    status, body = result["bad"]
    assert status == 400 and body["error"]["param"] == "alpha"
    for (method, seed, stream), (status, text) in result["seeded"].items():
        assert status == 200, (method, stream, text)
        assert text == result["reference"][(method, seed)], (method, stream)
    assert result["health"] == 200 and result["kv_pages_used"] == 0


def test_every_rank_draws_the_same_tokens_although_their_global_generators_differ(served_every_method):
    """The silent divergence: each rank's global torch generator is seeded apart (tests/
    tp_serve.py); an unseeded request used to draw its seed from it, so every rank sampled
    other tokens while the all-reduces summed their activations. Now rank 0 draws the seed
    from the operating system and sends it: every rank recorded the same seed and tokens for
    every request, and the unseeded requests got seeds of their own."""
    ranks = served_every_method["recorded"]
    assert len(ranks[0]) == 2 * 2 * len(METHODS)  # the bad request never reached the engine
    assert ranks[1] == ranks[0] and ranks[2] == ranks[0]
    seeds = [seed for seed, _, _ in ranks[0].values()]
    assert None not in seeds
    assert len({seed for seed in seeds if seed != 3}) == 2 * len(METHODS)  # a fresh seed per unseeded request


def test_sigint_ends_every_rank_of_the_launch(served_every_method):
    result = served_every_method
    log = result["log"]
    assert result["returncode"] == 1, ours(log)  # torchrun ends on the signal it got
    assert re.search(r"^interrupted$", log, re.M) and "Application shutdown complete" in log, ours(log)
    for rank in (1, 2):
        assert re.search(rf"^interrupted \(rank {rank}\)$", log, re.M), ours(log)
    assert result["leftovers"] == []


def _fault_request(launch: ServeLaunch) -> dict:
    """One long chat request in flight (non-streamed); its answer and how long it took."""
    start = time.monotonic()
    status, body = launch.chat("plain", None, False, max_tokens=200, ignore_eos=True)
    return {"status": status, "body": body, "start": start, "answered": time.monotonic()}


@pytest.mark.parametrize("fault, rank", [("diverge", 2), ("raise", 1), ("raise", 0)])
def test_a_fault_on_one_rank_stops_the_launch_within_seconds(tp3_model_dir, tmp_path, fault, rank):
    """A forced divergence (one rank's token changed at step 5), a follower that raises inside a
    step, the leader that raises inside a step: the request in flight ends with a 503 naming
    the cause, /health never says ok again, every rank exits non-zero within 15 s and nothing
    is left running."""
    launch = ServeLaunch(tp3_model_dir, tmp_path, env={"POWERFAST_TEST_FAULT": f"{fault}@{rank}:5"})
    try:
        answer = _fault_request(launch)
        try:
            health = launch.http.get("/health").status_code
        except Exception:  # noqa: BLE001 - gone already
            health = None
        returncode = launch.wait(BUDGET_S)
        ended = time.monotonic()
    finally:
        launch.close()
    log = launch.log
    assert answer["status"] == 503 and answer["body"]["error"]["code"] == "engine_closed", (answer, ours(log))
    message = answer["body"]["error"]["message"]
    assert health in (503, None)
    assert returncode != 0 and ended - answer["start"] < BUDGET_S, ours(log)
    codes = rank_exit_codes(log)
    assert sorted(codes) == [0, 1, 2] and all(code != 0 for code in codes.values()), ours(log)
    assert launch.leftovers() == []
    # one line per rank, no traceback of ours (torchrun prints its own about the failed launch)
    assert not [line for line in log.splitlines() if line.strip().startswith("File") and "powerfast" in line]
    if fault == "diverge":
        line = re.compile(r"tensor-parallel ranks diverged at step 5: rank 2 computed a different step from rank 0 "
                          r"\(first at request chatcmpl-\w+-0\); the server stops")
        assert line.search(message), message
        for who in ("powerfast serve: error:", "powerfast serve (rank 1): error:", "powerfast serve (rank 2): error:"):
            assert re.search(re.escape(who) + r".*" + line.pattern, log), (who, ours(log))
    elif rank == 0:
        assert message == ("the engine's step 5 failed: FaultInjected: test fault (POWERFAST_TEST_FAULT): rank 0 "
                           "raises at step 5")
        assert "powerfast serve: error: " + message in log
    else:
        assert message.startswith("the engine's step 5 failed: RuntimeError:") and "peer" in message, message
        assert ("powerfast serve (rank 1): error: FaultInjected: test fault (POWERFAST_TEST_FAULT): rank 1 raises at "
                "step 5") in log


def test_a_follower_killed_mid_stream_fails_the_requests_in_flight_and_ends_the_launch(tp3_model_dir, tmp_path):
    """SIGKILL to rank 1 while a stream and a power request are in flight: both end with an
    error naming the cause at once, the launch exits non-zero within 15 s, nothing is left."""
    launch = ServeLaunch(tp3_model_dir, tmp_path)
    other: dict = {}
    try:
        body = {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with launch.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            first = [next(events) for _ in range(3)]
            worker = threading.Thread(target=lambda: other.update(
                answer=launch.chat("power", None, False, max_tokens=400, ignore_eos=True)))
            worker.start()
            time.sleep(1.0)
            os.kill(launch.ranks[1], signal.SIGKILL)
            killed = time.monotonic()
            rest = list(events)
        worker.join(BUDGET_S)
        returncode = launch.wait(BUDGET_S)
        ended = time.monotonic()
    finally:
        launch.close()
    log = launch.log
    assert len(first) == 3
    errors = [json.loads(line[len("data: "):]) for line in rest if '"error"' in line]
    assert rest[-1] == "data: [DONE]" and len(errors) == 1, rest[-3:]
    assert errors[0]["error"]["code"] == "engine_closed" and "peer" in errors[0]["error"]["message"]
    status, answer = other["answer"]
    assert status == 503 and answer["error"]["message"] == errors[0]["error"]["message"]
    assert returncode != 0 and ended - killed < BUDGET_S, ours(log)
    assert rank_exit_codes(log).get(1) == -signal.SIGKILL
    assert launch.leftovers() == []


def test_a_follower_that_stops_answering_fails_the_request_within_the_step_timeout(tp3_model_dir, tmp_path):
    """SIGSTOP to rank 1 (alive, silent: no connection closes): the leader's step waits in a
    collective, the server's step timeout (3 s here) fails the request in flight with a 503,
    rank 0 exits non-zero at once, and torchrun ends the frozen rank (SIGTERM, then SIGKILL
    after its 30 s grace); nothing is left running."""
    launch = ServeLaunch(tp3_model_dir, tmp_path, args=["--step-timeout", "3"])
    try:
        timer = threading.Timer(1.0, lambda: os.kill(launch.ranks[1], signal.SIGSTOP))
        timer.start()
        start = time.monotonic()
        status, body = launch.chat("plain", None, False, max_tokens=400, ignore_eos=True)
        answered = time.monotonic() - start
        returncode = launch.wait(60)
    finally:
        launch.close()
    log = launch.log
    assert status == 503 and re.fullmatch(r"the engine's step \d+ did not finish within 3 s",
                                          body["error"]["message"]), body
    assert answered < 1.0 + 3 + 5, ours(log)
    codes = rank_exit_codes(log)
    assert returncode != 0 and codes[0] == 1 and codes[1] == -signal.SIGKILL, ours(log)
    assert launch.leftovers() == []

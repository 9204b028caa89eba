"""Engine replicas on Ray Serve, on a local Ray cluster: two replicas of a tiny model behind
one endpoint, called with the official openai client and httpx.

Each replica loads the tiny random Llama of test_server.py from a folder (the weights and the
embedded SmolLM2 tokenizer, saved once), so every method runs in milliseconds per step. What
a seeded request returns is checked against the same sampler run offline in this process.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import threading
import time

import pytest

serve = pytest.importorskip("ray.serve", reason="needs the replicas extra: pip install 'powerfast[replicas]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import ray  # noqa: E402
from conftest import fresh_seed  # noqa: E402
from test_server import MCMC, POWER, SIR, SMC, mixed_request, offline_text, tiny_model  # noqa: E402

from powerfast.runtime.runner import ModelRunner  # noqa: E402
from powerfast.serving.replicas import APP_NAME, ReplicaConfig, replica_deployment  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "replica-key"
MODEL_NAME = "tiny-llama"
# the torch path of the ops in the replicas too (interpreted kernels take seconds a token)
ENV = {"POWERFAST_INTERPRET_OPS": "0", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replicas:
    """A local Ray cluster serving two replicas on a free port."""

    def __init__(self, folder) -> None:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="WARNING")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        config = ReplicaConfig(model=str(folder), served_model_name=MODEL_NAME, api_key=KEY, kv_memory_mib=32, env=ENV)
        serve.run(replica_deployment(config, num_replicas=2, cpus_per_replica=0.5, health_check_period_s=1.0),
                  name=APP_NAME, route_prefix="/")
        self.handle = serve.get_app_handle(APP_NAME)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def states(self) -> list[dict]:
        """Every live replica's ``replica_state()``."""
        return self.handle.broadcast("replica_state").results()

    def wait_idle(self, timeout: float = 20.0) -> list[dict]:
        """The replicas' states once none holds a KV page or a request."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(s["kv_pages_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 for s in states):
                return states
            assert time.monotonic() < deadline, f"replicas not idle: {states}"
            time.sleep(0.1)

    def wait_replicas(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` replicas run and answer. A broadcast can still reach a replica that was
        just killed (the controller has not dropped it yet): that error means "not yet"."""
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout
        while True:
            deployment = serve.status().applications[APP_NAME].deployments["PowerfastReplica"]
            try:
                answering = len(self.states())
            except RayActorError:
                answering = -1
            if deployment.replica_states.get("RUNNING", 0) == count and answering == count:
                return
            assert time.monotonic() < deadline, f"not {count} running replicas: {deployment.replica_states}"
            time.sleep(0.5)

    def close(self) -> None:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from powerfast.runtime.models import default_model_dir

    return PreTrainedTokenizerFast.from_pretrained(default_model_dir(verbose=False))


@pytest.fixture(scope="module")
def replicas(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    live = Replicas(folder)
    yield live
    live.close()


@pytest.fixture(scope="module")
def offline(tokenizer):
    return ModelRunner(tiny_model(len(tokenizer), tokenizer.eos_token_id), num_pages=256)


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")  # the offline sampler's ops, as the replicas'


def test_two_replicas_answer_seeded_requests_as_one_process(replicas, offline, tokenizer):
    client = replicas.client()
    states = replicas.wait_idle()
    assert len(states) == 2 and states[0]["pid"] != states[1]["pid"]
    for method in ("plain", "power", "sir"):
        extra = {"power": POWER, "sir": SIR}.get(method, {})
        expected = offline_text(offline, tokenizer, method, "The quick brown fox", 8, 11, chat=False)
        for _ in range(3):  # whichever replica answers
            completion = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=8,
                                                   seed=11, extra_body=extra)
            assert completion.choices[0].text == expected
        streamed = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi."}],
                                                  max_tokens=8, seed=5, stream=True, extra_body=extra)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == offline_text(offline, tokenizer, method, "Hi.", 8, 5, chat=True)
    # an unseeded request is a fresh draw on whichever replica: four of them are not all alike
    texts = {client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=8).choices[0].text
             for _ in range(4)}
    assert len(texts) > 1
    replicas.wait_idle()


BAD = [({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "alpha": 0}, "alpha"),
       ({"prompt": "x", "method": "sir", "temperature": 0}, "temperature"),
       ({"prompt": "x", "method": "power", "candidate_proposal": "low"}, "candidate_proposal"),
       ({"prompt": "x", "method": "nope"}, "method")]


def test_mixed_methods_streams_cancellations_and_bad_requests_leave_no_page_in_use(replicas):
    """Sixteen clients on both replicas: every good request answers 200 (0 5xx), every bad one
    400 naming the field; afterwards no replica holds a KV page or a request."""
    methods = [{"method": "plain"}, {"method": "greedy"}, POWER, MCMC, SMC, SIR]
    rng = random.Random(fresh_seed())
    plan = [[(rng.choice(methods), rng.random() < 0.5, rng.random() < 0.25, rng.random() < 0.15)
             for _ in range(4)] for _ in range(16)]
    outcome = {"done": 0, "cancelled": 0, "cancelled_before_answer": 0, "bad": 0}

    async def bad_request(http, number):
        body, param = BAD[number % len(BAD)]
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        outcome["bad"] += 1

    async def client(index):
        async with httpx.AsyncClient(base_url=replicas.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            for number, (settings, stream, cancel, bad) in enumerate(plan[index]):
                if bad:
                    await bad_request(http, number + index)
                else:  # asserts its 200: no 5xx
                    await mixed_request(http, settings, stream, cancel, 100 * index + number, outcome)

    async def everyone():
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(16))), timeout=150)

    asyncio.run(everyone())
    assert outcome["done"] + outcome["cancelled"] + outcome["bad"] == 64
    states = replicas.wait_idle()
    assert len(states) == 2
    assert sum(s["requests_finished"].get("error", 0) for s in states) == 0
    with httpx.Client(base_url=replicas.url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").status_code == 401  # the API key holds on every replica
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == \
            MODEL_NAME


def test_a_killed_replica_ends_its_requests_with_an_error_and_is_replaced(replicas):
    """SIGKILL one replica mid-load: its requests end at once with an error (a 5xx, or a stream
    cut before its [DONE]), never a hang; the other replica's all answer; Ray Serve starts a
    new replica and both serve again with no page in use."""
    states = replicas.wait_idle()
    victim = states[0]["pid"]
    results: list[tuple] = []

    def one(index: int) -> None:
        started = time.monotonic()
        body = {"prompt": "Count:", "max_tokens": 200, "seed": index, "stream": index % 2 == 0, "ignore_eos": True}
        try:
            with httpx.stream("POST", replicas.url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:
                lines = [line for line in response.iter_lines() if line]
                complete = lines and (lines[-1] == "data: [DONE]" if body["stream"] else lines[-1].endswith("}"))
                results.append((index, response.status_code, bool(complete), time.monotonic() - started))
        except httpx.HTTPError as error:  # the stream cut: the proxy closed it
            results.append((index, type(error).__name__, False, time.monotonic() - started))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not all(s["num_running"] for s in replicas.states()):  # both replicas busy
        assert time.monotonic() < deadline, replicas.states()
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(90)
        assert not thread.is_alive(), "a request hung after its replica died"
    failed = [r for r in results if not (r[1] == 200 and r[2])]
    answered = [r for r in results if r[1] == 200 and r[2]]
    assert failed, f"no request was on the killed replica: {results}"
    assert answered, f"the surviving replica answered nothing: {results}"
    for index, status, _, _ in failed:
        assert status != 200 or index % 2 == 0, results  # a whole answer is either complete or a 5xx
        assert status == 200 or not isinstance(status, int) or status >= 500, results
    replicas.wait_replicas(2)
    pids = {s["pid"] for s in replicas.wait_idle()}
    assert victim not in pids and len(pids) == 2
    completion = replicas.client().completions.create(model=MODEL_NAME, prompt="Again", max_tokens=4, seed=1)
    assert completion.choices[0].finish_reason == "length"
    assert time.monotonic() - killed_at < 150

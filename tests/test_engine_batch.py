"""The engine's batched step: one sampling launch answers many requests' Samples, and the
step's streamed tokens are read from the launches' whole tensors. Each request must get
exactly what it gets alone, where every launch is its own (powerfast.samplers.sampling,
powerfast.serving.engine)."""

from __future__ import annotations

import random

import pytest
from conftest import fresh_seed
import recorded
from test_engine import CharTokenizer
import torch

from powerfast.samplers.sampling import Sample, Sampled, sample_all, sample_launch
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

VOCAB = 32


@pytest.fixture(scope="module")
def model():
    return recorded.tiny_model()


def random_samples(rng: random.Random, count: int, shared_logits: bool) -> list[Sample]:
    """``count`` Samples of 1 to 3 rows with random logits, seeds, counters, temperatures
    (greedy among them), EOS ids, live rows and running log-likelihoods; their logits are
    consecutive row ranges of one tensor (a decode forward's) or tensors of their own."""
    sizes = [rng.randint(1, 3) for _ in range(count)]
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(sum(sizes), VOCAB, generator=generator) * 3
    parts = torch.split(logits, sizes) if shared_logits else [p.clone() for p in torch.split(logits, sizes)]
    samples = []
    for rows, part in zip(sizes, parts):
        active = torch.rand(rows, generator=generator) < 0.8
        logliks = -torch.rand(rows, generator=generator) * 10
        samples.append(Sample(part, rng.randrange(2**62), rng.randrange(1000), rng.choice([0.0, 0.7, 1.0, 1.5]),
                              rng.choice([-1, rng.randrange(VOCAB)]), active, logliks, rng.random() < 0.5))
    return samples


def copy_state(sample: Sample) -> Sample:
    """The Sample with its own active and logliks (a launch updates them in place)."""
    return sample._replace(active=sample.active.clone(), logliks=sample.logliks.clone())


@pytest.mark.parametrize("shared_logits", [True, False], ids=["forward-rows", "own-tensors"])
def test_a_shared_launch_answers_each_sample_as_its_own_launch_would(shared_logits):
    """Every field of every reply of one launch over many Samples equals, bit for bit, the
    reply of that Sample's own launch; the launch's whole tokens and live rows are the
    replies' in order."""
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(4):
        samples = random_samples(rng, rng.randint(2, 9), shared_logits)
        alone = [sample_all([copy_state(sample)])[0] for sample in samples]
        launch = sample_launch([copy_state(sample) for sample in samples])
        assert len(launch.replies) == len(samples)
        for index, (reply, want) in enumerate(zip(launch.replies, alone)):
            for name in Sampled._fields:
                assert torch.equal(getattr(reply, name), getattr(want, name)), (name, index, seed)
        assert torch.equal(launch.tokens, torch.cat([want.tokens for want in alone])), seed
        assert torch.equal(launch.was_active, torch.cat([want.was_active for want in alone])), seed
        assert sample_launch([copy_state(samples[0])]).replies[0].tokens.tolist() == alone[0].tokens.tolist()


def test_a_replaced_reply_of_a_shared_launch_is_a_sampled():
    rng = random.Random(fresh_seed())
    launch = sample_launch(random_samples(rng, 3, True))
    tokens = launch.replies[1].tokens + 1
    replaced = launch.replies[1]._replace(tokens=tokens)
    assert isinstance(replaced, Sampled) and replaced.tokens is tokens
    assert torch.equal(replaced.logliks, launch.replies[1].logliks)


def random_requests(rng: random.Random, count: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts and params: plain, low-temp, greedy and power (streamed), best-of-n (not
    streamed); EOS ignored or not, random budgets, stop strings or none."""
    small_power = dict(block_size=2, num_candidates=3, top_k=2, num_rollouts=2, horizon=2)
    requests = []
    for index in range(count):
        method = rng.choice(["plain", "plain", "plain", "low-temp", "greedy", "power", "best-of-n"])
        extra = {"power": small_power, "best-of-n": {"num_samples": 2}}.get(method, {})
        stop = [] if rng.random() < 0.4 else ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 2)))
                                              for _ in range(rng.randint(1, 2))]
        params = SamplingParams(method=method, max_tokens=rng.randint(1, 14), seed=rng.randrange(2**40),
                                ignore_eos=rng.random() < 0.5, stop=stop, **extra)
        prompt = [rng.randrange(16) for _ in range(rng.randint(1, 5))]
        requests.append((prompt, params))
    return requests


def stream_of(engine: Engine, requests, ids=None) -> dict[str, list[tuple]]:
    """Every output of each request as it comes, stepping until all have finished."""
    ids = ids or [engine.add_request(prompt, params) for prompt, params in requests]
    streams = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for out in engine.step():
            streams[out.request_id].append((out.new_token_ids, out.new_text, out.token_ids, out.text, out.finished,
                                            out.finish_reason, out.decoded_tokens, out.prompt_tokens, out.seed))
    return [streams[request_id] for request_id in ids]


@pytest.mark.slow
def test_requests_together_stream_exactly_what_each_streams_alone(model):
    """Random requests of several methods, with EOS, stop strings and budgets, added at once
    to one engine, report the same outputs, one for one (new tokens and text, everything so
    far, the end and its reason), as each request run alone on an engine of its own; and
    their final outputs from ``run`` are the last of them."""
    seed = fresh_seed()
    rng = random.Random(seed)
    requests = random_requests(rng, 12)

    def engine() -> Engine:
        return Engine(model, CharTokenizer(), page_size=4, num_pages=1024)

    alone = [stream_of(engine(), [request])[0] for request in requests]
    shared = engine()
    together = stream_of(shared, requests)
    for index, (got, want) in enumerate(zip(together, alone)):
        assert got == want, (index, requests[index][1], seed)
        assert want[-1][4] and sum(1 for out in want if out[4]) == 1
    assert shared.stats().kv_pages_used == 0 and shared.stats().num_running == 0
    finals = engine().run([prompt for prompt, _ in requests], [params for _, params in requests])
    for index, (final, want) in enumerate(zip(finals, alone)):
        assert (final.token_ids, final.text, final.finish_reason) == (want[-1][2], want[-1][3], want[-1][5]), \
            (index, seed)


# ------------------------------------------------------------------ the loops the engine steps itself


def alone(model, params: SamplingParams, prompt: list[int]):
    """The request's result run alone outside the engine (``generate`` of its own sampler)."""
    sampler = params.sampler(new_runner(model))
    [result] = sampler.generate([prompt], params.max_tokens, ignore_eos=params.ignore_eos)
    return result


def new_runner(model):
    from powerfast.samplers.base import as_runner

    return as_runner(model, page_size=4, num_pages=512)


def test_batched_loops_give_each_request_what_it_gets_alone(model):
    """Plain, low-temperature and greedy requests (one-row streaming loops, which the engine
    steps as rows of one batch) added at different steps, with different budgets, some ending
    at their EOS, one aborted, beside power and best-of-2 requests (programs stepped as
    generators): each gets the tokens it gets alone, and when its program ran to its end, the
    same result (tokens, phases, the log-likelihood to the last bits a batch's logits may
    differ in); every page is free at the end."""
    seed = fresh_seed()
    rng = random.Random(seed)
    engine = Engine(model, page_size=4, num_pages=512)
    cases, finals, aborted = {}, {}, None

    def step():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out

    for wave in range(3):
        for _ in range(rng.randint(3, 6)):
            method = rng.choice(["plain", "plain", "low-temp", "greedy", "power", "best-of-n"])
            extra = dict(block_size=3, num_candidates=4, top_k=2, num_rollouts=2, horizon=3) if method == "power" else {}
            if method == "best-of-n":
                extra = dict(num_samples=2)
            params = SamplingParams(method=method, max_tokens=rng.randint(1, 24), seed=rng.randrange(2**40),
                                    ignore_eos=rng.random() < 0.5, **extra)
            prompt = [rng.randrange(16) for _ in range(rng.randint(1, 5))]
            request_id = engine.add_request(prompt, params, stream=rng.random() < 0.5)
            cases[request_id] = (params, prompt)
        for _ in range(rng.randint(0, 4)):
            step()
        if wave == 1 and aborted is None:
            running = [r.id for r in engine.running_requests() if r.loop_row is not None]
            if running:
                aborted = running[0]
                engine.abort(aborted)
    while engine.has_unfinished():
        step()
    assert engine.stats().kv_pages_used == 0
    assert all(row.dead for row in engine._loops.rows)
    for request_id, (params, prompt) in cases.items():
        out = finals[request_id]
        if request_id == aborted:
            assert out.finish_reason == "abort"
            continue
        want = alone(model, params, prompt)
        assert out.token_ids == want.token_ids, (request_id, params.method, seed)
        if out.result is not None:
            assert out.result.token_ids == want.token_ids
            # the batch's logits may differ from a lone forward's in the last bits (other kernels)
            assert out.result.log_likelihood == pytest.approx(want.log_likelihood, rel=1e-5, abs=1e-4), (
                seed, params.method, params.max_tokens, params.ignore_eos, prompt, out.result.token_ids)
            assert out.result.stats.tokens_by_phase == want.stats.tokens_by_phase


def test_a_loop_that_joins_behind_running_loops_and_ends_at_once_keeps_its_own_result(model):
    """Loops that join while others run are sampled as the last rows of a launch; one whose
    budget ends at its first token returns the log-likelihood of its own row (a regression:
    the row was looked up by its place among the due rows, not among all the rows, and took a
    running neighbour's log-likelihood)."""
    engine = Engine(model, page_size=4, num_pages=512)
    finals = {}
    running = [engine.add_request([3, 4, 5], SamplingParams(method="plain", max_tokens=20, seed=s, ignore_eos=True))
               for s in (1, 2)]
    for _ in range(3):
        engine.step()
    cases = {}
    for budget, prompt in ((1, [10, 11, 12, 15, 5]), (1, [7, 2]), (3, [9])):
        params = SamplingParams(method="greedy", max_tokens=budget, seed=5, ignore_eos=True)
        cases[engine.add_request(prompt, params)] = (params, prompt)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert set(running) <= set(finals)
    for request_id, (params, prompt) in cases.items():
        want = alone(model, params, prompt)
        got = finals[request_id].result
        assert got.token_ids == want.token_ids
        assert got.log_likelihood == pytest.approx(want.log_likelihood, rel=1e-5, abs=1e-4), (prompt, got.token_ids)


def test_a_loop_whose_eos_falls_on_its_check_step_returns_its_result_as_alone(model):
    """A decode loop looks at its EOS every 32 steps and returns there; stepped by the engine it
    must do the same: a request whose EOS is its 32nd token ends with the loop's result (not
    cut by the engine), the tokens and log-likelihood of the loop run alone."""
    saved = model.generation_config.eos_token_id
    try:
        for seed in range(400):
            params = SamplingParams(method="plain", max_tokens=40, seed=seed, ignore_eos=True)
            tokens = alone(model, params, [0, 3, 7]).token_ids
            if tokens[31] not in tokens[:31]:
                break
        else:
            pytest.fail("no seed whose 32nd token is new among 400")
        model.generation_config.eos_token_id = [tokens[31]]
        params = SamplingParams(method="plain", max_tokens=40, seed=seed)
        want = alone(model, params, [0, 3, 7])
        assert want.token_ids == tokens[:32]
        engine = Engine(model, page_size=4, num_pages=512)
        [out] = engine.run([[0, 3, 7]], params)
        assert out.finish_reason == "stop" and out.token_ids == want.token_ids
        assert out.result is not None and out.result.log_likelihood == want.log_likelihood
    finally:
        model.generation_config.eos_token_id = saved

"""The engine: step programs, continuous batching, per-request random streams, admission,
abort, stop strings, and the asyncio front (powerfast.serving.engine, powerfast.samplers.program)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import pytest
from conftest import fresh_seed
import recorded
import torch

from powerfast.samplers.factory import make_sampler
from powerfast.samplers.program import Decode, Loop, Prefill, Sample, drive
from powerfast.samplers.sampling import sample_all
from powerfast.serving.async_engine import AsyncEngine
from powerfast.serving.engine import Engine
from powerfast.serving.errors import EngineClosedError, InvalidRequestError, QueueFullError, RequestTooLargeError
from powerfast.serving.params import SamplingParams

SEED = fresh_seed()
WANT = json.loads(recorded.PATH.read_text())
SMALL_POWER = dict(method="power", block_size=3, num_candidates=4, top_k=2, num_rollouts=2, horizon=3)


@pytest.fixture(scope="module")
def model():
    return recorded.tiny_model()


class CharTokenizer:
    """Token id t is the letter chr(97 + t); EOS (5) is special and decodes to nothing."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 97 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t) for t in ids if not (skip_special_tokens and t == 5))


def params_of(name: str, **overrides) -> SamplingParams:
    """The engine's params for a recorded case."""
    case = recorded.CASES[name]
    kw = dict(method=case["method"], max_tokens=recorded.MAX_NEW_TOKENS, seed=recorded.SEED)
    kw.update({k: case[k] for k in ("alpha", "num_samples", "temperature") if k in case})
    for sub in ("power", "mcmc", "smc"):
        kw.update(case.get(sub, {}))
    kw.update(overrides)
    return SamplingParams(**kw)


def new_engine(model, **kwargs) -> Engine:
    kwargs.setdefault("page_size", 4)
    kwargs.setdefault("num_pages", 512)
    return Engine(model, **kwargs)


# ------------------------------------------------------------------ same tokens as before


RECORDED_ON_CPU = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="recorded with the CPU kernels; a GPU's logits differ in the last bits (the live comparisons run there)")


@RECORDED_ON_CPU
@pytest.mark.parametrize("name", sorted(recorded.CASES))
@pytest.mark.slow
def test_generate_gives_the_tokens_recorded_before_the_step_programs(model, name):
    """Every sampler's generate, alone and batched, reproduces the recorded tokens."""
    alone = [recorded.run_generate(model, name, [p])[0] for p in recorded.PROMPTS]
    assert alone == WANT[name]["alone"]
    assert recorded.run_generate(model, name, recorded.PROMPTS) == WANT[name]["together"]


@RECORDED_ON_CPU
@pytest.mark.slow
def test_requests_alone_and_together_give_the_recorded_tokens(model):
    """A request gives the tokens of generate([prompt]) with its seed, alone or sharing every
    batch with requests of all the other methods (per-request random streams)."""
    engine = new_engine(model)
    names = sorted(recorded.CASES)
    for name in names:
        [out] = engine.run([recorded.PROMPTS[0]], params_of(name))
        assert out.token_ids == WANT[name]["alone"][0], name
        assert out.finish_reason in ("stop", "length")
        if recorded.CASES[name]["method"] in ("power", "mcmc", "smc", "best-of-n", "sir"):
            assert out.result is not None and out.result.token_ids == out.token_ids
    prompts = [p for _ in names for p in recorded.PROMPTS]
    params = [params_of(name) for name in names for _ in recorded.PROMPTS]
    order = list(range(len(prompts)))
    random.Random(SEED).shuffle(order)  # the batch order must not matter either
    outs = engine.run([prompts[i] for i in order], [params[i] for i in order])
    for out, i in zip(outs, order):
        name, p = names[i // 2], i % 2
        assert out.token_ids == WANT[name]["alone"][p], (name, p, SEED)
    stats = engine.stats()
    assert stats.kv_pages_used == 0 and stats.kv_pages_reserved == 0 and stats.num_running == 0


def test_drive_closes_the_program_when_the_runner_fails(model):
    """A forward that raises closes the program, whose finally frees what it holds."""
    sampler = make_sampler("plain", model, seed=1, runner_options=dict(page_size=4, num_pages=64))
    runner = sampler.runner
    calls = {"n": 0}
    real_decode = runner.decode

    def failing_decode(seqs, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_decode(seqs, tokens)

    runner.decode = failing_decode
    with pytest.raises(RuntimeError, match="boom"):
        drive(sampler.program([[0, 3, 7]], 10, (5,)), runner)
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------ continuous batching


def test_a_request_joins_at_the_next_step_and_shares_the_decode_forward(model):
    engine = new_engine(model)
    first = engine.add_request([0, 3, 7], SamplingParams(max_tokens=10, seed=1, ignore_eos=True))
    engine.step()
    assert engine.last_step_forwards == 2 and set(engine.last_step_rows) == {first}  # prefill + decode
    engine.step()
    assert engine.last_step_forwards == 1
    second = engine.add_request([0, 9, 2], SamplingParams(method="power", max_tokens=10, seed=2, ignore_eos=True,
                                                          **{k: v for k, v in SMALL_POWER.items() if k != "method"}))
    forwards_before = engine.stats().num_forwards
    engine.step()  # the power request is prefilled, then both decode in ONE forward
    assert engine.stats().num_forwards - forwards_before == 2
    assert set(engine.last_step_rows) == {first, second}
    assert engine.last_step_rows[second] == SMALL_POWER["num_candidates"]  # its L candidate rows
    shared = 0
    while engine.has_unfinished():
        engine.step()
        if len(engine.last_step_rows) == 2:
            shared += 1
            assert engine.last_step_forwards == 1
    assert shared >= 5
    assert engine.stats().kv_pages_used == 0


def test_streamed_tokens_add_up_to_the_final_tokens(model):
    engine = new_engine(model, tokenizer=CharTokenizer())
    methods = {"plain": SamplingParams(max_tokens=12, seed=3),
               "power": SamplingParams(max_tokens=12, seed=3, **SMALL_POWER),
               "mcmc": SamplingParams(method="mcmc", max_tokens=12, seed=3, block_size=4, mcmc_steps=1)}
    ids = {engine.add_request([0, 3, 7], p): name for name, p in methods.items()}
    streamed = {i: [] for i in ids}
    texts = {i: "" for i in ids}
    updates = {i: 0 for i in ids}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.new_text
            updates[out.request_id] += 1
            if out.finished:
                final[out.request_id] = out
    for i, name in ids.items():
        assert streamed[i] == final[i].token_ids, name
        assert texts[i] == final[i].text == CharTokenizer().decode(final[i].token_ids), name
    by_name = {name: (updates[i], len(final[i].token_ids)) for i, name in ids.items()}
    assert by_name["plain"][0] >= by_name["plain"][1] - 1  # a token a step (two in its first step)
    assert by_name["power"][0] >= -(-by_name["power"][1] // 3)  # a block (3 tokens) at a time
    assert by_name["mcmc"][0] == 1  # nothing is final before its end


@pytest.mark.parametrize("stops", [(), ("zz",)])
def test_a_request_that_does_not_stream_gets_only_its_final_output_with_the_same_tokens(model, stops):
    """stream=False: one output (the final one) per request, the tokens and text a streamed
    request with the same seed ends with, a first-token time between arrival and finish; a
    stop string is still found at the step that completes it (the text is decoded every
    step only then)."""
    tokenizer = CharTokenizer()
    seed = fresh_seed()
    methods = {"plain": SamplingParams(max_tokens=12, seed=seed, stop=stops),
               "low-temp": SamplingParams(method="low-temp", max_tokens=12, seed=seed, stop=stops),
               "power": SamplingParams(max_tokens=12, seed=seed, stop=stops, **SMALL_POWER)}
    finals = {}
    for stream in (True, False):
        engine = new_engine(model, tokenizer=tokenizer)
        ids = {engine.add_request([0, 3, 7], p, stream=stream): name for name, p in methods.items()}
        outputs = {name: [] for name in methods}
        while engine.has_unfinished():
            for out in engine.step():
                outputs[ids[out.request_id]].append(out)
        for name, outs in outputs.items():
            assert outs[-1].finished and all(not o.finished for o in outs[:-1]), (name, stream)
            if not stream:
                [final] = outs
                assert final.new_token_ids == final.token_ids and final.new_text == final.text
                assert final.arrival_time <= final.first_token_time <= final.finish_time
        finals[stream] = {name: outs[-1] for name, outs in outputs.items()}
        assert engine.stats().kv_pages_used == 0
    for name in methods:
        on, off = finals[True][name], finals[False][name]
        assert (off.token_ids, off.text, off.finish_reason) == (on.token_ids, on.text, on.finish_reason), name
        assert off.text == tokenizer.decode(off.token_ids)[: len(off.text)]
    # a stop string the streamed plain request met cuts the unstreamed one at the same place
    plain = finals[True]["plain"]
    if len(plain.text) >= 4 and not stops:
        stop = plain.text[2:4]
        engine = new_engine(model, tokenizer=tokenizer)
        engine.add_request([0, 3, 7], dataclasses.replace(methods["plain"], stop=(stop,)), stream=False)
        [out] = [o for _ in range(40) for o in engine.step()][:1] or [None]
        assert out is not None and out.finish_reason == "stop" and out.text == plain.text[: plain.text.find(stop)]


# ------------------------------------------------------------------ abort and admission


@pytest.mark.parametrize("method", ["plain", "power", "mcmc", "smc", "best-of-n", "sir"])
def test_abort_frees_every_page_at_once(model, method):
    engine = new_engine(model)
    extra = dict(SMALL_POWER) if method == "power" else {"method": method}
    request = engine.add_request([0, 3, 7, 1], SamplingParams(max_tokens=30, ignore_eos=True, seed=SEED, **extra))
    for _ in range(1 + SEED % 5):
        engine.step()
    assert engine.stats().kv_pages_used > 0
    assert engine.abort(request)
    stats = engine.stats()
    assert stats.kv_pages_used == 0 and stats.kv_pages_reserved == 0 and stats.num_running == 0
    [out] = engine.step()
    assert out.finished and out.finish_reason == "abort" and out.request_id == request
    assert not engine.has_unfinished() and not engine.abort(request)


@pytest.mark.slow
def test_a_pool_too_small_for_two_power_requests_runs_them_one_after_the_other(model):
    params = SamplingParams(max_tokens=12, seed=4, ignore_eos=True, **SMALL_POWER)
    sampler = make_sampler("power", model, runner_options=dict(page_size=4, num_pages=512), config=params.config())
    need = sampler.peak_kv_pages([3], 12, 4)
    engine = new_engine(model, num_pages=need + need // 2)  # one fits, two do not
    a = engine.add_request([0, 3, 7], params)
    b = engine.add_request([0, 3, 8], params)
    engine.step()
    assert engine.stats().num_running == 1 and engine.stats().num_waiting == 1
    finished, peak = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished.append((out.request_id, out.finish_reason))
        peak = max(peak, engine.stats().kv_pages_used)
    assert finished == [(a, "length"), (b, "length")]
    assert peak <= engine.cache.num_pages


@pytest.mark.slow
def test_mixed_requests_on_a_tight_pool_never_run_out_of_pages(model):
    """Random mixes of methods on a pool that admits only a few at a time: every request
    ends by itself (no OutOfPagesError, no error at all) and nothing leaks."""
    rng = random.Random(SEED)
    engine = new_engine(model, num_pages=160)
    kinds = [dict(method="plain"), dict(method="greedy"), SMALL_POWER, dict(method="mcmc", block_size=4),
             dict(method="smc", num_particles=4, resample_every=2), dict(method="best-of-n", num_samples=3),
             dict(method="sir", num_samples=3, temperature=0.8)]
    for i in range(14):
        prompt = [0] + [rng.randrange(16) for _ in range(rng.randrange(1, 9))]
        engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(4, 16), seed=rng.randrange(1000),
                                                   **rng.choice(kinds)))
    reasons = []
    while engine.has_unfinished():
        reasons += [out.finish_reason for out in engine.step() if out.finished]
        assert engine.stats().kv_pages_used <= engine.stats().kv_pages_reserved
    assert len(reasons) == 14 and set(reasons) <= {"stop", "length"}, (reasons, SEED)
    assert engine.stats().kv_pages_used == 0


def test_a_request_that_could_never_fit_is_refused_at_once(model):
    engine = new_engine(model, num_pages=20)
    with pytest.raises(RequestTooLargeError) as caught:
        engine.add_request([0, 3, 7], SamplingParams(max_tokens=40, **SMALL_POWER))
    assert caught.value.field == "max_tokens" and "20" in str(caught.value) and "KV pages" in str(caught.value)
    engine = new_engine(model, max_branches=16)
    with pytest.raises(RequestTooLargeError) as caught:
        engine.add_request([0, 3], SamplingParams(method="power", top_k=4, num_rollouts=8, num_candidates=8, max_tokens=8))
    assert caught.value.field == "num_rollouts" and "32" in str(caught.value) and "16" in str(caught.value)
    assert engine.stats().requests_rejected["too_large"] == 1


def test_a_full_queue_is_an_error_to_the_caller(model):
    engine = new_engine(model, max_queue=2)
    engine.add_request([0, 1], SamplingParams(max_tokens=4))
    engine.add_request([0, 2], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFullError, match="2 requests waiting"):
        engine.add_request([0, 3], SamplingParams(max_tokens=4))
    engine.step()  # both admitted: room again
    engine.add_request([0, 3], SamplingParams(max_tokens=4))
    assert engine.stats().requests_rejected["queue_full"] == 1


@pytest.mark.parametrize("fields, bad", [
    (dict(max_tokens=-3), "max_tokens"),
    (dict(method="power", alpha=0.0), "alpha"),
    (dict(method="beam"), "method"),
    (dict(method="power", top_k=9, num_candidates=4), "top_k"),
    (dict(method="power", jackknife=True, num_rollouts=1), "jackknife"),
    (dict(method="smc", ess_threshold=1.5), "ess_threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(method="sir", temperature=0.0), "temperature"),
    (dict(method="sir", num_samples=0), "num_samples"),
    (dict(method="sir", alpha=-1.0), "alpha"),
    (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"),
])
def test_bad_params_name_the_field(fields, bad):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**fields)
    assert caught.value.field == bad, (caught.value.field, str(caught.value))


def test_bad_prompts_name_the_field(model):
    engine = new_engine(model)  # context 64 positions, vocabulary 16
    cases = [([], "prompt"), ([0] * 64, "prompt"), ([0, 99], "prompt"), ("abc", "prompt"),
             ([0] * 60, "max_tokens")]
    for prompt, field in cases:
        with pytest.raises(InvalidRequestError) as caught:
            engine.add_request(prompt, SamplingParams(max_tokens=8))
        assert caught.value.field == field, (prompt, str(caught.value))
    assert engine.stats().requests_rejected["invalid"] == len(cases)


# ------------------------------------------------------------------ stop


def test_stop_strings_cut_the_text_and_end_the_request(model):
    tokenizer = CharTokenizer()
    engine = new_engine(model, tokenizer=tokenizer)
    [full] = engine.run(["adh"], SamplingParams(max_tokens=20, seed=SEED, ignore_eos=True))
    assert len(full.text) >= 6
    stop = full.text[3:5]
    where = full.text.find(stop)
    request = engine.add_request("adh", SamplingParams(max_tokens=20, seed=SEED, ignore_eos=True, stop=[stop, "zz"]))
    text, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            text += out.new_text
            assert stop not in text
            last = out
    assert last.request_id == request and last.finish_reason == "stop"
    assert last.text == text == full.text[:where]
    assert engine.stats().kv_pages_used == 0


def test_every_eos_id_of_the_model_ends_a_request(model):
    engine = new_engine(model)
    [first] = engine.run([[0, 3, 7]], SamplingParams(max_tokens=12, seed=SEED, ignore_eos=True))
    other = first.token_ids[2]  # make a token the run samples an EOS id, next to 5
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [5, other]
    try:
        engine = new_engine(model)
        [out] = engine.run([[0, 3, 7]], SamplingParams(max_tokens=12, seed=SEED))
    finally:
        model.generation_config.eos_token_id = saved
    end = min(i for i, t in enumerate(first.token_ids) if t in (5, other))
    assert out.token_ids == first.token_ids[: end + 1] and out.finish_reason == "stop"


# ------------------------------------------------------------------ asyncio


def test_async_engine_streams_concurrent_requests_and_cancels_cleanly(model):
    engine = new_engine(model, tokenizer=CharTokenizer())
    alone = {n: engine.run([[0, n, 7]], SamplingParams(max_tokens=10, seed=n))[0].token_ids for n in range(1, 7)}
    front = AsyncEngine(engine)

    async def consume(n):
        tokens = []
        async for out in front.generate([0, n, 7], SamplingParams(max_tokens=10, seed=n)):
            tokens += out.new_token_ids
        return n, tokens

    async def drop_after_first(n):
        stream = front.generate([0, n], SamplingParams(max_tokens=40, seed=n, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(*[consume(n) for n in range(1, 7)], drop_after_first(9), drop_after_first(10))
        for _ in range(50):  # the aborts land within a step of the loop thread
            if engine.stats().kv_pages_used == 0 and not engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        stats = engine.stats()
        with pytest.raises(InvalidRequestError):
            async for _ in front.generate([0, 1], SamplingParams(max_tokens=1000)):
                pass
        await front.shutdown()
        with pytest.raises(EngineClosedError):
            async for _ in front.generate([0, 1], SamplingParams(max_tokens=4)):
                pass
        return results, stats

    results, stats = asyncio.run(main())
    for n, tokens in results[:6]:
        assert tokens == alone[n]
    assert stats.kv_pages_used == 0 and stats.requests_finished["abort"] == 2


@pytest.mark.slow
def test_out_of_pages_never_reaches_a_request_through_admission(model):
    """The reservations are upper bounds: with the pool exactly as large as one request's
    reservation, requests of every method run one at a time and never run out."""
    for extra in (SMALL_POWER, dict(method="smc", num_particles=4), dict(method="mcmc", block_size=4)):
        params = SamplingParams(max_tokens=10, seed=SEED, ignore_eos=True, **extra)
        probe = new_engine(model)
        probe.add_request([0, 3, 7], params)
        need = probe._waiting[0].need
        engine = new_engine(model, num_pages=need)
        outs = engine.run([[0, 3, 7], [0, 4, 7]], [params, params])
        assert [o.finish_reason for o in outs] == ["length", "length"], (extra, [o.error for o in outs])


def test_a_program_yields_its_forwards_and_frees_everything_when_closed(model):
    sampler = make_sampler("plain", model, seed=2, runner_options=dict(page_size=4, num_pages=64))
    program = sampler.program([[0, 3]], 3, (5,), stream=True)
    first = next(program)
    assert isinstance(first, Prefill) and first.prompts == [[0, 3]]
    loop = program.send(sampler.runner.prefill(first.prompts))
    # a one-row streaming loop yields itself whole (the engine batches it); run() gives its steps
    assert isinstance(loop, Loop) and loop.first_logits.shape[0] == 1 and loop.num_steps == 3
    assert loop.temperature == 1.0 and loop.eos_token_ids == (5,)
    steps = loop.run()
    sample = next(steps)
    assert isinstance(sample, Sample) and sample.logits.shape[0] == 1 and sample.counter == 0 and sample.stream
    assert sample.seed == loop.seed
    streamed = sample_all([sample])[0]
    assert streamed.tokens.shape == (1,) and bool(streamed.was_active[0])
    decode = steps.send(streamed)
    assert isinstance(decode, Decode) and len(decode.seqs) == 1 and int(decode.tokens[0]) == int(streamed.tokens[0])
    assert sampler.runner.cache.pages_in_use > 0
    steps.close()
    program.close()
    assert sampler.runner.cache.pages_in_use == 0


def test_seeds_past_63_bits_are_refused_not_folded():
    for bad in (-1, 2**63, 2**70):
        with pytest.raises(InvalidRequestError) as caught:
            SamplingParams(seed=bad)
        assert caught.value.field == "seed" and str(bad) in str(caught.value)
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.slow
def test_requests_the_engine_ends_still_count_their_tokens(model):
    """decoded_tokens covers every sampled token, and tokens_by_phase every ended request,
    whoever ended it (its EOS or a stop string streamed, a stop string in a block, an abort)."""
    tokenizer = CharTokenizer()
    engine = new_engine(model, tokenizer=tokenizer)
    [full] = engine.run(["adh"], SamplingParams(max_tokens=16, seed=SEED, ignore_eos=True))
    [cut] = engine.run(["adh"], SamplingParams(max_tokens=16, seed=SEED, ignore_eos=True, stop=[full.text[2:4]]))
    assert cut.finish_reason == "stop" and cut.decoded_tokens >= len(cut.token_ids) >= 1
    before = engine.stats().tokens_by_phase
    power = SamplingParams(max_tokens=12, seed=SEED, ignore_eos=True, **SMALL_POWER)
    [whole] = engine.run(["adh"], power)
    middle = len(whole.text) // 2
    assert len(whole.text) >= 2, (whole.token_ids, SEED)
    [stopped] = engine.run(["adh"], dataclasses.replace(power, stop=(whole.text[middle - 1 : middle + 1],)))
    after = engine.stats().tokens_by_phase
    assert stopped.finish_reason == "stop" and stopped.result is None
    assert after.get("stopped early", 0) - before.get("stopped early", 0) == stopped.decoded_tokens > 0
    assert after["prefill"] - before["prefill"] == 2 * 3  # both power requests' prompts
    request = engine.add_request("adh", SamplingParams(max_tokens=30, ignore_eos=True, **SMALL_POWER))
    engine.step()
    engine.step()
    engine.abort(request)
    assert engine.stats().tokens_by_phase["aborted"] > 0


def test_one_sampling_launch_per_forward_for_every_request(model, monkeypatch):
    """Plain, low-temperature and greedy requests (three temperatures, with and without
    EOS) share each step's ONE sampling launch: every step that ran a decode forward and
    no prefill launched the sampling op once, over all the rows of the forward; and each
    request still gets the tokens it gets alone."""
    from powerfast.samplers import sampling

    launches = []
    real = sampling.sample_rows
    monkeypatch.setattr(sampling, "sample_rows", lambda logits, **kw: launches.append(logits.shape[0]) or real(logits, **kw))
    params = [SamplingParams(method="plain", max_tokens=12, seed=SEED + 1, ignore_eos=True),
              SamplingParams(method="low-temp", max_tokens=12, seed=SEED + 2, ignore_eos=True),
              SamplingParams(method="greedy", max_tokens=12, seed=SEED + 3),
              SamplingParams(method="plain", temperature=1.5, max_tokens=12, seed=SEED + 4)]
    prompts = [[1, 2], [3], [4, 0, 2], [2, 2]]
    alone = [new_engine(model).run([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    launches.clear()
    engine = new_engine(model)
    for prompt, sp in zip(prompts, params):
        engine.add_request(prompt, sp)
    finals, decode_steps = {}, 0
    while engine.has_unfinished():
        before = len(launches)
        forwards_before = engine.stats().num_forwards
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.token_ids
        rows = sum(engine.last_step_rows.values())
        if engine.last_step_forwards == 1 and rows:  # a decode forward alone
            decode_steps += 1
            assert engine.last_step_sample_launches == 1 and len(launches) == before + 1
            assert launches[-1] == rows
        assert engine.stats().num_forwards - forwards_before == engine.last_step_forwards
    assert decode_steps >= 8
    assert [finals[k] for k in sorted(finals, key=lambda k: int(k.split("-")[1]))] == alone


@pytest.mark.parametrize("lookahead", [
    dict(num_rollouts=4, rollout_proposal="tempered", rollout_resample_every=2, rollout_groups=2),
    dict(num_rollouts=4, skip_share=0.95, rollouts_per_round=2, round_tolerance=0.05),
    dict(num_rollouts=2, entropy_cut=2.72),  # the tiny model's median next-token entropy: some blocks cut
], ids=["resampled", "adaptive", "entropy-cut"])
@pytest.mark.slow
def test_resampled_rollouts_run_through_the_engine_alone_and_together_and_free_everything(model, lookahead):
    """Power with resampled tempered rollouts (R = 2, 2 groups), or with adaptive budgets
    (skipped decisions, rollouts in rounds), is a request like any other: it gets the tokens
    it gets alone when it shares the steps with plain requests, an abort of one of them frees
    its pages, and nothing is left held at the end."""
    params = SamplingParams(method="power", max_tokens=9, seed=SEED + 5, ignore_eos=True, block_size=3,
                            num_candidates=4, top_k=2, horizon=5, **lookahead)
    [alone] = new_engine(model).run([[1, 2, 3]], params)
    blocks = alone.result.stats.blocks
    assert len(alone.token_ids) == 9 and sum(len(b.candidates[b.choice]) for b in blocks) == 9
    assert len(blocks) >= 3 if "entropy_cut" in lookahead else len(blocks) == 3  # cuts may make more decisions
    engine = new_engine(model)
    power_id = engine.add_request([1, 2, 3], params)
    doomed = engine.add_request([4], SamplingParams(method="plain", max_tokens=30, seed=1, ignore_eos=True))
    engine.add_request([2, 2], SamplingParams(method="plain", max_tokens=6, seed=2, ignore_eos=True))
    finals, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        if steps == 3:
            engine.abort(doomed)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[power_id].token_ids == alone.token_ids and finals[doomed].finish_reason == "abort"
    assert engine.cache.pages_in_use == 0 and engine.stats().kv_pages_reserved == 0

"""Device-to-host reads of every method through the engine, against a budget per method.

The reads are counted on the CPU by the counter of ``bench/engine_host.py``: it wraps
``Tensor.item / tolist / cpu / numpy / __bool__ / __int__ / __float__ / __index__`` (and
``.to("cpu")``) and keeps those a GPU run would make (not in code that runs only for CPU
tensors, not of tensors that would be on the host there). The budgets, stated in docs/python-api.md
("Device-to-host reads"), with B the block size, T the token budget, R the requests:

- plain, low-temp, greedy: one copy per engine step for all streaming requests together,
  plus one per request at its end (the sampler's result);
- best-of-n, sir: one copy per request at its end (sir draws its sample on the host from
  it), plus the all-finished check of the decode loop every 32 tokens;
- power: per request one NaN check of the prompt's logits, and per decision at most 3
  copies: the candidates, the rollouts, the estimate; with reused rollouts at most 4: the
  rollouts, the estimate, the reused candidates and their NaN check (plus the first
  decision's own candidates);
- mcmc: per request and block one copy, and one per MCMC step's proposal;
- smc: per request one NaN check of the prompt's logits and one copy per segment.
"""

from __future__ import annotations

import math

import pytest
from conftest import fresh_seed

from bench.engine_host import HostReadCounter, make_prompt, tiny_model
from powerfast.runtime.runner import ModelRunner
from powerfast.serving.engine import Engine
from powerfast.serving.params import SamplingParams

REQUESTS, TOKENS, BLOCK = 3, 16, 4
SETTINGS = dict(block_size=BLOCK, num_candidates=4, top_k=2, num_rollouts=2, horizon=4, mcmc_steps=2,
                num_particles=4, resample_every=8, num_samples=2)
DECISIONS = math.ceil(TOKENS / BLOCK)
BUDGETS = {  # reads of the whole run, as a function of its engine steps
    "plain": lambda steps: steps + REQUESTS,
    "low-temp": lambda steps: steps + REQUESTS,
    "greedy": lambda steps: steps + REQUESTS,
    "best-of-n": lambda steps: REQUESTS * (1 + TOKENS // 32),
    "sir": lambda steps: REQUESTS * (1 + TOKENS // 32),
    "power": lambda steps: REQUESTS * (1 + 3 * DECISIONS),
    "power-reuse": lambda steps: REQUESTS * (2 + 4 * DECISIONS),
    "mcmc": lambda steps: REQUESTS * DECISIONS * (1 + SETTINGS["mcmc_steps"]),
    "smc": lambda steps: REQUESTS * (1 + math.ceil(TOKENS / SETTINGS["resample_every"])),
}


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(tiny_model(), page_size=16, num_pages=1024)


@pytest.mark.parametrize("method", list(BUDGETS))
def test_device_to_host_reads_stay_within_the_methods_budget(runner, method, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")  # the torch ops: the counter sees their CPU-only code
    extra = {"reuse_rollouts": True} if method == "power-reuse" else {}
    params = SamplingParams(method=method.replace("-reuse", ""), ignore_eos=True, max_tokens=TOKENS,
                            seed=fresh_seed(), **SETTINGS, **extra)
    engine = Engine(runner, None)
    with HostReadCounter() as counter:
        finals = engine.run([make_prompt(i) for i in range(REQUESTS)], params)
    assert all(len(out.token_ids) == TOKENS for out in finals)
    reads = sum(counter.gpu_reads.values())
    budget = BUDGETS[method](engine.num_steps)
    print(f"{method}: {reads} reads in {engine.num_steps} steps (budget {budget}): {dict(counter.gpu_reads)}")
    assert 0 < reads <= budget, dict(counter.gpu_reads)


def test_the_counter_sees_reads_of_cpu_tensors(runner, monkeypatch):
    """The counter is not blind on the CPU: a ``.tolist()`` of the active rows per token,
    planted in the decode loop (code compiled under decoding.py's file name), shows up
    as one more read per step. (Best-of-2: a decode loop of two rows yields a Sample per
    step; a one-row plain loop is stepped by the engine itself.)"""
    import powerfast.samplers.decoding as decoding
    from bench import engine_host

    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    params = SamplingParams(method="best-of-n", num_samples=2, ignore_eos=True, max_tokens=8, seed=1)
    with HostReadCounter() as counter:
        Engine(runner, None).run([make_prompt(0)], params)
    clean = sum(counter.gpu_reads.values())
    namespace = {"Sample": decoding.Sample}
    exec(compile("def reading_sample(*args):\n    args[5].tolist()\n    return Sample(*args)\n",
                 engine_host.POWERFAST_DIR + "samplers/decoding.py", "exec"), namespace)
    monkeypatch.setattr(decoding, "Sample", namespace["reading_sample"])
    with HostReadCounter() as counter:
        Engine(runner, None).run([make_prompt(0)], params)
    assert sum(counter.gpu_reads.values()) == clean + 8
